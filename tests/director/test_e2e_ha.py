"""A director pair end to end: two `glb director --id` processes on one LAN with two DR real servers (root).

Real components only, as test_e2e_dr.py: `glb realserver setup --mode dr`,
HTTP servers naming themselves, both directors as their own processes (each
reaching the session's redis-server through its own RedisBridge), clients
in their own namespace. The service schedules with wlc and persistence.

Shown, with the userspace engine and with the kernel data plane: 50
long-lived HTTP/1.1 connections from five client addresses keep working,
on the same TCP connection and the same real server, when the master is
killed -9, when it stops cleanly (the standby says it took over on
priority 0, not after the master-down interval), and when the old master
comes back with preempt true (it takes the VIPs back) or false (it stays
backup), and when the master stalls past the master-down interval (the
backup takes the VIP for a moment; the master announces it again, so the
client's ARP cache comes back). New connections are served after each change; the site's snapshot
in Redis never stops counting as available (never withdrawn, never stale
by the config's ``stale_after``) and is published by the master only.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis

from glb.state import Keys
from tests.configs import ZONES
from tests.director.director_lab import (
    PY,
    DirectorProcess,
    RedisBridge,
    curl,
    real_server,
    running_lab,
    start_http,
)
from tests.netns import Lab
from tests.waiting import until

pytestmark = pytest.mark.netns

VIP = "10.0.0.100"
CLIENTS = [f"10.0.0.{20 + i}" for i in range(5)]
DIRECTORS = {"dc1-a": ("10.0.0.2", 200), "dc1-b": ("10.0.0.3", 100)}
RS = {1: "10.0.0.11", 2: "10.0.0.12"}
CONNECTIONS = 50
STALE_AFTER = 3.0

# 50 HTTP/1.1 connections, 10 per client address; each stdin line: one request on every one.
# Prints, per connection, [who answered, the local port]: a new port means the connection was lost
# and http.client quietly opened another one.
MANY_CLIENTS = r"""
import http.client, json, sys
vip, per, sources = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
conns = [http.client.HTTPConnection(vip, 80, timeout=15, source_address=(s, 0)) for s in sources for _ in range(per)]
for line in sys.stdin:
    out = []
    for c in conns:
        try:
            c.request("GET", "/")
            body = c.getresponse().read().decode().strip()
            out.append([body, c.sock.getsockname()[1]])
        except Exception as e:
            out.append(["error: " + type(e).__name__, None])
            c.close()
    print(json.dumps(out), flush=True)
"""


def config(redis_port: int, dataplane: str, preempt: bool) -> str:
    members = "\n".join(f"          - {{id: {m}, address: {a}, priority: {p}}}" for m, (a, p) in DIRECTORS.items())
    servers = "\n".join(f"          - {{address: \"{a}\", weight: 1}}" for a in RS.values())
    return f"""
redis: {{url: "redis://127.0.0.1:6379/0", timeout: 1.0, stale_after: {STALE_AFTER}}}
{ZONES}sites:
  dc1:
    director:
      interface: eth0
      status_listen: "127.0.0.1:9100"
      heartbeat: 0.5
      packet: {{workers: 1, dataplane: {dataplane}}}
      pair:
        virtual_router_id: 51
        preempt: {str(preempt).lower()}
        preempt_delay: {1.0 if preempt else 0}  # docs/ha.md: long enough for the master's whole table to arrive
        members:
{members}
    services:
      - name: web
        vips: ["{VIP}:80/tcp"]
        forwarding: dr
        scheduler: wlc
        persistence: {{timeout: 300}}
        real_servers:
{servers}
        health_check: {{type: http, port: 80, interval: 0.3, timeout: 0.3, rise: 1, fall: 2, start_jitter: 0.1}}
"""


class Watch:
    """Polls the site's snapshot in Redis from the test's own namespace: who published, and was it available."""

    def __init__(self, port: int) -> None:
        self.r = redis.Redis(port=port)
        self.key = Keys().site("dc1")
        self.unavailable: list[str] = []
        self.publishers: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            fields = self.r.hgetall(self.key)
            secs, usecs = self.r.time()
            if fields:
                doc = json.loads(fields[b"data"])
                age = secs + usecs / 1e6 - float(fields[b"published_at"])
                self.publishers.add(doc["director_id"])
                if doc["withdrawn"] or age > STALE_AFTER:
                    self.unavailable.append(f"withdrawn={doc['withdrawn']} age={age:.2f} by {doc['director_id']}")
            time.sleep(0.05)

    def close(self) -> list[str]:
        self._stop.set()
        self._thread.join(5)
        self.r.close()
        return self.unavailable


class HALab:
    def __init__(self, lab: Lab, tmp: Path, redis_port: int, dataplane: str) -> None:
        self.tmp, self.redis_port, self.dataplane = tmp, redis_port, dataplane
        sw = lab.netns("sw")
        br = lab.bridge(sw)
        self.client = lab.netns("client")
        lab.port(sw, br, self.client, [f"{a}/24" for a in CLIENTS])
        self.ns, self.bridges, self.d = {}, {}, {}
        for member, (addr, _) in DIRECTORS.items():
            ns = self.ns[member] = lab.netns(member)
            lab.port(sw, br, ns, [f"{addr}/24"])
            self.bridges[member] = RedisBridge(ns.name, redis_port)
        for i, addr in RS.items():
            start_http(real_server(lab, sw, br, tmp, f"rs{i}", [f"{addr}/24"], [VIP], "dr"), f"rs{i}")
        self.runs = 0

    def start(self, member: str, preempt: bool = True) -> DirectorProcess:
        self.runs += 1
        path = self.tmp / f"{member}.yaml"
        path.write_text(self.config_text(preempt))
        d = self.d[member] = DirectorProcess(self.ns[member], path, self.tmp / f"{member}.{self.runs}.log",
                                             member=member)
        d.wait_up(list(RS.values()))
        return d

    def config_text(self, preempt: bool) -> str:
        return config(self.redis_port, self.dataplane, preempt)

    def running(self, member: str) -> bool:
        d = self.d.get(member)
        return d is not None and d.proc.poll() is None

    def role(self, member: str) -> str | None:
        if not self.running(member):
            return None
        pair = (self.d[member].status() or {}).get("pair") or {}
        return pair.get("role")

    def standby_ready(self, master: str, standby: str) -> bool:
        pair = (self.d[master].status() or {}).get("pair") or {}
        return any(m["id"] == standby and m["present"] and m["healthy"] for m in pair.get("members", ()))

    def established(self, member: str) -> dict[str, int]:
        """Established flows per real server in the member's table (a backup's come from sync). Not the
        table's size: that counts the closed flows of earlier tests too (FIN_WAIT lives 120 s)."""
        return {addr: rs.get("active_conns", 0) for addr, rs in self.d[member].servers().items()}

    def close(self) -> None:
        for d in self.d.values():
            d.stop()
        for b in self.bridges.values():
            b.close()


@pytest.fixture(scope="module", params=["userspace", "kernel"])
def ha(request, tmp_path_factory, redis_server):
    with running_lab("ha", HALab, tmp_path_factory.mktemp("ha"), redis_server, request.param) as t:
        yield t


@pytest.fixture
def pair(ha):
    """Every test starts with dc1-a master (preempt on) and dc1-b its backup."""
    for member in ("dc1-a", "dc1-b"):
        if not ha.running(member):
            ha.start(member, preempt=True)
    if ha.role("dc1-a") != "master":  # dc1-a was restarted without preempt: start it again with
        ha.d["dc1-a"].stop()
        ha.start("dc1-a", preempt=True)
    until(lambda: ha.role("dc1-a") == "master" and ha.role("dc1-b") == "backup", "dc1-a master, dc1-b backup", 20)
    return ha


class Clients:
    """The 50 long-lived connections, as one process in the client namespace."""

    def __init__(self, ha: HALab) -> None:
        self.proc = ha.client.popen([PY, "-u", "-c", MANY_CLIENTS, VIP, str(CONNECTIONS // len(CLIENTS)), *CLIENTS],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.first = self.round()
        assert all(not who.startswith("error") for who, _ in self.first), self.first
        assert {who for who, _ in self.first} == {"rs1", "rs2"}, "wlc with persistence spreads five clients"
        self.per_server = {a: sum(who == f"rs{i}" for who, _ in self.first) for i, a in RS.items()}
        """How many of the connections each real server holds."""

    def round(self) -> list[list]:
        self.proc.stdin.write("GET\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def check_survived(self) -> None:
        """Every connection answered, by the same server, on the same TCP connection."""
        now = self.round()
        broken = [(i, before, after) for i, (before, after) in enumerate(zip(self.first, now)) if before != after]
        assert not broken, f"{len(broken)} of {CONNECTIONS} connections broke: {broken[:5]}"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.terminate()
        self.proc.wait(5)


def new_connections_served(ha: HALab) -> None:
    got = [curl(ha.client, f"http://{VIP}/") for _ in range(4)]
    assert all(g in ("rs1", "rs2") for g in got), got


def takeover(ha: HALab, clients: Clients, standby: str, stop, *, clean: bool = False) -> None:
    """``stop()`` the master, check everything survived. A killed master hands nothing over: first wait
    until ``standby`` holds the 50 flows. A ``clean`` stop must hand every flow over itself, the last
    ones confirmed too: it comes right after they were made."""
    if not clean:
        until(lambda: ha.established(standby) == clients.per_server,
              f"{standby} holds the {CONNECTIONS} flows from sync", 10)
    # As an operator handing over checks first: the master hears its standby, able to take over
    # (else a clean stop rightly withdraws the site: docs/ha.md).
    master = next(m for m in DIRECTORS if m != standby)
    until(lambda: ha.standby_ready(master, standby), f"{master} hears {standby} present and healthy", 10)
    stop()
    until(lambda: ha.role(standby) == "master", f"{standby} takes over", 10)
    clients.check_survived()
    new_connections_served(ha)
    if ha.dataplane == "kernel":  # the synced flows took the slow path once and were installed in the kernel
        before = ha.d[standby].status()["packet_path"]["kernel"].get("forwarded_dr", 0)
        clients.check_survived()

        def kernel_forwarded() -> bool:  # the workers report their counters twice a second
            pp = ha.d[standby].status()["packet_path"]
            return pp["dataplane"] == "kernel" and pp["kernel"]["forwarded_dr"] >= before + CONNECTIONS
        until(kernel_forwarded, "the kernel forwards the synced flows")


def test_kill_9_of_the_master_and_its_return_with_preempt(pair, redis_server):
    watch = Watch(redis_server.port)
    clients = Clients(pair)
    try:
        takeover(pair, clients, "dc1-b", lambda: pair.d["dc1-a"].proc.send_signal(signal.SIGKILL))
        pair.d["dc1-a"].stop()
        # Back with preempt on and the higher priority: it takes the VIPs back once it has the flows.
        pair.start("dc1-a", preempt=True)
        until(lambda: pair.role("dc1-a") == "master", "dc1-a preempts", 20)
        clients.check_survived()
        new_connections_served(pair)
        status = pair.d["dc1-a"].status()
        assert status["pair"]["counters"]["sync_received"].get("conns", 0) >= CONNECTIONS
    finally:
        clients.close()
        unavailable = watch.close()
    assert not unavailable, f"the site left DNS: {unavailable[:3]}"
    assert watch.publishers == {"dc1-a", "dc1-b"}


def test_a_clean_stop_hands_over_and_without_preempt_the_old_master_stays_backup(pair, redis_server):
    watch = Watch(redis_server.port)
    clients = Clients(pair)
    try:
        takeover(pair, clients, "dc1-b", lambda: pair.d["dc1-a"].stop(), clean=True)
        assert "released (priority 0)" in pair.d["dc1-b"].log.read_text()  # not the master-down interval
        pair.start("dc1-a", preempt=False)
        until(lambda: pair.role("dc1-a") == "backup", "dc1-a comes back as backup", 20)

        def heard(n: int) -> bool:
            return (pair.d["dc1-a"].status()["pair"]["counters"]["vrrp"].get("rx", 0) >= n
                    and pair.role("dc1-a") == "backup")
        until(lambda: heard(50), "dc1-a hears 50 advertisements of a lower-priority master and stays backup", 20)
        assert pair.role("dc1-b") == "master"
        clients.check_survived()
    finally:
        clients.close()
        unavailable = watch.close()
    assert not unavailable, f"the site left DNS: {unavailable[:3]}"


def vip_mac(ha: HALab) -> str | None:
    """The MAC the client's ARP cache has for the VIP."""
    entries = json.loads(ha.client.run(["ip", "-j", "neigh", "show", VIP]).stdout or "[]")
    return entries[0].get("lladdr") if entries else None


def test_a_false_takeover_ends_with_the_vip_announced_by_the_master_again(pair):
    """The master's event loop stalls past the master-down interval (SIGSTOP): the backup takes the VIP
    and announces it, then yields at the master's next advertisement. The master, hearing a
    lower-priority master, announces the VIP again: the client's ARP cache comes back to it instead
    of keeping the backup's MAC, where nothing is forwarded any more."""
    mac = {m: pair.ns[m].run(["cat", "/sys/class/net/eth0/address"]).stdout.strip() for m in DIRECTORS}
    new_connections_served(pair)
    until(lambda: vip_mac(pair) == mac["dc1-a"], "the client's ARP entry for the VIP says dc1-a", 10)
    stalled = pair.d["dc1-a"].proc
    stalled.send_signal(signal.SIGSTOP)
    try:
        until(lambda: pair.role("dc1-b") == "master", "dc1-b takes over", 10)
        until(lambda: vip_mac(pair) == mac["dc1-b"], "dc1-b's announcement reaches the client", 10)
    finally:
        stalled.send_signal(signal.SIGCONT)
    until(lambda: pair.role("dc1-b") == "backup", "dc1-b yields to dc1-a's advertisement", 10)
    until(lambda: vip_mac(pair) == mac["dc1-a"], "dc1-a announces the VIP again", 10)
    assert "announcing the VIPs again" in pair.d["dc1-a"].log.read_text()
    new_connections_served(pair)
