"""Direct Routing end to end: client, director and real servers on one bridge (root).

Every component is the real one: `glb realserver setup --mode dr` on each real
server (VIPs on lo, ARP silenced), an HTTP server naming itself, `glb director`
as its own process owning the VIPs on eth0 with the session's redis-server,
curl and scapy on the client. One lab per module (building it and waiting for
health checks is the slow part); each test sets the config it needs.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.director.director_lab import (
    KEEPALIVE_CLIENT,
    PY,
    DirectorLab,
    DirectorProcess,
    config_yaml,
    counting_table,
    curl,
    lab_per_dataplane,
    nft_counters,
    real_server,
    service_yaml,
    start_http,
)
from director.dataplane import kernelmaps as km
from director.dataplane.bpf import BPF_MAXINSNS, bpf_program
from tests.environment import tcx_unavailable
from tests.netns import Lab

pytestmark = pytest.mark.netns

VIP, VIP6 = "10.0.0.100", "fd00::100"
CLIENT, CLIENT6 = "10.0.0.10", "fd00::10"
RS = {1: "10.0.0.11", 2: "10.0.0.12", 3: "10.0.0.13"}
RS6 = {1: "fd00::11", 2: "fd00::12"}
MAX_ENTRIES = 2000


def services(weights: dict[int, int]) -> str:
    return (service_yaml("web", [f"{VIP}:80/tcp"], [(RS[i], w) for i, w in weights.items()])
            + service_yaml("web6", [f"[{VIP6}]:80/tcp"], [(RS6[1], 1), (RS6[2], 1)]))


class DRLab(DirectorLab):
    def __init__(self, lab: Lab, tmp, redis_port: int, dataplane: str) -> None:
        self.lab = lab
        self.dataplane = dataplane
        sw = lab.netns("sw")
        br = lab.bridge(sw)
        self.client = lab.netns("client")
        self.director = lab.netns("director")
        lab.port(sw, br, self.client, [f"{CLIENT}/24", f"{CLIENT6}/64"])
        lab.port(sw, br, self.director, ["10.0.0.2/24", "fd00::2/64"])
        self.rs = {}
        for i in (1, 2, 3):
            addrs = [f"{RS[i]}/24"] + ([f"{RS6[i]}/64"] if i in RS6 else [])
            self.rs[i] = real_server(lab, sw, br, tmp, f"rs{i}", addrs, [VIP, VIP6], "dr")
            start_http(self.rs[i], f"rs{i}")
        # Count what reaches the director from a VIP (replies must not) and the client's arrivals.
        for ns in (self.director, self.client):
            counting_table(ns, {"from_vip": f"ip saddr {VIP}", "from_vip6": f"ip6 saddr {VIP6}",
                                "to_vip": f"ip daddr {VIP}"})
        self.tmp = tmp
        # The kernel data plane pins its maps on a bpffs of the lab's own (``ip netns exec`` remounts /sys,
        # hiding the host's /sys/fs/bpf), so a restarted director finds them.
        self.pins = ""
        if dataplane == "kernel":
            (tmp / "bpf").mkdir()
            subprocess.run(["mount", "-t", "bpf", "bpf", str(tmp / "bpf")], check=True)
            self.pins = str(tmp / "bpf")
        self.start_director(tmp, redis_port, self.yaml({1: 1, 2: 1}))

    def yaml(self, weights: dict[int, int]) -> str:
        return config_yaml(redis_port=6379, services=services(weights), max_entries=MAX_ENTRIES,
                           dataplane=self.dataplane, pin_root=self.pins)

    def reload(self, weights: dict[int, int]) -> None:
        self.d.reload(self.yaml(weights))

    def who(self, n: int, six: bool = False) -> Counter:
        url = f"http://[{VIP6}]/" if six else f"http://{VIP}/"
        return Counter(curl(self.client, url) for _ in range(n))

    def restart(self, between=None) -> None:
        """Stop the director (SIGTERM) and start another with the same config (``between()`` in between)."""
        assert self.d.stop() == 0
        if between is not None:
            between()
        self.d = DirectorProcess(self.director, self.config, self.tmp / "director-restarted.log")

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.pins:
                subprocess.run(["umount", self.pins], check=False)


@pytest.fixture(scope="module", params=["userspace", "kernel"])
def dr(request, tmp_path_factory, redis_server):
    """The lab with the director forwarding established flows in userspace (the engine alone), then
    in the kernel (the tc program; the engine schedules new flows and takes the rest)."""
    yield from lab_per_dataplane("dr", DRLab, [RS[1], RS[2], RS6[1], RS6[2]], request, tmp_path_factory, redis_server)


@pytest.fixture
def base(dr):
    """Every test starts from rs1 and rs2 at weight 1."""
    dr.reload({1: 1, 2: 1})
    dr.d.wait_up([RS[1], RS[2]])
    deadline = time.monotonic() + 10
    while RS[3] in dr.d.servers() and time.monotonic() < deadline:
        time.sleep(0.1)
    return dr


def test_every_real_server_serves_over_time_ipv4_and_ipv6(base):
    assert base.who(8) == Counter({"rs1": 4, "rs2": 4})  # rr
    assert base.who(8, six=True) == Counter({"rs1": 4, "rs2": 4})


def test_replies_do_not_pass_through_the_director(base):
    before = nft_counters(base.director, "glbt")
    rx_before = base.director.link_stats("eth0")["rx_packets"]
    got = base.who(6)
    assert sum(got.values()) == 6 and None not in got
    after = nft_counters(base.director, "glbt")
    client = nft_counters(base.client, "glbt")
    # The client's packets came through the director (nftables' ingress hook runs after tc's, so it
    # sees only what the kernel data plane left to the engine; the link counts them all) ...
    if base.dataplane == "kernel":
        assert base.director.link_stats("eth0")["rx_packets"] - rx_before >= 6 * 5
    else:
        assert after["to_vip"] - before["to_vip"] >= 6 * 5
    assert after["from_vip"] == 0 and after["from_vip6"] == 0  # ... the replies never did
    assert client["from_vip"] >= 6 * 4  # yet the client got them, straight from the real servers
    # The director's kernel dropped its own copy of every VIP packet (no RST, no forwarding); with the
    # kernel data plane its stack gets none at all (forwarded, or sent down the engine's slow-path veth).
    guard = base.director.run(["nft", "list", "table", "netdev", "glb_director"]).stdout
    guarded = guard.split("ip daddr @vips4")[1].split("\n")[0]
    assert "drop" in guard and (("packets 0 " in guarded) == (base.dataplane == "kernel"))
    metrics = base.d.metrics()
    assert 'glb_director_vip_packets_total{service="web",vip="10.0.0.100:80/tcp"}' in metrics
    pp = base.d.status()["packet_path"]
    assert pp["dataplane"] == base.dataplane
    if base.dataplane == "kernel":  # established flows took the tc program; the engine the rest
        deadline = time.monotonic() + 3  # the workers fold the kernel's counters into a report twice a second
        while pp["kernel"]["forwarded_dr"] < 6 * 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            pp = base.d.status()["packet_path"]
        assert pp["kernel"]["forwarded_dr"] >= 6 * 2
        assert 'glb_director_kernel_packets_total{reason="forwarded_dr"}' in metrics
    else:
        assert pp["loop"] == "c"  # established flows took the C loop


def _keepalive(ns, vip: str):
    proc = ns.popen([PY, "-u", "-c", KEEPALIVE_CLIENT, vip], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)

    def ask() -> str:
        proc.stdin.write("GET\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    return proc, ask


def test_a_flow_stays_on_its_server_when_another_is_added(base):
    proc, ask = _keepalive(base.client, VIP)
    try:
        owner = ask()
        assert owner in ("rs1", "rs2")
        base.reload({1: 1, 2: 1, 3: 1})
        base.d.wait_up([RS[3]])
        assert [ask() for _ in range(5)] == [owner] * 5
        assert "rs3" in base.who(9)  # new flows reach the newcomer
    finally:
        proc.terminate()


def _kernel_forwarded(base) -> int:
    return base.d.status()["packet_path"]["kernel"]["forwarded_dr"]


# Kernel only: the userspace engine's table does not outlive the process (mh flows re-hash; others reset).
@pytest.mark.only_params(dr=["kernel"])
def test_a_restarted_director_keeps_forwarding_established_flows(base):
    """rr schedules anew after a restart, and Python's table starts empty: only the kernel's pinned maps
    keep an established connection on its server (and close it through Python, which adopts the flow)."""
    assert base.dataplane == "kernel"
    procs, owners = [], []
    try:
        for _ in range(4):  # rr: two connections on each server
            proc, ask = _keepalive(base.client, VIP)
            procs.append((proc, ask))
            owners.append(ask())
        assert set(owners) == {"rs1", "rs2"}
        base.restart()
        base.d.wait_up([RS[1], RS[2]])
        assert "reusing the maps pinned" in base.d.log.read_text()
        how = "clsact" if tcx_unavailable() else "tcx"  # tcx where the kernel has it (6.6+)
        assert f"kernel data plane: attached at {how} ingress of eth0" in base.d.log.read_text()
        before = _kernel_forwarded(base)  # the reused counters so far (sampled late, if anything: never more)
        assert [ask() for _, ask in procs] == owners
        # By the kernel (the new director's table never saw those flows open): each ask's request at least.
        base.lab.wait_for(lambda: _kernel_forwarded(base) >= before + 4, timeout=5,
                          what="the kernel to count the established flows' packets")
        servers = base.d.servers()
        assert sum(servers[RS[i]]["active_conns"] + servers[RS[i]]["inactive_conns"] for i in (1, 2)) == 0
        for proc, _ in procs:  # each closes: its FIN goes through Python, which adopts the flow first
            proc.stdin.close()
            assert proc.wait(10) == 0
        deadline = time.monotonic() + 5  # counters reach /status once a second
        while time.monotonic() < deadline:
            servers = base.d.servers()
            if sum(servers[RS[i]]["inactive_conns"] for i in (1, 2)) >= 4:
                break
            time.sleep(0.2)
        assert sum(servers[RS[i]]["inactive_conns"] for i in (1, 2)) >= 4, servers  # adopted, closing
    finally:
        for proc, _ in procs:
            proc.kill()


def _an_older_plan_layout(base) -> None:
    """What a GLB release whose plan maps (routes, lookup tables, counters...) differed from this one's
    leaves in the pins: another id for that group in ``layout`` (kernelmaps.GROUPS)."""
    from director.dataplane.libbpf import _libbpf

    (layout,) = Path(base.pins).glob("*/layout")
    lib = _libbpf()
    fd = lib.bpf_obj_get(str(layout).encode())
    assert fd >= 0
    try:
        key, value = km.U32.pack(list(km.GROUPS).index("plan")), km.U64.pack(0x5EED | 1)
        assert lib.bpf_map_update_elem(fd, key, value, 0) == 0
    finally:
        os.close(fd)


@pytest.mark.only_params(dr=["kernel"])
def test_an_upgrade_that_changed_the_plan_s_maps_keeps_established_flows(base):
    """The pins of a release whose routes, lookup tables or counters had another layout: those maps are
    rebuilt empty, the flows' maps kept, and the new director's first plan writes the routes the kept
    flows hold, so the kernel (its counters new, from 0) forwards them on their servers."""
    procs, owners = [], []
    try:
        for _ in range(4):
            proc, ask = _keepalive(base.client, VIP)
            procs.append((proc, ask))
            owners.append(ask())
        assert set(owners) == {"rs1", "rs2"}
        base.restart(between=lambda: _an_older_plan_layout(base))
        base.d.wait_up([RS[1], RS[2]])
        log = base.d.log.read_text()
        assert "reusing the maps pinned" in log and "(established flows kept; rebuilt empty, another layout: plan)" in log
        before = _kernel_forwarded(base)
        assert [ask() for _, ask in procs] == owners
        base.lab.wait_for(lambda: _kernel_forwarded(base) >= before + 4, timeout=5,
                          what="the kernel to count the established flows' packets")
        # Python never saw them open (an earlier test's closed flows, which the sweep hands it, are inactive).
        assert sum(s["active_conns"] for s in base.d.servers().values()) == 0
        for proc, _ in procs:  # each closes through Python, which adopts the flow
            proc.stdin.close()
            assert proc.wait(10) == 0
    finally:
        for proc, _ in procs:
            proc.kill()


def test_weight_zero_drains_without_breaking_established_flows(base):
    procs = []
    try:
        held = {}
        for _ in range(4):  # rr: two connections on each server
            proc, ask = _keepalive(base.client, VIP)
            procs.append(proc)
            held.setdefault(ask(), []).append(ask)
        assert set(held) == {"rs1", "rs2"}
        base.reload({1: 0, 2: 1})
        deadline = time.monotonic() + 10
        while base.d.servers()[RS[1]]["weight"] != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        base.d.wait_plan()
        assert base.who(6) == Counter({"rs2": 6})
        for ask in held["rs1"]:
            assert [ask() for _ in range(3)] == ["rs1"] * 3  # drained, established flows intact
        # The table still counts them on the drained server (the director samples the engine each second).
        base.lab.wait_for(lambda: base.d.servers()[RS[1]]["active_conns"] >= 2, timeout=5, what="active conns")
    finally:
        for p in procs:
            p.terminate()


def test_a_removed_server_gets_no_new_flows(base):
    base.reload({1: 1})
    deadline = time.monotonic() + 10
    while RS[2] in base.d.servers() and time.monotonic() < deadline:
        time.sleep(0.1)
    base.d.wait_plan()
    assert base.who(6) == Counter({"rs1": 6})


SYN_FLOOD = r"""
import logging, sys
logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
from scapy.all import IP, TCP, Ether, sendp, conf
count = int(sys.argv[2])
frames = [Ether(dst=sys.argv[3]) / IP(src=f"10.0.{1 + i // 250 % 200}.{i % 250 + 1}", dst=sys.argv[1]) /
          TCP(sport=1024 + i % 60000, dport=80, flags="S", seq=i) for i in range(count)]
s = conf.L2socket(iface="eth0")
for f in frames:
    s.send(f)
print(count)
"""


@pytest.mark.timeout(600)  # about 20 s alone; the flood's length scales with a loaded machine
def test_a_syn_flood_keeps_the_table_at_its_bound_and_the_director_serving(base):
    director_mac = base.director.run(["cat", "/sys/class/net/eth0/address"]).stdout.strip()
    flood = base.client.popen([PY, "-c", SYN_FLOOD, VIP, "12000", director_mac], stdout=subprocess.PIPE, text=True)
    served = Counter()
    while flood.poll() is None:
        served.update(base.who(2))
    assert flood.wait(120) == 0
    served.update(base.who(4))
    assert None not in served and sum(served.values()) >= 6
    def flood_counted() -> dict | None:
        pp = base.d.status()["packet_path"]
        return pp if pp["evicted"] >= 12000 - MAX_ENTRIES - 100 else None

    # The engine reports twice a second and the director samples once: wait for the flood's evictions to show.
    pp = base.lab.wait_for(flood_counted, timeout=10, what="the flood's evictions to be reported")
    assert pp["connections"] <= MAX_ENTRIES
    assert "glb_director_connections_evicted_total" in base.d.metrics()


@contextmanager
def restarted(dr, text: str):
    """The director restarted with config ``text`` (packet settings apply on restart), then as the lab built it."""
    log = dr.d.log
    dr.d.stop()
    dr.config.write_text(text)
    dr.d = DirectorProcess(dr.director, dr.config, log)
    try:
        dr.d.wait_up([RS[1], RS[2]])
        yield dr
    finally:
        dr.d.stop()
        dr.config.write_text(dr.yaml({1: 1, 2: 1}))
        dr.d = DirectorProcess(dr.director, dr.config, log)
        dr.d.wait_up([RS[1], RS[2], RS6[1], RS6[2]])


def test_two_packet_workers_share_the_interface(dr):
    """packet.workers: 2 joins two workers with PACKET_FANOUT: each frame is
    forwarded once, by one of them, and clients spread over both (all of one
    client's flows go to one worker: tests/director/test_e2e_workers.py). The
    kernel data plane needs one worker: ``auto`` falls back to the engine."""
    with restarted(dr, config_yaml(redis_port=6379, services=services({1: 1, 2: 1}), max_entries=MAX_ENTRIES,
                                   workers=2, dataplane="userspace" if dr.dataplane == "userspace" else "auto")):
        assert len(dr.d.status()["packet_path"]["workers"]) == 2

        def settled() -> tuple[int, list[int]]:
            # Workers report twice a second: wait until the counters stop moving.
            last = None
            while True:
                pp = dr.d.status()["packet_path"]
                now = (pp["forwarded"], [w["forwarded"] for w in pp["workers"]])
                if now == last:
                    return now
                last = now
                time.sleep(0.7)

        before, before_each = settled()
        wire_before = nft_counters(dr.director, "glbt")["to_vip"]
        sources = [f"10.0.0.{60 + i}" for i in range(12)]
        for src in sources:
            dr.client.ip("addr", "add", f"{src}/24", "dev", "eth0")
        try:
            served = Counter(dr.client.run(["curl", "-s", "-m", "3", "--interface", src, f"http://{VIP}/"],
                                           check=False).stdout.strip() or None
                             for src in sources for _ in range(3))
        finally:
            for src in sources:
                dr.client.ip("addr", "del", f"{src}/24", "dev", "eth0")
        assert None not in served and set(served) == {"rs1", "rs2"}
        after, after_each = settled()
        wire = nft_counters(dr.director, "glbt")["to_vip"] - wire_before
        assert after - before == wire  # not one frame forwarded twice (or lost)
        assert all(a > b for a, b in zip(after_each, before_each))  # both workers took clients


def process_states(pid: int, samples: int = 40) -> list[str]:
    """The scheduler state letter of ``pid`` (R running or runnable, S sleeping ...), sampled."""
    out = []
    for _ in range(samples):
        stat = Path(f"/proc/{pid}/stat").read_text()
        out.append(stat[stat.rindex(")") + 2])
        time.sleep(0.005)
    return out


def test_busy_polling_workers_forward_and_never_sleep(dr):
    """packet.busy_poll: true: the worker spins on its ring instead of sleeping in poll(2), and forwards as before."""
    text = dr.yaml({1: 1, 2: 1})
    assert "packet: {workers: 1," in text
    with restarted(dr, text.replace("packet: {workers: 1,", "packet: {workers: 1, busy_poll: true,")):
        assert dr.who(8) == Counter({"rs1": 4, "rs2": 4})
        assert dr.who(8, six=True) == Counter({"rs1": 4, "rs2": 4})
        (worker,) = [w["pid"] for w in dr.d.status()["packet_path"]["workers"]]
        # Idle now: a polling worker would sleep (S) between its 20 ms ticks; this one stays on the CPU.
        states = process_states(worker)
        assert states.count("R") > len(states) // 2, states
    # The same idle check against the ordinary worker, so the one above can tell the two apart.
    (worker,) = [w["pid"] for w in dr.d.status()["packet_path"]["workers"]]
    states = process_states(worker)
    assert states.count("S") > len(states) // 2, states


EXTRA_VIPS = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(800)]


def test_more_vips_than_a_classic_bpf_program_holds(dr):
    """Past the kernel's 4096 instructions the socket filter lets all IP and ARP in and Python picks the VIPs."""
    vips = [VIP, *EXTRA_VIPS]
    assert len(bpf_program([ipaddress.ip_address(v).packed for v in vips] + [ipaddress.ip_address(VIP6).packed])) > BPF_MAXINSNS
    many = (service_yaml("web", [f"{v}:80/tcp" for v in vips], [(RS[1], 1), (RS[2], 1)])
            + service_yaml("web6", [f"[{VIP6}]:80/tcp"], [(RS6[1], 1), (RS6[2], 1)]))
    far = EXTRA_VIPS[-1]
    dr.client.ip("route", "add", "10.1.0.0/16", "dev", "eth0")
    try:
        with restarted(dr, config_yaml(redis_port=6379, services=many, max_entries=MAX_ENTRIES,
                                       dataplane=dr.dataplane)):
            assert dr.who(8) == Counter({"rs1": 4, "rs2": 4})
            assert dr.who(4, six=True) == Counter({"rs1": 2, "rs2": 2})
            # The last VIP of 801: its ARP request answered with the director's MAC, its SYNs forwarded
            # (the real servers do not hold it, so nothing answers them).
            assert curl(dr.client, f"http://{far}/", timeout=1) is None
            mac = json.loads(dr.director.ip("-j", "link", "show", "eth0").stdout)[0]["address"]
            assert f"lladdr {mac}" in dr.client.ip("neigh", "show", far).stdout
            metric = f'glb_director_vip_packets_total{{service="web",vip="{far}:80/tcp"}} '
            dr.lab.wait_for(lambda: any(line.startswith(metric) and float(line.split()[-1]) > 0
                                        for line in dr.d.metrics().splitlines()),
                            what=f"packets to {far} counted")
    finally:
        dr.client.ip("route", "del", "10.1.0.0/16", "dev", "eth0")


def test_a_killed_packet_worker_comes_back_with_its_data_plane(base):
    """The supervisor restarts a worker killed with SIGKILL. With the kernel data plane the new
    worker loads the program again and takes the dead one's place at tc ingress and its
    slow-path veth: replaced, not added beside them (the old program would forward by maps
    nobody updates)."""

    def attached() -> list[str]:
        return base.director.ingress_programs(ids=True)

    def slow_paths() -> list[str]:
        links = json.loads(base.director.ip("-j", "link", "show").stdout)
        return sorted(link["ifname"] for link in links if link["ifname"].startswith("glb"))

    before = attached()
    (victim,) = [w["pid"] for w in base.d.status()["packet_path"]["workers"]]
    os.kill(victim, signal.SIGKILL)
    base.lab.wait_for(lambda: base.d.status()["packet_path"]["workers"][0]["pid"] not in (None, victim), timeout=20,
                      what="the killed worker's replacement")
    base.d.wait_plan()
    pp = base.d.status()["packet_path"]
    assert pp["dataplane"] == base.dataplane and pp["workers"][0]["restarts"] == 1
    assert base.who(8) == Counter({"rs1": 4, "rs2": 4})
    assert base.who(8, six=True) == Counter({"rs1": 4, "rs2": 4})
    after = attached()
    if base.dataplane == "kernel":
        assert len(before) == 1 and len(after) == 1, (before, after)
        assert after != before  # a newly loaded program (its id), in the old one's place
        ifindex = json.loads(base.director.ip("-j", "link", "show", "eth0").stdout)[0]["ifindex"]
        assert slow_paths() == [f"glb{ifindex}r", f"glb{ifindex}s"]
    else:
        assert before == after == [] and slow_paths() == []

