"""Probes against real servers on 127.0.0.1 (TCP, HTTP, HTTPS, DNS, UDP, exec),
and the checker's scheduling with an in-memory fake probe."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

import dnslib
import pytest
from aiohttp import web

from glb.config import CHECK_TYPES, CHECKS, DnsCheck, ExecCheck, HttpCheck, HttpsCheck, TcpCheck, UdpCheck
from director.control.checker import Checker, Target
from director.control.health import ServerKey
from director.control.fastprobe import STARTERS
from director.control.probes import PROBES, ProbeResult, Prober
from tests.environment import binary_unavailable, require
from tests.waiting import async_until
from tests.ports import free_port

HOST = "127.0.0.1"


@pytest.fixture
async def prober():
    p = Prober()
    yield p
    await p.close()


def test_every_config_check_type_has_a_probe():
    # The config accepts exactly the types the director can probe.
    assert set(CHECK_TYPES) == set(PROBES) | set(STARTERS)
    assert all(CHECKS[name].type == name for name in CHECK_TYPES)


# --------------------------------------------------------------------------
# TCP


async def test_tcp_up_then_refused(prober):
    server = await asyncio.start_server(lambda r, w: w.close(), HOST, 0)
    port = server.sockets[0].getsockname()[1]
    check = TcpCheck(timeout=1.0)
    try:
        r = await prober(check, HOST, port)
        assert (r.ok, r.detail) == (True, "connected")
        assert 0 <= r.latency < 1.0
    finally:
        server.close()
        await server.wait_closed()
    r = await prober(check, HOST, port)
    assert (r.ok, r.detail) == (False, "connection refused")


# --------------------------------------------------------------------------
# HTTP and HTTPS


async def _hang(request: web.Request) -> web.Response:
    await asyncio.sleep(3600)
    return web.Response()


def _http_app() -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="status: all good\n" + "x" * 100_000 + "MARKER")

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=503, text="sick")

    async def vhost(request: web.Request) -> web.Response:
        return web.Response(status=200 if request.host == "app.example.net" else 404, text=request.host)

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    app = web.Application()
    app.router.add_route("*", "/ok", ok)
    app.router.add_get("/fail", fail)
    app.router.add_get("/vhost", vhost)
    app.router.add_get("/moved", moved)
    app.router.add_get("/hang", _hang)
    return app


async def _serve(app: web.Application, ssl_context=None) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0, ssl_context=ssl_context)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


@pytest.fixture
async def http_server():
    runner, port = await _serve(_http_app())
    yield port
    await runner.cleanup()


@pytest.mark.parametrize(
    "kwargs, ok, detail",
    [
        ({"path": "/ok"}, True, "HTTP 200"),
        ({"path": "/ok", "method": "HEAD"}, True, "HTTP 200"),
        ({"path": "/ok", "expect_body": "all good"}, True, "HTTP 200, body matched"),
        ({"path": "/ok", "expect_body": "MARKER"}, True, "HTTP 200, body matched"),  # past the first chunk
        ({"path": "/ok", "expect_body": "nope"}, False, "HTTP 200, body lacks 'nope'"),
        ({"path": "/fail"}, False, "HTTP 503 (expected 200)"),
        ({"path": "/fail", "expect_status": (200, 503)}, True, "HTTP 503"),
        ({"path": "/missing"}, False, "HTTP 404 (expected 200)"),
        ({"path": "/moved"}, False, "HTTP 302 (expected 200)"),  # redirects are not followed
        ({"path": "/vhost"}, False, "HTTP 404 (expected 200)"),
        ({"path": "/vhost", "host": "app.example.net"}, True, "HTTP 200"),
        ({"path": "/hang", "timeout": 0.3}, False, "timeout after 0.3s"),
    ],
)
async def test_http(prober, http_server, kwargs, ok, detail):
    check = HttpCheck(**{"timeout": 2.0, **kwargs})
    r = await prober(check, HOST, http_server)
    assert (r.ok, r.detail) == (ok, detail)


async def test_http_server_goes_away(prober):
    runner, port = await _serve(_http_app())
    check = HttpCheck(path="/ok", timeout=2.0)
    assert (await prober(check, HOST, port)).ok
    await runner.cleanup()
    r = await prober(check, HOST, port)
    assert (r.ok, r.detail) == (False, "connection refused")


def self_signed(tmp: Path, name: str = "app.example.net") -> tuple[Path, Path]:
    """A throwaway certificate made with the openssl CLI (no extra Python package)."""
    openssl = shutil.which("openssl")
    require(binary_unavailable("openssl"))
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.fixture
async def https_server(tmp_path):
    import ssl

    cert, key = self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    runner, port = await _serve(_http_app(), ctx)
    yield port
    await runner.cleanup()


async def test_https_with_and_without_verification(prober, https_server):
    lax = HttpsCheck(path="/vhost", host="app.example.net", tls_verify=False, timeout=2.0)
    r = await prober(lax, HOST, https_server)
    assert (r.ok, r.detail) == (True, "HTTP 200")
    strict = HttpsCheck(path="/vhost", host="app.example.net", tls_verify=True, timeout=2.0)
    r = await prober(strict, HOST, https_server)
    assert not r.ok and r.detail.startswith("TLS certificate: ")
    assert "self" in r.detail  # "self-signed certificate"


async def test_https_against_plain_http_fails_cleanly(prober, http_server):
    check = HttpsCheck(path="/ok", tls_verify=False, timeout=2.0)
    r = await prober(check, HOST, http_server)
    assert not r.ok and "\n" not in r.detail and r.detail


# --------------------------------------------------------------------------
# DNS and UDP: tiny responders on 127.0.0.1


class _Responder(asyncio.DatagramProtocol):
    def __init__(self, answer):
        self.answer = answer
        self.seen = 0

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.seen += 1
        reply = self.answer(data)
        if reply is not None:
            self.transport.sendto(reply, addr)


def dns_answer(data: bytes) -> bytes | None:
    q = dnslib.DNSRecord.parse(data)
    name = str(q.q.qname)
    if name == "hang.example.net.":
        return None
    reply = q.reply()
    if name == "example.net.":
        reply.add_answer(dnslib.RR(name, dnslib.QTYPE.A, rdata=dnslib.A("192.0.2.1"), ttl=30))
    elif name == "broken.example.net.":
        return b"\x00"  # garbage with a wrong id: ignored, so the probe times out
    else:
        reply.header.rcode = dnslib.RCODE.NXDOMAIN
    return reply.pack()


async def _udp_server(answer) -> tuple[asyncio.DatagramTransport, _Responder, int]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(lambda: _Responder(answer), local_addr=(HOST, 0))
    return transport, proto, transport.get_extra_info("sockname")[1]


@pytest.fixture
async def dns_server():
    transport, proto, port = await _udp_server(dns_answer)
    yield port
    transport.close()


@pytest.mark.parametrize(
    "name, rcode, ok, detail",
    [
        ("example.net", "NOERROR", True, "rcode NOERROR, 1 answers"),
        ("nothing.example.net", "NOERROR", False, "rcode NXDOMAIN (expected NOERROR)"),
        ("nothing.example.net", "NXDOMAIN", True, "rcode NXDOMAIN, 0 answers"),
        ("hang.example.net", "NOERROR", False, "timeout after 0.3s"),
        ("broken.example.net", "NOERROR", False, "timeout after 0.3s"),
    ],
)
async def test_dns(prober, dns_server, name, rcode, ok, detail):
    check = DnsCheck(query_name=name, expect_rcode=rcode, timeout=0.3)
    r = await prober(check, HOST, dns_server)
    assert (r.ok, r.detail) == (ok, detail)


async def test_dns_port_closed_fails_fast(prober):
    port = free_port()
    check = DnsCheck(query_name="example.net", timeout=5.0)
    started = time.monotonic()
    r = await prober(check, HOST, port)
    assert (r.ok, r.detail) == (False, "connection refused")  # ICMP port unreachable
    assert time.monotonic() - started < 4.0


async def test_udp_send_expect(prober):
    transport, proto, port = await _udp_server(lambda data: b"PONG " + data if data == b"PING" else None)
    try:
        r = await prober(UdpCheck(send="PING", expect="PONG", timeout=1.0), HOST, port)
        assert (r.ok, r.detail) == (True, "reply of 9 bytes")
        r = await prober(UdpCheck(send="PING", expect="HELLO", timeout=1.0), HOST, port)
        assert (r.ok, r.detail) == (False, "reply lacks 'HELLO'")
        r = await prober(UdpCheck(send="other", timeout=0.3), HOST, port)
        assert (r.ok, r.detail) == (False, "timeout after 0.3s")
    finally:
        transport.close()
    r = await prober(UdpCheck(send="PING", timeout=2.0), HOST, port)
    assert (r.ok, r.detail) == (False, "connection refused")


# --------------------------------------------------------------------------
# exec


@pytest.mark.parametrize(
    "command, ok, detail",
    [
        (("sh", "-c", "exit 0"), True, "exit 0"),
        (("sh", "-c", "echo degraded; exit 3"), False, "exit 3: degraded"),
        (("sh", "-c", 'test "$1:$GLB_PORT" = "127.0.0.1:8080" && echo fine', "sh", "{address}"), True, "exit 0: fine"),
        (("/nonexistent/check",), False, "cannot run /nonexistent/check: no such file or directory"),
    ],
)
async def test_exec(prober, command, ok, detail):
    r = await prober(ExecCheck(command=command, timeout=5.0), HOST, 8080)
    assert (r.ok, r.detail) == (ok, detail)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_exec_timeout_kills_the_whole_process_group(prober, tmp_path):
    pidfile = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pidfile}; wait"
    started = time.monotonic()
    r = await prober(ExecCheck(command=("sh", "-c", script), timeout=0.5), HOST, 1)
    assert (r.ok, r.detail) == (False, "timeout after 0.5s")
    assert time.monotonic() - started < 5.0
    child = int(pidfile.read_text())
    for _ in range(100):
        if not _alive(child):
            break
        await asyncio.sleep(0.02)
    assert not _alive(child), "the command's child survived the timeout"


# --------------------------------------------------------------------------
# The checker (fake probe: scheduling only)


def _target(i: int, **check) -> Target:
    hc = TcpCheck(**{"interval": 0.05, "timeout": 0.05, "start_jitter": 0.0, **check})
    return Target(ServerKey("web", f"10.0.0.{i}", 0), f"10.0.0.{i}", 80, hc)


async def test_checker_bounds_probes_in_flight():
    in_flight = peak = 0
    results: list[tuple[Target, ProbeResult]] = []

    async def slow_probe(check, address, port):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.03)
        finally:
            in_flight -= 1
        return ProbeResult(True, "fake", 0.03)

    checker = Checker(slow_probe, results.extend, max_probes=3)
    checker.update([_target(i) for i in range(12)])
    try:
        deadline = time.monotonic() + 10
        while {t.key for t, _ in results} != {_target(i).key for i in range(12)}:
            assert time.monotonic() < deadline, "not every target was probed"
            await asyncio.sleep(0.01)
    finally:
        await checker.stop()
    assert peak == 3
    assert checker.in_flight == 0


async def test_checker_survives_probes_that_raise_or_hang():
    calls: dict[str, int] = {}
    results: list[tuple[str, ProbeResult]] = []

    async def bad_probe(check, address, port):
        calls[address] = calls.get(address, 0) + 1
        if address.endswith(".1"):
            raise RuntimeError("bug")
        if address.endswith(".2"):
            await asyncio.Event().wait()  # ignores its timeout entirely
        return ProbeResult(True, "fine", 0.0)

    def record(batch):
        results.extend((target.address, result) for target, result in batch)
        if any(target.address.endswith(".3") for target, _ in batch):
            raise ValueError("consumer bug")  # a consumer that raises must not stop the checker

    checker = Checker(bad_probe, record, max_probes=10)
    import director.control.checker as checker_module

    old_backstop = checker_module.BACKSTOP
    checker_module.BACKSTOP = 0.1
    try:
        checker.update([_target(1), _target(2), _target(3)])
        deadline = time.monotonic() + 10
        while not (calls.get("10.0.0.1", 0) >= 3 and calls.get("10.0.0.2", 0) >= 2 and calls.get("10.0.0.3", 0) >= 3):
            assert time.monotonic() < deadline, calls
            await asyncio.sleep(0.01)
    finally:
        checker_module.BACKSTOP = old_backstop
        await checker.stop()
    by = {}
    for address, r in results:
        by.setdefault(address, r)
    assert by["10.0.0.1"] == ProbeResult(False, "probe error: RuntimeError", 0.0)
    assert by["10.0.0.2"].detail == "probe overran its timeout (0.05s)"
    assert by["10.0.0.3"].ok


async def test_checker_update_keeps_unchanged_targets_and_restarts_changed_ones():
    probed: list[str] = []

    async def probe(check, address, port):
        probed.append(f"{address}/{check.interval}")
        return ProbeResult(True, "ok", 0.0)

    checker = Checker(probe, lambda batch: None, max_probes=5)
    checker.update([_target(1, interval=5.0), _target(2, interval=5.0)])
    await async_until(lambda: len(probed) == 2, "the first probes")
    assert sorted(probed) == ["10.0.0.1/5.0", "10.0.0.2/5.0"]
    slot1 = checker._slots[_target(1).key]
    # Target 1 unchanged, target 2's check changed, target 3 new. Tasks start in
    # that order (no jitter), so a restarted target 1 would be probed before 2 and 3.
    checker.update([_target(1, interval=5.0), _target(2, interval=6.0), _target(3, interval=5.0)])
    await async_until(lambda: {"10.0.0.2/6.0", "10.0.0.3/5.0"} <= set(probed), "the changed and new targets' probes")
    assert checker._slots[_target(1).key] is slot1  # kept, with its cadence
    await checker.stop()
    assert checker._slots == {}
    assert not slot1.live and slot1.timer is None
    # No burst: the unchanged target was not probed again; the others were (re)started once.
    assert sorted(probed) == ["10.0.0.1/5.0", "10.0.0.2/5.0", "10.0.0.2/6.0", "10.0.0.3/5.0"]


async def test_checker_start_jitter_spreads_first_probes():
    first: dict[str, float] = {}
    start = time.monotonic()

    async def probe(check, address, port):
        first.setdefault(address, time.monotonic() - start)
        return ProbeResult(True, "ok", 0.0)

    values = iter([0.0, 0.5, 0.99])
    checker = Checker(probe, lambda batch: None, max_probes=5, rng=lambda: next(values))
    checker.update([_target(i, start_jitter=0.4, interval=5.0) for i in (1, 2, 3)])
    await async_until(lambda: len(first) == 3, "every first probe")
    await checker.stop()
    # rng() x start_jitter: 0, 0.2 and 0.396 s. A sleep never ends early, so the lower
    # bounds hold on any machine; the order shows each waited its own offset.
    assert sorted(first, key=first.get) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert first["10.0.0.2"] >= 0.2 and first["10.0.0.3"] >= 0.396
