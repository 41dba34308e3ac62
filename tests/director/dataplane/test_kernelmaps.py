"""The kernel data plane's map layout (director/dataplane/kernelmaps.py) and KernelTables over the fake maps.

Pure: no BPF. test_kernel_golden.py holds the C program to the same layout.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from director.dataplane import codec
from director.dataplane import kernelmaps as km
from director.dataplane.conntable import ESTABLISHED, NEXT, UDP
from director.dataplane.kernel import SWEEP_PASS_EVERY, FakeMaps, KernelTables


def P(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


KEY4 = codec.flow_key(6, P("198.51.100.7"), P("192.0.2.10"), 40000, 80)
KEY6 = codec.flow_key(17, P("2001:db8:100::7"), P("2001:db8:10::10"), 5353, 53)
TUN4 = codec.Tunnel(P("10.2.0.1"), P("10.2.0.11"), b"\x02\0\0\0\0\x11", b"\x02\0\0\0\0\xd1", mtu=1500)
TUN6 = codec.Tunnel(P("2001:db8:2::1"), P("2001:db8:2::11"), b"\x02\0\0\0\0\x11", b"\x02\0\0\0\0\xd1", mtu=1400)


def test_flow_keys_carry_family_vip_id_ports_in_wire_order_and_client():
    k = km.flow_key(KEY4, 0x0102)
    assert len(k) == km.FLOW_KEY.size == 24  # with 8 of value: under 100 bytes an entry at 1M (benchmarks.md)
    assert k == bytes([6, 4]) + km.U16.pack(0x0102) + b"\x9c\x40\x00\x50" + P("198.51.100.7") + bytes(12)
    k6 = km.flow_key(KEY6, 3)
    assert k6[:2] == bytes([17, 6]) and k6[4:8] == b"\x14\xe9\x00\x35" and k6[8:] == P("2001:db8:100::7")
    ids = {0x0102: P("192.0.2.10"), 3: P("2001:db8:10::10")}
    assert km.conn_key(k, ids) == KEY4 and km.conn_key(k6, ids) == KEY6 and km.conn_key(k, {}) is None
    assert km.flow_vip(KEY4) == P("192.0.2.10") and km.flow_vip(KEY6) == P("2001:db8:10::10")
    with pytest.raises(ValueError):
        km.flow_key(b"short", 0)


def test_flow_values_hold_route_state_and_a_32_bit_expiry_read_near_now():
    v = km.flow_value(7, ESTABLISHED, 12.5)
    assert len(v) == km.FLOW_VALUE.size == 8
    route, state, expires = km.parse_flow_value(v, 10.0)
    assert (route, state) == (7, ESTABLISHED) and 12.5 <= expires < 12.5 + km.TICK  # rounded up: never early
    # The tick counter wraps every 2^32 ticks (~52 days); an expiry is read as the one nearest now.
    wrap = (1 << 32) * km.TICK
    late = km.flow_value(1, UDP, wrap + 5.0)
    assert km.parse_flow_value(late, wrap - 5.0)[2] == pytest.approx(wrap + 5.0, abs=km.TICK)
    assert km.parse_flow_value(km.flow_value(1, UDP, wrap - 5.0), wrap + 1.0)[2] == pytest.approx(wrap - 5.0, abs=km.TICK)
    assert km.TIMEOUTS.unpack(km.timeouts_value([100 * 86400.0]))[0] == km.ns(km.MAX_TIMEOUT)


def test_a_flow_value_s_flags_keep_nat_and_kernel_made_apart():
    # One byte carries both: the program sets FLOW_KERNEL on flows it made or moved (hash schedulers),
    # Python writes FLOW_TWO_WAY on NAT flows; a NAT flow must never read as kernel-made (the sweep adopts those).
    assert km.flow_value(1, ESTABLISHED, 1.0)[3] == 0
    nat = km.flow_value(1, ESTABLISHED, 1.0, two_way=True)[3]
    assert nat == km.FLOW_TWO_WAY and not nat & km.FLOW_KERNEL
    assert km.parse_flow_value(km.flow_value(3, ESTABLISHED, 12.5, two_way=True), 10.0)[:2] == (3, ESTABLISHED)


def test_routes_for_dr_tun_and_unreachable():
    macs = b"\x02\0\0\0\0\x11\x02\0\0\0\0\xd1"
    dst, src, mode, fam, flags, ifindex, max_inner, _, saddr, daddr, _ = km.ROUTE.unpack(km.route_value(macs, True, 3))
    assert (dst + src, mode, flags, ifindex) == (macs, km.MODE_DR, km.ROUTE_LIVE, 3)
    r = km.ROUTE.unpack(km.route_value(TUN4, False))
    assert r[2:7] == (km.MODE_TUN, 4, 0, 0, 1480)
    assert r[8][:4] == P("10.2.0.1") and r[9][:4] == P("10.2.0.11") and r[0] + r[1] == TUN4.eth[:12]
    r6 = km.ROUTE.unpack(km.route_value(TUN6, True))
    assert r6[2:7] == (km.MODE_TUN, 6, km.ROUTE_LIVE, 0, 1360) and r6[9] == P("2001:db8:2::11")
    assert km.ROUTE.unpack(km.route_value(None, True))[2:5] == (km.MODE_NONE, 0, 0)


def test_the_state_table_is_the_connection_tables():
    v = km.next_state_value()
    assert len(v) == km.STATES * 256
    for state in range(12):
        for flags in (0, 0x02, 0x10, 0x11, 0x04, 0x18):
            ns = NEXT[state][flags]
            assert v[state * 256 + flags] == (255 if ns < 0 else ns)
    assert all(v[s * 256 + f] != s for s in range(12, km.STATES) for f in range(256))
    t = km.TIMEOUTS.unpack(km.timeouts_value([1.0, 900.0, 0.5]))
    assert t[:4] == (1_000_000_000, 900_000_000_000, 500_000_000, 0) and len(t) == km.STATES


def test_percpu_values_sum_per_field():
    two = km.COUNTER.pack(3, 300) + km.COUNTER.pack(4, 400)
    assert km.sum_percpu(two, km.COUNTER.size, km.COUNTER) == (7, 700)
    one = km.percpu(km.U32.pack(5), 4, 3)
    assert len(one) == 24 and km.sum_percpu(one, 4, km.U32) == (15,)


def test_the_c_structs_match_the_layout():
    """The C file's structs, field by field in size, against the Python packing (the loader checks the
    object too, but this runs without clang or BPF)."""
    src = (Path(km.__file__).with_name("tc") / "glb_tc.bpf.c").read_text()
    sizes = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8}

    def size(struct: str) -> int:
        body = re.search(r"struct %s \{(.*?)\};" % struct, src, re.S).group(1)
        total = 0
        for typ, name, n in re.findall(r"(__u\d+) (\w+)(?:\[(\w+)\])?;", body):
            count = int(n) if n and n.isdigit() else (km.STATES if n == "STATES" else 1)
            total += sizes[typ] * count
        return total

    assert size("flow_key") == km.FLOW_KEY.size
    assert size("flow") == km.FLOW_VALUE.size
    assert size("vip") == km.VIP.size
    assert size("route") == km.ROUTE.size
    assert size("counter") == km.COUNTER.size
    assert size("timeouts") == km.TIMEOUTS.size
    enum = re.search(r"enum reason \{(.*?)\};", src, re.S).group(1)
    assert len(re.findall(r"^\s*R_(?!MAX)\w+", enum, re.M)) == len(km.REASONS)


def test_pinned_maps_are_kept_or_rebuilt_by_groups_that_cover_every_map_once():
    named = [n for _, names in km.GROUPS.values() for n in names]
    assert sorted(named) == sorted(n for n in km.MAPS if n != "layout")  # layout is the record itself
    src = (Path(km.__file__).with_name("tc") / "glb_tc.bpf.c").read_text()
    slots = int(re.search(r"max_entries, (\d+)\);\n[^}]*\} layout SEC", src).group(1))
    assert len(km.GROUPS) <= slots
    ids = km.group_ids(4096)
    assert all(i & 1 for i in ids.values()) and len(set(ids.values())) == len(ids)
    assert km.group_ids(4096) == ids  # stable: a restart finds the same
    bigger = km.group_ids(8192)  # the table's size: the maps sized to it
    assert {g for g in ids if ids[g] != bigger[g]} == {"flows", "templates"}
    bumped = km.group_ids(4096, {"plan": km.GROUPS["plan"][0] + 1})  # a release changed a plan map's meaning
    assert {g for g in ids if ids[g] != bumped[g]} == {"plan"}
    assert [k for k, _ in km.layout_items(ids)] == [km.U32.pack(i) for i in range(len(km.GROUPS))]
    assert km.layout_items(ids)[0][0] == km.ZERO and list(km.GROUPS)[0] == "flows"  # pins before the groups


def test_kernel_tables_over_the_fake():
    maps = FakeMaps(cpus=2)
    t = KernelTables(maps, [60.0] * 12)
    assert maps.lookup("next_state", km.ZERO) == km.next_state_value()
    t.set_route(1, TUN4, True)
    t.install(KEY4, 1, ESTABLISHED, 100.0)
    t.install(KEY6, 1, UDP, 50.0)
    route, state, expires = t.flow(KEY4, 90.0)
    assert (route, state) == (1, ESTABLISHED) and expires == pytest.approx(100.0, abs=km.TICK)
    assert sorted(t.flows()) == sorted([KEY4, KEY6])
    assert t.remove(KEY4) and not t.remove(KEY4) and t.flow(KEY4, 90.0) is None
    maps.update("route_counters", km.U32.pack(1), km.COUNTER.pack(2, 80) + km.COUNTER.pack(1, 40))
    assert t.route_counters(1) == (3, 120) and t.route_counters(2) == (0, 0)
    maps.update("reasons", km.U32.pack(km.REASONS.index("pass_no_flow")), km.percpu(km.U64.pack(4), 8, 2))
    assert t.reasons()["pass_no_flow"] == 8 and t.reasons()["forwarded_dr"] == 0
    t.set_ident(0x1233)
    assert km.sum_percpu(maps.lookup("ident", km.ZERO), 4, km.U32) == (2 * 0x1233,)
    with pytest.raises(ValueError):
        t.set_route(km.MAX_ROUTES, TUN4, True)
    with pytest.raises(ValueError):
        maps.update("conns", b"x", b"y")  # the fake refuses what the kernel would


# --------------------------------------------------------------------------
# KernelSync: the forwarder's flows mirrored into the (fake) kernel tables


def _sync_lab():
    from director.dataplane.forwarder import Forwarder
    from director.dataplane.kernel import KernelSync
    from tests.director.dataplane.test_forwarder import RS, plan, server, syn

    f = Forwarder()
    f.apply(plan(server(RS[0]), server(RS[1])))
    maps = FakeMaps(cpus=2)
    tables = KernelTables(maps, f.table.timeouts)
    sync = KernelSync(tables, ifindex=7)
    f.kernel = f.table.outside = sync
    forward = f.forward

    def forward_and_flush(frame, now):  # as the engine: the flows a batch of frames changed, then one write
        action = forward(frame, now)
        sync.flush()
        return action

    f.forward = forward_and_flush
    return f, maps, tables, sync, syn, plan, server, RS


def test_a_flow_is_installed_once_confirmed_with_its_route():
    f, maps, tables, sync, syn, plan, server, RS = _sync_lab()
    f.forward(memoryview(syn(40000)), 0.0)
    assert tables.flows() == []  # a SYN alone proves nothing (a flood stays in userspace)
    action = f.forward(memoryview(syn(40000, flags="A")), 1.0)
    (key,) = tables.flows()
    route, state, expires = tables.flow(key, 1.0)
    assert state == ESTABLISHED and expires == pytest.approx(1.0 + f.table.timeouts[ESTABLISHED])
    r = km.ROUTE.unpack(maps.lookup("routes", km.U32.pack(route)))
    # DR: the kernel applies its flows' state changes (ROUTE_TRACK), whatever the scheduler
    assert r[0] + r[1] == action and r[2:6] == (km.MODE_DR, 0, km.ROUTE_LIVE | km.ROUTE_NEW | km.ROUTE_TRACK, 7)
    f.forward(memoryview(syn(40000, flags="FA")), 2.0)  # a FIN that came to Python anyway: written again
    assert tables.flow(key, 2.0)[1] != ESTABLISHED


def test_a_plan_that_takes_the_server_away_turns_its_route_off():
    f, maps, tables, sync, syn, plan, server, RS = _sync_lab()
    f.forward(memoryview(syn(40000)), 0.0)
    owner = f.forward(memoryview(syn(40000, flags="A")), 0.0)
    (key,) = tables.flows()
    route = tables.flow(key, 0.0)[0]
    down = [server(a, available=a != RS[owner[5] - 1], weight=int(a != RS[owner[5] - 1])) for a in RS[:2]]
    f.apply(plan(*down))
    sync.plan_applied(f.vips)
    assert km.ROUTE.unpack(maps.lookup("routes", km.U32.pack(route)))[4] == 0  # not live: the kernel passes
    live = {k[4:] for k, v in maps.maps["vips"].items() if km.VIP.unpack(v)[1] & km.VIP_LIVE}
    assert live == {ipaddressed("192.0.2.10")}


def test_a_standby_plan_without_vips_turns_every_route_off():
    from director.dataplane.packetpath import without_vips

    f, maps, tables, sync, syn, plan, server, RS = _sync_lab()
    f.forward(memoryview(syn(40000)), 0.0)
    f.forward(memoryview(syn(40000, flags="A")), 0.0)
    (key,) = tables.flows()
    f.apply(without_vips(plan(server(RS[0]), server(RS[1]))))
    sync.plan_applied(f.vips)
    assert km.ROUTE.unpack(maps.lookup("routes", km.U32.pack(tables.flow(key, 0.0)[0])))[4] == 0
    assert all(not km.VIP.unpack(v)[1] & km.VIP_LIVE for v in maps.maps["vips"].values())  # ids kept, none live


def ipaddressed(a: str) -> bytes:
    return P(a).ljust(16, b"\0")


def test_kernel_counters_fold_into_the_forwarders_and_expiry_follows_the_kernel():
    f, maps, tables, sync, syn, plan, server, RS = _sync_lab()
    f.forward(memoryview(syn(40000)), 0.0)
    f.forward(memoryview(syn(40000, flags="A")), 0.0)
    (key,) = tables.flows()
    route = tables.flow(key, 0.0)[0]
    before = f.stats().forwarded
    maps.update("route_counters", km.U32.pack(route), km.COUNTER.pack(10, 400) + km.COUNTER.pack(5, 200))
    sync.fold_counters()
    sync.fold_counters()  # deltas: folding twice counts once
    assert f.stats().forwarded == before + 15
    # The kernel kept the flow alive past Python's expiry: the sweep adopts the kernel's.
    es = f.table.timeouts[ESTABLISHED]
    tables.install(key, route, ESTABLISHED, es + 500.0)
    assert f.sweep(es + 10.0) == 0 and len(f.table) == 1
    assert f.sweep(es + 600.0) == 1 and len(f.table) == 0
    sync.flush()
    assert tables.flows() == []  # forgotten in the kernel too


class CountingMaps(FakeMaps):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, int]] = []

    def update(self, name, key, value):
        self.calls.append(("update", name, 1))
        super().update(name, key, value)

    def update_batch(self, name, items):
        if items:
            self.calls.append(("update_batch", name, len(items)))
        for k, v in items:
            FakeMaps.update(self, name, k, v)

    def delete_batch(self, name, keys):
        if keys:
            self.calls.append(("delete_batch", name, len(keys)))
        return sum(FakeMaps.delete(self, name, k) for k in keys)


def test_flows_are_written_in_one_batch_per_flush_and_only_changed_routes():
    from director.dataplane.forwarder import Forwarder
    from director.dataplane.kernel import KernelSync
    from tests.director.dataplane.test_forwarder import RS, plan, server, syn

    f = Forwarder()
    f.apply(plan(server(RS[0]), server(RS[1])))
    maps = CountingMaps()
    sync = KernelSync(KernelTables(maps, f.table.timeouts))
    f.kernel = f.table.outside = sync
    for port in range(40000, 40010):
        f.forward(memoryview(syn(port)), 0.0)
        f.forward(memoryview(syn(port, flags="A")), 0.0)
    maps.calls.clear()
    sync.flush()
    assert maps.calls == [("update_batch", "conns", 10)]
    assert len(sync.tables.flows()) == 10
    maps.calls.clear()
    f.apply(plan(server(RS[0]), server(RS[1])))
    sync.plan_applied(f.vips, f)
    assert [c for c in maps.calls if c[1] == "routes"] == []  # nothing changed: nothing written
    f.apply(plan(server(RS[0], available=False, weight=0), server(RS[1])))
    sync.plan_applied(f.vips, f)
    assert [c for c in maps.calls if c[1] == "routes"] == [("update_batch", "routes", 1)]  # one route off
    maps.calls.clear()
    assert f.sweep(10_000.0) == 10
    sync.flush()
    assert maps.calls == [("delete_batch", "conns", 10)] and sync.tables.flows() == []


def test_the_kernel_sweep_removes_expired_flows_only_the_kernel_holds_in_batches():
    f, maps, tables, sync, syn, plan, server, RS = _sync_lab()
    f.forward(memoryview(syn(40000)), 0.0)
    f.forward(memoryview(syn(40000, flags="A")), 0.0)  # Python's: its own sweep decides
    (mine,) = tables.flows()
    route = tables.flow(mine, 0.0)[0]
    theirs = [codec.flow_key(6, P(f"198.51.100.{i}"), P("192.0.2.10"), 5000, 80) for i in range(1, 6)]
    for i, k in enumerate(theirs):  # a predecessor's: three expired, two alive
        tables.install(k, route, ESTABLISHED, 10.0 if i < 3 else 5000.0)
    tables.install(mine, route, ESTABLISHED, 10.0)  # expired too, but held by Python's table
    swept = sync.sweep(100.0, f.table.__contains__, budget=4) + sync.sweep(100.0, f.table.__contains__, budget=4)
    sync.flush()
    assert swept == 3 and sorted(tables.flows()) == sorted([mine, *theirs[3:]])
    # A new pass starts at most every SWEEP_PASS_EVERY: a predecessor's flow expired since waits for it.
    tables.install(theirs[3], route, ESTABLISHED, 10.0)
    assert sync.sweep(100.0 + SWEEP_PASS_EVERY / 2, f.table.__contains__, budget=4) == 0
    assert sync.sweep(100.0 + SWEEP_PASS_EVERY, f.table.__contains__, budget=4) == 1


def test_a_restarted_director_adopts_its_predecessor_s_flows_over_the_same_maps():
    from director.dataplane.forwarder import Forwarder
    from director.dataplane.kernel import KernelSync
    from tests.director.dataplane.test_forwarder import RS, plan, server, syn

    maps = FakeMaps()

    def director(addrs=RS[:3]):
        f = Forwarder()
        f.apply(plan(*[server(a) for a in addrs]))
        sync = KernelSync(KernelTables(maps, f.table.timeouts), ifindex=7)
        f.kernel = f.table.outside = sync
        sync.plan_applied(f.vips, f)
        return f, sync

    old, sync = director()
    owners = {}
    for port in range(40000, 40006):
        old.forward(memoryview(syn(port)), 0.0)
        owners[port] = old.forward(memoryview(syn(port, flags="A")), 0.0)
    sync.flush()
    routes_before = dict(maps.maps["routes"])
    new, sync2 = director()  # restarted: an empty table over the same (pinned) maps
    assert len(new.table) == 0 and len(sync2.tables.flows()) == 6
    assert maps.maps["routes"] == routes_before  # the predecessor's routes found, still live
    # A FIN of a flow only the kernel knows: adopted with its server and state, then closed as usual.
    assert new.forward(memoryview(syn(40001, flags="FA")), 1.0) == owners[40001]
    (c,) = new.table
    assert c.state != ESTABLISHED and c.dest.available
    sync2.flush()
    assert sync2.tables.flow(c.key, 1.0)[1] == c.state
    # Restarted with a plan that no longer has a predecessor's server: its routes are turned off, so
    # the kernel passes their flows to Python, which does not adopt them (no server to keep them on).
    gone = RS[owners[40002][5] - 1]
    third, sync3 = director([a for a in RS[:3] if a != gone])
    off = [r for r in map(km.ROUTE.unpack, maps.maps["routes"].values()) if r[2] == km.MODE_NONE]
    assert len(off) == 1 and off[0][4] == 0
    assert third.forward(memoryview(syn(40002, flags="A")), 1.0) is None


def test_vip_ids_are_stable_kept_while_not_live_and_read_back_from_maps_that_outlived_a_director():
    maps = FakeMaps()
    t = KernelTables(maps, [60.0] * 12)
    a, b, c = P("192.0.2.10"), P("192.0.2.11"), P("2001:db8:10::10")
    t.set_vips([a, b])
    ids = (t.vip_id(a), t.vip_id(b))
    assert len(set(ids)) == 2
    t.install(KEY4, 0, ESTABLISHED, 100.0)  # KEY4's VIP is a
    t.set_vips([c])  # a standby's or a new plan: a and b not live, still known
    t.set_vips([a, c])
    assert t.vip_id(a) == ids[0] and t.vip_id(c) not in ids
    again = KernelTables(maps, [60.0] * 12)  # a restarted director over pinned maps
    assert again.vip_id(a) == ids[0] and again.vip_id(b) == ids[1] and again.flows() == [KEY4]
    writes = []
    maps.update = lambda name, k, v, _u=maps.update: (writes.append(name), _u(name, k, v))[1]
    again.set_vips([a, c])
    assert writes == []  # nothing changed: nothing written


def test_a_service_with_spill_configured_is_never_scheduled_by_the_kernel():
    # The packet workers switch a spilling service's new flows on the spill flag, ahead of any plan; a kernel
    # lookup table would go on sending them to the dead local servers until the plan came.
    from types import SimpleNamespace as NS
    plain = NS(scheduler="mh", forwarding="dr", persistence=None, spill=None)
    assert km.kernel_schedules(plain)
    assert not km.kernel_schedules(NS(**{**vars(plain), "spill": NS(active=False)}))
    assert not km.kernel_schedules(NS(**{**vars(plain), "spill": NS(active=True)}))
    assert not km.kernel_schedules(NS(**{**vars(plain), "scheduler": "wlc"}))
    assert km.kernel_schedules(NS(**{**vars(plain), "persistence": (300.0, 24, 64)}))  # its templates too


def test_templates_are_keyed_as_python_s_persistence():
    from director.control.health import ServerKey
    from director.dataplane.scheduler import Persistence
    p = Persistence(300.0, 24, 64)
    pid = km.persist_id("web")
    k4 = km.template_key(pid, p.key(P("192.0.2.77")))
    assert k4 == km.TPL_KEY.pack(pid, 4, P("192.0.2.0") + bytes(12))
    assert km.template_key(pid, p.key(P("2001:db8:1:2:3::9"))) == km.TPL_KEY.pack(pid, 6, P("2001:db8:1:2::"))
    assert km.persist_id("web") != km.persist_id("api") and km.persist_id("") & 1
    kind, m4, m6, table, size, persist, timeout = km.SVC.unpack(km.svc_value("sh", 7, 256, (300.0, 24, 64), pid))
    assert (kind, m4, m6, table, size, persist) == (km.SCHED_KINDS["sh"], 24, 64, 7, 256, pid)
    assert abs(timeout * km.TICK - 300.0) < 0.01
    assert km.SVC.unpack(km.svc_value("mh", 1, 251))[5:] == (0, 0)  # no persistence
    server, expires = km.TPL.unpack(km.template_value(km.server_id(ServerKey("web", "10.2.0.11", 0)), 12.0))
    assert server & 1 and expires == km.ticks(12.0)


def test_flow_events_take_the_sweep_s_path_at_once():
    """KernelSync.events over the fakes: each live record of a flow the kernel made or moved goes to
    Forwarder.take as the sweep would hand it; a flow Python wrote since, an expired record, a route or a
    VIP this director does not know are passed over."""
    f, maps, tables, sync, syn, plan, server, RS = _sync_lab()
    f.forward(memoryview(syn(40000)), 0.0)
    f.forward(memoryview(syn(40000, flags="A")), 0.0)  # a Python flow: the route is registered
    (mine,) = tables.flows()
    route = tables.flow(mine, 0.0)[0]
    synced = []
    f.table.changed = synced.append

    def record(key: bytes, state: int, expires: float, index: int = route) -> bytes:
        v = bytearray(km.flow_value(index, state, expires))
        v[3] |= km.FLOW_KERNEL
        return km.FLOW_EVENT.pack(tables.kernel_key(key), bytes(v))

    new = codec.flow_key(6, P("203.0.113.9"), P("192.0.2.10"), 7000, 80)
    sync.events([record(new, 3, 60.0)], 1.0, f.take)  # SYN_RECV
    c = f.table.get(new)
    assert c is not None and c.state == 3 and not c.confirmed and synced == []
    assert c.dest.counts.inactive == 1 and c.dest.counts.active == 1  # (and Python's own flow)
    sync.events([record(new, ESTABLISHED, 900.0)], 2.0, f.take)
    assert c.state == ESTABLISHED and c.confirmed and c.expires == pytest.approx(900.0, abs=0.01)
    assert synced == [c] and c.dest.counts.active == 2 and c.dest.counts.inactive == 0
    others = [codec.flow_key(6, P(f"203.0.113.{i}"), P("192.0.2.10"), 7000, 80) for i in range(20, 24)]
    sync.forget(f.table.get(mine))  # Python's own write waits in pending: its record is stale
    stale = record(mine, 3, 60.0)
    sync.events([stale,
                 record(others[0], 3, 1.5),  # expired by now
                 record(others[1], 3, 60.0, index=route + 100),  # a route never registered here
                 km.FLOW_EVENT.pack(km.flow_key(others[2], 999), km.flow_value(route, 3, 60.0))],  # unknown VIP id
                2.0, f.take)
    assert f.table.get(mine).state == ESTABLISHED
    assert all(f.table.get(k) is None for k in others)


def test_python_s_templates_reach_the_kernel(caplog):
    """Over the fakes: a template Python makes (a flow it scheduled: here a plan whose VIP the kernel
    schedules appears after the fact, as on a backup taking over) is written with the flows; a service
    that becomes the kernel's brings every template it holds; a full map is counted and logged once; new
    persistence parameters clear the kernel's copies as they clear Python's."""
    from director.dataplane.kernel import KernelSync
    from glb.errors import KernelDataplaneError
    from director.dataplane.forwarder import Forwarder
    from tests.director.dataplane.test_forwarder import RS, plan, server, syn

    persistence = (300.0, 24, 64)
    parked = plan(server(RS[0]), server(RS[1]), scheduler="mh", vips=(), persistence=persistence)
    owned = plan(server(RS[0]), server(RS[1]), scheduler="mh", persistence=persistence)
    f = Forwarder()
    f.apply(owned)
    maps = FakeMaps(cpus=2)
    sync = KernelSync(KernelTables(maps, f.table.timeouts))
    f.kernel = f.table.outside = sync
    f.forward(memoryview(syn(40000)), 0.0)  # before the kernel schedules it: Python's template, not told
    sync.flush()
    assert maps.keys("templates") == []
    pers = f.service("web").persistence
    (key, t), = pers.items()
    f.apply(parked)
    sync.plan_applied(f.vips, f)
    assert maps.keys("templates") == []  # no VIP of it is the kernel's to schedule
    f.apply(owned)
    sync.plan_applied(f.vips, f)
    tk = km.template_key(km.persist_id("web"), key)
    assert maps.items("templates") == [(tk, km.template_value(km.server_id(t.dest.key), t.expires))]
    (svc,) = maps.maps["services"].values()
    assert km.SVC.unpack(svc)[1:3] == (24, 64) and km.SVC.unpack(svc)[5] == km.persist_id("web")
    f.forward(memoryview(syn(40001, src="192.0.2.9")), 1.0)  # another network: its template told
    sync.flush()
    assert len(maps.keys("templates")) == 2
    update = maps.update

    def full(name, k, v):
        if name == "templates":
            raise KernelDataplaneError("BPF map templates: update failed: Argument list too long")
        update(name, k, v)
    maps.update = full
    f.forward(memoryview(syn(40002, src="203.0.113.1")), 2.0)
    f.forward(memoryview(syn(40003, src="203.0.114.1")), 2.0)
    sync.flush()
    assert sync.templates_full == 2 and len(maps.keys("templates")) == 2
    assert sum("templates table is full" in r.getMessage() for r in caplog.records) == 1
    maps.update = update
    f.apply(plan(server(RS[0]), server(RS[1]), scheduler="mh", persistence=(300.0, 16, 64)))
    sync.plan_applied(f.vips, f)
    assert maps.keys("templates") == []  # another prefix length: Python's templates start afresh, the kernel's too
