"""The tc-BPF decapsulator and the userspace one held to one golden table.

Each row is a frame a real server may receive (scapy builds it) and what must
become of it: the inner packet handed to the stack, or a reason (a counter
name both decapsulators share). The BPF program runs on the frame through
BPF_PROG_TEST_RUN (director/dataplane/tc/glb_decap.bpf.c); the pure core of
the userspace decapsulator (director/realserver/decapsulate.py) on what its
raw socket would read. Rows about the outer packet alone (a fragment, a frame
for another MAC, not a tunnel) are the program's: the kernel deals with those
before a raw socket sees anything.

Needs root and BPF for the program's half: skipped otherwise, failed under CI=true.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import pytest

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers.inet import IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from director.realserver import bpfdecap  # noqa: E402
from director.realserver.decapsulate import DELIVER, REASONS, decapsulate, packed_vips  # noqa: E402
from tests.environment import require  # noqa: E402

VIPS = ("192.0.2.10", "2001:db8:10::10")
OTHER, OTHER6 = "192.0.2.99", "2001:db8:10::99"
CLIENT, CLIENT6 = "10.0.1.2", "fd00:1::2"
DIRECTOR, DIRECTOR6 = "10.0.2.2", "fd00:2::2"
RS, RS6 = "10.0.3.11", "fd00:3::11"
# BPF_PROG_TEST_RUN hands the frame to the stack of lo, whose MAC is all zeros: a frame for this host.
HOST_MAC, OTHER_MAC, SRC_MAC = "00:00:00:00:00:00", "02:00:00:00:00:99", "02:00:00:00:00:01"


def _tcp4(dst=VIPS[0], **kw):
    return IP(src=CLIENT, dst=dst, **kw) / TCP(sport=40000, dport=80, flags="A") / Raw(b"hello")


def _tcp6(dst=VIPS[1], **kw):
    return IPv6(src=CLIENT6, dst=dst, **kw) / TCP(sport=40000, dport=80, flags="A") / Raw(b"hello")


def _out4(inner, **kw):
    return IP(src=DIRECTOR, dst=RS, **kw) / inner


def _out6(inner, **kw):
    return IPv6(src=DIRECTOR6, dst=RS6, **kw) / inner


def _truncated4() -> bytes:
    """An inner IPv4 header that claims 20 bytes more than the tunnel carries."""
    b = bytearray(bytes(_tcp4()))
    b[2:4] = (len(b) + 20).to_bytes(2, "big")
    b[10:12] = b"\0\0"
    b[10:12] = _checksum(bytes(b[:20])).to_bytes(2, "big")
    return bytes(b)


def _checksum(header: bytes) -> int:
    s = sum(int.from_bytes(header[i:i + 2], "big") for i in range(0, len(header), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _bad_checksum4() -> bytes:
    b = bytearray(bytes(_tcp4()))
    b[10] ^= 0x55
    return bytes(b)


class Row(NamedTuple):
    name: str
    outer: object
    """The outer packet (scapy, from the IP header on)."""
    expect: str
    """``delivered`` or a counter name; ``untouched``: not a tunnel for this host, passed on and not counted."""
    inner: bytes | None = None
    """``delivered``: the inner packet the stack must get."""
    mac: str = HOST_MAC
    userspace: bool = True
    """Also through decapsulate.py (False: the kernel handles this before a raw socket reads it)."""


def _rows() -> list[Row]:
    rows = []
    for name, inner in (("v4-in-v4", _tcp4()), ("v6-in-v4", _tcp6())):
        rows.append(Row(name, _out4(inner), "delivered", bytes(inner)))
    for name, inner in (("v4-in-v6", _tcp4()), ("v6-in-v6", _tcp6())):
        rows.append(Row(name, _out6(inner), "delivered", bytes(inner)))
    udp = IP(src=CLIENT, dst=VIPS[0], options=b"\x01\x01\x01\x00") / UDP(sport=5000, dport=53) / Raw(b"q" * 30)
    rows += [
        Row("v4-in-v4 inner IPv4 options, UDP", _out4(udp), "delivered", bytes(udp)),
        Row("v4-in-v4 outer IPv4 options", _out4(_tcp4(), options=b"\x01\x01\x01\x00"), "delivered", bytes(_tcp4())),
        Row("v4-in-v4 not a VIP", _out4(_tcp4(dst=OTHER)), "dropped_not_vip"),
        Row("v6-in-v6 not a VIP", _out6(_tcp6(dst=OTHER6)), "dropped_not_vip"),
        Row("v4-in-v6 not a VIP", _out6(_tcp4(dst=OTHER)), "dropped_not_vip"),
        Row("nested v4-in-v4-in-v4", _out4(IP(src=CLIENT, dst=VIPS[0]) / _tcp4(dst="10.9.9.9")), "dropped_nested_tunnel"),
        Row("nested v6-in-v6-in-v4", _out4(IPv6(src=CLIENT6, dst=VIPS[1]) / _tcp6()), "dropped_nested_tunnel"),
        Row("truncated inner IPv4", _out4(Raw(_truncated4()), proto=4), "dropped_truncated"),
        Row("truncated inner IPv4 header", _out4(Raw(bytes(_tcp4())[:12]), proto=4), "dropped_truncated"),
        Row("truncated inner IPv6", _out6(Raw(bytes(_tcp6())[:50]), nh=41), "dropped_truncated"),
        Row("inner IPv4 bad checksum", _out4(Raw(_bad_checksum4()), proto=4), "dropped_bad_checksum"),
        Row("IPv6 inside protocol 4", _out4(Raw(bytes(_tcp6())), proto=4), "dropped_bad_header"),
        Row("IPv4 inside protocol 41", _out6(Raw(bytes(_tcp4())), nh=41), "dropped_bad_header"),
        Row("inner IPv6 payload length 0", _out4(Raw(b"\x60" + bytes(39)), proto=41), "dropped_bad_header"),
        Row("fragment of the outer packet", _out4(_tcp4(), flags="MF"), "outer_fragment", userspace=False),
        Row("last fragment of the outer packet", _out4(_tcp4(), frag=8), "outer_fragment", userspace=False),
        Row("outer IPv4 bad checksum", _out4(_tcp4(), chksum=0x1234), "dropped_bad_checksum", userspace=False),
        Row("outer IPv4 longer than the frame", _out4(_tcp4(), len=200), "dropped_truncated", userspace=False),
        Row("a frame for another MAC", _out4(_tcp4()), "untouched", mac=OTHER_MAC, userspace=False),
        Row("not a tunnel: TCP to the VIP", _tcp4(), "untouched", userspace=False),
        Row("not a tunnel: IPv6 TCP to the VIP", _tcp6(), "untouched", userspace=False),
    ]
    return rows


ROWS = _rows()


def _frame(row: Row) -> bytes:
    return bytes(Ether(dst=row.mac, src=SRC_MAC) / row.outer)


@pytest.fixture(scope="module")
def program():
    require("needs root (loading a BPF program)" if os.geteuid() != 0 else None, bpfdecap.probe())
    loaded = bpfdecap.Loaded(VIPS)
    yield loaded
    loaded.close()


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_the_bpf_program(program, row):
    frame = _frame(row)
    before = program.counters()
    rc, out = program.bpf.test_run(frame)
    after = program.counters()
    assert rc == 0  # TC_ACT_OK: the program never drops, it unwraps or passes on
    counted = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    if row.expect == "untouched":
        assert out == frame and counted == {}
        return
    assert counted == {"received": 1, row.expect: 1}
    if row.expect == "delivered":
        ether_type = 0x0800 if row.inner[0] >> 4 == 4 else 0x86DD
        assert out == bytes(Ether(dst=row.mac, src=SRC_MAC, type=ether_type)) + row.inner
    else:
        assert out == frame


USERSPACE = [r for r in ROWS if r.userspace]
_CODES = {"delivered": DELIVER, **{f"dropped_{name}": code for code, name in REASONS.items()}}


@pytest.mark.parametrize("row", USERSPACE, ids=[r.name for r in USERSPACE])
def test_the_userspace_decapsulator(row):
    """What an AF_INET raw socket reads starts at the outer IPv4 header; an AF_INET6 one at the inner packet."""
    outer = bytes(row.outer)
    v4 = outer[0] >> 4 == 4
    proto = outer[9] if v4 else outer[6]
    buf = outer if v4 else outer[40:]
    verdict = decapsulate(buf, len(buf), v4, proto, *packed_vips(VIPS))
    assert verdict.reason == _CODES[row.expect]
    if row.expect == "delivered":
        assert bytes(buf[verdict.start:verdict.end]) == row.inner


def test_both_count_by_the_same_names():
    assert {f"dropped_{n}" for n in REASONS.values()} - set(bpfdecap.COUNTERS.values()) == {"dropped_tun_write_error"}
