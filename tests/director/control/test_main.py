"""The director end to end: real HTTP, HTTPS, TCP, DNS and UDP servers on
127.0.0.x go down and come back, and the state published in a real
redis-server follows; /healthz, /status and /metrics of a running director;
overrides from Redis; SIGHUP reload and SIGTERM withdrawal of a director
running as its own process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import dnslib
import pytest
from aiohttp import web

from glb import config
from glb.config import RedisConfig
from glb.errors import DirectorError
from glb.state import Override, SiteSnapshot, server_target
from glb.store import RedisStore
from director.control.main import Director, run
from director.control.probes import Prober
from tests.configs import head
from tests.waiting import async_until
from tests.environment import binary_unavailable, require
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[3]
INTERVAL = 0.1
RISE, FALL = 2, 2
# Generous: rise/fall x interval is 0.2 s here; a loaded CI machine gets 25x.
FOLLOW = 5.0


TOKEN = "s3cret-test-token"


def write_config(path: Path, redis_url: str, status_port: int, services: str, token: str | None = TOKEN) -> Path:
    admin = f"admin: {{token: {token}}}" if token else ""
    path.write_text(head(redis_url, admin) + f"""sites:
  dc1:
    director: {{interface: lo, id: test-director, status_listen: "127.0.0.1:{status_port}", heartbeat: 0.2, max_probes: 8}}
    services:
{services}
""")
    return path


def check(kind: str, **extra) -> str:
    fields = {"type": kind, "interval": INTERVAL, "timeout": INTERVAL, "rise": RISE, "fall": FALL,
              "start_jitter": 0.05, **extra}
    return json.dumps(fields)


async def read_site(redis_url: str) -> SiteSnapshot | None:
    store = RedisStore(RedisConfig(url=redis_url, timeout=0.5))
    try:
        return await store.load_site("dc1")
    finally:
        await store.close()


async def wait_for(predicate, timeout: float = FOLLOW, step: float = 0.02):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


def states(snap: SiteSnapshot | None, service: str) -> dict[str, str]:
    if snap is None or snap.service(service) is None:
        return {}
    return {rs.address: rs.state for rs in snap.service(service).real_servers}


async def published_states(redis_url: str, service: str, want: dict[str, str]) -> SiteSnapshot:
    async def match():
        snap = await read_site(redis_url)
        return snap if states(snap, service) == want else None

    return await wait_for(match)


# --------------------------------------------------------------------------
# Real servers the tests control


class HTTPServer:
    """An aiohttp server on a fixed host:port that can be stopped and started again."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None):
        self.host, self.port, self.ssl_context = host, port, ssl_context
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def health(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/healthz", health)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port, ssl_context=self.ssl_context, reuse_address=True).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


class TCPServer:
    """A TCP listener on a fixed host:port (accepts and closes) that can be stopped and started again."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(lambda r, w: w.close(), self.host, self.port, reuse_address=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


class UDPServer(asyncio.DatagramProtocol):
    """A DNS or UDP echo responder; ``silent`` makes it hang (no replies)."""

    def __init__(self, dns: bool):
        self.dns = dns
        self.silent = False

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        if self.silent:
            return
        if not self.dns:
            self.transport.sendto(b"PONG", addr)
            return
        q = dnslib.DNSRecord.parse(data)
        reply = q.reply()
        reply.add_answer(dnslib.RR(q.q.qname, dnslib.QTYPE.A, rdata=dnslib.A("192.0.2.1"), ttl=30))
        self.transport.sendto(reply.pack(), addr)


async def udp_server(host: str, port: int, dns: bool) -> tuple[asyncio.DatagramTransport, UDPServer]:
    loop = asyncio.get_running_loop()
    return await loop.create_datagram_endpoint(lambda: UDPServer(dns), local_addr=(host, port))


def self_signed(tmp: Path) -> ssl.SSLContext:
    openssl = shutil.which("openssl")
    require(binary_unavailable("openssl"))
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=secure.example.net"],
        check=True, capture_output=True, timeout=60,
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


# --------------------------------------------------------------------------
# In-process director against every check type


@pytest.fixture
async def lab(tmp_path, redis_url):
    """Real servers for five services and a config that checks them."""
    http_port, https_port, tcp_port = free_port(), free_port(), free_port()
    dns_port, udp_port = free_port(), free_port()
    web1, web2 = HTTPServer("127.0.0.1", http_port), HTTPServer("127.0.0.2", http_port)
    secure = HTTPServer("127.0.0.3", https_port, self_signed(tmp_path))
    tcp = TCPServer("127.0.0.5", tcp_port)
    dns_transport, dns = await udp_server("127.0.0.4", dns_port, dns=True)
    udp_transport, udp = await udp_server("127.0.0.6", udp_port, dns=False)
    for s in (web1, web2, secure, tcp):
        await s.start()
    services = f"""
      - name: web
        vips: ["192.0.2.10:{http_port}/tcp"]
        quorum: 0.75
        real_servers: [{{address: 127.0.0.1, weight: 3}}, {{address: 127.0.0.2, weight: 1}}]
        health_check: {check("http", path="/healthz", expect_body="ok")}
      - name: secure
        vips: ["192.0.2.10:{https_port}/tcp"]
        real_servers: [127.0.0.3]
        health_check: {check("https", path="/healthz", tls_verify=False)}
      - name: dns
        vips: ["192.0.2.10:{dns_port}/udp"]
        real_servers: [127.0.0.4]
        health_check: {check("dns", query_name="example.net")}
      - name: tcp
        vips: ["192.0.2.10:{tcp_port}/tcp"]
        sorry_server: 127.0.0.99
        real_servers: [127.0.0.5]
        health_check: {check("tcp")}
      - name: udp
        vips: ["192.0.2.10:{udp_port}/udp"]
        real_servers: [127.0.0.6]
        health_check: {check("udp", send="PING", expect="PONG")}
"""
    path = write_config(tmp_path / "glb.yaml", redis_url, free_port(), services)
    env = {"web1": web1, "web2": web2, "secure": secure, "tcp": tcp, "dns": dns, "udp": udp, "tcp_port": tcp_port,
           "config": path, "redis_url": redis_url}
    try:
        yield env
    finally:
        for s in (web1, web2, secure, tcp):
            await s.stop()
        dns_transport.close()
        udp_transport.close()


class RecordingProbe:
    """The real prober, noting the address of each probe as it starts."""

    def __init__(self) -> None:
        self.prober = Prober()
        self.starts: list[str] = []

    async def __call__(self, check, address: str, port: int):
        self.starts.append(address)
        return await self.prober(check, address, port)


def most_checks_of_another_between_two_of_one(starts: list[str]) -> tuple[int, str, str]:
    """The most probes one target started between two consecutive probes of another, with both.

    On a fixed, equal cadence that is one or two, however slow the machine: a
    probe that hangs past its timeout, or a target starved of its turn, shows
    as many probes of the others while it waits.
    """
    worst = (0, "", "")
    for one in set(starts):
        since: dict[str, int] = {}
        seen_one = False
        for address in starts:
            if address == one:
                if seen_one and since:
                    other, n = max(since.items(), key=lambda kv: kv[1])
                    worst = max(worst, (n, other, one))
                seen_one, since = True, {}
            elif seen_one:
                since[address] = since.get(address, 0) + 1
    return worst


@pytest.fixture
async def director(lab):
    probe = RecordingProbe()
    d = Director(config.load(lab["config"]), "dc1", probe=probe)
    d.probe = probe
    await d.start()
    try:
        yield d
    finally:
        await d.stop()
        await probe.prober.close()


ALL_UP = {
    "web": {"127.0.0.1": "up", "127.0.0.2": "up"},
    "secure": {"127.0.0.3": "up"},
    "dns": {"127.0.0.4": "up"},
    "tcp": {"127.0.0.5": "up"},
    "udp": {"127.0.0.6": "up"},
}


async def test_published_state_follows_real_servers(lab, director):
    url = lab["redis_url"]
    for service, want in ALL_UP.items():
        await published_states(url, service, want)

    # HTTP: one server of two goes down; capacity 3/4 stays at quorum 0.75.
    await lab["web2"].stop()
    snap = await published_states(url, "web", {"127.0.0.1": "up", "127.0.0.2": "down"})
    web_state = snap.service("web")
    assert (web_state.healthy_fraction, web_state.up) == (0.75, True)
    assert web_state.real_server("127.0.0.2", 0).last_result == "connection refused"
    await lab["web2"].start()
    await published_states(url, "web", ALL_UP["web"])

    # The heavier one goes: 1/4 is below quorum, the service is down for DNS.
    await lab["web1"].stop()
    snap = await published_states(url, "web", {"127.0.0.1": "down", "127.0.0.2": "up"})
    assert (snap.service("web").healthy_fraction, snap.service("web").up) == (0.25, False)
    await lab["web1"].start()
    await published_states(url, "web", ALL_UP["web"])

    # HTTPS, TCP, DNS and UDP: the servers hang (or go away) and come back.
    await lab["secure"].stop()
    await published_states(url, "secure", {"127.0.0.3": "down"})
    await lab["secure"].start()
    await published_states(url, "secure", {"127.0.0.3": "up"})

    # TCP: the listener goes away and comes back; with its only server down
    # the service is down for DNS and its sorry server takes new flows.
    await lab["tcp"].stop()
    snap = await published_states(url, "tcp", {"127.0.0.5": "down"})
    assert snap.service("tcp").real_server("127.0.0.5", 0).last_result == "connection refused"
    assert not snap.service("tcp").up and director.table.service("tcp").sorry_active
    await lab["tcp"].start()
    snap = await published_states(url, "tcp", {"127.0.0.5": "up"})
    assert snap.service("tcp").up and not director.table.service("tcp").sorry_active

    lab["dns"].silent = True
    snap = await published_states(url, "dns", {"127.0.0.4": "down"})
    assert snap.service("dns").real_server("127.0.0.4", 0).last_result == f"timeout after {INTERVAL:g}s"
    assert not snap.service("dns").up
    lab["dns"].silent = False
    await published_states(url, "dns", {"127.0.0.4": "up"})

    lab["udp"].silent = True
    await published_states(url, "udp", {"127.0.0.6": "down"})
    lab["udp"].silent = False
    await published_states(url, "udp", {"127.0.0.6": "up"})

    # Every check kept its cadence meanwhile: nothing above (hung servers, refusals,
    # TLS) held one server's checks back while the others went on.
    starts = director.probe.starts
    assert set(starts) == {a for want in ALL_UP.values() for a in want}
    n, other, one = most_checks_of_another_between_two_of_one(starts)
    print(f"cadence: at most {n} checks of {other} between two of {one}; {len(starts)} checks")
    assert n <= 4, f"{other} was checked {n} times between two checks of {one}"


async def test_status_and_metrics_of_a_running_director(lab, director):
    url = lab["redis_url"]
    for service, want in ALL_UP.items():
        await published_states(url, service, want)
    base = f"http://127.0.0.1:{director.status_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200
            assert await r.json() == {"status": "ok", "site": "dc1", "redis": "ok"}
        async with http.get(f"{base}/status") as r:
            assert r.status == 200 and r.content_type == "application/json"
            status = await r.json()
        async with http.get(f"{base}/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            metrics = await r.text()

    assert (status["site"], status["director_id"], status["drained"]) == ("dc1", "test-director", False)
    assert status["redis"]["connected"] is True and status["redis"]["last_version"] >= 1
    assert status["checker"] == {"targets": 6, "in_flight": status["checker"]["in_flight"], "max_probes": 8}
    services = {s["name"]: s for s in status["services"]}
    assert list(services) == ["web", "secure", "dns", "tcp", "udp"]
    web_s = services["web"]
    assert (web_s["forwarding"], web_s["scheduler"], web_s["up"], web_s["healthy_fraction"]) == ("dr", "wlc", True, 1.0)
    assert web_s["vips"][0]["vip"].startswith("192.0.2.10:") and web_s["vips"][0]["packets"] == 0
    assert web_s["health_check"]["type"] == "http"
    rs = web_s["real_servers"][0]
    assert (rs["address"], rs["state"], rs["health"], rs["admin"], rs["weight"]) == ("127.0.0.1", "up", "up", "none", 3)
    assert rs["last_ok"] is True and rs["last_result"] == "HTTP 200, body matched"
    assert time.time() - rs["last_check"] < 5 and 0 <= rs["last_latency"] < 1
    assert (rs["active_conns"], rs["inactive_conns"], rs["packets"], rs["bytes_per_s"]) == (0, 0, 0, 0)
    assert services["tcp"]["sorry_server"] == "127.0.0.99" and services["tcp"]["sorry_active"] is False

    # Publication is paced by the heartbeat (0.2 s) and real changes only: our
    # own publications, echoed back by the override follower, do not trigger more.
    before = director.publisher.published
    await asyncio.sleep(1.0)
    assert director.publisher.published - before <= 8

    assert 'glb_director_server_state{server="127.0.0.1:0",service="web",state="up"} 1.0' in metrics
    assert 'glb_director_server_state{server="127.0.0.1:0",service="web",state="down"} 0.0' in metrics
    assert 'glb_director_server_weight{server="127.0.0.1:0",service="web"} 3.0' in metrics
    assert 'glb_director_health_transitions_total{from="down",server="127.0.0.1:0",service="web",to="up"} 1.0' in metrics
    assert 'glb_director_check_latency_seconds_count{service="dns",type="dns"}' in metrics
    assert 'glb_director_checks_total{result="ok",server="127.0.0.6:0",service="udp"}' in metrics
    assert 'glb_director_service_up{service="web"} 1.0' in metrics
    assert 'glb_director_server_packets_total{server="127.0.0.1:0",service="web"} 0.0' in metrics
    assert f'glb_director_vip_bytes_total{{service="tcp",vip="192.0.2.10:{lab["tcp_port"]}/tcp"}} 0.0' in metrics
    assert "glb_director_redis_connected 1.0" in metrics


async def test_overrides_from_redis_are_honoured_and_survive_a_restart(lab):
    url = lab["redis_url"]
    store = RedisStore(RedisConfig(url=url, timeout=0.5))
    target = server_target("dc1", "web", "127.0.0.2", 0)
    try:
        # Set before the director starts: a restarted director honours it.
        await store.set_override(Override(target, drain=True, who="alice", why="kernel upgrade"))
        d = Director(config.load(lab["config"]), "dc1")
        await d.start()
        try:
            snap = await published_states(url, "web", {"127.0.0.1": "up", "127.0.0.2": "draining"})
            drained = snap.service("web").real_server("127.0.0.2", 0)
            assert drained.weight == 0
            assert snap.service("web").healthy_fraction == 0.75
            # Cleared while running: back to up at once.
            await store.clear_override(target)
            await published_states(url, "web", ALL_UP["web"])
            # A weight override: state stays up, the weight changes.
            await store.set_override(Override(target, weight=7, who="bob"))

            async def reweighted():
                s = await read_site(url)
                return s and s.service("web").real_server("127.0.0.2", 0).weight == 7

            await wait_for(reweighted)
            await store.set_override(Override("site:dc1", drain=True, who="carol"))
            await wait_for(lambda: _true(d.site_drained()))
        finally:
            await d.stop()
    finally:
        await store.close()


async def _true(value: bool) -> bool:
    return value


async def test_stop_withdraws_the_site(lab):
    d = Director(config.load(lab["config"]), "dc1")
    await d.start()
    await published_states(lab["redis_url"], "web", ALL_UP["web"])
    await d.stop()
    snap = await read_site(lab["redis_url"])
    assert snap.withdrawn and not any(s.up for s in snap.services)


async def test_keeps_probing_while_redis_is_down(lab, redis_server):
    d = Director(config.load(lab["config"]), "dc1")
    await d.start()
    try:
        await published_states(lab["redis_url"], "web", ALL_UP["web"])
        redis_server.stop()
        try:
            await lab["web2"].stop()
            # The decision is made locally even though it cannot be published.
            await wait_for(lambda: _true(d.table.server(_key("web", "127.0.0.2")).state == "down"))
            await wait_for(lambda: _true(d.publisher.connected is False))
        finally:
            redis_server.start()
        snap = await published_states(lab["redis_url"], "web", {"127.0.0.1": "up", "127.0.0.2": "down"})
        assert not snap.withdrawn
    finally:
        await d.stop()


def _key(service: str, address: str):
    from director.control.health import ServerKey

    return ServerKey(service, address, 0)


# --------------------------------------------------------------------------
# Startup errors: one line, a GLBError


async def test_unknown_site_is_a_one_line_error(lab):
    with pytest.raises(DirectorError) as info:
        Director(config.load(lab["config"]), "dc9")
    assert str(info.value) == f"{lab['config']}: no site 'dc9' (sites: dc1)"


async def test_status_port_in_use_is_a_one_line_error(lab):
    cfg = config.load(lab["config"])
    port = cfg.sites[0].director.status_listen.port
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        d = Director(cfg, "dc1")
        try:
            with pytest.raises(DirectorError) as info:
                await d.start()
        finally:
            await d.stop()
    assert str(info.value) == f"cannot listen on 127.0.0.1:{port} for /status: address already in use"
    # The port is probably held by the site's running director: no withdrawal.
    assert await read_site(lab["redis_url"]) is None


def test_run_rejects_a_bad_log_level(tmp_path):
    with pytest.raises(DirectorError):
        run(str(tmp_path / "missing.yaml"), "dc1", "loud")


# --------------------------------------------------------------------------
# As its own process: SIGHUP reloads, SIGTERM withdraws and exits 0


def reload_services(port: int, servers: str) -> str:
    return f"""
      - name: web
        vips: ["192.0.2.10:{port}/tcp"]
        real_servers: {servers}
        health_check: {check("tcp", rise=1, fall=1)}
"""


async def test_process_reloads_on_sighup_and_withdraws_on_sigterm(tmp_path, redis_url):
    port = free_port()
    servers = []
    for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        servers.append(await asyncio.start_server(lambda r, w: w.close(), host, port))
    status_port = free_port()
    path = write_config(tmp_path / "glb.yaml", redis_url, status_port,
                        reload_services(port, "[{address: 127.0.0.1, weight: 1}, {address: 127.0.0.2, weight: 1}]"))
    code = f"import sys; from director.control.main import run; sys.exit(run({str(path)!r}, 'dc1', 'info'))"
    log = open(tmp_path / "director.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        await published_states(redis_url, "web", {"127.0.0.1": "up", "127.0.0.2": "up"})
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{status_port}/status") as r:
                before = {s["address"]: s for s in (await r.json())["services"][0]["real_servers"]}

            # Reweight .1, remove .2, add .3; then SIGHUP.
            write_config(path, redis_url, status_port,
                         reload_services(port, "[{address: 127.0.0.1, weight: 5}, {address: 127.0.0.3, weight: 1}]"))
            os.kill(proc.pid, signal.SIGHUP)
            snap = await published_states(redis_url, "web", {"127.0.0.1": "up", "127.0.0.3": "up"})
            assert snap.service("web").real_server("127.0.0.1", 0).weight == 5

            async with http.get(f"http://127.0.0.1:{status_port}/status") as r:
                after = {s["address"]: s for s in (await r.json())["services"][0]["real_servers"]}
            # The kept server did not flap: same state since before the reload.
            assert after["127.0.0.1"]["since"] == before["127.0.0.1"]["since"]

            # A broken config on SIGHUP is logged and the running one kept.
            path.write_text("sites: [")
            os.kill(proc.pid, signal.SIGHUP)
            await async_until(lambda: "reload failed, keeping the running config" in (tmp_path / "director.log").read_text(),
                              "the director to refuse the broken config")
            assert proc.poll() is None
            async with http.get(f"http://127.0.0.1:{status_port}/healthz") as r:
                assert r.status == 200

        os.kill(proc.pid, signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
        snap = await read_site(redis_url)
        assert snap.withdrawn and not snap.service("web").up
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        for s in servers:
            s.close()
    text = (tmp_path / "director.log").read_text()
    assert "reload failed, keeping the running config" in text
    assert "Traceback" not in text
