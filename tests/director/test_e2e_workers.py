"""Two packet workers act as one director (root, network namespaces).

A client namespace with many addresses, a DR director with ``packet.workers: 2``
and two real servers on one bridge. What must hold: a client's connections
all reach the worker that holds its persistence entry; wlc balances on the
connections of both workers together; a worker killed with SIGKILL is
restarted and the director keeps serving.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import time
from collections import Counter

import pytest

from tests.director.director_lab import (
    PY,
    DirectorProcess,
    RedisBridge,
    config_yaml,
    curl,
    real_server,
    running_lab,
    service_yaml,
    start_http,
)
from tests.netns import Lab

pytestmark = pytest.mark.netns

VIP = "10.0.0.100"
RS = {1: "10.0.0.11", 2: "10.0.0.12"}
CLIENTS = [f"10.0.1.{i}" for i in range(1, 120)]  # on the client, in 10.0.0.0/16

# "hold VIP SRC...": one connection per source address, held open until stdin closes.
# "keep VIP SRC": one HTTP/1.1 connection from SRC; a request per stdin line; prints who answered.
# "ask VIP SRC N": N HTTP requests, each on a new connection from SRC; prints who answered.
CLIENT = r"""
import http.client, socket, sys
mode, vip = sys.argv[1], sys.argv[2]
if mode == "hold":
    held = [socket.create_connection((vip, 80), timeout=5, source_address=(s, 0)) for s in sys.argv[3:]]
    print("held", len(held), flush=True)
    sys.stdin.read()
elif mode == "keep":
    c = http.client.HTTPConnection(vip, 80, timeout=5, source_address=(sys.argv[3], 0))
    for line in sys.stdin:
        try:
            c.request("GET", "/")
            print(c.getresponse().read().decode().strip(), flush=True)
        except Exception as e:
            print("error", type(e).__name__, flush=True)
else:
    for _ in range(int(sys.argv[4])):
        c = http.client.HTTPConnection(vip, 80, timeout=5, source_address=(sys.argv[3], 0))
        try:
            c.request("GET", "/")
            print(c.getresponse().read().decode().strip(), flush=True)
        except Exception as e:
            print("error", type(e).__name__, flush=True)
        c.close()
"""


def yaml(persistence: bool, scheduler: str = "wlc") -> str:
    return yaml_with({1: 1, 2: 1}, persistence, scheduler)


def yaml_with(weights: dict[int, int], persistence: bool = False, scheduler: str = "wlc") -> str:
    svc = service_yaml("web", [f"{VIP}:80/tcp"], [(RS[i], w) for i, w in weights.items()], scheduler=scheduler)
    if persistence:
        svc += "        persistence: {timeout: 300}\n"
    return config_yaml(redis_port=6379, services=svc, workers=2)


class WorkersLab:
    def __init__(self, lab: Lab, tmp, redis_port: int) -> None:
        self.lab = lab
        sw = lab.netns("sw")
        br = lab.bridge(sw)
        self.client = lab.netns("client")
        self.director = lab.netns("director")
        lab.port(sw, br, self.client, ["10.0.0.10/16", *(f"{c}/16" for c in CLIENTS)])
        lab.port(sw, br, self.director, ["10.0.0.2/16"])
        for i in (1, 2):
            start_http(real_server(lab, sw, br, tmp, f"rs{i}", [f"{RS[i]}/16"], [VIP], "dr"), f"rs{i}")
        self.bridge = RedisBridge(self.director.name, redis_port)
        self.tmp = tmp
        self.config = tmp / "glb.yaml"
        self.d: DirectorProcess | None = None

    def run_director(self, persistence: bool, scheduler: str = "wlc") -> DirectorProcess:
        if self.d is not None:
            self.d.stop()
        self.config.write_text(yaml(persistence, scheduler))
        self.d = DirectorProcess(self.director, self.config, self.tmp / f"director-{persistence}-{scheduler}.log")
        self.d.wait_up([RS[1], RS[2]])
        return self.d

    def hold(self, sources: list[str]):
        import subprocess

        p = self.client.popen([PY, "-c", CLIENT, "hold", VIP, *sources], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == f"held {len(sources)}"
        return p

    def keep(self, source: str):
        import subprocess

        return self.client.popen([PY, "-c", CLIENT, "keep", VIP, source], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, bufsize=1)

    def ask(self, source: str, n: int) -> list[str]:
        res = self.client.run([PY, "-c", CLIENT, "ask", VIP, source, str(n)], timeout=120)
        return res.stdout.split()

    def active(self) -> dict[str, int]:
        return {a: s["active_conns"] for a, s in self.d.servers().items()}

    def close(self) -> None:
        if self.d is not None:
            self.d.stop()
        self.bridge.close()


@pytest.fixture(scope="module")
def wl(tmp_path_factory, redis_server):
    with running_lab("wk", WorkersLab, tmp_path_factory.mktemp("workers"), redis_server) as t:
        yield t


def release(*holders) -> None:
    for p in holders:
        p.stdin.close()
        p.wait(10)


def test_persistence_holds_across_50_connections_while_others_hold_theirs(wl):
    wl.run_director(persistence=True)
    others = wl.hold(CLIENTS[60:76])  # 16 other clients keep a connection open each
    try:
        for client in CLIENTS[:6]:
            got = Counter(wl.ask(client, 50))
            assert sum(got.values()) == 50 and len(got) == 1 and "error" not in got, (client, got)
        workers = wl.d.status()["packet_path"]["workers"]
        assert all(w["forwarded"] > 0 for w in workers)  # the clients spread over both workers
    finally:
        release(others)


def test_wlc_balances_40_long_lived_connections_over_both_workers(wl):
    """Worker 0 takes 10 connections while only rs1 serves; then rs2 is back and
    worker 1 takes 30. Counting alone, worker 1 would see two idle servers and
    split 15/15 (25 against 15); with the counts of both it fills rs2 first."""
    from director.dataplane import fanout

    def on(worker: int) -> list[str]:
        return [c for c in CLIENTS if fanout.bucket(ipaddress.ip_address(c).packed, 2) == worker]

    d = wl.run_director(persistence=False)
    holders = []
    try:
        d.reload(yaml_with({1: 1}))
        d.wait_plan()
        deadline = time.monotonic() + 10
        while RS[2] in d.servers() and time.monotonic() < deadline:
            time.sleep(0.1)
        holders.append(wl.hold(on(0)[:10]))
        d.reload(yaml_with({1: 1, 2: 1}))
        d.wait_up([RS[1], RS[2]])
        holders += [wl.hold(on(1)[k:k + 10]) for k in range(0, 30, 10)]
        deadline = time.monotonic() + 10
        while sum(wl.active().values()) < 40 and time.monotonic() < deadline:
            time.sleep(0.3)  # workers report twice a second
        active = wl.active()
        assert sum(active.values()) == 40, active
        assert all(17 <= n <= 23 for n in active.values()), active
        assert all(w["forwarded"] > 0 for w in d.status()["packet_path"]["workers"])
    finally:
        release(*holders)


def kill_and_wait(d: DirectorProcess, index: int) -> list[dict]:
    """SIGKILL packet worker ``index``; return /status's workers once its replacement is ready."""
    victim = d.status()["packet_path"]["workers"][index]["pid"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        workers = d.status()["packet_path"]["workers"]
        if workers[index]["pid"] not in (None, victim) and workers[index]["restarts"] == 1:
            break
        assert time.monotonic() < deadline, workers
        time.sleep(0.2)
    d.wait_plan()  # plan_applied is -1 until the new worker is ready (it joined the fanout group)
    return d.status()["packet_path"]["workers"]


def test_a_killed_worker_comes_back_and_the_director_keeps_serving(wl):
    d = wl.d if wl.d is not None else wl.run_director(persistence=False)
    before = d.status()["packet_path"]["workers"]
    workers = kill_and_wait(d, 1)
    assert workers[0]["pid"] == before[0]["pid"] and workers[0]["restarts"] == 0
    assert 'glb_director_packet_worker_restarts_total{worker="1"} 1.0' in d.metrics()
    for client in CLIENTS[80:90]:  # clients of both workers are served
        assert set(wl.ask(client, 3)) <= {"rs1", "rs2"}
    assert curl(wl.client, f"http://{VIP}/") in ("rs1", "rs2")
    assert d.proc.poll() is None


def forwarded(d: DirectorProcess) -> list[int]:
    """Frames each worker forwarded, once their reports (every 0.5 s) settled."""
    last = None
    while True:
        now = [w["forwarded"] for w in d.status()["packet_path"]["workers"]]
        if now == last:
            return now
        last = now
        time.sleep(0.7)


def test_the_first_worker_killed_gets_its_clients_back_and_their_mh_flows_resume(wl):
    """Killing worker 0 moves worker 1 to the kernel's first fanout position and
    appends the new worker 0: the program must follow, or the client lands on
    worker 1, which never saw its connection."""
    from director.dataplane import fanout

    d = wl.run_director(persistence=False, scheduler="mh")
    client = next(c for c in CLIENTS[90:] if fanout.bucket(ipaddress.ip_address(c).packed, 2) == 0)
    conn = wl.keep(client)
    try:
        conn.stdin.write("GET\n")
        first = conn.stdout.readline().strip()
        assert first in ("rs1", "rs2")
        before = forwarded(d)
        assert before[0] > 0 and before[1] == 0  # the kernel put the client on worker 0
        kill_and_wait(d, 0)
        for _ in range(3):  # the same connection, picked up mid-stream by the new worker 0 (mh)
            conn.stdin.write("GET\n")
            assert conn.stdout.readline().strip() == first
        after = forwarded(d)
        assert after[0] > 0 and after[1] == before[1], (before, after)
    finally:
        conn.stdin.close()
        conn.wait(10)
