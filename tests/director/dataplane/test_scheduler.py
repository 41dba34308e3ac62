"""director.dataplane.scheduler against IPVS semantics: exact sequences, deterministic."""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest

from director.dataplane.scheduler import (
    SCHEDULERS,
    Dest,
    Persistence,
    make_scheduler,
)
from glb import config
from glb.errors import SchedulerError


def ip(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


VIP = ip("192.0.2.10")


def dests(*weights: int, base: str = "10.1.0.") -> list[Dest]:
    return [Dest(ip(f"{base}{i + 1}"), w) for i, w in enumerate(weights)]


def names(ds: list[Dest], picks) -> str:
    return "".join("-" if d is None else "abcdefghij"[ds.index(d)] for d in picks)


def run(sched, n: int, src: bytes = ip("198.51.100.7")) -> list:
    return [sched.schedule(src, 40000 + i, VIP, 80, float(i)) for i in range(n)]


def client(i: int) -> bytes:
    return ip("198.51.100.0") if i == 0 else (int.from_bytes(ip("100.64.0.0"), "big") + i * 7919).to_bytes(4, "big")


def test_every_configured_scheduler_exists():
    assert set(SCHEDULERS) == set(config.SCHEDULERS)
    with pytest.raises(SchedulerError):
        make_scheduler("fo")


# ---- rr / wrr ------------------------------------------------------------------


def test_rr_cycles_and_skips_quiesced_and_down():
    ds = dests(1, 1, 1)
    s = make_scheduler("rr", ds)
    assert names(ds, run(s, 6)) == "abcabc"
    ds[1].weight = 0
    s.update()
    assert names(ds, run(s, 4)) == "acac"
    ds[1].weight, ds[2].available = 5, False
    s.update()
    assert names(ds, run(s, 4)) == "abab"  # after c comes a again


def test_rr_continues_from_last_pick_when_list_changes():
    ds = dests(1, 1, 1)
    s = make_scheduler("rr", ds)
    assert names(ds, run(s, 2)) == "ab"
    ds.append(Dest(ip("10.1.0.4"), 1))
    s.update(ds)
    assert names(ds, run(s, 4)) == "cdab"


def test_rr_nothing_usable():
    ds = dests(0, 0)
    assert run(make_scheduler("rr", ds), 1) == [None]
    assert run(make_scheduler("rr", []), 1) == [None]


def test_wrr_ipvs_sequence():
    ds = dests(4, 3, 2)
    s = make_scheduler("wrr", ds)
    assert names(ds, run(s, 18)) == "aababcabc" * 2


def test_wrr_uses_gcd_steps():
    ds = dests(2, 4)
    s = make_scheduler("wrr", ds)
    assert names(ds, run(s, 6)) == "babbab"


def test_wrr_weight_zero_and_down_get_nothing():
    ds = dests(3, 0, 1)
    ds[2].available = False
    s = make_scheduler("wrr", ds)
    assert names(ds, run(s, 5)) == "aaaaa"
    ds[0].weight = 0
    s.update()
    assert run(s, 1) == [None]


def test_wrr_proportions():
    ds = dests(5, 3, 1)
    s = make_scheduler("wrr", ds)
    assert Counter(names(ds, run(s, 900))) == {"a": 500, "b": 300, "c": 100}


# ---- least-connection family ----------------------------------------------------


def load(ds: list[Dest], *counts: tuple[int, int]) -> None:
    for d, (active, inactive) in zip(ds, counts):
        d.active, d.inactive = active, inactive


def test_lc_uses_overhead_active_256_inactive():
    ds = dests(1, 1, 1)
    load(ds, (1, 0), (0, 200), (0, 300))
    assert make_scheduler("lc", ds).schedule(VIP, 1, VIP, 80, 0) is ds[1]
    load(ds, (1, 0), (0, 257), (0, 300))
    assert make_scheduler("lc", ds).schedule(VIP, 1, VIP, 80, 0) is ds[0]


def test_lc_ignores_weights_except_zero_and_ties_go_first():
    ds = dests(1, 100, 0)
    load(ds, (2, 0), (2, 0), (0, 0))
    assert make_scheduler("lc", ds).schedule(VIP, 1, VIP, 80, 0) is ds[0]


def test_wlc_divides_by_weight():
    ds = dests(1, 3)
    load(ds, (1, 0), (2, 0))  # 256/1 vs 512/3
    assert make_scheduler("wlc", ds).schedule(VIP, 1, VIP, 80, 0) is ds[1]
    load(ds, (1, 0), (3, 10))  # 256 vs 778/3 = 259.3
    assert make_scheduler("wlc", ds).schedule(VIP, 1, VIP, 80, 0) is ds[0]


def test_wlc_skips_quiesced_and_down():
    ds = dests(1, 0, 1)
    ds[2].available = False
    load(ds, (10, 0), (0, 0), (0, 0))
    assert make_scheduler("wlc", ds).schedule(VIP, 1, VIP, 80, 0) is ds[0]


def test_wlc_fills_evenly_by_weight_when_counts_follow():
    ds = dests(1, 2, 3)
    s = make_scheduler("wlc", ds)
    for _ in range(600):
        s.schedule(VIP, 1, VIP, 80, 0).active += 1
    assert [d.active for d in ds] == [100, 200, 300]


def test_sed_counts_active_plus_one_and_ignores_inactive():
    ds = dests(1, 3)
    load(ds, (1, 0), (3, 0))  # 2/1 vs 4/3
    assert make_scheduler("sed", ds).schedule(VIP, 1, VIP, 80, 0) is ds[1]
    load(ds, (0, 1000), (2, 0))  # 1/1 vs 3/3: tie, first wins
    assert make_scheduler("sed", ds).schedule(VIP, 1, VIP, 80, 0) is ds[0]


def test_nq_prefers_an_idle_server_whatever_its_weight():
    ds = dests(10, 1, 1)
    load(ds, (1, 0), (3, 0), (0, 50))
    assert make_scheduler("nq", ds).schedule(VIP, 1, VIP, 80, 0) is ds[2]
    load(ds, (1, 0), (3, 0), (1, 0))  # nobody idle: sed, 2/10 wins
    assert make_scheduler("nq", ds).schedule(VIP, 1, VIP, 80, 0) is ds[0]


# ---- dh / sh ----------------------------------------------------------------------


def ipvs_bucket(addr: bytes, port: int = 0) -> int:
    return ((port + int.from_bytes(addr, "big")) * 2654435761) & 0xFF


def test_dh_maps_destination_address_to_buckets_in_turn():
    ds = dests(1, 1, 1)
    s = make_scheduler("dh", ds)
    for last in range(20):
        dst = ip(f"192.0.2.{last}")
        assert s.schedule(ip("198.51.100.1"), 1, dst, 80, 0) is ds[ipvs_bucket(dst) % 3]
    # every client of one VIP lands on one server
    assert len({s.schedule(client(i), 1, VIP, 80, 0) for i in range(50)}) == 1


def test_sh_buckets_follow_weights_in_list_order():
    ds = dests(2, 1)
    s = make_scheduler("sh", ds)
    for i in range(60):
        src = client(i)
        expect = ds[0] if ipvs_bucket(src) % 3 < 2 else ds[1]
        assert s.schedule(src, 1, VIP, 80, 0) is expect


def test_sh_is_ipvs_hash_last_octet_decides():
    ds = dests(1, 1, 1, 1)
    s = make_scheduler("sh", ds)
    picks = {s.schedule(ip(a), 1, VIP, 80, 0) for a in ("10.0.0.5", "172.16.9.5", "198.51.100.5")}
    assert len(picks) == 1


def test_sh_port_flag_spreads_one_client():
    ds = dests(1, 1, 1, 1)
    s = make_scheduler("sh", ds, port=True)
    assert len({s.schedule(ip("198.51.100.7"), p, VIP, 80, 0) for p in range(1000, 1100)}) == 4


def test_sh_fallback_and_strict_ipvs():
    ds = dests(1, 1)
    src = next(client(i) for i in range(100) if ipvs_bucket(client(i)) % 2 == 0)
    assert make_scheduler("sh", ds).schedule(src, 1, VIP, 80, 0) is ds[0]
    ds[0].weight = 0
    assert make_scheduler("sh", ds).schedule(src, 1, VIP, 80, 0) is ds[1]
    assert make_scheduler("sh", ds, fallback=False).schedule(src, 1, VIP, 80, 0) is None


def test_ipv6_fold_is_xor_of_words():
    s = make_scheduler("sh", [Dest(ip(f"2001:db8::{i}"), 1) for i in range(1, 4)])
    src = ip("2001:db8:100::7")
    words = [int.from_bytes(src[i:i + 4], "big") for i in range(0, 16, 4)]
    fold = words[0] ^ words[1] ^ words[2] ^ words[3]
    assert s.schedule(src, 1, ip("2001:db8:10::10"), 80, 0) is s.dests[((fold * 2654435761) & 0xFF) % 3]


# ---- mh --------------------------------------------------------------------------


def test_mh_spreads_clients_by_weight():
    ds = dests(1, 2, 3, 4)
    s = make_scheduler("mh", ds, table_size=65537)
    got = Counter(names(ds, [s.schedule(client(i), 1, VIP, 80, 0) for i in range(20000)]))
    for k, w in zip("abcd", (1, 2, 3, 4)):
        assert abs(got[k] / 20000 - w / 10) < 0.02


def test_mh_is_deterministic_and_sticky():
    s1 = make_scheduler("mh", dests(1, 1, 1), table_size=251)
    s2 = make_scheduler("mh", dests(1, 1, 1), table_size=251)
    for i in range(200):
        a = s1.schedule(client(i), 1, VIP, 80, 0)
        assert a.addr == s2.schedule(client(i), 1, VIP, 80, 0).addr
        assert a is s1.schedule(client(i), 2, VIP, 80, 0)  # port ignored without the flag


def test_mh_drain_moves_only_the_drained_servers_clients():
    ds = dests(1, 1, 1, 1)
    s = make_scheduler("mh", ds, table_size=4093)
    before = [s.schedule(client(i), 1, VIP, 80, 0) for i in range(3000)]
    ds[2].weight = 0
    s.update()
    after = [s.schedule(client(i), 1, VIP, 80, 0) for i in range(3000)]
    assert all(a is b for a, b in zip(before, after) if a is not ds[2])
    assert all(b is not ds[2] for b in after)
    ds[2].weight = 1  # undrain: exactly the old mapping is back
    s.update()
    assert [s.schedule(client(i), 1, VIP, 80, 0) for i in range(3000)] == before


def test_mh_drained_server_keeps_its_slots_via_last_weight():
    # Without fallback a lookup that lands on the drained server's slot finds no one:
    # exactly its old clients get None, so its slots were neither rebuilt away nor moved.
    ds = dests(5, 5, 5, 5)
    s = make_scheduler("mh", ds, table_size=4093, fallback=False)
    before = [s.schedule(client(i), 1, VIP, 80, 0) for i in range(3000)]
    assert ds[2] in before
    ds[2].weight = 0
    s.update()
    after = [s.schedule(client(i), 1, VIP, 80, 0) for i in range(3000)]
    assert after == [None if b is ds[2] else b for b in before]


def test_mh_order_of_the_servers_does_not_matter():
    # Two directors (or a reload) listing the same servers in another order send each client to the same server.
    ds = dests(1, 2, 3, 1, 2)
    there = dests(1, 2, 3, 1, 2)[::-1]
    a = make_scheduler("mh", ds, table_size=4093)
    b = make_scheduler("mh", there, table_size=4093)
    for i in range(2000):
        assert a.schedule(client(i), 1, VIP, 80, 0).addr == b.schedule(client(i), 1, VIP, 80, 0).addr


def test_mh_down_server_falls_back_or_none_without_fallback():
    ds = dests(1, 1, 1)
    strict = make_scheduler("mh", ds, table_size=251, fallback=False)
    loose = make_scheduler("mh", ds, table_size=251)
    victims = [client(i) for i in range(300) if strict.schedule(client(i), 1, VIP, 80, 0) is ds[0]]
    ds[0].available = False
    strict.update()
    loose.update()
    assert victims and all(strict.schedule(c, 1, VIP, 80, 0) is None for c in victims)
    moved = [loose.schedule(c, 1, VIP, 80, 0) for c in victims]
    assert set(moved) == {ds[1], ds[2]}  # the detour spreads, it does not pile on one server


def test_mh_all_unusable_returns_none_quickly():
    ds = dests(1, 1)
    s = make_scheduler("mh", ds)
    for d in ds:
        d.weight = 0
    s.update()
    assert s.schedule(client(1), 1, VIP, 80, 0) is None
    assert make_scheduler("mh", []).schedule(client(1), 1, VIP, 80, 0) is None


def test_mh_weight_change_rebuilds_and_new_server_takes_about_its_share():
    ds = dests(1, 1, 1)
    s = make_scheduler("mh", ds, table_size=4093)
    before = [s.schedule(client(i), 1, VIP, 80, 0) for i in range(4000)]
    ds.append(Dest(ip("10.1.0.4"), 1))
    s.update(ds)
    after = [s.schedule(client(i), 1, VIP, 80, 0) for i in range(4000)]
    moved = sum(a is not b for a, b in zip(before, after))
    to_new = sum(b is ds[3] for b in after)
    assert abs(to_new / 4000 - 0.25) < 0.03
    assert moved - to_new < 4000 * 0.03  # few flows shuffle between old servers


def test_mh_port_flag_and_ipv6():
    ds = [Dest(ip(f"2001:db8:1::{i}"), 1) for i in range(1, 5)]
    s = make_scheduler("mh", ds, table_size=1021, port=True)
    src = ip("2001:db8:100::7")
    assert len({s.schedule(src, p, ip("2001:db8:10::10"), 80, 0) for p in range(200)}) == 4


def test_mh_rejects_non_prime_table():
    with pytest.raises(SchedulerError):
        make_scheduler("mh", dests(1), table_size=65536)


# ---- family ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_a_family_only_sees_its_own_destinations(name):
    mixed = [Dest(ip("2001:db8:1::1"), 5), Dest(ip("10.1.0.1"), 1), Dest(ip("2001:db8:1::2"), 5)]
    s4 = make_scheduler(name, mixed, family=4, **({"table_size": 251} if name == "mh" else {}))
    s6 = make_scheduler(name, mixed, family=6, **({"table_size": 251} if name == "mh" else {}))
    for i in range(20):
        assert s4.schedule(client(i), 1, VIP, 80, float(i)) is mixed[1]
        d6 = s6.schedule(ip("2001:db8:100::7"), 1000 + i, ip("2001:db8:10::10"), 80, float(i))
        assert d6 in (mixed[0], mixed[2])


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_quiesced_server_gets_no_new_flows(name):
    ds = dests(1, 1, 1)
    ds[1].weight = 0
    s = make_scheduler(name, ds, **({"table_size": 251} if name == "mh" else {}))
    picks = [s.schedule(client(i), 1000 + i, ip(f"192.0.2.{i % 50}"), 80, float(i)) for i in range(200)]
    assert ds[1] not in picks


# ---- lblc / lblcr ------------------------------------------------------------------


def test_lblc_sticks_per_destination_until_overloaded():
    ds = dests(2, 2)
    s = make_scheduler("lblc", ds)
    dst = ip("192.0.2.50")
    first = s.schedule(client(1), 1, dst, 80, 0)
    assert first is ds[0]
    first.active = 3  # > weight, and ds[1] has 0*2 < 2: overloaded
    assert s.schedule(client(2), 1, dst, 80, 1) is ds[1]
    assert s.schedule(client(3), 1, dst, 80, 2) is ds[1]  # the entry moved


def test_lblc_entry_expires_and_down_server_is_replaced():
    ds = dests(1, 1)
    s = make_scheduler("lblc", ds, expiration=100.0)
    dst = ip("192.0.2.50")
    assert s.schedule(client(1), 1, dst, 80, 0) is ds[0]
    ds[0].inactive = 5  # now wlc prefers ds[1], but the entry holds
    assert s.schedule(client(1), 1, dst, 80, 50) is ds[0]
    assert s.schedule(client(1), 1, dst, 80, 151) is ds[1]  # unused > 100 s: rescheduled
    ds[1].available = False
    assert s.schedule(client(1), 1, dst, 80, 152) is ds[0]


def test_lblc_table_is_bounded():
    s = make_scheduler("lblc", dests(1, 1), max_entries=10)
    for i in range(50):
        s.schedule(client(1), 1, ip(f"192.0.2.{i}"), 80, 0)
    assert len(s._table) == 10


def test_lblcr_grows_the_set_when_busy_and_shrinks_after_expiration():
    ds = dests(2, 2, 2)
    s = make_scheduler("lblcr", ds, expiration=100.0)
    dst = ip("192.0.2.50")
    assert s.schedule(client(1), 1, dst, 80, 0) is ds[0]
    ds[0].active = 3  # overloaded: add the wlc choice to the set
    assert s.schedule(client(1), 1, dst, 80, 1) is ds[1]
    assert s._table[dst].dests == [ds[1], ds[0]]
    ds[1].active = 1  # the set's least loaded member serves
    assert s.schedule(client(1), 1, dst, 80, 2) is ds[1]
    # 100 s later without change, the most loaded member leaves the set
    assert s.schedule(client(1), 1, dst, 80, 102) is ds[1]
    assert s._table[dst].dests == [ds[1]]


# ---- persistence ----------------------------------------------------------------


def test_persistence_sticks_a_client_network_to_one_server():
    ds = dests(1, 1, 1)
    s = make_scheduler("rr", ds)
    p = Persistence(timeout=300, netmask=24)
    t1 = p.schedule(s, ip("198.51.100.7"), 1000, VIP, 80, 0)
    t2 = p.schedule(s, ip("198.51.100.200"), 1001, VIP, 443, 10)
    t3 = p.schedule(s, ip("198.51.101.7"), 1002, VIP, 80, 20)
    assert t1 is t2 and t1.dest is ds[0]
    assert t3.dest is ds[1]


def test_persistence_times_out_unless_it_controls_connections():
    ds = dests(1, 1)
    s = make_scheduler("rr", ds)
    p = Persistence(timeout=300)
    src = ip("198.51.100.7")
    t = p.schedule(s, src, 1000, VIP, 80, 0)
    assert p.schedule(s, src, 1001, VIP, 80, 299).dest is ds[0]  # refreshed to 599
    assert p.schedule(s, src, 1002, VIP, 80, 600).dest is ds[1]  # expired: rescheduled
    t = p.get(src, 600)
    t.controlled = 1  # a live connection holds it
    assert p.schedule(s, src, 1003, VIP, 80, 5000).dest is ds[1]


def test_persistence_drops_template_of_quiesced_down_or_removed_server():
    ds = dests(1, 1)
    s = make_scheduler("rr", ds)
    p = Persistence(timeout=300)
    src = ip("198.51.100.7")
    assert p.schedule(s, src, 1, VIP, 80, 0).dest is ds[0]
    ds[0].weight = 0
    s.update()
    assert p.schedule(s, src, 2, VIP, 80, 1).dest is ds[1]
    ds[0].weight = 1
    ds[1].available = False
    s.update()
    assert p.schedule(s, src, 3, VIP, 80, 2).dest is ds[0]
    s.update([ds[1]])
    ds[1].available = True
    assert p.schedule(s, src, 4, VIP, 80, 3).dest is ds[1]


def test_persistence_ipv6_mask_and_sweep():
    ds = [Dest(ip("2001:db8:1::1"), 1), Dest(ip("2001:db8:1::2"), 1)]
    s = make_scheduler("rr", ds)
    p = Persistence(timeout=10, netmask6=64)
    a = p.schedule(s, ip("2001:db8:100::1"), 1, ip("2001:db8:10::10"), 80, 0)
    b = p.schedule(s, ip("2001:db8:100::ffff"), 1, ip("2001:db8:10::10"), 80, 0)
    c = p.schedule(s, ip("2001:db8:101::1"), 1, ip("2001:db8:10::10"), 80, 0)
    assert a is b and c.dest is not a.dest
    assert len(p) == 2
    assert p.sweep(5) == 0 and p.sweep(11) == 2 and len(p) == 0


def test_persistence_none_when_nothing_usable_and_bad_mask():
    p = Persistence()
    assert p.schedule(make_scheduler("rr", dests(0)), ip("198.51.100.7"), 1, VIP, 80, 0) is None
    with pytest.raises(SchedulerError):
        Persistence(netmask=33)


def test_dest_from_config():
    rs = config.RealServer(ipaddress.ip_address("10.1.0.11"), None, 5)
    d = Dest.from_config(rs, reschedule=True)
    assert (d.addr, d.port, d.weight, d.last_weight, d.reschedule, d.server) == (rs.address.packed, 0, 5, 5, True, rs)
    assert d.family == 4 and d.usable and d.overhead == 0
    p = Persistence.from_config(config.Persistence(timeout=60, netmask=24))
    assert p.timeout == 60
    with pytest.raises(SchedulerError):
        Dest(b"\x01\x02")


def test_persistence_install_takes_a_synced_template():
    a, b = Dest(b"\x0a\x00\x00\x01"), Dest(b"\x0a\x00\x00\x02")
    p = Persistence(300.0, netmask=24, max_entries=2)
    t = p.install(b"\x0a\x09\x09\x00", a, 100.0)
    assert p.get(b"\x0a\x09\x09\x63", 50.0) is t and t.dest is a
    assert p.install(b"\x0a\x09\x09\x01", a, 80.0) is t and t.expires == 100.0  # same dest: kept, never shortened
    t2 = p.install(b"\x0a\x09\x09\x00", b, 120.0)
    assert t2 is not t and p.get(b"\x0a\x09\x09\x05", 50.0) is t2
    p.install(b"\x0b\x00\x00\x00", a, 100.0)
    p.install(b"\x0c\x00\x00\x00", a, 100.0)
    assert len(p) == 2 and p.get(b"\x0a\x09\x09\x05", 50.0) is None  # bounded: the oldest went
