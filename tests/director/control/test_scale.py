"""The director's control plane at scale (issue 19): a probe result that changes
nothing costs no rebuild and no publication, and a late event loop never
turns into a false down."""

from __future__ import annotations

import asyncio
import resource
import select
import socket
import threading
import time

import pytest

from glb import config
from director.control.checker import Checker, Target, targets
from director.control.health import HealthTable
from director.control.main import Director
from director.control.probes import ProbeResult, Prober
from director.control.site import SnapshotCache, build_snapshot
from glb.config import TcpCheck
from director.control.health import ServerKey
from tests.configs import ZONES
from tests.waiting import async_until


def _config(servers: int, check: str, redis_port: int = 1) -> config.Config:
    rs = "\n".join(f"          - {{address: 127.0.0.{i + 2}, port: 80}}" for i in range(servers))
    return config.loads(f"""
redis: {{url: "redis://127.0.0.1:{redis_port}/0"}}
{ZONES}sites:
  dc1:
    director: {{interface: lo, id: t, status_listen: "127.0.0.1:9"}}
    services:
      - name: web
        vips: ["192.0.2.10:80/tcp"]
        health_check: {check}
        real_servers:
{rs}
""")


class _Spy:
    def __init__(self) -> None:
        self.calls = 0

    def poke(self) -> None:
        self.calls += 1

    def apply(self) -> None:
        self.calls += 1

    def counters(self) -> dict:
        return {}


def test_a_result_that_changes_nothing_rebuilds_and_publishes_nothing():
    d = Director(_config(3, "{type: tcp, rise: 1, fall: 2, initial: down}"), "dc1", probe=lambda *a: None)
    publisher, plan = _Spy(), _Spy()
    d.publisher = publisher
    d.packet_path = plan  # what _plan_dirty() calls apply() on
    cache = SnapshotCache()
    d._snapshots = cache
    tgts = {t.key: t for t in targets(d.table.site)}
    a, b, c = tgts.values()

    for t in (a, b, c):  # down -> up: a change each
        d._on_results([(t, ProbeResult(True, "connected", 0.001))])
    assert publisher.calls == 3 and plan.calls == 3
    first = d._build(False)

    for _ in range(5):  # the same result again and again: nothing to do
        for t in (a, b, c):
            d._on_results([(t, ProbeResult(True, "connected", 0.002))])
    assert publisher.calls == 3 and plan.calls == 3

    # The heartbeat's snapshot reuses every document: nothing it shows changed.
    again = d._build(False)
    assert again.services[0] is first.services[0]

    # One failure (fall 2): the result changed, the state did not. Only that
    # server's document is rebuilt; still no publication, no new plan.
    d._on_results([(b, ProbeResult(False, "connection refused", 0.0))])
    assert publisher.calls == 3 and plan.calls == 3
    third = d._build(False)
    olds, news = first.services[0].real_servers, third.services[0].real_servers
    assert [o is n for o, n in zip(olds, news)] == [True, False, True]
    assert news[1].last_result == "connection refused" and news[1].state == "up"

    # The second failure takes b down: one publication, one new plan.
    d._on_results([(b, ProbeResult(False, "connection refused", 0.0))])
    assert publisher.calls == 4 and plan.calls == 4
    assert build_snapshot(d.table, "t", 1.0).services[0].real_servers[1].state == "down"


def test_snapshot_cache_follows_a_reload_that_removes_servers():
    site3 = _config(3, "{type: tcp, initial: up}").sites[0]
    site2 = _config(2, "{type: tcp, initial: up}").sites[0]
    table = HealthTable(site3, 0.0)
    cache = SnapshotCache()
    assert len(build_snapshot(table, "t", 1.0, cache=cache).services[0].real_servers) == 3
    table.reconfigure(site2, 2.0)
    snap = build_snapshot(table, "t", 3.0, cache=cache)
    assert [rs.address for rs in snap.services[0].real_servers] == ["127.0.0.2", "127.0.0.3"]
    assert snap == build_snapshot(table, "t", 3.0)  # the cache never changes what is published


# --------------------------------------------------------------------------
# A late event loop


class _ThreadServer:
    """TCP and HTTP on 127.0.0.2..5 (one port), served from a thread: it
    answers while the event loop under test is blocked."""

    def __init__(self, servers: int = 4) -> None:
        self.socks = []
        self.port = 0
        for i in range(servers):
            sock = socket.socket()
            sock.bind((f"127.0.0.{i + 2}", self.port))
            sock.listen(128)
            self.port = sock.getsockname()[1]
            self.socks.append(sock)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            ready, _, _ = select.select(self.socks, [], [], 0.1)
            for sock in ready:
                conn, _ = sock.accept()
                with conn:
                    conn.settimeout(1.0)
                    try:
                        if b"\r\n\r\n" in conn.recv(4096):
                            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    except OSError:
                        pass

    def close(self) -> None:
        self.stopping = True
        self.thread.join()
        for sock in self.socks:
            sock.close()


@pytest.fixture
def thread_server():
    server = _ThreadServer()
    yield server
    server.close()


@pytest.mark.parametrize("kind", ["tcp", "http"])
async def test_an_event_loop_blocked_longer_than_the_timeout_marks_nothing_down(thread_server, kind):
    timeout = 0.3
    site = _config(4, f"{{type: {kind}, port: {thread_server.port}, interval: {timeout}, timeout: {timeout}, rise: 1, "
                      f"fall: 1, initial: up, start_jitter: 0.1}}").sites[0]
    # fall: 1, the strictest: a single counted failure would take a server down.
    table = HealthTable(site, time.time())
    transitions = []
    results = []

    def on_results(batch: list[tuple[Target, ProbeResult]]) -> None:
        results.extend(r for _, r in batch)
        transitions.extend(table.record_many(((t.key, r.ok, r.detail, r.latency) for t, r in batch), time.time()))

    prober = Prober()
    checker = Checker(prober, on_results, max_probes=16)
    loop = asyncio.get_running_loop()
    try:
        checker.update(targets(site))
        await async_until(lambda: len(results) >= 8, "the first checks")
        # Block the loop (as a slow callback would) for longer than the
        # timeout, at phases that land before, during and after probes.
        for phase in (0.0, 0.013, 0.047, 0.071, 0.093):
            blocked = loop.create_future()
            loop.call_later(phase, lambda f=blocked: (time.sleep(3 * timeout), f.set_result(None)))
            await blocked
            seen = len(results)
            await async_until(lambda: len(results) >= seen + 8, "checks after the block")
    finally:
        await checker.stop()
        await prober.close()
    assert checker.skipped_for_lag >= 1  # the blocks did make checks late
    assert [t for t in transitions if t.new == "down"] == []
    assert all(r.ok for r in results), [r.detail for r in results if not r.ok]
    assert checker.lag.count >= len(results)


def _target(i: int) -> Target:
    hc = TcpCheck(interval=0.05, timeout=0.05, start_jitter=0.0)
    return Target(ServerKey("web", f"10.0.0.{i}", 0), f"10.0.0.{i}", 80, hc)


async def test_a_stalled_result_is_not_counted_and_the_check_runs_again():
    calls = 0

    async def probe(check, address, port):
        nonlocal calls
        calls += 1
        # The first answer is what a probe says when its timeout fired on a stalled loop.
        return ProbeResult(False, "timeout after 0.05s", 0.05, stalled=calls == 1)

    results: list[ProbeResult] = []
    checker = Checker(probe, lambda batch: results.extend(r for _, r in batch), max_probes=4)
    checker.update([_target(1)])
    try:
        await async_until(lambda: len(results) >= 1, "a counted result")
    finally:
        await checker.stop()
    assert calls >= 2 and not results[0].stalled
    assert checker.skipped_for_lag == 1


def _unanswering_port(keep: list[socket.socket]) -> int:
    """A port whose connects hang: its listen backlog of 0 is full after one
    connection, so further SYNs go unanswered. Sockets go into ``keep``."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    keep.append(lsock)
    port = lsock.getsockname()[1]
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        keep.append(s)
    return port


async def test_a_probe_times_out_cleanly_with_descriptors_past_1023():
    # Past 1023, select() refuses a descriptor: the deadline's poll must not.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    keep: list[socket.socket] = []
    prober = Prober()
    try:
        port = _unanswering_port(keep)
        while keep[-1].fileno() < 1030:
            keep.append(socket.socket())
        r = await prober(TcpCheck(timeout=0.1), "127.0.0.1", port)
        assert (r.ok, r.detail) == (False, "timeout after 0.1s")
    finally:
        for s in keep:
            s.close()
        await prober.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_prober_reports_a_timeout_that_fired_on_a_stalled_loop():
    fillers: list[socket.socket] = []
    port = _unanswering_port(fillers)
    prober = Prober()
    try:
        check = TcpCheck(timeout=0.1)
        on_time = await prober(check, "127.0.0.1", port)
        assert (on_time.ok, on_time.detail, on_time.stalled) == (False, "timeout after 0.1s", False)
        loop = asyncio.get_running_loop()
        loop.call_soon(time.sleep, 0.5)  # blocks past the deadline by more than the timeout
        late = await prober(check, "127.0.0.1", port)
        assert (late.ok, late.stalled) == (False, True)
    finally:
        for s in fillers:
            s.close()
        await prober.close()


# --------------------------------------------------------------------------
# Batches and the prober's epoll set


class _HeldProbes:
    """A callback prober whose probes end when the test says (``finish_all``)."""

    def __init__(self) -> None:
        self.running: list = []

    async def __call__(self, check, address, port):  # pragma: no cover - every check here has start()
        raise AssertionError("coroutine probe used")

    def start(self, check, address, port, done, token):
        self.running.append((done, token))
        return lambda: None

    def finish_all(self, result: ProbeResult) -> None:
        running, self.running = self.running, []
        for done, token in running:
            done(token, result)


async def test_results_of_one_loop_turn_reach_on_results_in_one_call():
    probes = _HeldProbes()
    batches: list[list] = []
    checker = Checker(probes, batches.append, max_probes=8)
    checker.update([_target(i) for i in range(1, 4)])
    try:
        await async_until(lambda: len(probes.running) == 3, "three probes in flight")
        asyncio.get_running_loop().call_soon(probes.finish_all, ProbeResult(True, "connected", 0.001))
        await async_until(lambda: batches, "the batch")
        await asyncio.sleep(0)
        assert [sorted(t.address for t, _ in b) for b in batches] == [["10.0.0.1", "10.0.0.2", "10.0.0.3"]]
    finally:
        await checker.stop()


async def test_the_poller_lets_go_of_every_ended_probe(thread_server):
    # Connected, refused and timed out: each probe's descriptor leaves the epoll set.
    fillers: list[socket.socket] = []
    hanging = _unanswering_port(fillers)
    prober = Prober()
    try:
        checks = [(TcpCheck(timeout=0.2), f"127.0.0.{i + 2}", thread_server.port) for i in range(4)]
        checks += [(TcpCheck(timeout=0.2), "127.0.0.1", hanging), (TcpCheck(timeout=0.2), "127.0.0.1", 1)]
        results = await asyncio.gather(*(prober(*c) for c in checks))
        assert [r.ok for r in results] == [True] * 4 + [False, False]
        assert len(prober.poller()) == 0
    finally:
        for s in fillers:
            s.close()
        await prober.close()
