"""A real recursive resolver (unbound, from apt) resolves through dnsfront and honours its TTLs."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import pytest

from tests.waiting import until
from tests.environment import binary_unavailable, needs

UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"
pytestmark = needs(None if Path(UNBOUND).exists() else binary_unavailable("unbound"))


@pytest.fixture
def unbound(tmp_path, dnsfront):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("dnsfront_conftest_ub", Path(__file__).with_name("conftest.py"))
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    srv = dnsfront()
    port = mod.free_port()
    conf = tmp_path / "unbound.conf"
    conf.write_text(f"""
server:
  interface: 127.0.0.1
  port: {port}
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{tmp_path}"
  pidfile: "{tmp_path}/unbound.pid"
  use-syslog: no
  logfile: "{tmp_path}/unbound.log"
  verbosity: 1
  do-ip6: no
  module-config: "iterator"
  do-not-query-localhost: no
  access-control: 127.0.0.0/8 allow
  qname-minimisation: no
  prefetch: no
  serve-expired: no
stub-zone:
  name: "example.net"
  stub-addr: 127.0.0.1@{srv.port}
remote-control:
  control-enable: no
""")
    proc = subprocess.Popen([UNBOUND, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                dns.query.udp(dns.message.make_query("mail.example.net", "A"), "127.0.0.1", port=port, timeout=0.3)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"unbound did not start: {(tmp_path / 'unbound.log').read_text()[-2000:]}")
                time.sleep(0.1)
        yield srv, port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def upstream_a_queries(srv) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.status_port}/metrics", timeout=3).read().decode()
    for line in text.splitlines():
        if line.startswith('dnsfront_responses_total{qtype="A",rcode="NOERROR"}'):
            return float(line.split()[-1])
    return 0.0


def test_unbound_resolves_and_caches_for_the_ttl(unbound):
    srv, port = unbound

    def ask():
        q = dns.message.make_query("app.example.net", "A")
        q.flags |= dns.flags.RD
        return dns.query.udp(q, "127.0.0.1", port=port, timeout=3)

    r = ask()
    cached_at = time.monotonic()
    assert r.rcode() == 0 and r.answer
    first = r.answer[0][0].address
    ttl = r.answer[0].ttl
    assert first in ("192.0.2.10", "192.0.2.20", "192.0.2.30")
    assert 0 < ttl <= 5  # no Redis state: the degraded TTL (see docs/dnsfront.md)
    before = upstream_a_queries(srv)
    time.sleep(1.2)
    r = ask()
    # Served from unbound's cache: same address, TTL counted down, dnsfront not asked.
    assert r.answer[0][0].address == first
    assert r.answer[0].ttl <= ttl - 1
    assert upstream_a_queries(srv) == before
    # Once the TTL has run out unbound asks dnsfront again, and not before (TTLs are whole seconds).
    until(lambda: ask() and upstream_a_queries(srv) > before, "unbound to ask dnsfront again", timeout=ttl + 5)
    assert time.monotonic() - cached_at >= ttl - 1
