"""LVS-NAT in the tc program (director/dataplane/tc/glb_tc.bpf.c) held to the Python NAT's golden frames.

A forwarder with the NAT plan of test_nat.py opens a flow (SYN, SYN-ACK, ACK;
or a datagram and its answer) with a KernelSync over the program's maps, as
the engine would: the flow and its reply entry are installed. Then each
frame goes through the forwarder and, with BPF_PROG_TEST_RUN, through the
program: both must give test_nat.py's expected frame (DNAT to RIP:8080 in,
SNAT back to VIP:80 out), IPv4 and IPv6, TCP and UDP, counted in and out on
the route. What the program must leave to the engine (a reply without an
entry, a state-changing flag in either direction) comes out untouched.

Needs root and BPF: skipped otherwise, failed under CI=true.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import pytest

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers.inet import TCP, UDP  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from director.dataplane import kernelmaps as km  # noqa: E402
from director.dataplane.codec import Drop  # noqa: E402
from director.dataplane.conntable import ConnTable  # noqa: E402
from director.dataplane.forwarder import Forwarder  # noqa: E402
from director.dataplane.kernel import KernelSync, KernelTables  # noqa: E402
from tests.director.dataplane.test_kernel_golden import bpf, for_this_host  # noqa: E402,F401 (the fixture)
from tests.director.dataplane.test_nat import FAMILIES, client, plan, sent, server, to_client, to_server  # noqa: E402

CLIENT_IF, LAN_IF = 1, 2
"""Interface indexes the routes and reply entries name (a test run's redirect is only a return code)."""


class NatCase:
    """A forwarder and the program's maps holding its NAT flows, kept in step by a KernelSync."""

    def __init__(self, bpf, proto: int) -> None:
        for name in ("conns", "nat_replies"):
            for k in bpf.keys(name):
                bpf.delete(name, k)
        zero = km.percpu(km.COUNTER.pack(0, 0), km.COUNTER.size, bpf.cpus)
        for i in range(8):  # the routes' indexes come from 0
            for name in ("route_counters", "route_out_counters"):
                bpf.update(name, km.U32.pack(i), zero)
        self.bpf = bpf
        self.f = Forwarder(ConnTable())
        self.f.apply(plan(proto))
        self.tables = KernelTables(bpf, self.f.table.timeouts)
        self.tables.set_slowpath(0)
        self.sync = KernelSync(self.tables, CLIENT_IF, LAN_IF)
        self.f.kernel = self.f.table.outside = self.sync
        self.sync.plan_applied(self.f.vips, self.f)

    def forward(self, data: bytes):
        out = self.f.forward(memoryview(bytearray(data)), time.monotonic())
        self.sync.flush()
        return out

    def open(self, proto: int, c: str, v: str, r: str) -> None:
        if proto == 6:
            self.forward(client(TCP(sport=40000, dport=80, flags="S", seq=1), c, v))
            self.forward(server(TCP(sport=8080, dport=40000, flags="SA", seq=9, ack=2), r, c))
            self.forward(client(TCP(sport=40000, dport=80, flags="A", seq=2, ack=10), c, v))
        else:
            self.forward(client(UDP(sport=5353, dport=80) / Raw(b"q"), c, v))
            self.forward(server(UDP(sport=8080, dport=5353) / Raw(b"a"), r, c))

    def run(self, data: bytes):
        """(Python's output frame or None, the kernel's return code and frame, reasons this packet counted)."""
        before = self.tables.reasons()
        action = self.forward(data)
        rc, out = self.bpf.test_run(for_this_host(data))
        after = self.tables.reasons()
        return (None if action is None else sent(action)), rc, out, {
            k: after[k] - before[k] for k in after if after[k] != before[k]}

    def route(self) -> int:
        (c,) = self.f.table.confirmed_flows.values()
        return self.tables.route_index(c.tag)


def _tcp(flags="PA", payload=b"hello", reply=False):
    if reply:
        return TCP(sport=8080, dport=40000, flags=flags, seq=10, ack=7) / Raw(payload)
    return TCP(sport=40000, dport=80, flags=flags, seq=2, ack=10) / Raw(payload)


def _udp(payload=b"query", reply=False):
    return UDP(sport=8080, dport=5353) / Raw(payload) if reply else UDP(sport=5353, dport=80) / Raw(payload)


@pytest.mark.parametrize("proto", [6, 17], ids=["tcp", "udp"])
@pytest.mark.parametrize("c, v, r", FAMILIES, ids=["ipv4", "ipv6"])
def test_nat_in_and_out_through_the_kernel(bpf, proto, c, v, r):
    case = NatCase(bpf, proto)
    case.open(proto, c, v, r)
    l4 = _tcp if proto == 6 else _udp
    # In: DNAT to RIP:8080, from the director's LAN MAC to the server's.
    into = client(l4(), c, v)
    py, rc, out, reasons = case.run(into)
    assert rc == km.TC_ACT_REDIRECT and reasons == {"forwarded_nat": 1}
    golden = l4()
    golden.dport = 8080
    assert out == py == to_server(golden, r, c)
    # Out: SNAT back to VIP:80, to the client's MAC, from the director's public one.
    back = server(l4(reply=True), r, c)
    py, rc, out, reasons = case.run(back)
    assert rc == km.TC_ACT_REDIRECT and reasons == {"forwarded_nat_reply": 1}
    golden = l4(reply=True)
    golden.sport = 80
    assert out == py == to_client(golden, c, v)
    # Both directions counted on the route (ipvsadm's InPkts and OutPkts).
    i = case.route()
    assert case.tables.route_counters(i) == (1, len(into) - 14)
    assert case.tables.route_counters(i, "route_out_counters") == (1, len(back) - 14)
    (conn,) = case.f.table.confirmed_flows.values()
    route = conn.tag
    seen = (route.packets, route.out_packets, route.out_bytes)
    case.sync.fold_counters()  # into the forwarder's Route, as /status reads it
    assert (route.packets, route.out_packets, route.out_bytes) == (seen[0] + 1, seen[1] + 1, seen[2] + len(back) - 14)


@pytest.mark.parametrize("c, v, r", FAMILIES, ids=["ipv4", "ipv6"])
def test_a_reply_without_an_entry_is_left_untouched_for_the_engine(bpf, c, v, r):
    case = NatCase(bpf, 6)
    case.open(6, c, v, r)
    stray = server(TCP(sport=8080, dport=40001, flags="A"), r, c)  # no flow from the client's port 40001
    py, rc, out, reasons = case.run(stray)
    assert py is None and case.f.drops[Drop.REPLY_NO_CONNECTION] == 1  # the engine drops and counts it
    assert rc == km.TC_ACT_OK and out == for_this_host(stray) and reasons == {"pass_no_flow": 1}


@pytest.mark.parametrize("reply", [False, True], ids=["client_fin", "server_fin"])
def test_a_state_change_in_either_direction_goes_to_the_engine(bpf, reply):
    c, v, r = FAMILIES[0]
    case = NatCase(bpf, 6)
    case.open(6, c, v, r)
    fin = server(_tcp("FA", b"", reply=True), r, c) if reply else client(_tcp("FA", b""), c, v)
    rc, out = bpf.test_run(for_this_host(fin))
    assert rc == km.TC_ACT_OK and out == for_this_host(fin)
    assert case.forward(fin) is not None  # the engine moves the state, and the kernel's entry with it
    (conn,) = case.f.table.confirmed_flows.values()
    assert case.tables.flow(conn.key, time.monotonic())[1] == conn.state


def test_a_synced_flow_is_not_the_kernel_s_until_a_client_packet_is_seen(bpf):
    """Connection sync gives a backup the flow but not the client's MAC: the replies need it."""
    c, v, r = FAMILIES[0]
    case = NatCase(bpf, 6)
    case.open(6, c, v, r)
    (conn,) = case.f.table.confirmed_flows.values()
    case.sync.forget(conn)
    case.sync.flush()
    conn.peer = None
    case.sync.flow(conn)
    case.sync.flush()
    assert bpf.keys("conns") == [] and bpf.keys("nat_replies") == []
    data = for_this_host(client(_tcp(), c, v))
    assert bpf.test_run(data) == (km.TC_ACT_OK, data)  # the engine's: it learns the MAC, installs both
    assert case.forward(client(_tcp(), c, v)) is not None
    assert len(bpf.keys("conns")) == 1 and len(bpf.keys("nat_replies")) == 1
    assert case.run(server(_tcp(reply=True), r, c))[3] == {"forwarded_nat_reply": 1}


def test_the_kernel_knows_the_nat_servers_of_the_plan(bpf):
    """Their frames the program does not forward go to the engine (and to the host: probes' answers)."""
    from tests.director.dataplane.test_nat import P, RIP4, RIP6

    case = NatCase(bpf, 6)
    assert set(bpf.keys("nat_sources")) == {km.vip_key(P(RIP4)), km.vip_key(P(RIP6))}
    case.f.apply(dataclasses.replace(plan(6), services=()))
    case.sync.plan_applied(case.f.vips, case.f)
    assert bpf.keys("nat_sources") == []


def test_a_restarted_director_adopts_a_flow_whose_server_speaks_first(bpf):
    """Over the maps a previous director left (pinned): the flow is the kernel's both ways; the real
    server's FIN comes to Python, which takes the flow over from the kernel's entries and sends it on."""
    c, v, r = FAMILIES[0]
    old = NatCase(bpf, 6)
    old.open(6, c, v, r)
    new = Forwarder(ConnTable())
    new.apply(plan(6))
    sync = KernelSync(KernelTables(bpf, new.table.timeouts), CLIENT_IF, LAN_IF)
    new.kernel = new.table.outside = sync
    sync.plan_applied(new.vips, new)
    fin = _tcp("FA", b"", reply=True)
    out = new.forward(memoryview(bytearray(server(fin, r, c))), time.monotonic())
    fin.sport = 80
    assert sent(out) == to_client(fin, c, v)
    (conn,) = new.table.confirmed_flows.values()
    assert conn.state != old.f.table.confirmed_flows[conn.key].state  # the server's FIN moved it
