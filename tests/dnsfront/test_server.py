"""dnsfront as a real process, queried with dnspython over real UDP and TCP.

One table row per behaviour of issue 3 part A: query -> expected rcode, flags
and sections. Every row runs over UDP and over TCP.
"""

from __future__ import annotations

import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from tests.waiting import until
from tests.environment import ipv6_loopback_unavailable, needs

AA, RD, RA, TC, CD = dns.flags.AA, dns.flags.RD, dns.flags.RA, dns.flags.TC, dns.flags.CD


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Module-scoped: one process for the whole table (the per-test factory is for the rest).
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location("dnsfront_conftest", pathlib.Path(__file__).with_name("conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    port, status_port = mod.free_port(), mod.free_port()
    path = tmp_path_factory.mktemp("dnsfront") / "glb.yaml"
    path.write_text(mod.config_text(port=port, status_port=status_port))
    p = mod.DNSFrontProcess(path, port, status_port)
    try:
        p.wait_ready()
        yield p
    finally:
        p.stop()


def q(name: str, rtype: str = "A", **kw) -> dns.message.Message:
    return dns.message.make_query(name, rtype, **kw)


def with_flags(m: dns.message.Message, flags: int) -> dns.message.Message:
    m.flags = flags
    return m


def with_opcode(m: dns.message.Message, opcode: int) -> dns.message.Message:
    m.set_opcode(opcode)
    return m


@dataclass
class Case:
    id: str
    query: Callable[[], dns.message.Message]
    rcode: int = dns.rcode.NOERROR
    flags_set: int = AA
    flags_clear: int = RA
    answer: int | None = None
    """Number of RRs in the answer section (None: don't check)."""
    soa_ttl: int | None = None
    """Expect an SOA in authority with this TTL."""
    edns: bool | None = None
    check: Callable[[dns.message.Message], None] | None = None
    udp_only: bool = False
    tcp_check: Callable[[dns.message.Message], None] | None = None


def _ans(m, rtype):
    return [r for rr in m.answer if rr.rdtype == rtype for r in rr]


CASES = [
    # This server's Redis is unreachable, so it has no state: the degraded TTL (5), not the full one (20).
    Case("lb-answer-without-state", lambda: q("app.example.net"), answer=1,
         check=lambda m: m.answer[0].ttl == 5 or pytest.fail(f"ttl {m.answer[0].ttl}, expected degraded_ttl 5")),
    Case("rd-copied", lambda: with_flags(q("app.example.net"), RD), flags_set=AA | RD),
    Case("rd-not-set", lambda: with_flags(q("app.example.net"), 0), flags_clear=RA | RD),
    Case("cd-copied", lambda: with_flags(q("mail.example.net"), CD), flags_set=AA | CD),
    Case("z-bit-not-echoed", lambda: with_flags(q("mail.example.net"), 0x0040 | RD), flags_clear=RA | 0x0040),
    Case("nxdomain-with-soa", lambda: q("nope.example.net"), rcode=dns.rcode.NXDOMAIN, answer=0, soa_ttl=30),
    Case("nodata-with-soa", lambda: q("mail.example.net", "TXT"), answer=0, soa_ttl=30),
    Case("empty-non-terminal", lambda: q("sub.example.net"), answer=0, soa_ttl=30),
    Case("unknown-type-nodata", lambda: q("mail.example.net", "TYPE65280"), answer=0, soa_ttl=30),
    Case("lb-name-other-type-nodata", lambda: q("app.example.net", "MX"), answer=0, soa_ttl=30),
    Case("refused-out-of-zone", lambda: q("example.org"), rcode=dns.rcode.REFUSED, flags_set=0, flags_clear=AA | RA, answer=0),
    Case("refused-chaos", lambda: q("version.bind", "TXT", rdclass=dns.rdataclass.CH),
         rcode=dns.rcode.REFUSED, flags_set=0, flags_clear=AA | RA),
    Case("refused-axfr", lambda: q("example.net", "AXFR"), rcode=dns.rcode.REFUSED, flags_set=0, flags_clear=AA | RA),
    Case("no-opt-without-edns", lambda: q("mail.example.net"), edns=False),
    Case("opt-with-edns", lambda: q("mail.example.net", use_edns=0), edns=True,
         check=lambda m: m.payload == 1232 or pytest.fail("payload")),
    Case("badvers", lambda: q("mail.example.net", use_edns=1), rcode=dns.rcode.BADVERS, flags_set=0, flags_clear=AA | RA,
         edns=True, answer=0, check=lambda m: m.edns == 0 or pytest.fail("version")),
    Case("unknown-option-ignored", lambda: q("mail.example.net", use_edns=0,
                                            options=[dns.edns.GenericOption(65100, b"xyz")]), answer=1, edns=True),
    Case("truncated-no-edns", lambda: q("big.example.net"), flags_set=AA | TC, answer=0, edns=False, udp_only=True),
    Case("truncated-keeps-opt", lambda: q("big.example.net", use_edns=0, payload=512), flags_set=AA | TC,
         answer=0, edns=True, udp_only=True),
    Case("big-fits-edns", lambda: q("big.example.net", use_edns=0, payload=4096), answer=40, edns=True),
    Case("big-over-tcp", lambda: q("big.example.net"), answer=None,
         tcp_check=lambda m: len(m.answer[0]) == 40 or pytest.fail("tcp answer")),
    Case("notimp-opcode", lambda: with_opcode(q("mail.example.net"), dns.opcode.IQUERY), rcode=dns.rcode.NOTIMP,
         flags_set=0, flags_clear=AA | RA),
    Case("case-echoed", lambda: q("MaIl.ExAmPlE.NeT"), answer=1,
         check=lambda m: m.question[0].name.to_text() == "MaIl.ExAmPlE.NeT." or pytest.fail("case")),
    Case("any-minimal", lambda: q("example.net", "ANY"), check=lambda m: len(m.answer) == 1 or pytest.fail("any")),
    Case("any-at-lb-name", lambda: q("app.example.net", "ANY"), answer=1),
    Case("cname-chain", lambda: q("www.example.net"),
         check=lambda m: [r.rdtype for r in m.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A] or pytest.fail("chain")),
    Case("ns-with-glue", lambda: q("example.net", "NS"), answer=2,
         check=lambda m: {r.rdtype for r in m.additional} == {dns.rdatatype.A, dns.rdatatype.AAAA} or pytest.fail("glue")),
    Case("static-types", lambda: q("_http._tcp.app.example.net", "SRV"), answer=1),
    Case("caa", lambda: q("example.net", "CAA"), answer=1),
    Case("txt", lambda: q("example.net", "TXT"), answer=1),
    Case("aaaa", lambda: q("mail.example.net", "AAAA"), answer=1),
    Case("wildcard", lambda: q("x.wild.example.net"), answer=1),
    Case("ecs-scope-topology", lambda: q("near.example.net", use_edns=0,
                                         options=[dns.edns.ECSOption("10.9.4.0", 24)]), answer=1,
         check=lambda m: ([(o.srclen, o.scopelen) for o in m.options] == [(24, 16)] and
                          m.answer[0][0].address == "192.0.2.30") or pytest.fail("ecs")),
    Case("ecs-malformed-formerr", lambda: q("near.example.net", use_edns=0,
                                            options=[dns.edns.GenericOption(8, b"\x00\x01\x18\x00\x01")]),
         rcode=dns.rcode.FORMERR, flags_set=0, flags_clear=AA | RA),
    Case("do-bit-copied", lambda: q("mail.example.net", want_dnssec=True), edns=True,
         check=lambda m: bool(m.ednsflags & dns.flags.DO) or pytest.fail("DO")),
]


def exchange(m: dns.message.Message, server, tcp: bool) -> dns.message.Message:
    fn = dns.query.tcp if tcp else dns.query.udp
    return fn(m, "127.0.0.1", port=server.port, timeout=2, ignore_trailing=False)


# UDP-only cases (truncation ...) have no TCP variant: nothing to skip.
@pytest.mark.parametrize(("case", "transport"),
                         [(c, t) for t in ("udp", "tcp") for c in CASES if not (c.udp_only and t == "tcp")],
                         ids=lambda v: v if isinstance(v, str) else v.id)
def test_behaviour_table(server, case: Case, transport: str):
    tcp = transport == "tcp"
    query = case.query()
    r = exchange(query, server, tcp)
    assert r.id == query.id
    assert r.rcode() == case.rcode, dns.rcode.to_text(r.rcode())
    assert r.flags & dns.flags.QR
    assert r.flags & case.flags_set == case.flags_set, dns.flags.to_text(r.flags)
    assert not r.flags & case.flags_clear, dns.flags.to_text(r.flags)
    if case.answer is not None and not (tcp and case.tcp_check):
        assert sum(len(rr) for rr in r.answer) == case.answer
    if case.soa_ttl is not None:
        assert [rr.rdtype for rr in r.authority] == [dns.rdatatype.SOA]
        assert r.authority[0].ttl == case.soa_ttl
    if case.edns is not None:
        assert (r.edns >= 0) == case.edns
    if case.check:
        case.check(r)
    if tcp and case.tcp_check:
        case.tcp_check(r)


# ---------------------------------------------------------------------------
# Raw packets: things dnspython will not build


def udp_raw(server, payload: bytes, timeout: float = 1.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(payload, ("127.0.0.1", server.port))
        try:
            return s.recv(65535)
        except socket.timeout:
            return None


def test_two_opts_is_formerr(server):
    m = q("mail.example.net", use_edns=0).to_wire()
    opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
    bad = m[:10] + b"\x00\x02" + m[12:] + opt
    r = dns.message.from_wire(udp_raw(server, bad))
    assert r.rcode() == dns.rcode.FORMERR and r.edns == 0


def test_qdcount_zero_is_formerr(server):
    r = dns.message.from_wire(udp_raw(server, struct.pack("!HHHHHH", 77, 0x0100, 0, 0, 0, 0)))
    assert r.id == 77 and r.rcode() == dns.rcode.FORMERR and r.flags & RD


def test_garbage_after_header_is_formerr(server):
    out = udp_raw(server, struct.pack("!HHHHHH", 78, 0, 1, 0, 0, 0) + b"\x05ab")
    r = dns.message.from_wire(out)
    assert r.id == 78 and r.rcode() == dns.rcode.FORMERR


def test_short_packet_and_responses_are_dropped_and_server_lives(server):
    assert udp_raw(server, b"\x01\x02\x03", timeout=0.3) is None
    resp = q("mail.example.net").to_wire()
    resp = resp[:2] + bytes((resp[2] | 0x80,)) + resp[3:]  # QR=1: a response
    assert udp_raw(server, resp, timeout=0.3) is None
    assert exchange(q("mail.example.net"), server, False).rcode() == dns.rcode.NOERROR


# ---------------------------------------------------------------------------
# TCP (RFC 7766)


def tcp_connect(server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=3)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_msg(s: socket.socket) -> dns.message.Message:
    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise EOFError("closed")
            buf += chunk
        return buf

    (n,) = struct.unpack("!H", exact(2))
    return dns.message.from_wire(exact(n))


def framed(m: dns.message.Message) -> bytes:
    w = m.to_wire()
    return struct.pack("!H", len(w)) + w


def test_tcp_pipelining(server):
    queries = [q(n) for n in ("mail.example.net", "app.example.net", "nope.example.net", "www.example.net")]
    with tcp_connect(server) as s:
        s.sendall(b"".join(framed(m) for m in queries))
        got = [read_msg(s) for _ in queries]
    assert [r.id for r in got] == [m.id for m in queries]
    assert got[2].rcode() == dns.rcode.NXDOMAIN


def test_tcp_length_prefix_split_across_segments(server):
    m = q("mail.example.net")
    data = framed(m)
    with tcp_connect(server) as s:
        for piece in (data[:1], data[1:2], data[2:7], data[7:]):
            s.sendall(piece)
            time.sleep(0.05)
        r = read_msg(s)
    assert r.id == m.id and r.answer


def test_tcp_idle_timeout_and_connection_cap(dnsfront):
    import json
    import urllib.request

    srv = dnsfront(idle=0.5, max_conns=2)

    def tcp_counters() -> dict:
        c = json.load(urllib.request.urlopen(f"http://127.0.0.1:{srv.status_port}/status", timeout=3))["counters"]
        return {k: c[k] for k in ("tcp_open", "tcp_refused", "tcp_idle_closed")}

    a, b = tcp_connect(srv), tcp_connect(srv)
    try:
        until(lambda: tcp_counters()["tcp_open"] == 2, "the server to hold both connections", timeout=5)
        with tcp_connect(srv) as c:  # over the cap: closed at once
            c.settimeout(2)
            try:
                c.sendall(framed(q("mail.example.net")))
                assert c.recv(10) == b""
            except (ConnectionResetError, BrokenPipeError):
                pass
        a.sendall(framed(q("mail.example.net")))
        assert read_msg(a).answer
        start = time.monotonic()
        b.settimeout(3)
        assert b.recv(10) == b""  # idle connection closed by the server
        assert time.monotonic() - start < 2.0
        counters = tcp_counters()  # (a may have gone idle by now too)
        assert counters["tcp_refused"] == 1 and counters["tcp_idle_closed"] >= 1, counters
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------
# Status endpoints


def test_status_endpoints(server):
    import json
    import urllib.request

    base = f"http://127.0.0.1:{server.status_port}"
    assert urllib.request.urlopen(base + "/healthz", timeout=3).status == 200
    exchange(q("app.example.net"), server, False)
    status = json.load(urllib.request.urlopen(base + "/status", timeout=3))
    names = {n["name"]: n for n in status["names"]}
    assert "no Redis state" in names["app.example.net."]["ipv4"]["reason"]
    assert status["redis"][0]["connected"] is False
    metrics = urllib.request.urlopen(base + "/metrics", timeout=3).read().decode()
    assert 'dnsfront_responses_total{qtype="A",rcode="NOERROR"}' in metrics
    assert "dnsfront_answers_total{" in metrics
    assert "dnsfront_state_age_seconds" in metrics
    assert "dnsfront_rebuilds_total 1.0" in metrics  # the start: every name, from configured weights
    for family in ("dnsfront_rebuild_names", "dnsfront_rebuild_seconds", "dnsfront_change_to_answer_seconds"):
        assert f"{family}_bucket{{le=\"+Inf\"}}" in metrics and f"{family}_sum" in metrics


# ---------------------------------------------------------------------------
# Distributions over the wire (no Redis: configured weights)


def test_weighted_distribution_over_udp(server):
    c = Counter()
    m = q("app.example.net")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        for _ in range(2000):
            s.sendto(m.to_wire(), ("127.0.0.1", server.port))
            c[dns.message.from_wire(s.recv(2048)).answer[0][0].address] += 1
    # weights 300:100 -> 75 % dc1; 2000 draws: sd ~1 %, bound at ~5 sd
    assert c["192.0.2.10"] / 2000 == pytest.approx(0.75, abs=0.05)


def test_topology_by_ecs_over_udp(server):
    for subnet, bits, vip in (("198.51.100.0", 24, "192.0.2.10"), ("203.0.113.0", 24, "192.0.2.20"),
                              ("10.9.0.0", 16, "192.0.2.30")):
        for _ in range(20):
            r = exchange(q("near.example.net", use_edns=0, options=[dns.edns.ECSOption(subnet, bits)]), server, False)
            assert r.answer[0][0].address == vip


# ---------------------------------------------------------------------------
# Lifecycle


def test_sighup_reload_and_sigterm_exit(dnsfront):
    import signal
    import threading

    srv = dnsfront()
    # Keep querying during the reload: not one query may go unanswered.
    failures, answered, stop = [], [0], threading.Event()

    def hammer() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1.0)
            while not stop.is_set():
                m = q("app.example.net")
                s.sendto(m.to_wire(), ("127.0.0.1", srv.port))
                try:
                    if dns.message.from_wire(s.recv(2048)).id == m.id:
                        answered[0] += 1
                except socket.timeout:
                    failures.append(m.id)

    def reload_outcomes() -> tuple[int, int]:
        text = srv.log.read_text()
        return text.count("reloaded "), text.count("reload failed, keeping the running config")

    t = threading.Thread(target=hammer)
    t.start()
    try:
        until(lambda: answered[0] > 0, "the first answers", timeout=5)
        text = srv.path.read_text().replace("192.0.2.25", "192.0.2.26")
        srv.path.write_text(text)
        srv.proc.send_signal(signal.SIGHUP)
        until(lambda: exchange(q("mail.example.net"), srv, False).answer[0][0].address == "192.0.2.26",
              "the reload to take effect", timeout=5)
        during = answered[0]
        until(lambda: answered[0] > during + 50, "answers after the reload", timeout=5)  # still served, none lost
    finally:
        stop.set()
        t.join(5)
    assert failures == []
    assert reload_outcomes() == (1, 0)
    # A broken file is refused (the process says so) and the old config keeps serving.
    srv.path.write_text("zones: [")
    srv.proc.send_signal(signal.SIGHUP)
    until(lambda: reload_outcomes() == (1, 1), "the broken file's reload to be refused", timeout=5)
    assert exchange(q("mail.example.net"), srv, False).answer[0][0].address == "192.0.2.26"
    assert srv.stop() == 0


def _exited(pid: int) -> bool:
    """True once ``pid`` has exited (its files are closed), reaped or not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_workers_share_the_port(dnsfront):
    srv = dnsfront(workers=2)
    for _ in range(50):
        assert exchange(q("mail.example.net"), srv, False).answer
    import json
    import urllib.request

    deadline = time.monotonic() + 10
    status = {"workers": 0}
    while time.monotonic() < deadline:
        try:  # the supervisor serves status once every worker reported ready
            status = json.load(urllib.request.urlopen(f"http://127.0.0.1:{srv.status_port}/status", timeout=3))
        except OSError:
            pass
        if status["workers"] == 2:
            break
        time.sleep(0.2)
    assert status["workers"] == 2
    pids = {r["pid"] for r in status["redis"]}
    assert len(pids) == 2
    # A worker that dies is replaced; DNS keeps answering meanwhile.
    import os
    import signal

    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)
    # A datagram the kernel queued on the victim's socket before the process
    # finished exiting dies with it: no server can answer that one. What must
    # hold is that once its sockets are closed (dead or zombie), the
    # remaining worker answers everything while the replacement starts.
    deadline = time.monotonic() + 10
    while not _exited(victim) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _exited(victim)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert exchange(q("mail.example.net"), srv, False).answer
        try:
            status = json.load(urllib.request.urlopen(f"http://127.0.0.1:{srv.status_port}/status", timeout=3))
        except OSError:
            continue
        now_pids = {r["pid"] for r in status["redis"]}
        if len(now_pids) == 2 and victim not in now_pids:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"worker {victim} was not replaced: {status}")
    assert srv.stop() == 0


def test_second_instance_on_the_same_port_is_refused(server):
    from glb.errors import DNSFrontError

    from dnsfront.main import run

    with pytest.raises(DNSFrontError, match=r"cannot listen on 127\.0\.0\.1:\d+/udp: Address already in use"):
        run(str(server.path))
    assert exchange(q("mail.example.net"), server, False).answer  # the first one is untouched


def test_bad_config_is_one_line_error(tmp_path, text_config):
    # As an operator meets it: `glb dnsfront` with a config that has one mistake.
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text(text_config().replace("policy: weighted", "policy: weighed"))
    r = subprocess.run([sys.executable, "-m", "glb.cli", "dnsfront", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (1, ""), r
    assert r.stderr.splitlines() == [
        f"{bad}: names[app.example.net].policy: unknown policy 'weighed' (expected one of weighted, failover, topology, sticky)",
    ]


@needs(ipv6_loopback_unavailable())
def test_ipv6_listen_udp_and_tcp(dnsfront):
    srv = dnsfront(ipv6=True)
    for fn in (dns.query.udp, dns.query.tcp):
        r = fn(q("mail.example.net", "AAAA"), "::1", port=srv.port, timeout=2)
        assert r.answer[0][0].address == "2001:db8::25"


# ---------------------------------------------------------------------------
# The supervisor of several workers


def status_of(srv) -> dict:
    """The supervisor's /status, or {"workers": 0} while it does not serve it yet."""
    import json
    import urllib.request

    try:
        return json.load(urllib.request.urlopen(f"http://127.0.0.1:{srv.status_port}/status", timeout=3))
    except OSError:
        return {"workers": 0}


def worker_pids(srv, n: int, timeout: float = 20.0) -> set[int]:
    """The PIDs of the supervisor's ``n`` workers, once all of them report."""
    deadline = time.monotonic() + timeout
    while (status := status_of(srv))["workers"] != n:
        if time.monotonic() > deadline:
            pytest.fail(f"{n} workers never reported: {status}")
        time.sleep(0.1)
    return {r["pid"] for r in status["redis"]}


def wait_exited(pids, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(_exited(p) for p in pids):
        if time.monotonic() > deadline:
            pytest.fail(f"still running: {[p for p in pids if not _exited(p)]}")
        time.sleep(0.05)


def test_sighup_reaches_every_worker(dnsfront):
    import re
    import signal

    srv = dnsfront(workers=3)
    pids = worker_pids(srv, 3)
    srv.path.write_text(srv.path.read_text().replace("192.0.2.25", "192.0.2.26"))
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while (reloaded := set(re.findall(r"\[w(\d)\]: reloaded ", srv.log.read_text()))) != {"0", "1", "2"}:
        if time.monotonic() > deadline:
            pytest.fail(f"only workers {sorted(reloaded)} reloaded:\n{srv.log.read_text()[-3000:]}")
        time.sleep(0.05)
    # Whichever worker the kernel hands a query to (by source port) answers from the new file.
    for _ in range(60):
        assert exchange(q("mail.example.net"), srv, False).answer[0][0].address == "192.0.2.26"
    assert worker_pids(srv, 3) == pids  # reloaded in place, none restarted
    assert srv.stop() == 0


def test_workers_exit_when_the_supervisor_is_killed(dnsfront):
    import os
    import signal

    srv = dnsfront(workers=2)
    pids = worker_pids(srv, 2)
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(10)
    wait_exited(pids)  # no orphan keeps answering on the port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", srv.port))  # nothing holds it any more


def test_the_crash_loop_limit_gives_up_with_exit_1(dnsfront):
    import os
    import signal

    srv = dnsfront(workers=2)
    pids = worker_pids(srv, 2)
    # The file breaks behind the supervisor's back: every worker it starts from now on fails to.
    srv.path.write_text("zones: [\n")
    os.kill(min(pids), signal.SIGKILL)
    assert srv.proc.wait(90) == 1
    log = srv.log.read_text()
    assert "workers keep dying (more than 10 exits in 60s); not restarting them" in log
    # The killed one, then each failed start with its exit code and why; the 11th death ends it.
    assert log.count(" exited with code -9; restarting it") == 1
    assert log.count(f" exited with code 1 ({srv.path}:2:1: YAML syntax error") == 9
    wait_exited(pids)  # the healthy worker is stopped too
    assert "Traceback" not in log



def test_a_workers_startup_error_is_the_supervisors_one_line_error(tmp_path, text_config):
    """The config file broke between the supervisor's read and the workers' (an edit during start-up):
    the supervisor fails with the worker's reason, which `glb dnsfront` prints as one line and exits 1."""
    import asyncio

    from glb import config as configmod
    from glb.errors import DNSFrontError
    from tests.ports import free_port

    from dnsfront.main import _supervise

    good, broken = tmp_path / "good.yaml", tmp_path / "broken.yaml"
    good.write_text(text_config(port=free_port(), status_port=free_port()))
    broken.write_text("zones: [\n")
    with pytest.raises(DNSFrontError) as info:
        asyncio.run(_supervise(str(broken), configmod.load(good), 2, "info"))
    assert str(info.value) == f"{broken}:2:1: YAML syntax error: expected the node content, but found '<stream end>'"
