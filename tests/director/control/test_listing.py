"""`glb director list` against a running director: the real `glb director`
process for a generated config, real HTTP and TCP servers on 127.0.0.x as
its real servers, a real redis-server; the CLI run as a subprocess. Plus the
table rendering on its own (pure).

``running_director`` / ``director_lab`` and the helpers are shared with
tests/glb/test_admin_cli.py.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from glb.config import RedisConfig
from glb.store import RedisStore
from director.control.listing import render
from tests.configs import app_name, head
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "listing-test-token-0123456789"
FOLLOW = 10.0  # generous: rise/fall x interval is at most 0.75 s here


def glb(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real CLI, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "glb.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, env={**os.environ, **(env or {})})


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """Assert exit 1 with exactly one line on stderr (no traceback) and return it."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert r.stdout == ""
    return lines[0]


def list_rows(stdout: str) -> dict[str, list[str]]:
    """Real-server rows of `glb director list`: "addr:port" -> the other cells."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("  -> ") and not line.startswith("  -> RemoteAddress"):
            cells = re.split(r"\s{2,}", line[5:].strip())
            rows[cells[0]] = cells[1:]
    return rows


# --------------------------------------------------------------------------
# Real servers: threads, so they answer whatever the test's event loop does


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.server.healthy  # type: ignore[attr-defined]
        body = b"ok" if ok else b"sick"
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class Backend:
    """An HTTP real server on host:port whose health the test switches."""

    def __init__(self, host: str, port: int):
        self.server = ThreadingHTTPServer((host, port), _Health)
        self.server.daemon_threads = True
        self.server.healthy = True  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def healthy(self) -> bool:
        return self.server.healthy  # type: ignore[attr-defined]

    @healthy.setter
    def healthy(self, value: bool) -> None:
        self.server.healthy = value  # type: ignore[attr-defined]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class _Accept(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        pass


class TCPBackend:
    def __init__(self, host: str, port: int):
        self.server = socketserver.ThreadingTCPServer((host, port), _Accept)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def check(kind: str, **extra) -> str:
    return json.dumps({"type": kind, "interval": 0.25, "timeout": 0.25, "rise": 1, "fall": 3,
                       "start_jitter": 0.05, **extra})


def write_config(path: Path, redis_url: str, status_port: int, http_port: int, tcp_port: int,
                 token: str | None = TOKEN, admin_port: int | None = None, tokens_file: Path | None = None) -> Path:
    """Site dc1 (the director under test): a DR web service of three servers
    (127.0.0.3 never listens), a TUN service with two VIPs and a sorry server,
    its admin API on ``admin_port``; site dc2 exists so `glb status` has DNS answers to show."""
    admin_keys = ([f"token: {token}"] if token else []) + ([f'tokens_file: "{tokens_file}"'] if tokens_file else [])
    admin = f"admin: {{{', '.join(admin_keys)}}}" if admin_keys else ""
    admin_listen = f', admin_listen: "127.0.0.1:{admin_port}"' if admin_port else ""
    path.write_text(head(redis_url, admin) + app_name("dc1", "dc2") + f"""sites:
  dc1:
    director: {{interface: lo, id: test-director, address: 192.0.2.1, address6: "2001:db8::1",
               status_listen: "127.0.0.1:{status_port}", heartbeat: 0.2, max_probes: 8{admin_listen}}}
    services:
      - name: web
        vips: ["192.0.2.10:{http_port}/tcp"]
        quorum: 0.5
        real_servers: [{{address: 127.0.0.1, weight: 3}}, {{address: 127.0.0.2, weight: 1}},
                       {{address: 127.0.0.3, weight: 1}}]
        health_check: {check("http", path="/healthz", expect_body="ok")}
      - name: mail
        vips: ["192.0.2.11:{tcp_port}/tcp", "[2001:db8::11]:{tcp_port}/tcp"]
        forwarding: tun
        scheduler: mh
        mh_table_size: 251
        persistence: {{timeout: 60, netmask: 24}}
        sorry_server: 127.0.0.99
        real_servers: [{{address: 127.0.0.5, port: {tcp_port}, weight: 2}}]
        health_check: {check("tcp")}
  dc2:
    director: {{interface: lo, status_listen: "127.0.0.1:{free_port()}"}}
    services:
      - name: web
        vips: ["192.0.2.140:80/tcp"]
        real_servers: [10.2.0.11]
        health_check: {{type: tcp}}
""")
    return path


def get_status(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/status")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def servers_of(doc: dict) -> dict[str, dict]:
    return {f"{s['name']}/{rs['address']}": rs for s in doc["services"] for rs in s["real_servers"]}


def wait_for(predicate, timeout: float = FOLLOW, step: float = 0.05):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except OSError as e:  # the director is still starting
            last = e
        else:
            if last:
                return last
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


BASELINE = {"web/127.0.0.1": "up", "web/127.0.0.2": "up", "web/127.0.0.3": "down", "mail/127.0.0.5": "up"}


def at_baseline(port: int) -> bool:
    doc = get_status(port)
    rs = servers_of(doc)
    return (
        not doc["drained"]
        and {k: v["state"] for k, v in rs.items()} == BASELINE
        and all(v["admin"] == "none" and v["weight_override"] is None for v in rs.values())
        and all(v["last_check"] is not None for v in rs.values())
    )


async def _clear_overrides(redis_url: str) -> None:
    store = RedisStore(RedisConfig(url=redis_url, timeout=1.0))
    try:
        state = await store.load()
        for target in list(state.overrides):
            await store.clear_override(target)
    finally:
        await store.close()


async def _load_state(redis_url: str):
    store = RedisStore(RedisConfig(url=redis_url, timeout=1.0))
    try:
        return await store.load()
    finally:
        await store.close()


def load_state(redis_url: str):
    return asyncio.run(_load_state(redis_url))


OPERATOR_TOKEN = "alice-operate-token-0123456789"
READER_TOKEN = "grafana-read-token-0123456789"


def write_tokens(path: Path) -> Path:
    """The director's tokens file: alice may operate, grafana may read; mode 0600."""
    path.write_text(f"# name scope token\nalice operate {OPERATOR_TOKEN}\ngrafana read {READER_TOKEN}\n")
    path.chmod(0o600)
    return path


class Lab:
    def __init__(self, config: Path, status_port: int, redis_url: str, tmp: Path, backends: dict[str, Backend],
                 admin_port: int | None = None):
        self.config, self.status_port, self.redis_url, self.tmp = config, status_port, redis_url, tmp
        self.backends = backends
        self.admin_port = admin_port
        self.token_file = tmp / "alice.token"
        if not self.token_file.exists():
            self.token_file.write_text(OPERATOR_TOKEN + "\n")
            self.token_file.chmod(0o600)

    def args(self, *extra: str, config: Path | None = None) -> list[str]:
        return ["--config", str(config or self.config), "--site", "dc1", *extra]

    def admin_args(self, *extra: str, config: Path | None = None) -> list[str]:
        """``args`` for drain/undrain/weight: with alice's token file."""
        return self.args("--token-file", str(self.token_file), *extra, config=config)

    def status(self) -> dict:
        return get_status(self.status_port)


@pytest.fixture(scope="module")
def running_director(redis_server, tmp_path_factory) -> Iterator[Lab]:
    """One `glb director` process for the module, and its real servers.

    Uses the session redis-server directly (the function-scoped ``redis_url``
    would flush it under the running director between tests)."""
    tmp = tmp_path_factory.mktemp("director-cli")
    redis_server.start()
    redis_server.flushall()
    http_port, tcp_port, status_port, admin_port = free_port(), free_port(), free_port(), free_port()
    started: list = []
    proc = None
    log = None
    try:
        backends = {}
        for host in ("127.0.0.1", "127.0.0.2"):
            backends[host] = Backend(host, http_port)
            started.append(backends[host])
        started.append(TCPBackend("127.0.0.5", tcp_port))
        config = write_config(tmp / "glb.yaml", redis_server.url, status_port, http_port, tcp_port, token=None,
                              admin_port=admin_port, tokens_file=write_tokens(tmp / "tokens"))
        log = open(tmp / "director.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "glb.cli", "director", "--config", str(config), "--site", "dc1"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
        lab = Lab(config, status_port, redis_server.url, tmp, backends, admin_port)

        def director_ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"glb director exited with {proc.returncode}: "
                                     + (tmp / "director.log").read_text()[-2000:])
            return at_baseline(status_port)

        wait_for(director_ready)
        yield lab
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        if log is not None:
            log.close()
        for s in started:
            s.close()
    text = (tmp / "director.log").read_text()
    assert "Traceback" not in text, text


@pytest.fixture
def director_lab(running_director: Lab) -> Iterator[Lab]:
    """The running director back at its baseline: no overrides, every backend healthy."""
    lab = running_director
    for b in lab.backends.values():
        b.healthy = True
    asyncio.run(_clear_overrides(lab.redis_url))
    wait_for(lambda: at_baseline(lab.status_port))
    yield lab
    for b in lab.backends.values():
        b.healthy = True


# --------------------------------------------------------------------------
# Against the running director


def test_list_shows_the_running_directors_table(director_lab):
    lab = director_lab
    r = glb("director", "list", *lab.args())
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0].startswith("site dc1, director test-director")
    assert "redis connected" in lines[0]
    assert "Prot LocalAddress:Port Scheduler Flags" in lines
    assert any(line.split()[:3] == ["->", "RemoteAddress:Port", "Forward"] for line in lines)

    doc = lab.status()
    web_port = doc["services"][0]["vips"][0]["vip"].split(":")[1].split("/")[0]
    mail_port = doc["services"][1]["real_servers"][0]["port"]
    # The virtual services, ipvsadm style: protocol, VIP:port, scheduler, flags.
    assert any(line.startswith(f"TCP  192.0.2.10:{web_port} wlc ") and "web: up, 80% healthy (quorum 50%)" in line
               for line in lines), lines
    mail_lines = [line for line in lines if line.startswith("TCP  ") and "mh persistent 60 mask /24 /128" in line]
    assert [line.split()[1] for line in mail_lines] == [f"192.0.2.11:{mail_port}", f"[2001:db8::11]:{mail_port}"]
    assert "sorry server 127.0.0.99" in mail_lines[0] and "ACTIVE" not in mail_lines[0]

    rows = list_rows(r.stdout)
    assert list(rows) == [f"127.0.0.1:{web_port}", f"127.0.0.2:{web_port}", f"127.0.0.3:{web_port}",
                          f"127.0.0.5:{mail_port}"]
    forward, weight, state, active, inactive, cps, pps, bps, last = rows[f"127.0.0.1:{web_port}"]
    assert (forward, weight, state, active, inactive, cps, pps, bps) == ("Route", "3", "up", "0", "0", "0", "0", "0")
    assert re.fullmatch(r"ok HTTP 200, body matched \(\d+\.\dms, \d+\.\ds ago\)", last), last
    assert rows[f"127.0.0.2:{web_port}"][:3] == ["Route", "1", "up"]
    # Down: weight 0, and why.
    down = rows[f"127.0.0.3:{web_port}"]
    assert down[:3] == ["Route", "0", "down"]
    assert down[-1].startswith("FAIL connection refused (")
    assert rows[f"127.0.0.5:{mail_port}"][:3] == ["Tunnel", "2", "up"]
    assert rows[f"127.0.0.5:{mail_port}"][-1].startswith("ok connected (")


def test_list_follows_health_changes(director_lab):
    lab = director_lab
    lab.backends["127.0.0.2"].healthy = False
    wait_for(lambda: servers_of(lab.status())["web/127.0.0.2"]["state"] == "down")
    r = glb("director", "list", *lab.args())
    assert r.returncode == 0, r.stderr
    row = next(cells for addr, cells in list_rows(r.stdout).items() if addr.startswith("127.0.0.2:"))
    assert row[1:3] == ["0", "down"]
    assert row[-1].startswith("FAIL HTTP 503 (expected 200) (")
    assert "web: up, 60% healthy" in r.stdout  # 3 of 5 configured weight


def test_list_names_the_address_when_the_director_is_unreachable(director_lab, tmp_path):
    gone = free_port()
    config = write_config(tmp_path / "glb.yaml", director_lab.redis_url, gone, 8080, 25)
    line = one_line_error(glb("director", "list", *director_lab.args(config=config)))
    assert line == (f"glb: error: director of site dc1 at 127.0.0.1:{gone} is not reachable: "
                    "connection refused (is 'glb director --site dc1' running?)")


def test_list_refuses_another_sites_director(director_lab, tmp_path):
    """dc2's config pointing at dc1's director: say so instead of showing dc1 as dc2."""
    text = director_lab.config.read_text()
    config = tmp_path / "glb.yaml"
    dc2_listen = re.search(r'dc2:\n    director: \{interface: lo, status_listen: "([^"]+)"', text).group(1)
    config.write_text(text.replace(dc2_listen, f"127.0.0.1:{director_lab.status_port}"))
    r = glb("director", "list", "--config", str(config), "--site", "dc2")
    line = one_line_error(r)
    assert line.startswith(f"glb: error: the director at 127.0.0.1:{director_lab.status_port} serves site 'dc1', not 'dc2'")


def test_list_unknown_site_is_one_line(director_lab):
    r = glb("director", "list", "--config", str(director_lab.config), "--site", "dc9")
    assert one_line_error(r) == f"glb: error: {director_lab.config}: no site 'dc9' (sites: dc1, dc2)"


def test_list_of_something_else_on_the_port_is_one_line(tmp_path):
    """A port where something other than a director answers."""

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        config = write_config(tmp_path / "glb.yaml", "redis://127.0.0.1:1/0", server.server_address[1], 8080, 25)
        line = one_line_error(glb("director", "list", "--config", str(config), "--site", "dc1"))
        assert "answered HTTP 404 Not Found to GET /status: is a GLB director of this version listening there?" in line
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --------------------------------------------------------------------------
# The rendering alone


def _doc(**overrides) -> dict:
    now = 1_760_000_100.0
    rs = {
        "address": "2001:db8::21", "port": 0, "state": "up", "health": "up", "admin": "none",
        "weight": 100, "configured_weight": 100, "weight_override": None,
        "active_conns": 1234, "inactive_conns": 5, "packets": 10, "bytes": 1000,
        "new_conns_per_s": 2.5, "packets_per_s": 250_000.0, "bytes_per_s": 123_456_789.0,
        "last_check": now - 75.0, "last_ok": True, "last_result": "connected", "last_latency": 0.0012,
        "since": now - 3600,
    }
    doc = {
        "site": "dc1", "director_id": "dc1-a", "glb_version": "0.1.0", "now": now, "uptime": 3725.0,
        "drained": False,
        "redis": {"connected": True, "last_error": None, "outage_since": None, "published": 9, "failed": 0,
                  "last_version": 42, "last_published_at": now - 0.5},
        "checker": {"targets": 2, "in_flight": 0, "max_probes": 8},
        "services": [{
            "name": "web", "vips": [{"vip": "[2001:db8::10]:80/tcp", "packets": 0, "bytes": 0, "connections": 0},
                                    {"vip": "192.0.2.10:443/tcp", "packets": 250_000, "bytes": 0, "connections": 7}],
            "forwarding": "dr", "scheduler": "wrr", "persistence": None,
            "up": True, "healthy_fraction": 1.0, "quorum": 0.0, "sorry_server": None, "sorry_active": False,
            "health_check": {"type": "tcp", "port": None, "interval": 1.0, "timeout": 0.5, "rise": 2, "fall": 3},
            "active_conns": 0, "inactive_conns": 0, "new_conns_per_s": 0.0, "packets_per_s": 0.0, "bytes_per_s": 0.0,
            "real_servers": [rs, {**rs, "address": "10.1.0.12", "port": 8443, "state": "draining", "admin": "drain",
                                  "weight": 0, "weight_override": 5, "last_check": None, "last_ok": None,
                                  "last_result": "not checked yet", "last_latency": None}],
        }],
    }
    doc.update(overrides)
    return doc


def test_render_ipvsadm_like_rows():
    text = render(_doc())
    lines = text.splitlines()
    assert lines[0] == ("site dc1, director dc1-a (glb 0.1.0), up 1h02m; redis connected, "
                        "state version 42 published 0.5s ago")
    assert lines[1] == "Prot LocalAddress:Port Scheduler Flags"
    assert lines[2].split() == ["->", "RemoteAddress:Port", "Forward", "Weight", "State", "ActiveConn",
                                "InActConn", "CPS", "PPS", "BPS", "Last", "check"]
    assert lines[3].startswith("TCP  [2001:db8::10]:80 wrr  (conns 0, pkts 0, bytes 0)  web: up, 100% healthy")
    assert lines[4] == "TCP  192.0.2.10:443 wrr  (conns 7, pkts 250K, bytes 0)"
    rows = list_rows(text)
    # Port 0 with VIPs on two ports: "*" (the port the client connected to).
    assert rows["[2001:db8::21]:*"] == ["Route", "100", "up", "1234", "5", "2.5", "250K", "123M",
                                        "ok connected (1.2ms, 1m15s ago)"]
    assert rows["10.1.0.12:8443"] == ["Route", "0*", "draining", "1234", "5", "2.5", "250K", "123M",
                                      "- not checked yet"]
    assert lines[-1].startswith("* weight set by an operator override")
    # The columns line up.
    starts = {line.index("Route") for line in lines if line.startswith("  -> ") and "Route" in line}
    assert len(starts) == 1 and lines[2].index("Forward") in starts


def test_render_drained_site_and_redis_outage():
    base = _doc()
    doc = _doc(drained=True, redis={**base["redis"], "connected": False, "outage_since": base["now"] - 12,
                                    "last_error": "redis at redis://127.0.0.1:6379/0: connection refused"})
    svc = doc["services"][0]
    svc.update(up=False, healthy_fraction=0.0, quorum=0.5, sorry_server="192.0.2.99", sorry_active=True,
               forwarding="tun", persistence={"timeout": 300.0, "netmask": 24, "netmask6": 64})
    svc["vips"] = svc["vips"][1:]
    svc["real_servers"] = [{**svc["real_servers"][0], "state": "down", "health": "down", "admin": "drain",
                            "weight": 0, "last_ok": False, "last_result": "connection refused"}]
    text = render(doc)
    lines = text.splitlines()
    assert "redis UNREACHABLE for 12.0s (redis at redis://127.0.0.1:6379/0: connection refused)" in lines[0]
    assert lines[1].startswith("SITE DRAINED by an operator")
    assert lines[4].startswith("TCP  192.0.2.10:443 wrr persistent 300 mask /24 /64  (conns 7")
    assert "web: DOWN, 0% healthy (quorum 50%), sorry server 192.0.2.99 ACTIVE, tcp check every 1s" in lines[4]
    # A single VIP port: a server without a port shows it.
    assert list_rows(text)["[2001:db8::21]:443"][:3] == ["Tunnel", "0", "down (drained)"]
    assert not lines[-1].startswith("*")


def test_render_names_the_pair_and_each_members_role():
    now = _doc()["now"]
    pair = {"member": "dc1-a", "role": "master", "since": now - 125, "active": "dc1-a", "virtual_router_id": 51,
            "members": [
                {"id": "dc1-a", "role": "master", "present": True, "healthy": True, "last_heard": now},
                {"id": "dc1-b", "role": "backup", "present": True, "healthy": True, "last_heard": now - 0.4},
                {"id": "dc1-c", "role": "absent", "present": False, "healthy": False, "last_heard": None}]}
    lines = render(_doc(pair=pair)).splitlines()
    assert lines[1] == ("pair vrid 51: dc1-a MASTER (this one, for 2m05s); dc1-b backup, healthy, heard 0.4s ago; "
                        "dc1-c absent, never heard")
    assert lines[2] == "Prot LocalAddress:Port Scheduler Flags"
    assert "pair" not in render(_doc(pair=None))  # a director alone: as before
