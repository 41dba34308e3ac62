"""New flows of the hash schedulers (mh, sh, dh) scheduled by the tc program, held to scheduler.py.

The Python forwarder's schedulers and the kernel's lookup tables (written by
KernelSync.plan_applied) must send the same client to the same server: many
random flows, IPv4 and IPv6, TCP and UDP, through BPF_PROG_TEST_RUN. Where
the slot's server cannot take new flows (weight 0, down) the kernel leaves
the packet to Python, whose fallback walk decides. Python then knows the
kernel's flows and the TCP state changes the kernel applies to them when
the sweep reads them (Forwarder.take), or when a packet the kernel leaves
brings one up (adopted).

Needs root and BPF: skipped otherwise, failed under CI=true.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import time

import pytest

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers.inet import IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from director.control.health import ServerKey  # noqa: E402
from director.dataplane import codec  # noqa: E402
from director.dataplane import kernelmaps as km  # noqa: E402
from director.dataplane.conntable import ESTABLISHED, FIN_WAIT, SYN_RECV, UDP as S_UDP  # noqa: E402
from director.dataplane.forwarder import Forwarder, Plan, ServerPlan, ServicePlan, VipPlan  # noqa: E402
from director.dataplane.kernel import SWEEP_PASS_EVERY, KernelSync, KernelTables  # noqa: E402
from director.dataplane.scheduler import _GOLDEN, MH_SEED, Persistence, _fold  # noqa: E402
from glb.hashing import client_hash  # noqa: E402
from tests.director.dataplane.test_codec import DIR4, DIR6, DIR_MAC, VIP4, VIP6, frame, packed  # noqa: E402
from tests.director.dataplane.test_kernel_golden import for_this_host  # noqa: E402
from tests.environment import bpf_unavailable, require  # noqa: E402

ADDRS = [f"10.2.0.{i}" for i in range(11, 16)] + [f"2001:db8:2::{i}" for i in range(11, 16)]
PORTS = ((80, 6), (53, 17))


def _mac(i: int) -> bytes:
    return bytes([2, 0, 0, 0, 0x11, i])


@pytest.fixture(scope="module")
def bpf():
    require(bpf_unavailable())
    from director.dataplane.libbpf import LibBpf

    b = LibBpf(max_entries={"conns": 1 << 16}, sizes=km.MAPS)
    yield b
    b.close()


def _plan(scheduler: str, weights=(1, 2, 3, 1, 1), down=(), table_size=65537, forwarding="dr", **kw) -> Plan:
    servers = tuple(ServerPlan(ServerKey("web", a, 0), packed(a), weights[i % 5], a not in down, False,
                               _mac(i), 1500) for i, a in enumerate(ADDRS))
    vips = tuple(VipPlan(packed(a), port, proto, f"{a}:{port}/{proto}") for a in (VIP4, VIP6) for port, proto in PORTS)
    return Plan(codec.mac_bytes(DIR_MAC), (ServicePlan("web", forwarding, scheduler, vips, servers,
                                                       mh_table_size=table_size, **kw),),
                packed(DIR4), packed(DIR6))


class Director:
    """A forwarder with its kernel tables in ``bpf``, as the engine keeps them."""

    def __init__(self, bpf, plan: Plan):
        for name in ("conns", "services", "slots", "templates", "persist_routes"):
            bpf.delete_batch(name, bpf.keys(name))
        self.bpf = bpf
        self.f = Forwarder()
        self.f.apply(plan)
        self.tables = KernelTables(bpf, self.f.table.timeouts)
        self.f.kernel = self.sync = KernelSync(self.tables)
        self.sync.plan_applied(self.f.vips, self.f)

    def apply(self, plan: Plan) -> None:
        self.f.apply(plan)
        self.sync.plan_applied(self.f.vips, self.f)

    def run(self, data: bytes) -> tuple[int, bytes, dict[str, int]]:
        before = self.tables.reasons()
        rc, out = self.bpf.test_run(for_this_host(data))
        after = self.tables.reasons()
        return rc, out, {k: after[k] - before[k] for k in after if after[k] != before[k]}

    def slot_owner(self, src: bytes, vip: bytes):
        """The server of the slot the kernel reads first (the scheduler's own first probe)."""
        sched = self.f.service("web").sched4 if len(src) == 4 else self.f.service("web").sched6
        table = sched.lookup_table()
        if sched.name == "mh":
            return table[client_hash(src, None, MH_SEED) % len(table)]
        return table[(_fold(vip if sched.name == "dh" else src) * _GOLDEN) & 0xFF]


def _any_client(rng: random.Random, six: bool) -> str:
    return f"2001:db8:{rng.randrange(1 << 16):x}::{rng.randrange(1, 1 << 16):x}" if six else \
        f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def _flows(n: int, seed: int, client=_any_client):
    """SYNs and UDP queries from ``client(rng, six)``, to both ports of both VIPs."""
    rng = random.Random(seed)
    for _ in range(n):
        six = rng.random() < 0.5
        src = client(rng, six)
        vip = VIP6 if six else VIP4
        sport = rng.randrange(1024, 65536)
        port, proto = rng.choice(PORTS)
        ip = IPv6(src=src, dst=vip) if six else IP(src=src, dst=vip)
        l4 = TCP(sport=sport, dport=port, flags="S") if proto == 6 else UDP(sport=sport, dport=port) / Raw(b"q")
        yield packed(src), packed(vip), sport, port, proto, frame(ip / l4)


@pytest.mark.parametrize("scheduler", ["mh", "sh", "dh"])
def test_the_kernel_schedules_new_flows_as_python_does(bpf, scheduler):
    d = Director(bpf, _plan(scheduler, weights=(1, 2, 0, 3, 1), down=(ADDRS[4], ADDRS[9])))
    now = time.monotonic()
    kernel = python = 0
    for src, vip, sport, port, proto, data in _flows(400, seed=12):
        sched = d.f.service("web").sched4 if len(src) == 4 else d.f.service("web").sched6
        want = sched.schedule(src, sport, vip, port, now)
        rc, out, reasons = d.run(data)
        owner = d.slot_owner(src, vip)
        if owner is not None and owner.usable:
            assert owner is want
            assert rc == km.TC_ACT_REDIRECT and out[:12] == want.tx, "the kernel's server is Python's"
            assert reasons == {"new_flow": 1, "forwarded_dr": 1}
            key = codec.flow_key(proto, src, vip, sport, port)
            route, state, _ = d.tables.flow(key, now)
            assert route == d.tables.route_index(d.f.route(want.key, f"{ipaddress.ip_address(vip)}:{port}/{proto}"))
            assert state == (SYN_RECV if proto == 6 else S_UDP)
            kernel += 1
        else:  # weight 0 or down: Python's fallback walk decides
            assert rc == km.TC_ACT_OK and reasons == {"pass_no_flow": 1}
            python += 1
    assert kernel > 150 and (python > 0 or scheduler == "dh")  # dh: one server per VIP


def test_mh_with_a_small_table_and_tun(bpf):
    d = Director(bpf, _plan("mh", table_size=251, forwarding="tun"))
    now = time.monotonic()
    for src, vip, sport, port, proto, data in _flows(200, seed=5):
        want = (d.f.service("web").sched4 if len(src) == 4 else d.f.service("web").sched6).schedule(
            src, sport, vip, port, now)
        rc, out, reasons = d.run(data)
        assert rc == km.TC_ACT_REDIRECT and reasons == {"new_flow": 1, "forwarded_tun": 1}
        assert out[:12] == want.tx.eth[:12]
        assert want.addr in (out[30:34], out[38:54])  # the tunnel's outer destination


def test_what_the_kernel_leaves_to_python(bpf):
    d = Director(bpf, _plan("mh"))
    mid = frame(IP(src="198.51.100.7", dst=VIP4) / TCP(sport=4000, dport=80, flags="A"))
    assert d.run(mid)[0] == km.TC_ACT_OK  # only a SYN opens a connection in the kernel
    other = frame(IP(src="198.51.100.7", dst=VIP4) / TCP(sport=4000, dport=81, flags="S"))
    assert d.run(other)[2] == {"pass_no_flow": 1}  # no service there
    d.tables.set_vips(())
    syn = frame(IP(src="198.51.100.7", dst=VIP4) / TCP(sport=4000, dport=80, flags="S"))
    assert d.run(syn)[2] == {"pass_no_flow": 1}  # a VIP this director does not own (a backup)
    d = Director(bpf, _plan("mh", forwarding="nat"))
    assert d.bpf.keys("services") == []
    assert d.run(syn)[2] == {"pass_no_flow": 1}
    d = Director(bpf, _plan("wlc"))
    assert d.bpf.keys("services") == []


def test_python_follows_the_kernel_s_flows_and_states(bpf):
    d = Director(bpf, _plan("mh"))
    now = time.monotonic()
    ip = IP(src="198.51.100.7", dst=VIP4)
    key = codec.flow_key(6, packed("198.51.100.7"), packed(VIP4), 4000, 80)
    synced = []
    d.f.table.changed = synced.append

    passes = [now]

    def sweep():  # a pass of its own each time: passes start at most every SWEEP_PASS_EVERY
        passes.append(passes[-1] + SWEEP_PASS_EVERY)
        d.sync.sweep(passes[-1], d.f.table.__contains__, take=d.f.take)

    rc, _, _ = d.run(frame(ip / TCP(sport=4000, dport=80, flags="S")))
    assert rc == km.TC_ACT_REDIRECT and len(d.f.table) == 0
    sweep()  # the sweep hands Python the kernel's new flow, unconfirmed as a SYN is
    c = d.f.table.get(key)
    assert c.state == SYN_RECV and not c.confirmed and c.dest.counts.inactive == 1 and synced == []
    # The handshake's ACK: the kernel applies the state change (a service it schedules) ...
    assert d.run(frame(ip / TCP(sport=4000, dport=80, flags="A")))[2] == {"state_tracked": 1, "forwarded_dr": 1}
    assert d.tables.flow(key, now)[1] == ESTABLISHED
    sweep()  # ... and Python follows: active on its server, confirmed, told to connection sync
    assert c.state == ESTABLISHED and c.confirmed and c.dest.counts.active == 1 and synced == [c]
    assert d.run(frame(ip / TCP(sport=4000, dport=80, flags="FA")))[2] == {"state_tracked": 1, "forwarded_dr": 1}
    sweep()
    assert c.state == FIN_WAIT and c.dest.counts.active == 0 and c.dest.counts.inactive == 1 and synced == [c, c]
    # A SYN reusing the closing flow is a new connection: Python's (it reschedules).
    syn = frame(ip / TCP(sport=4000, dport=80, flags="S"))
    assert d.run(syn)[2] == {"pass_state_change": 1}
    assert d.f.forward(memoryview(bytearray(syn)), now) is not None
    assert d.f.table.get(key) is not c and d.f.table.get(key).state == SYN_RECV
    # A UDP flow's packets all stay in the kernel: the sweep hands it to Python, confirmed.
    rc, _, _ = d.run(frame(ip / UDP(sport=5000, dport=53) / Raw(b"q")))
    ukey = codec.flow_key(17, packed("198.51.100.7"), packed(VIP4), 5000, 53)
    assert rc == km.TC_ACT_REDIRECT and d.f.table.get(ukey) is None
    sweep()
    u = d.f.table.get(ukey)
    assert u is not None and u.confirmed and u.state == S_UDP and synced[-1] is u
    d.sync.fold_counters()
    # kernel-made: the first SYN and the UDP flow; the reusing SYN was Python's
    assert sum(r.conns for r in d.f._routes.values()) == 3


def test_python_adopts_a_kernel_flow_a_packet_brings_up(bpf):
    """A packet the kernel leaves (here: its server went down) for a flow Python never swept: adopted."""
    d = Director(bpf, _plan("mh"))
    now = time.monotonic()
    ip = IP(src="198.51.100.7", dst=VIP4)
    assert d.run(frame(ip / TCP(sport=4000, dport=80, flags="S")))[0] == km.TC_ACT_REDIRECT
    assert d.run(frame(ip / TCP(sport=4000, dport=80, flags="A")))[0] == km.TC_ACT_REDIRECT
    key = codec.flow_key(6, packed("198.51.100.7"), packed(VIP4), 4000, 80)
    route = d.tables.flow(key, now)[0]
    _, server = d.sync._routes[route]
    d.apply(_plan("mh", down=(str(ipaddress.ip_address(server.addr)),)))
    data = frame(ip / TCP(sport=4000, dport=80, flags="A"))
    assert d.run(data)[2] == {"pass_route_down": 1}
    d.f.forward(memoryview(bytearray(data)), now)  # on_server_down: keep (still its server's)
    c = d.f.table.get(key)
    assert c is not None and c.dest is server and c.state == ESTABLISHED


def test_a_plan_change_rewrites_only_what_changed(bpf):
    d = Director(bpf, _plan("mh", table_size=65537))
    chunks = dict(bpf.items("slots"))
    assert len(chunks) == 4 * 257  # one table per VIP (address, port, protocol)
    d.apply(_plan("mh", weights=(1, 2, 0, 1, 1)))  # a drain: the route stops taking new flows, no slot moves
    assert dict(bpf.items("slots")) == chunks
    drained = d.f.route(ServerKey("web", ADDRS[2], 0), f"{VIP4}:80/6")
    assert not km.ROUTE.unpack(bpf.lookup("routes", km.U32.pack(d.tables.route_index(drained))))[4] & km.ROUTE_NEW
    d.apply(_plan("mh", weights=(1, 2, 2, 1, 1)))  # a new weight: Maglev moves some slots
    after = dict(bpf.items("slots"))
    assert after.keys() == chunks.keys() and after != chunks
    numbers = {km.SVC.unpack(v)[3] for v in dict(bpf.items("services")).values()}
    d.apply(_plan("mh", table_size=251))  # another size: tables of other numbers, the old chunks gone
    assert not numbers & {km.SVC.unpack(v)[3] for v in dict(bpf.items("services")).values()}
    assert len(bpf.keys("slots")) == 4
    d.apply(_plan("wlc"))
    assert bpf.keys("services") == [] and bpf.keys("slots") == []


# -- persistence ---------------------------------------------------------------------------------

NETS4 = [f"203.0.{i}." for i in range(113, 119)]
NETS6 = [f"2001:db8:{i:x}:1::" for i in range(0x51, 0x57)]


def _network_client(rng: random.Random, six: bool) -> str:
    """A client of one of a few networks (/24, /64)."""
    return rng.choice(NETS6) + f"{rng.randrange(1, 1 << 16):x}" if six else rng.choice(NETS4) + str(rng.randrange(1, 255))


@pytest.mark.parametrize("scheduler", ["mh", "sh"])
def test_the_kernel_keeps_persistence_as_python_does(bpf, scheduler):
    """Each client network sticks to its template's server across both VIPs and ports of the service, as
    a Persistence over the same schedulers says, while plans move the scheduler's table (new weights) and
    drain the template's server (weight 0: not honoured, scheduled afresh). What the kernel leaves
    (the slot's server cannot take new flows) Python decides, and the template it makes or refreshes is
    the kernel's from then on (Persistence.watch)."""
    persistence = (300.0, 24, 64)
    d = Director(bpf, _plan(scheduler, persistence=persistence))
    ref = Persistence(*persistence)
    clock = [time.monotonic()]

    def sweep():  # Python hears of the kernel's flows (and so its templates): flow events, or this
        clock.append(clock[-1] + SWEEP_PASS_EVERY)
        while d.sync.sweep(clock[-1], d.f.table.__contains__, budget=1 << 16, take=d.f.take) or d.sync._sweep_token:
            pass

    kernel = python = 0
    for rnd, weights in enumerate([(1, 2, 3, 1, 1), (3, 1, 1, 2, 1), (1, 0, 2, 0, 1)]):
        if rnd:
            d.apply(_plan(scheduler, weights=weights, persistence=persistence))
        for src, vip, sport, port, proto, data in _flows(120, 40 + rnd, _network_client):
            now = time.monotonic()
            svc = d.f.service("web")
            want = ref.schedule(svc.sched4 if len(src) == 4 else svc.sched6, src, sport, vip, port, now).dest
            rc, out, reasons = d.run(data)
            if rc == km.TC_ACT_REDIRECT:
                assert reasons == {"new_flow": 1, "forwarded_dr": 1}
                assert out[:12] == want.tx, "the kernel's server is the template's"
                kernel += 1
            else:
                assert rc == km.TC_ACT_OK and reasons == {"pass_no_flow": 1}  # a drained slot's: Python walks on
                sweep()
                assert d.f.forward(memoryview(bytearray(data)), now) is not None
                d.sync.flush()
                assert d.f.table.get(codec.flow_key(proto, src, vip, sport, port)).dest is want
                python += 1
        sweep()
        # one template per client network, in the kernel and in Python, naming the same server
        pers = svc.persistence
        kernel_tpls = dict(bpf.items("templates"))
        assert len(kernel_tpls) == len(pers) == len(ref)
        for key, t in ref._table.items():
            assert km.TPL.unpack(kernel_tpls[km.template_key(km.persist_id("web"), key)])[0] == \
                km.server_id(t.dest.key)
            assert pers._table[key].dest is t.dest
    assert kernel > 200 and python > 0


def test_an_expired_template_is_python_s_and_comes_back_refreshed(bpf):
    """The kernel's copy of a template cannot tell whether it still controls connections: an expired one
    leaves the new flow to Python, whose template (alive while it controls one) decides and is written back.
    The sweep deletes the expired copies Python does not keep."""
    persistence = (300.0, 24, 64)
    d = Director(bpf, _plan("mh", persistence=persistence))
    now = time.monotonic()
    ip = IP(src="203.0.113.9", dst=VIP4)
    assert d.run(frame(ip / TCP(sport=4000, dport=80, flags="S")))[2] == {"new_flow": 1, "forwarded_dr": 1}
    d.sync.sweep(now, d.f.table.__contains__, budget=1 << 16, take=d.f.take)
    pers = d.f.service("web").persistence
    key = pers.key(packed("203.0.113.9"))
    t = pers._table[key]
    assert t.controlled == 1  # the kernel's flow counts on Python's template
    tk = km.template_key(km.persist_id("web"), key)
    server = km.TPL.unpack(bpf.lookup("templates", tk))[0]
    assert server == km.server_id(t.dest.key)
    bpf.update("templates", tk, km.TPL.pack(server, km.ticks(now - 5)))  # the timeout ran out here
    t.expires = now - 5  # and in Python, but its connection lives
    syn = frame(IP(src="203.0.113.200", dst=VIP4) / TCP(sport=4001, dport=80, flags="S"))
    assert d.run(syn)[2] == {"pass_template": 1}
    assert d.f.forward(memoryview(bytearray(syn)), now) is not None
    d.sync.flush()
    c = d.f.table.get(codec.flow_key(6, packed("203.0.113.200"), packed(VIP4), 4001, 80))
    assert c.dest is t.dest and c.template is t and t.controlled == 2
    server2, expires = km.TPL.unpack(bpf.lookup("templates", tk))
    assert server2 == server and km.parse_flow_value(km.FLOW_VALUE.pack(0, 0, 0, expires), now)[2] > now + 290
    # The sweep: an expired copy Python keeps alive stays; one Python has not (a stranger's) goes.
    stranger = km.template_key(km.persist_id("web"), pers.key(packed("198.51.100.1")))
    bpf.update("templates", stranger, km.TPL.pack(server, km.ticks(now - 5)))
    bpf.update("templates", tk, km.TPL.pack(server, km.ticks(now - 5)))
    d.sync.sweep(now + 10, d.f.table.__contains__, budget=1 << 16, take=d.f.take)
    d.sync.flush()
    assert set(bpf.keys("templates")) == {tk}


def test_the_kernel_applies_the_state_changes_of_python_s_flows_too(bpf):
    """A wlc flow (Python schedules and confirms it): its FIN is forwarded by the kernel with the state
    applied, and Python's counts follow (here through the sweep; flow events tell it at once)."""
    d = Director(bpf, _plan("wlc"))
    now = time.monotonic()
    ip = IP(src="198.51.100.7", dst=VIP4)
    key = codec.flow_key(6, packed("198.51.100.7"), packed(VIP4), 4000, 80)
    for flags in ("S", "A"):
        assert d.run(frame(ip / TCP(sport=4000, dport=80, flags=flags)))[2] == {"pass_no_flow": 1}
        assert d.f.forward(memoryview(bytearray(frame(ip / TCP(sport=4000, dport=80, flags=flags)))), now)
        d.sync.flush()
    c = d.f.table.get(key)
    assert c.state == ESTABLISHED and c.dest.counts.active == 1
    assert d.run(frame(ip / TCP(sport=4000, dport=80, flags="A")))[2] == {"forwarded_dr": 1}
    assert d.run(frame(ip / TCP(sport=4000, dport=80, flags="FA")))[2] == {"state_tracked": 1, "forwarded_dr": 1}
    assert d.tables.flow(key, now)[1] == FIN_WAIT
    d.sync.sweep(now + SWEEP_PASS_EVERY, d.f.table.__contains__, budget=1 << 16, take=d.f.take)
    assert c.state == FIN_WAIT and c.dest.counts.active == 0 and c.dest.counts.inactive == 1
