"""Random and mutated packets never crash the engine or the server, and
well-formed queries keep getting answers (RFC 8906)."""

from __future__ import annotations

import random
import socket
import struct

import dns.message
import dns.query
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as stb

from dnsfront.answers import Engine

SEEDS = [
    dns.message.make_query("app.example.net", "A").to_wire(),
    dns.message.make_query("www.example.net", "AAAA", use_edns=0, want_dnssec=True).to_wire(),
    dns.message.make_query("near.example.net", "A", use_edns=0,
                           options=[dns.edns.ECSOption("198.51.100.0", 24)]).to_wire(),
    dns.message.make_query("example.net", "NS", use_edns=0, payload=4096).to_wire(),
    dns.message.make_query("nope.example.net", "CAA").to_wire(),
]

import dns.edns  # noqa: E402 - used above at import time through dns.message


def mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: overwrite, insert, delete, truncate."""
    buf = bytearray(data)
    for kind, pos, value in ops:
        if not buf:
            break
        pos %= len(buf)
        if kind == 0:
            buf[pos] = value
        elif kind == 1:
            buf.insert(pos, value)
        elif kind == 2:
            del buf[pos]
        else:
            del buf[pos:]
    return bytes(buf)


packets = stb.one_of(
    stb.binary(max_size=600),
    stb.builds(mutate, stb.sampled_from(SEEDS),
               stb.lists(stb.tuples(stb.integers(0, 3), stb.integers(0, 10_000), stb.integers(0, 255)),
                         min_size=1, max_size=6)),
    # A valid header in front of random bytes: the FORMERR path.
    stb.builds(lambda h, body: h + body,
               stb.builds(lambda i, f, qd, an, ns, ar: struct.pack("!HHHHHH", i, f & 0x7FFF, qd, an, ns, ar),
                          stb.integers(0, 65535), stb.integers(0, 65535), stb.integers(0, 3), stb.integers(0, 3),
                          stb.integers(0, 3), stb.integers(0, 3)),
               stb.binary(max_size=100)),
)


@pytest.fixture(scope="module")
def engine():
    from glb import config as configmod

    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location("dnsfront_conftest_fz", pathlib.Path(__file__).with_name("conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    e = Engine(configmod.loads(mod.config_text()), rng=random.Random(1))
    e.update(mod.all_up(), mod.NOW)
    return e


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(packet=packets, tcp=stb.booleans())
def test_engine_never_raises_and_answers_parse(engine, packet, tcp):
    out = engine.handle(packet, ("198.51.100.9", 5353), tcp)
    if out is None:
        return
    assert len(packet) >= 12 and not packet[2] & 0x80  # only headers we could read, never a response
    assert out[:2] == packet[:2]  # the ID is always echoed
    assert out[2] & 0x80  # QR set
    if not tcp:
        assert len(out) <= max(512, engine.udp_payload)
    assert not out[3] & 0xC0  # RA and Z never set
    opcode = (packet[2] >> 3) & 0xF
    if opcode:
        assert out[3] & 0xF in (1, 4) and (out[2] >> 3) & 0xF == opcode  # FORMERR or NOTIMP, opcode echoed
        return  # dnspython parses other opcodes' sections by their own rules
    dns.message.from_wire(out, ignore_trailing=False)
    assert engine.internal_errors == 0


def test_server_survives_garbage_and_keeps_answering(dnsfront):
    srv = dnsfront()
    rng = random.Random(11)
    good = dns.message.make_query("mail.example.net", "A")

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(batch=stb.lists(packets, min_size=1, max_size=8))
    def throw(batch):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for p in batch:
                s.sendto(p, ("127.0.0.1", srv.port))
        # Also over TCP, with a random framing now and then.
        if rng.random() < 0.2:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=2) as t:
                for p in batch:
                    t.sendall(struct.pack("!H", len(p)) + p)
        r = dns.query.udp(good, "127.0.0.1", port=srv.port, timeout=2)
        assert r.answer[0][0].address == "192.0.2.25"

    throw()
    assert srv.proc.poll() is None
    assert dns.query.tcp(good, "127.0.0.1", port=srv.port, timeout=2).answer
