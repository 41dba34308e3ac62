"""dnsfront under attack, as a real process: RRL over UDP (never TCP), DNS
cookies shared by the workers, the per-source TCP cap, and their counters."""

from __future__ import annotations

import json
import socket
import urllib.request

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode

from tests.waiting import until

RRL = "  rrl: {enabled: true, responses_per_second: 1, window: 5, slip: 2}\n"


def status_counters(srv) -> dict:
    return json.load(urllib.request.urlopen(f"http://127.0.0.1:{srv.status_port}/status", timeout=3))["counters"]


def metrics(srv) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{srv.status_port}/metrics", timeout=3).read().decode()


def udp_burst(srv, n: int, message: dns.message.Message) -> list[dns.message.Message | None]:
    """Send ``n`` copies, then collect what comes back (None: nothing)."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        for _ in range(n):
            s.sendto(message.to_wire(), ("127.0.0.1", srv.port))
        for _ in range(n):
            try:
                out.append(dns.message.from_wire(s.recv(65535)))
            except socket.timeout:
                break
    return out + [None] * (n - len(out))


def test_rrl_limits_udp_slips_tc_and_leaves_tcp_alone(dnsfront):
    srv = dnsfront(dnsfront_extra=RRL)
    m = dns.message.make_query("mail.example.net", "A")
    got = udp_burst(srv, 40, m)
    full = [r for r in got if r is not None and not r.flags & dns.flags.TC]
    tc = [r for r in got if r is not None and r.flags & dns.flags.TC]
    assert 1 <= len(full) < 40 and tc, (len(full), len(tc))
    assert all(not r.answer and r.question for r in tc)
    # TCP is never limited: the same name, same source, right after.
    for _ in range(10):
        assert dns.query.tcp(m, "127.0.0.1", port=srv.port, timeout=3).answer
    c = status_counters(srv)
    assert c["rrl_limited"] == 40 - len(full) and c["rrl_slipped"] == len(tc)
    text = metrics(srv)
    assert f"dnsfront_rrl_limited_total {float(c['rrl_limited'])}" in text
    assert f"dnsfront_rrl_slipped_total {float(len(tc))}" in text


def test_valid_server_cookie_is_exempt_from_rrl(dnsfront):
    srv = dnsfront(dnsfront_extra=RRL)
    client = b"\x42" * 8
    first = dns.query.tcp(dns.message.make_query("app.example.net", "A", use_edns=0,
                                                 options=[dns.edns.GenericOption(10, client)]),
                          "127.0.0.1", port=srv.port, timeout=3)
    cookie = next(o for o in first.options if o.otype == 10).to_wire()
    assert cookie[:8] == client and len(cookie) == 24
    m = dns.message.make_query("app.example.net", "A", use_edns=0, options=[dns.edns.GenericOption(10, cookie)])
    got = udp_burst(srv, 20, m)
    assert all(r is not None and r.answer and not r.flags & dns.flags.TC for r in got)
    assert status_counters(srv)["rrl_exempt_cookie"] >= 18
    # A client cookie alone proves nothing: limited, slipped as BADCOOKIE with a new server cookie.
    m = dns.message.make_query("app.example.net", "A", use_edns=0, options=[dns.edns.GenericOption(10, client)])
    got = udp_burst(srv, 20, m)
    bad = [r for r in got if r is not None and r.rcode() == dns.rcode.BADCOOKIE]
    assert bad and all(next(o for o in r.options if o.otype == 10).to_wire()[:8] == client for r in bad)


def test_workers_share_the_cookie_secret(dnsfront):
    srv = dnsfront(workers=2)
    client = b"\x07" * 8
    m = dns.message.make_query("mail.example.net", "A", use_edns=0, options=[dns.edns.GenericOption(10, client)])
    cookie = next(o for o in dns.query.udp(m, "127.0.0.1", port=srv.port, timeout=3).options if o.otype == 10)
    full = cookie.to_wire()
    m = dns.message.make_query("mail.example.net", "A", use_edns=0, options=[dns.edns.GenericOption(10, full)])
    pids = set()
    for _ in range(30):  # a new source port each time: SO_REUSEPORT spreads them over both workers
        r = dns.query.udp(m, "127.0.0.1", port=srv.port, timeout=3)
        # A valid, young server cookie comes back unchanged; an invalid one would be replaced.
        assert next(o for o in r.options if o.otype == 10).to_wire() == full
    until(lambda: len(json.load(urllib.request.urlopen(
        f"http://127.0.0.1:{srv.status_port}/status", timeout=3))["redis"]) == 2, "both workers to report", timeout=10)
    for w in json.load(urllib.request.urlopen(f"http://127.0.0.1:{srv.status_port}/status", timeout=3))["redis"]:
        pids.add(w["pid"])
    assert len(pids) == 2


def test_tcp_per_source_cap(dnsfront):
    srv = dnsfront(dnsfront_extra="  tcp_max_per_source: 2\n")
    conns = [socket.create_connection(("127.0.0.1", srv.port), timeout=3) for _ in range(2)]
    try:
        until(lambda: status_counters(srv)["tcp_open"] == 2, "both connections held", timeout=5)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=3) as c:  # third from 127.0.0.1
            c.settimeout(3)
            try:
                assert c.recv(10) == b""
            except ConnectionResetError:
                pass
        # Another source (127.0.0.2 is loopback too) still gets in.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=3, source_address=("127.0.0.2", 0)) as d:
            r = dns.query.tcp(dns.message.make_query("mail.example.net", "A"), "127.0.0.1", port=srv.port,
                              timeout=3, sock=d)
            assert r.answer
        c = status_counters(srv)
        assert c["tcp_refused_source"] == 1 and c["tcp_refused"] == 0
        assert "dnsfront_tcp_refused_source_total 1.0" in metrics(srv)
    finally:
        for s in conns:
            s.close()
