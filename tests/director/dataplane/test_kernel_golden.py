"""The tc program (director/dataplane/tc/glb_tc.bpf.c) held to the golden table and to Forwarder.fast.

Each case runs one frame through the Python forwarder's fast path and, with
the same flows installed in the kernel's maps as the forwarder has them
(mirror()), through the BPF program with BPF_PROG_TEST_RUN. Both
must decide the same: forwarded with the same output frame (and the golden
table's expected frame, test_codec.py), or left to the userspace engine
with the frame untouched. DR and TUN, IPv4 and IPv6. With a slow path set,
what the program leaves for the engine goes there untouched, and the rest
to the host.

Needs root and BPF: skipped otherwise, failed under CI=true.
"""

from __future__ import annotations

import logging
import os
import time

import pytest

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers.inet import IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from director.control.health import ServerKey  # noqa: E402
from director.dataplane import codec  # noqa: E402
from director.dataplane import kernelmaps as km  # noqa: E402
from director.dataplane.codec import VNET_NONE  # noqa: E402
from director.dataplane.forwarder import Forwarder, Plan, ServerPlan, ServicePlan, VipPlan  # noqa: E402
from director.dataplane.kernel import KernelTables  # noqa: E402
from tests.director.dataplane.test_codec import (  # noqa: E402
    CLIENT4,
    CLIENT6,
    DIR4,
    DIR6,
    DIR_MAC,
    FLOWS,
    IDENT,
    RS4,
    RS6,
    RS_MAC,
    VIP4,
    VIP6,
    packed,
    expected_dr,
    expected_tun,
    frame,
)
from tests.environment import bpf_unavailable, require  # noqa: E402


@pytest.fixture(scope="module")
def bpf():
    require(bpf_unavailable())
    from director.dataplane.libbpf import LibBpf

    b = LibBpf(max_entries=km.sized(4096), sizes=km.MAPS)
    yield b
    b.close()


def _plan(forwarding: str, available: bool = True, mtu: int = 1500) -> Plan:
    rs_mac = codec.mac_bytes(RS_MAC)
    servers = tuple(ServerPlan(ServerKey("web", a, 0), packed(a), 1, available,
                               False, rs_mac, mtu) for a in (RS4, RS6))
    vips = tuple(VipPlan(packed(a), port, proto, f"{a}:{port}/{proto}")
                 for a in (VIP4, VIP6) for port, proto in ((80, 6), (53, 17)))
    return Plan(codec.mac_bytes(DIR_MAC), (ServicePlan("web", forwarding, "rr", vips, servers),),
                packed(DIR4), packed(DIR6))


def _opening(l3) -> list[bytes]:
    """Frames that make the packet's flow confirmed in the forwarder: SYN + ACK, or two datagrams."""
    t = l3.getlayer(TCP) or l3.getlayer(UDP)
    if isinstance(l3, IP):
        base = IP(src=l3.src, dst=l3.dst)
    else:
        base = IPv6(src=l3.src, dst=l3.dst)
    if isinstance(t, TCP):
        return [frame(base / TCP(sport=t.sport, dport=t.dport, flags=f)) for f in ("S", "A")]
    return [frame(base / UDP(sport=t.sport, dport=t.dport) / Raw(b"o"))] * 2


def mirror(tables: KernelTables, fwd: Forwarder) -> None:
    """Every confirmed flow of ``fwd`` into the kernel's tables, with the routes they take, as KernelSync
    would have written them flow by flow."""
    for c in fwd.table.confirmed_flows.values():
        i = tables.route_index(c.tag)
        tables.set_route(i, c.dest.tx, c.dest.available and c.tag.live)
        tables.install(c.key, i, c.state, c.expires)


class Case:
    """A forwarder and the kernel's maps holding the same flows."""

    def __init__(self, bpf, forwarding: str, l3, slowpath: int = 0, **plan_kw):
        for k in bpf.keys("conns"):
            bpf.delete("conns", k)
        for i in range(8):  # each case allocates route indexes from 0
            bpf.update("route_counters", km.U32.pack(i), km.percpu(km.COUNTER.pack(0, 0), km.COUNTER.size, bpf.cpus))
        self.bpf, self.forwarding = bpf, forwarding
        self.f = Forwarder()
        self.f.apply(_plan(forwarding))
        now = time.monotonic()
        if l3 is not None and (l3.getlayer(TCP) or l3.getlayer(UDP)):
            for opening in _opening(l3):
                assert self.f.forward(memoryview(bytearray(opening)), now) is not None
        if plan_kw:
            self.f.apply(_plan(forwarding, **plan_kw))
        self.tables = KernelTables(bpf, self.f.table.timeouts)
        mirror(self.tables, self.f)
        self.tables.set_vips(self.f.vips)
        self.tables.set_slowpath(slowpath)

    def run(self, data: bytes):
        """(Python's action, kernel's return code, kernel's output frame, reasons counted by this packet)."""
        before = self.tables.reasons()
        self.f.ident = IDENT - 1
        self.tables.set_ident(IDENT - 1)
        buf = VNET_NONE + data
        action = self.f.fast(buf, len(VNET_NONE), len(data), time.monotonic())
        rc, out = self.bpf.test_run(for_this_host(data))
        after = self.tables.reasons()
        if out[:6] == bytes(6):  # left untouched: compare with the frame Python saw
            out = data[:6] + out[6:]
        return action, rc, out, {k: after[k] - before[k] for k in after if after[k] != before[k]}


def for_this_host(data: bytes) -> bytes:
    """The frame as a test run must get it to count as this host's (PACKET_HOST): addressed to the
    test device, lo, whose MAC is zero. The program never reads the destination MAC otherwise."""
    return bytes(6) + data[6:]


def same_decision(action, rc: int, out: bytes, data: bytes) -> str:
    """Assert the kernel did what the Python action says; which of the three it was."""
    if action is None:
        assert rc == km.TC_ACT_OK and out == data, "Python declines: the kernel must pass the frame untouched"
        return "pass"
    assert rc == km.TC_ACT_REDIRECT
    if action.__class__ is bytes:
        assert out == codec.dr_frame(data, action)
        return "dr"
    vnet, header, length = action
    assert out == header + data[14:14 + length]
    return "tun"


@pytest.mark.parametrize("forwarding", ["dr", "tun"])
@pytest.mark.parametrize("name,l3,key,flags,frag", FLOWS, ids=[f[0] for f in FLOWS])
def test_the_golden_table_through_the_kernel(bpf, forwarding, name, l3, key, flags, frag):
    case = Case(bpf, forwarding, l3)
    data = frame(l3)
    action, rc, out, reasons = case.run(data)
    decided = same_decision(action, rc, out, data)
    simple = frag == codec.NOT_FRAGMENT and "options" not in name and "extension" not in name and "atomic" not in name
    if simple:
        assert decided == forwarding  # every plain established flow is the kernel's
        assert out == (expected_dr(l3) if forwarding == "dr" else expected_tun(l3))
        assert reasons == {f"forwarded_{forwarding}": 1}
        (route,) = {c.tag for c in case.f.table.confirmed_flows.values()}
        assert case.tables.route_counters(case.tables.route_index(route)) == (1, len(bytes(l3)))
    else:
        assert decided == "pass" and reasons == {"pass_not_simple": 1}


def _tcp4(tcp_flags="A", payload=b"", **ip):
    return IP(src=CLIENT4, dst=VIP4, **ip) / TCP(sport=40000, dport=80, flags=tcp_flags) / Raw(payload)


def _udp6(payload=b"q"):
    return IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=5353, dport=53) / Raw(payload)


@pytest.mark.parametrize("forwarding", ["dr", "tun"])
@pytest.mark.parametrize("packet,reason", [
    (_tcp4("FA"), "pass_state_change"),  # FIN: ESTABLISHED -> FIN_WAIT is Python's
    (_tcp4("R"), "pass_state_change"),
    (IP(src=CLIENT4, dst=VIP4) / TCP(sport=40099, dport=80, flags="A"), "pass_no_flow"),
    (IP(src=CLIENT4, dst=VIP4) / UDP(sport=9, dport=53), "pass_no_flow"),
    (IP(src=CLIENT4, dst=VIP4, proto=0) / Raw(bytes(8)), "pass_not_simple"),
])
def test_what_the_kernel_leaves_to_userspace(bpf, forwarding, packet, reason):
    case = Case(bpf, forwarding, _tcp4())  # the one flow both know
    action, rc, out, reasons = case.run(frame(packet))
    assert same_decision(action, rc, out, frame(packet)) == "pass"
    assert reasons == {reason: 1}


@pytest.mark.parametrize("forwarding", ["dr", "tun"])
def test_a_down_server_s_flows_go_to_userspace(bpf, forwarding):
    case = Case(bpf, forwarding, _udp6(), available=False)
    action, rc, out, reasons = case.run(frame(_udp6()))
    assert same_decision(action, rc, out, frame(_udp6())) == "pass"
    assert reasons == {"pass_route_down": 1}


@pytest.mark.parametrize("forwarding", ["dr", "tun"])
def test_an_expired_flow_goes_to_userspace(bpf, forwarding):
    case = Case(bpf, forwarding, _tcp4())
    for c in case.f.table.confirmed_flows.values():
        c.expires = time.monotonic() - 1
    mirror(case.tables, case.f)
    action, rc, out, reasons = case.run(frame(_tcp4()))
    assert same_decision(action, rc, out, frame(_tcp4())) == "pass"
    assert reasons == {"pass_expired": 1}


def test_the_kernel_refreshes_the_expiry_as_the_table_does(bpf):
    case = Case(bpf, "dr", _tcp4())
    (c,) = case.f.table.confirmed_flows.values()
    key = c.key
    _, _, before = case.tables.flow(key, time.monotonic())
    case.run(frame(_tcp4()))
    route, state, after = case.tables.flow(key, time.monotonic())
    assert state == c.state and after > before
    assert after == pytest.approx(time.monotonic() + case.f.table.timeouts[state], abs=1.0)


@pytest.mark.parametrize("l3", [
    _tcp4("A", b"d" * 1460, flags="DF"),  # 1500 bytes: 1520 with the outer header
    IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=5353, dport=53) / Raw(b"u" * 1452),
    _tcp4("A", b"d" * 1460),  # without DF: Python fragments it into the tunnel, slowly
], ids=["ipv4-df", "ipv6", "ipv4-no-df"])
def test_too_big_for_the_tunnel_goes_to_userspace(bpf, l3):
    case = Case(bpf, "tun", l3)
    data = frame(l3)
    action, rc, out, reasons = case.run(data)
    assert same_decision(action, rc, out, data) == "pass"
    assert reasons == {"pass_too_big": 1}
    big_dr = Case(bpf, "dr", l3)  # DR has no tunnel to fit
    assert same_decision(*big_dr.run(data)[:3], data) == "dr"


def test_tun_drops_ethernet_padding_as_the_codec_does(bpf):
    l3 = IP(src=CLIENT4, dst=VIP4) / UDP(sport=1, dport=53) / Raw(b"x")
    padded = frame(l3) + bytes(60 - len(frame(l3)))
    case = Case(bpf, "tun", l3)
    action, rc, out, _ = case.run(padded)
    assert same_decision(action, rc, out, padded) == "tun"
    assert out == expected_tun(l3)


@pytest.fixture
def one_cpu():
    """This process on one CPU: the program's id counter is per CPU, and a test run runs on the caller's."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    yield
    os.sched_setaffinity(0, cpus)


def test_tunnelled_ids_count_on(bpf, one_cpu):
    case = Case(bpf, "tun", _tcp4())
    ids = []
    for _ in range(3):
        rc, out = bpf.test_run(for_this_host(frame(_tcp4())))
        assert rc == km.TC_ACT_REDIRECT
        ids.append(IP(out[14:]).id)
    case.run(frame(_tcp4()))
    assert ids[1] == (ids[0] + 1) & 0xFFFF and ids[2] == (ids[1] + 1) & 0xFFFF


SLOW = 0xFFFF
"""A slow-path ifindex for test runs (a redirect there is only a return code)."""


@pytest.mark.parametrize("forwarding", ["dr", "tun"])
@pytest.mark.parametrize("name,l3,key,flags,frag", FLOWS, ids=[f[0] for f in FLOWS])
def test_what_the_kernel_leaves_goes_to_the_slow_path_untouched(bpf, forwarding, name, l3, key, flags, frag):
    case = Case(bpf, forwarding, l3, slowpath=SLOW)
    data = frame(l3)
    action, rc, out, reasons = case.run(data)
    assert rc == km.TC_ACT_REDIRECT
    if action is None:
        assert out == data and not any(k.startswith("forwarded") for k in reasons)
    else:
        assert out != data and reasons == {f"forwarded_{forwarding}": 1}


def test_only_the_engine_s_frames_take_the_slow_path(bpf):
    from scapy.layers.inet6 import ICMPv6ND_NS
    from scapy.layers.l2 import ARP

    case = Case(bpf, "dr", None, slowpath=SLOW)

    def verdict(l3) -> int:
        data = for_this_host(frame(l3))
        rc, out = bpf.test_run(data)
        assert out == data
        return rc

    assert verdict(ARP(op=1, psrc="192.0.2.1", pdst=VIP4)) == km.TC_ACT_REDIRECT
    assert verdict(IP(src=CLIENT4, dst=VIP4) / UDP(sport=1, dport=53)) == km.TC_ACT_REDIRECT  # a new flow
    assert verdict(IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=1, dport=53)) == km.TC_ACT_REDIRECT
    # Neighbour solicitations: a copy for the engine, the frame for the host (its own addresses may share the group).
    ns = IPv6(src="2001:db8:10::1", dst="ff02::1:ff00:10", hlim=255) / ICMPv6ND_NS(tgt=VIP6)
    assert verdict(ns) == km.TC_ACT_OK
    # The host's own traffic is the host's.
    assert verdict(ARP(op=1, psrc="192.0.2.1", pdst="192.0.2.99")) == km.TC_ACT_OK
    assert verdict(IP(src=CLIENT4, dst="192.0.2.99") / UDP(sport=1, dport=53)) == km.TC_ACT_OK
    assert verdict(IPv6(src=CLIENT6, dst="2001:db8:10::99") / UDP(sport=1, dport=53)) == km.TC_ACT_OK
    case.tables.set_vips([])  # a standby: nothing is the engine's
    assert verdict(IP(src=CLIENT4, dst=VIP4) / UDP(sport=1, dport=53)) == km.TC_ACT_OK


def test_another_host_s_frame_is_never_forwarded(bpf):
    case = Case(bpf, "dr", _tcp4(), slowpath=SLOW)
    data = frame(_tcp4())  # to DIR_MAC, not the test device's: PACKET_OTHERHOST in a test run
    before = case.tables.reasons()["pass_other_host"]
    assert bpf.test_run(data) == (km.TC_ACT_OK, data)
    assert case.tables.reasons()["pass_other_host"] == before + 1
    assert case.run(data)[1] == km.TC_ACT_REDIRECT  # the same frame for this host: forwarded
