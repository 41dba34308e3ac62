"""Fixtures for dnsfront tests: a config with every kind of name, and state builders."""

from __future__ import annotations

import socket
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from glb import config as configmod
from glb.state import DeploymentState, Override, ServiceState, SiteSnapshot
from tests.ports import free_port

BASE = """
redis: {{url: "{redis}", stale_after: {stale_after}, resync_interval: 2.0}}
dnsfront:
  listen: ["127.0.0.1:{port}"]
  status_listen: 127.0.0.1:{status_port}
  tcp_idle_timeout: {idle}
  tcp_max_connections: {max_conns}
zones:
  - apex: example.net
    ttl: 3600
    soa: {{mname: ns1.example.net, rname: hostmaster@example.net, serial: 7, minimum: 30, ttl: 3600}}
    ns:
      - {{name: ns1.example.net, addresses: [192.0.2.53, "2001:db8::53"]}}
      - {{name: ns.other.org}}
    records:
      - {{name: "@", type: MX, value: "10 mail.example.net."}}
      - {{name: "@", type: TXT, value: "v=spf1 mx -all"}}
      - {{name: "@", type: CAA, value: '0 issue "letsencrypt.org"'}}
      - {{name: mail, type: A, value: 192.0.2.25}}
      - {{name: mail, type: AAAA, value: "2001:db8::25"}}
      - {{name: www, type: CNAME, value: app}}
      - {{name: ext, type: CNAME, value: www.other.org.}}
      - {{name: _http._tcp.app, type: SRV, value: "0 100 80 app.example.net."}}
      - {{name: big, type: A, values: [{big_values}], ttl: 300}}
      - {{name: "*.wild", type: A, value: 192.0.2.77}}
      - {{name: deep.ent.sub, type: TXT, value: "deep"}}
  - apex: sub2.example.net
    soa: {{mname: ns1.example.net, rname: hostmaster@example.net, minimum: 60, ttl: 20}}
    ns: [ns1.example.net]
names:
  app.example.net:
    service: web
    policy: weighted
    ttl: 20
    degraded_ttl: 5
    members:
      - {{site: dc1, weight: 300}}
      - {{site: dc2, weight: 100}}
  fo.example.net:
    service: web
    policy: failover
    ttl: 10
    all_down: fallback
    fallback: [192.0.2.99]
    members:
      - {{site: dc1, priority: 1}}
      - {{site: dc2, priority: 2}}
  near.example.net:
    service: web
    policy: topology
    members: [dc1, dc2, dc3]
  stick.example.net:
    service: web
    policy: sticky
    members: [dc1, dc2, dc3]
  sf.example.net:
    service: web
    all_down: servfail
    members: [dc3]
  multi.example.net:
    service: web
    answers: 2
    members: [dc1, dc2]
sites:
  dc1:
    networks: [198.51.100.0/24, "2001:db8:100::/48"]
    director: {{interface: eth0}}
    services: [{{name: web, vips: ["192.0.2.10:80/tcp", "[2001:db8:10::10]:80/tcp"], real_servers: [10.1.0.1]}}]
  dc2:
    networks: [203.0.113.0/24, 10.0.0.0/8]
    director: {{interface: eth0}}
    services: [{{name: web, vips: ["192.0.2.20:80/tcp"], real_servers: [10.2.0.1]}}]
  dc3:
    networks: [10.9.0.0/16]
    director: {{interface: eth0}}
    services: [{{name: web, vips: ["192.0.2.30:80/tcp"], real_servers: [10.3.0.1]}}]
"""

BIG_VALUES = ", ".join(f"192.0.2.{100 + i}" for i in range(40))  # > 512 bytes of A records


def config_text(redis: str = "redis://127.0.0.1:1/0", port: int = 53, status_port: int = 8053, idle: float = 10.0,
                max_conns: int = 1024, stale_after: float = 3.0, workers: int = 1, ipv6: bool = False,
                dnsfront_extra: str = "") -> str:
    """The test config; ``dnsfront_extra``: more lines for the dnsfront section (indented two spaces)."""
    text = textwrap.dedent(BASE).format(redis=redis, port=port, status_port=status_port, idle=idle,
                                        max_conns=max_conns, big_values=BIG_VALUES, stale_after=stale_after)
    if ipv6:
        text = text.replace(f'listen: ["127.0.0.1:{port}"]', f'listen: ["127.0.0.1:{port}", "[::1]:{port}"]')
    return text.replace("  tcp_idle_timeout:", f"  workers: {workers}\n{dnsfront_extra}  tcp_idle_timeout:", 1)


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    def write(**kw: object) -> Path:
        path = tmp_path / "glb.yaml"
        path.write_text(config_text(**kw))  # type: ignore[arg-type]
        return path

    return write


@pytest.fixture
def config() -> configmod.Config:
    return configmod.loads(config_text(), source="test.yaml")


NOW = 1_000_000.0


def snapshot(site: str, *, hf: float = 1.0, up: bool = True, at: float = NOW, withdrawn: bool = False,
             version: int = 1, service: str = "web") -> SiteSnapshot:
    vip = {"dc1": "192.0.2.10:80/tcp", "dc2": "192.0.2.20:80/tcp", "dc3": "192.0.2.30:80/tcp"}.get(site, "192.0.2.1:80/tcp")
    return SiteSnapshot(site, f"{site}-director", at, (ServiceState(service, (vip,), hf, up),),
                        withdrawn=withdrawn, version=version, published_at=at)


def state(*snaps: SiteSnapshot, overrides: tuple[Override, ...] = ()) -> DeploymentState:
    return DeploymentState.build(snaps, overrides)


def all_up(at: float = NOW) -> DeploymentState:
    return state(snapshot("dc1", at=at), snapshot("dc2", at=at), snapshot("dc3", at=at))


@pytest.fixture
def st():
    """State builders: ``st.snapshot(...)``, ``st.state(...)``, ``st.all_up()``, ``st.NOW``."""
    from types import SimpleNamespace

    return SimpleNamespace(snapshot=snapshot, state=state, all_up=all_up, NOW=NOW, Override=Override)


@pytest.fixture
def text_config() -> Callable[..., str]:
    return config_text


class DNSFrontProcess:
    """``dnsfront`` run as a real process on free loopback ports; killed by PID."""

    def __init__(self, path: Path, port: int, status_port: int, workers: int | None = None):
        import subprocess
        import sys

        self.path, self.port, self.status_port = path, port, status_port
        self.log = path.with_suffix(".log")
        # Logging as `glb dnsfront` sets it up, so tests can read what the process reports.
        code = ("import logging, sys; from dnsfront.main import run; "
                "logging.basicConfig(level=logging.DEBUG, format='%(levelname)s %(name)s: %(message)s'); "
                "sys.exit(run(sys.argv[1], int(sys.argv[2]) or None, 'debug'))")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(path), str(workers or 0)],
                                     stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 20.0) -> None:
        import time

        import dns.message
        import dns.query

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsfront exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                dns.query.udp(dns.message.make_query("example.net", "SOA"), "127.0.0.1", timeout=0.2, port=self.port)
                # Workers answer DNS before the status server is bound (it may
                # live in the supervisor): ready means both.
                socket.create_connection(("127.0.0.1", self.status_port), timeout=0.2).close()
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.05)
        raise RuntimeError(f"dnsfront did not answer within {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> int | None:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@pytest.fixture
def dnsfront(tmp_path: Path):
    """Factory: ``dnsfront(**config_kw)`` starts a server and returns it; all are stopped after the test."""
    started: list[DNSFrontProcess] = []

    def start(workers: int | None = None, **kw: object) -> DNSFrontProcess:
        port, status_port = free_port(), free_port()
        path = tmp_path / f"glb-{len(started)}.yaml"
        path.write_text(config_text(port=port, status_port=status_port, **kw))  # type: ignore[arg-type]
        p = DNSFrontProcess(path, port, status_port, workers)
        started.append(p)
        p.wait_ready()
        return p

    try:
        yield start
    finally:
        for p in started:
            p.stop()
