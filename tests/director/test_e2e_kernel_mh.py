"""An mh service on the kernel data plane, end to end: the tc program schedules new connections (root).

Client (with many addresses), director and three DR real servers on one
bridge, `glb director` with ``dataplane: kernel``. Every new connection's
SYN is scheduled and forwarded by the tc program (the kernel's ``new_flow``
counter) and its state changes applied there (``state_tracked``), each
client address lands where Python's Maglev puts it, Python's sweep then
counts the connections, and a drained server takes no new connection while
the others keep theirs. With persistence, the kernel keeps each client
network on the server its first connection got.
"""

from __future__ import annotations

import ipaddress
import time

import pytest

from director.dataplane.scheduler import Dest, make_scheduler
from tests.director.director_lab import (
    DirectorProcess,
    RedisBridge,
    config_yaml,
    realserver_setup,
    service_yaml,
    start_http,
)
from tests.environment import bpf_unavailable, require
from tests.netns import Lab, lab_unavailable

pytestmark = pytest.mark.netns

VIP = "10.0.0.100"
CLIENTS = [f"10.0.0.{i}" for i in range(20, 44)]
RS = {1: "10.0.0.11", 2: "10.0.0.12", 3: "10.0.0.13"}


def _yaml(weights: dict[int, int], pins: str, extra: str = "") -> str:
    svc = service_yaml("web", [f"{VIP}:80/tcp"], [(RS[i], w) for i, w in weights.items()], scheduler="mh",
                       extra=extra)
    return config_yaml(redis_port=6379, services=svc, max_entries=2000, dataplane="kernel", pin_root=pins)


def _python_choice(weights: dict[int, int], client: str, drained: int | None = None) -> str:
    """Where scheduler.py's Maglev sends a client: the director's table is built the same way (a drained
    server keeps its slots, its clients walk on)."""
    dests = [Dest(ipaddress.ip_address(RS[i]).packed, w) for i, w in weights.items()]
    s = make_scheduler("mh", dests, family=4)
    if drained is not None:
        dests[list(weights).index(drained)].weight = 0
        s.update()
    d = s.schedule(ipaddress.ip_address(client).packed, 0, ipaddress.ip_address(VIP).packed, 80, 0)
    return f"rs{1 + [RS[i] for i in weights].index(str(ipaddress.ip_address(d.addr)))}"


@pytest.fixture(scope="module")
def lab(tmp_path_factory, redis_server):
    require(lab_unavailable(), bpf_unavailable())
    redis_server.start()
    tmp = tmp_path_factory.mktemp("kmh")
    with Lab("kmh") as lab:
        sw = lab.netns("sw")
        br = lab.bridge(sw)
        client = lab.netns("client")
        director = lab.netns("director")
        lab.port(sw, br, client, [f"{a}/24" for a in CLIENTS])
        lab.port(sw, br, director, ["10.0.0.2/24"])
        for i, addr in RS.items():
            ns = lab.netns(f"rs{i}")
            lab.port(sw, br, ns, [f"{addr}/24"])
            realserver_setup(ns, tmp / f"rs{i}.json", [VIP], "dr")
            start_http(ns, f"rs{i}")
        bridge = RedisBridge(director.name, redis_server.port)
        config = tmp / "glb.yaml"
        config.write_text(_yaml({1: 1, 2: 1, 3: 1}, ""))
        d = DirectorProcess(director, config, tmp / "director.log")
        try:
            d.wait_up(list(RS.values()))
            yield client, d
        finally:
            d.stop()
            bridge.close()


def _get(client, source: str) -> str | None:
    res = client.run(["curl", "-s", "-m", "3", "--interface", source, f"http://{VIP}/"], check=False, timeout=8)
    return res.stdout.strip() if res.returncode == 0 else None


def _kernel(d) -> dict[str, int]:
    return (d.status() or {}).get("packet_path", {}).get("kernel", {})


def _settled(d, reason: str, at_least: int) -> int:
    """The kernel's counter once the workers have folded it into a report (twice a second)."""
    deadline = time.monotonic() + 3
    while _kernel(d).get(reason, 0) < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
    return _kernel(d).get(reason, 0)


def _vip_connections(d) -> int:
    return sum(v["connections"] for svc in (d.status() or {"services": []})["services"] for v in svc["vips"])


def test_new_connections_are_scheduled_in_the_kernel_where_python_would(lab):
    client, d = lab
    before, opened = _kernel(d).get("new_flow", 0), _vip_connections(d)
    got = {c: _get(client, c) for c in CLIENTS}
    assert got == {c: _python_choice({1: 1, 2: 1, 3: 1}, c) for c in CLIENTS}
    assert len(set(got.values())) == 3  # spread over every server
    # Each connection's SYN was scheduled by the tc program, not the engine ...
    assert _settled(d, "new_flow", before + len(CLIENTS)) - before == len(CLIENTS)
    # ... counted once as a new connection, and tracked by Python once its sweep read them (/status; the
    # workers fold the kernel's counters into their reports twice a second, so wait for a report).
    deadline = time.monotonic() + 5
    while _vip_connections(d) - opened < len(CLIENTS) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _vip_connections(d) - opened == len(CLIENTS)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        tracked = sum(rs["active_conns"] + rs["inactive_conns"] for rs in d.servers().values())
        if tracked >= len(CLIENTS):
            break
        time.sleep(0.2)
    assert tracked >= len(CLIENTS)
    # Their handshakes and closes were the kernel's too.
    assert _kernel(d).get("state_tracked", 0) >= 2 * len(CLIENTS)


def test_a_drained_server_gets_no_new_connection_and_the_others_keep_their_clients(lab):
    client, d = lab
    d.reload(_yaml({1: 1, 2: 0, 3: 1}, ""))
    deadline = time.monotonic() + 10
    while d.servers()[RS[2]]["weight"] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # the plan reaches the worker, which rewrites the routes
    try:
        got = {c: _get(client, c) for c in CLIENTS}
        # The drained server keeps its slots (no one else moves); its clients take Python's fallback walk.
        assert got == {c: _python_choice({1: 1, 2: 1, 3: 1}, c, drained=2) for c in CLIENTS}
        assert "rs2" not in got.values() and len(set(got.values())) == 2
    finally:
        d.reload(_yaml({1: 1, 2: 1, 3: 1}, ""))
        d.wait_up(list(RS.values()))


def test_persistence_is_kept_in_the_kernel(lab):
    """persistence /30: the first client of each four-address network gets Maglev's server for its own
    address, and the tc program, which made the network's template then, sends the other three there
    too (Maglev alone spreads them); every SYN scheduled by the kernel, none by Python."""
    client, d = lab
    d.reload(_yaml({1: 1, 2: 1, 3: 1}, "", extra="persistence: {timeout: 300, netmask: 30}"))
    deadline = time.monotonic() + 10
    while not (d.status() or {"services": [{}]})["services"][0].get("persistence") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # the plan reaches the worker, which writes the kernel's tables
    try:
        before = _kernel(d).get("new_flow", 0)
        got = {c: _get(client, c) for c in CLIENTS}
        first = {}
        want = {}
        for c in CLIENTS:
            net = int(ipaddress.ip_address(c)) >> 2
            first.setdefault(net, _python_choice({1: 1, 2: 1, 3: 1}, c))
            want[c] = first[net]
        assert got == want
        assert want != {c: _python_choice({1: 1, 2: 1, 3: 1}, c) for c in CLIENTS}  # not Maglev's alone
        assert _settled(d, "new_flow", before + len(CLIENTS)) - before == len(CLIENTS)
        assert _kernel(d).get("pass_template", 0) == 0
    finally:
        d.reload(_yaml({1: 1, 2: 1, 3: 1}, ""))
        deadline = time.monotonic() + 10
        while (d.status() or {"services": [{}]})["services"][0].get("persistence") and time.monotonic() < deadline:
            time.sleep(0.1)
        d.wait_up(list(RS.values()))
