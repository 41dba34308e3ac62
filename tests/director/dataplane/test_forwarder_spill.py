"""Cross-site spill in the forwarder (issue 16): new flows to the target's servers by IP-in-IP,
spilled flows never moved, the kernel data plane keeps forwarding them; time made up."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from director.control.health import HealthTable, ServerKey
from director.control.spill import RemoteServer, Spill
from director.dataplane import kernelmaps as km
from director.dataplane.codec import Drop
from director.dataplane.forwarder import Forwarder, ServerPlan, SpillPlan, build_plan
from director.dataplane.kernel import FakeMaps, KernelSync, KernelTables
from director.dataplane.packetpath import real_addresses
from director.dataplane.spillflags import NOT_ARMED
from glb import config
from tests.director.dataplane.test_forwarder import (
    CLIENT4, DIR4, DIR_MAC, P, RS, VIP4, dr_owner, fwd, plan, server, syn,
)

REMOTE = ["10.3.0.21", "10.3.0.22"]
HOP = bytes.fromhex("0200000003ff")  # the next hop towards the other site


def remote(addr: str, weight: int = 1, m: bytes | None = HOP) -> ServerPlan:
    return ServerPlan(ServerKey("web@dc2", addr, 0), P(addr), weight, True, False, m, 1500)


def spilling(*local: ServerPlan, weights=(1, 1), scheduler="rr", **kw):
    sp = SpillPlan("dc2", tuple(remote(a, w) for a, w in zip(REMOTE, weights)))
    return plan(*local, scheduler=scheduler, spill=sp, **kw)


def down(addr: str) -> ServerPlan:
    return server(addr, weight=0, available=False)


def tunnelled_to(action) -> str:
    """The outer destination of a TUN action (vnet, header, length), checking the outer source."""
    _, header, _ = action
    outer = Ether(bytes(header) + bytes(20))[IP]
    assert outer.src == DIR4 and outer.proto == 4 and Ether(bytes(header)).dst == HOP.hex(":")
    return outer.dst


def test_a_new_flow_is_tunnelled_to_the_target_and_its_packets_follow_fast_and_slow():
    f = Forwarder()
    f.apply(spilling(down(RS[0]), down(RS[1])))  # a DR service whose servers are all down
    assert tunnelled_to(fwd(f, syn(40000))) == REMOTE[0]
    ack = syn(40000, flags="A")
    assert tunnelled_to(fwd(f, ack, 1.0)) == REMOTE[0]
    buf = bytes(10) + bytes(ack)  # the ring's layout: virtio_net_hdr, then the frame
    assert tunnelled_to(f.fast(buf, 10, len(ack), 2.0)) == REMOTE[0]
    assert tunnelled_to(fwd(f, syn(40001))) == REMOTE[1]


def test_new_flows_spread_by_the_published_weights_with_the_services_scheduler():
    f = Forwarder()
    f.apply(spilling(down(RS[0]), weights=(3, 1), scheduler="wrr"))
    got = Counter(tunnelled_to(fwd(f, syn(40000 + i))) for i in range(40))
    assert got == {REMOTE[0]: 30, REMOTE[1]: 10}


def test_spilled_flows_stay_when_local_servers_return_and_when_spill_ends():
    f = Forwarder()
    f.apply(spilling(down(RS[0]), down(RS[1])))
    fwd(f, syn(40000))
    fwd(f, syn(40000, flags="A"), 0.1)
    f.apply(spilling(server(RS[0]), server(RS[1])))  # back, but still spilling (hysteresis)
    assert tunnelled_to(fwd(f, syn(40000, flags="A"), 0.2)) == REMOTE[0]
    assert tunnelled_to(fwd(f, syn(40001))) in REMOTE  # new flows still go away
    f.apply(plan(server(RS[0]), server(RS[1]), scheduler="rr"))  # spill over
    assert tunnelled_to(fwd(f, syn(40000, flags="A"), 0.3)) == REMOTE[0]
    ack = syn(40000, flags="A")
    assert tunnelled_to(f.fast(bytes(10) + bytes(ack), 10, len(ack), 0.4)) == REMOTE[0]
    assert dr_owner(fwd(f, syn(40002))) in RS  # new flows stay home
    # A client reusing the spilled flow's ports after it closed is a new flow: home.
    fwd(f, syn(40000, flags="FA"), 0.5)
    assert dr_owner(fwd(f, syn(40000), 0.6)) in RS


def test_local_established_flows_follow_on_server_down_while_spilling():
    f = Forwarder()
    f.apply(plan(server(RS[0], reschedule=True), scheduler="rr"))
    fwd(f, syn(40000))
    assert dr_owner(fwd(f, syn(40000, flags="A"), 0.1)) == RS[0]
    f.apply(spilling(server(RS[0], weight=0, available=False, reschedule=True)))
    # reschedule: the next packet drops the entry; a mid-stream ACK opens nothing (IPVS)
    assert fwd(f, syn(40000, flags="A"), 0.2) is None
    assert f.drops[Drop.NO_CONNECTION] == 1
    f2 = Forwarder()
    f2.apply(plan(server(RS[0]), scheduler="rr"))
    fwd(f2, syn(40000))
    f2.apply(spilling(down(RS[0])))  # keep: it stays on its local server
    assert dr_owner(fwd(f2, syn(40000, flags="A"), 0.2)) == RS[0]


def test_no_next_hop_means_no_new_spilled_flow_and_counts_are_kept_apart():
    f = Forwarder()
    sp = SpillPlan("dc2", (remote(REMOTE[0], m=None),))
    f.apply(plan(down(RS[0]), scheduler="rr", spill=sp))
    assert fwd(f, syn(40000)) is None and f.drops[Drop.NO_DESTINATION] == 1
    f.apply(spilling(down(RS[0])))
    fwd(f, syn(40001))
    fwd(f, syn(40001, flags="A"), 0.1)
    stats = f.stats()
    key = ServerKey("web@dc2", REMOTE[0], 0)
    assert stats.servers[key][:2] == (1, 0) and stats.servers[key][4] == 1  # one active, one new
    assert stats.servers[ServerKey("web", RS[0], 0)][4] == 0
    assert stats.vips[f"{VIP4}:80/tcp"][2] == 1


def test_the_kernel_data_plane_takes_a_spilled_flow_and_keeps_it_after_spill():
    f = Forwarder()
    f.apply(spilling(down(RS[0])))
    maps = FakeMaps(cpus=2)
    tables = KernelTables(maps, f.table.timeouts)
    sync = KernelSync(tables)
    f.kernel = f.table.outside = sync
    fwd(f, syn(40000))
    action = fwd(f, syn(40000, flags="A"), 0.1)
    sync.flush()  # installs are batched (the engine flushes before it sends the frame)
    (key,) = tables.flows()
    route = tables.flow(key, 0.1)[0]
    r = km.ROUTE.unpack(maps.lookup("routes", km.U32.pack(route)))
    assert r[2] == km.MODE_TUN and r[4] == km.ROUTE_LIVE | km.ROUTE_NEW | km.ROUTE_TRACK
    f.apply(plan(server(RS[0]), scheduler="rr"))
    sync.plan_applied(f.vips)
    r = km.ROUTE.unpack(maps.lookup("routes", km.U32.pack(route)))
    assert r[4] == km.ROUTE_LIVE | km.ROUTE_TRACK and tunnelled_to(action) == REMOTE[0]  # weight 0 now: no new flows


def test_build_plan_turns_a_spill_decision_into_tunnelled_servers():
    cfg = config.load(Path(__file__).resolve().parents[3] / "deploy" / "examples" / "lab.yaml")
    site = cfg.site("dc1")
    spill = Spill("web", "dc2", (RemoteServer("10.2.0.11", 0, 100), RemoteServer("10.2.0.12", 0, 50)))
    hops = {P("10.2.0.11"): HOP}
    p = build_plan(site, HealthTable(site, 0.0).services(), bytes(6), hops, 1400, {"web": spill})
    (svc,) = p.services
    assert svc.spill == SpillPlan("dc2", (
        ServerPlan(ServerKey("web@dc2", "10.2.0.11", 0), P("10.2.0.11"), 100, True, False, HOP, 1400),
        ServerPlan(ServerKey("web@dc2", "10.2.0.12", 0), P("10.2.0.12"), 50, True, False, None, 1400)))
    assert real_addresses(p)[-2:] == [P("10.2.0.11"), P("10.2.0.12")]
    assert build_plan(site, (), bytes(6), {}, 1500, {"web": None}).services[0].spill is None


def test_a_standby_target_takes_no_flow_but_its_next_hops_are_resolved_ahead():
    f = Forwarder()
    standby = SpillPlan("dc2", tuple(remote(a) for a in REMOTE), active=False)
    p = plan(server(RS[0]), scheduler="rr", spill=standby)
    f.apply(p)
    assert dr_owner(fwd(f, syn(40000))) == RS[0]
    assert real_addresses(p) == [P(RS[0]), P(REMOTE[0]), P(REMOTE[1])]
    f.apply(plan(down(RS[0]), scheduler="rr", spill=SpillPlan("dc2", standby.servers)))
    assert tunnelled_to(fwd(f, syn(40001))) == REMOTE[0]
    f.apply(plan(down(RS[0]), scheduler="rr", spill=standby))  # back to standby: no new flow goes away
    assert fwd(f, syn(40002)) is None and f.drops[Drop.NO_DESTINATION] == 1
    assert tunnelled_to(fwd(f, syn(40001, flags="A"), 0.1)) == REMOTE[0]  # the spilled one stays


def test_the_spill_flag_sends_new_flows_to_the_standby_target_before_the_plan_says_so():
    # The worker still forwards by its last plan (dc1's server up, dc2 a standby target) when the
    # control plane decides to spill: it arms the flag at once; the plan follows later.
    cells = [NOT_ARMED]
    f = Forwarder(spill_flags=cells)
    standby = SpillPlan("dc2", tuple(remote(a) for a in REMOTE), active=False, flag=0)
    f.apply(plan(server(RS[0]), scheduler="rr", spill=standby))
    assert dr_owner(fwd(f, syn(40000), 1.0)) == RS[0]  # refused by the dead server: the client gives up
    cells[0] = 2.0  # spill from 2.0 (the control plane's decision, plus `after`)
    assert dr_owner(fwd(f, syn(40001), 1.9)) == RS[0]
    assert tunnelled_to(fwd(f, syn(40002), 2.0)) == REMOTE[0]
    # The client reuses the port of the refused attempt: a new connection, spilled too.
    assert tunnelled_to(fwd(f, syn(40000), 2.1)) == REMOTE[1]
    assert f.stats().spilled_ahead == 2
    assert f.stats().servers[ServerKey("web@dc2", REMOTE[0], 0)][4] == 1
    # The plan arrives: the target is active, the flows spilled ahead keep their servers.
    f.apply(plan(down(RS[0]), scheduler="rr", spill=replace(standby, active=True)))
    assert tunnelled_to(fwd(f, syn(40002, flags="A"), 2.2)) == REMOTE[0]
    assert tunnelled_to(fwd(f, syn(40000, flags="A"), 2.2)) == REMOTE[1]
    assert tunnelled_to(fwd(f, syn(40003), 2.3)) == REMOTE[0]
    assert f.stats().spilled_ahead == 2  # by the plan now
    # Spill ends (recover_after passed): the flag is cleared and the plan says standby again.
    cells[0] = NOT_ARMED
    f.apply(plan(server(RS[0]), scheduler="rr", spill=standby))
    assert dr_owner(fwd(f, syn(40004), 9.0)) == RS[0]
    assert tunnelled_to(fwd(f, syn(40002, flags="A"), 9.0)) == REMOTE[0]  # spilled flows stay


def test_without_a_target_or_a_flag_cell_the_plan_alone_decides():
    cells = [0.0]  # armed long ago
    f = Forwarder(spill_flags=cells)
    f.apply(plan(down(RS[0]), scheduler="rr"))  # no target qualifies: nothing to spill to
    assert fwd(f, syn(40000), 1.0) is None and f.drops[Drop.NO_DESTINATION] == 1
    standby = SpillPlan("dc2", tuple(remote(a) for a in REMOTE), active=False)  # flag -1: no cell
    f.apply(plan(server(RS[0]), scheduler="rr", spill=standby))
    assert dr_owner(fwd(f, syn(40001), 1.0)) == RS[0]


def test_the_kernel_route_of_a_flow_spilled_on_the_flag_is_live_before_any_plan_makes_the_target_active():
    f = Forwarder(spill_flags=[0.0])
    f.apply(plan(server(RS[0]), scheduler="rr", spill=SpillPlan("dc2", (remote(REMOTE[0]),), active=False, flag=0)))
    maps = FakeMaps(cpus=2)
    tables = KernelTables(maps, f.table.timeouts)
    f.kernel = f.table.outside = sync = KernelSync(tables)
    sync.plan_applied(f.vips, f)
    fwd(f, syn(40000), 1.0)
    assert tunnelled_to(fwd(f, syn(40000, flags="A"), 1.1)) == REMOTE[0]
    sync.flush()
    (key,) = tables.flows()
    r = km.ROUTE.unpack(maps.lookup("routes", km.U32.pack(tables.flow(key, 1.1)[0])))
    assert r[2] == km.MODE_TUN and r[4] == km.ROUTE_LIVE | km.ROUTE_NEW | km.ROUTE_TRACK  # a remote server with weight, as above
