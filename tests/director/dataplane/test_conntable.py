"""director.dataplane.conntable with explicit time: states, timeouts, counters, bounds."""

from __future__ import annotations

import ipaddress
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from director.dataplane.conntable import (
    CLOSE,
    ESTABLISHED,
    FIN_WAIT,
    NEXT,
    SYN_RECV,
    UDP,
    ConnTable,
    FragmentTable,
)
from director.dataplane.scheduler import Dest, Persistence, make_scheduler
from glb import config

SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08
VIP = ipaddress.ip_address("192.0.2.10").packed


def key(i: int = 1, proto: int = 6) -> tuple:
    return (proto, (0xC6336400 + i).to_bytes(4, "big"), 40000 + i % 20000, VIP, 80)


def rs(n: int = 1) -> Dest:
    return Dest(bytes([10, 1, 0, n]))


def counts(*ds: Dest) -> list[tuple[int, int]]:
    return [(d.active, d.inactive) for d in ds]


# ---- TCP life cycle ----------------------------------------------------------------


def test_tcp_handshake_data_close_and_counters():
    t, d = ConnTable(), rs()
    c = t.add(key(), d, SYN, now=0)
    assert c.state == SYN_RECV and counts(d) == [(0, 1)] and c.expires == 60
    assert t.lookup(key(), ACK, 1).state == ESTABLISHED
    assert counts(d) == [(1, 0)]
    assert t.lookup(key(), PSH | ACK, 2).expires == 902
    assert t.lookup(key(), FIN | ACK, 3).state == FIN_WAIT
    assert counts(d) == [(0, 1)]
    assert t.lookup(key(), ACK, 4).expires == 124  # FIN_WAIT: 120 s
    assert t.lookup(key(), ACK, 124) is None  # timed out
    assert counts(d) == [(0, 0)] and len(t) == 0 and t.expired == 1


def test_timeouts_by_state():
    t = ConnTable(tcp_established=900, tcp_syn=60, tcp_fin_wait=120, tcp_close=10, udp=300)
    d = rs()
    t.add(key(1), d, SYN, 0)  # SYN_RECV 60
    t.add(key(2), d, SYN, 0)
    t.lookup(key(2), ACK, 0)  # ESTABLISHED 900
    t.add(key(3), d, SYN, 0)
    t.lookup(key(3), ACK, 0)
    t.lookup(key(3), RST, 0)  # CLOSE 10
    t.add(key(4, 17), d, 0, 0)  # UDP 300
    t.add(key(5), d, ACK, 0)  # picked up mid-stream: CLOSE (IPVS input-only table)
    assert t.get(key(5)).state == CLOSE
    alive = {k: t.peek(key(*k), 59.9) is not None for k in [(1,), (2,), (3,), (4, 17), (5,)]}
    assert alive == {(1,): True, (2,): True, (3,): False, (4, 17): True, (5,): False}
    assert t.peek(key(1), 60) is None
    assert t.peek(key(4, 17), 299) is not None and t.peek(key(4, 17), 300) is None
    assert t.peek(key(2), 899) is not None and t.peek(key(2), 900) is None


def test_established_is_refreshed_by_traffic():
    t, d = ConnTable(), rs()
    t.add(key(), d, SYN, 0)
    for now in range(1, 5000, 800):
        assert t.lookup(key(), ACK, now) is not None
    assert t.lookup(key(), ACK, 5000 + 900) is None


def test_input_only_transitions_match_ipvs():
    # A few rows of IPVS's INPUT-ONLY table, read as (state, flags) -> next.
    assert NEXT[SYN_RECV][ACK] == ESTABLISHED
    assert NEXT[SYN_RECV][RST] == SYN_RECV  # IPVS keeps SYN_RECV on RST
    assert NEXT[ESTABLISHED][FIN | ACK] == FIN_WAIT
    assert NEXT[ESTABLISHED][RST | ACK] == CLOSE
    assert NEXT[ESTABLISHED][SYN] == ESTABLISHED
    assert NEXT[ESTABLISHED][PSH] == ESTABLISHED  # no flag IPVS reads: unchanged
    assert all(NEXT[UDP][f] == UDP for f in range(256))


def test_syn_reusing_a_closing_flow_is_rescheduled():
    t, d = ConnTable(), rs()
    t.add(key(), d, SYN, 0)
    t.lookup(key(), ACK, 1)
    t.lookup(key(), FIN | ACK, 2)
    assert t.lookup(key(), SYN, 3) is None  # the client reused its port
    assert len(t) == 0 and counts(d) == [(0, 0)]
    d2 = rs(2)
    assert t.add(key(), d2, SYN, 3).dest is d2


def test_add_replaces_an_existing_entry():
    t, a, b = ConnTable(), rs(1), rs(2)
    t.add(key(), a, SYN, 0)
    t.lookup(key(), ACK, 1)
    t.add(key(), b, SYN, 2)
    assert counts(a, b) == [(0, 0), (0, 1)] and len(t) == 1


def test_udp_counts_inactive_and_is_confirmed_by_a_second_packet():
    t, d = ConnTable(), rs()
    t.add(key(1, 17), d, 0, 0)
    assert counts(d) == [(0, 1)] and t.unconfirmed == 1
    assert t.lookup(key(1, 17), 0, 10).state == UDP
    assert t.confirmed == 1 and t.unconfirmed == 0 and counts(d) == [(0, 1)]


def test_peek_changes_nothing():
    t, d = ConnTable(), rs()
    c = t.add(key(), d, SYN, 0)
    assert t.peek(key(), 30) is c
    assert c.state == SYN_RECV and c.expires == 60
    assert t.peek(key(9), 30) is None


def test_remove_and_flush():
    t, a, b = ConnTable(), rs(1), rs(2)
    for i in range(10):
        t.add(key(i), a if i % 2 else b, SYN, 0)
    assert t.remove(key(1)) and not t.remove(key(1))
    assert t.flush(lambda c: c.dest is a) == 4
    assert counts(a, b) == [(0, 0), (0, 5)] and len(t) == 5


# ---- down servers -------------------------------------------------------------------


def test_down_server_keep_forwards_until_timeout():
    t, d = ConnTable(), rs()
    t.add(key(), d, SYN, 0)
    t.lookup(key(), ACK, 1)
    d.available = False
    assert t.lookup(key(), ACK, 2).dest is d
    assert t.lookup(key(), ACK, 2 + 900) is None


def test_a_syn_on_a_never_established_flow_of_a_down_server_is_a_new_connection():
    t, d = ConnTable(), rs()
    t.add(key(), d, SYN, 0)  # the server refused it (its RST went straight to the client)
    d.available = False
    assert t.lookup(key(), PSH, 1).dest is d  # keep: anything but a SYN still goes there
    assert t.lookup(key(), SYN, 2) is None  # the client reused the port: schedule afresh
    assert counts(d) == [(0, 0)] and len(t) == 0
    t.add(key(2), d, SYN, 3)  # a server that is up keeps its unconfirmed flow's retransmitted SYN
    d.available = True
    assert t.lookup(key(2), SYN, 4).dest is d
    t.lookup(key(2), ACK, 5)
    d.available = False
    assert t.lookup(key(2), SYN, 6).dest is d  # an established flow stays (keep), SYN or not


def test_down_server_reschedule_drops_the_flow():
    t, d = ConnTable(), rs()
    d.reschedule = True
    t.add(key(), d, SYN, 0)
    t.lookup(key(), ACK, 1)
    d.available = False
    assert t.lookup(key(), ACK, 2) is None
    assert counts(d) == [(0, 0)] and len(t) == 0


def test_quiesced_server_keeps_established_flows():
    t, d = ConnTable(), rs()
    t.add(key(), d, SYN, 0)
    d.weight = 0
    assert t.lookup(key(), ACK, 1).dest is d


# ---- bounds and floods ----------------------------------------------------------------


def test_syn_flood_stays_at_the_bound_and_spares_established_flows():
    t = ConnTable(max_entries=1000)
    good, bad = rs(1), rs(2)
    for i in range(100):
        t.add(key(i), good, SYN, 0)
        t.lookup(key(i), ACK, 0.1)
    rng = random.Random(7)
    for i in range(20000):  # spoofed SYNs, never completed
        k = (6, rng.getrandbits(32).to_bytes(4, "big"), rng.getrandbits(16), VIP, 80)
        t.add(k, bad, SYN, 1 + i / 1000)
        assert len(t) <= 1000
    assert len(t) == 1000 and t.evicted == 20000 - 900
    assert all(t.lookup(key(i), ACK, 30).dest is good for i in range(100))
    assert counts(good, bad) == [(100, 0), (0, 900)]


def test_lru_evicts_least_recently_used_confirmed_flow_when_all_are_confirmed():
    t, d = ConnTable(max_entries=3), rs()
    for i in range(3):
        t.add(key(i), d, SYN, 0)
        t.lookup(key(i), ACK, 0)
    t.lookup(key(0), ACK, 1)  # 1 is now the least recently used
    t.add(key(9), d, SYN, 2)
    assert t.get(key(1)) is None and t.get(key(0)) is not None and t.get(key(2)) is not None
    assert len(t) == 3 and counts(d) == [(2, 1)]


# ---- sweeping -----------------------------------------------------------------------------


def test_sweep_expires_idle_entries_and_gives_counters_back():
    t, d = ConnTable(), rs()
    for i in range(50):
        t.add(key(i), d, SYN, 0)
    for i in range(25):
        t.lookup(key(i), ACK, 1)
    assert counts(d) == [(25, 25)]
    assert t.sweep(30) == 0
    assert t.sweep(62) == 25  # the half-open ones (60 s)
    assert counts(d) == [(25, 0)] and len(t) == 25
    for i in range(25):
        t.lookup(key(i), ACK, 500)  # traffic keeps them alive past their first due second
    assert t.sweep(902) == 0 and len(t) == 25
    assert t.sweep(1401) == 25 and counts(d) == [(0, 0)]


def test_sweep_sees_a_shortened_timeout():
    t, d = ConnTable(), rs()
    t.add(key(), d, SYN, 0)
    t.lookup(key(), ACK, 1)  # due at 901
    t.lookup(key(), RST, 2)  # CLOSE: 10 s
    assert t.sweep(13) == 1 and len(t) == 0


def test_sweep_budget_and_long_jumps():
    t, d = ConnTable(), rs()
    for i in range(100):
        t.add(key(i, 17), d, 0, 0)
    assert t.sweep(1e9, budget=30) == 30
    assert t.sweep(1e9, budget=30) == 30
    assert t.sweep(1e9 + 1) == 40 and len(t) == 0 and counts(d) == [(0, 0)]
    t.add(key(1), d, SYN, 1e9 + 2)
    assert t.sweep(1e9 + 100) == 1


def test_evicted_entries_leave_the_calendar():
    t, d = ConnTable(max_entries=10), rs()
    for i in range(1000):
        t.add(key(i), d, SYN, 0)
    assert sum(len(b) for b in t._calendar.values()) == 10


# ---- persistence templates -------------------------------------------------------------


def test_connections_hold_their_persistence_template():
    d1, d2 = rs(1), rs(2)
    s = make_scheduler("rr", [d1, d2])
    p = Persistence(timeout=60)
    t = ConnTable()
    src = key()[1]
    tpl = p.schedule(s, src, 1, VIP, 80, 0)
    t.add(key(), tpl.dest, SYN, 0, template=tpl)
    t.lookup(key(), ACK, 1)
    assert tpl.controlled == 1
    assert p.schedule(s, src, 2, VIP, 80, 500).dest is d1  # long past 60 s, still held
    t.lookup(key(), FIN | ACK, 501)
    t.sweep(700)
    assert tpl.controlled == 0
    assert p.schedule(s, src, 3, VIP, 80, 700).dest is d2


# ---- fragments -------------------------------------------------------------------------------


def test_fragment_table():
    f, d = FragmentTable(max_entries=2, timeout=30), rs()
    f.add((17, b"a", b"v", 1), d, 0)
    assert f.get((17, b"a", b"v", 1), 29) is d
    assert f.get((17, b"a", b"v", 1), 30) is None
    f.add((17, b"a", b"v", 2), d, 0)
    f.add((17, b"a", b"v", 3), d, 0)
    f.add((17, b"a", b"v", 4), d, 0)
    assert len(f) == 2 and f.get((17, b"a", b"v", 2), 1) is None


def test_from_config():
    cfg = config.ConnectionTableConfig(max_entries=5, tcp_established=100, tcp_fin_wait=20, tcp_close=5, udp=30)
    t = ConnTable.from_config(cfg)
    assert t.max_entries == 5
    assert (t.timeouts[ESTABLISHED], t.timeouts[FIN_WAIT], t.timeouts[CLOSE], t.timeouts[UDP]) == (100, 20, 5, 30)


# ---- invariants under random traffic -------------------------------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "lookup", "sweep", "down", "up"]),
        st.integers(0, 30),  # flow
        st.sampled_from([SYN, ACK, FIN | ACK, RST, PSH | ACK, 0]),
        st.floats(0, 200),  # time step
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_counters_always_match_the_table(ops):
    t = ConnTable(max_entries=12)
    ds = [rs(1), rs(2), rs(3)]
    ds[2].reschedule = True
    now = 0.0
    for op, flow, flags, step in ops:
        now += step
        proto = 17 if flow % 5 == 0 else 6
        k = key(flow, proto)
        fl = flags if proto == 6 else 0
        if op == "add":
            t.add(k, ds[flow % 3], fl, now)
        elif op == "lookup":
            t.lookup(k, fl, now)
        elif op == "sweep":
            t.sweep(now, budget=5)
        elif op == "down":
            ds[flow % 3].available = False
        else:
            ds[flow % 3].available = True
        assert len(t) <= 12
        entries = list(t)
        for d in ds:
            mine = [c for c in entries if c.dest is d]
            assert d.active == sum(c.state == ESTABLISHED for c in mine)
            assert d.inactive == sum(c.state != ESTABLISHED for c in mine)
        # every entry is filed exactly once, never after the second it may expire
        filed = [c for b in t._calendar.values() for c in b]
        assert len(filed) == len(entries) and set(filed) == set(entries)
        assert all(c.due <= int(c.expires) + 1 for c in entries)


# ---- the hot path: refresh ------------------------------------------------------------


def test_refresh_serves_a_confirmed_flow_whose_packet_changes_nothing_else():
    t, d = ConnTable(), rs()
    k = key()
    t.add(k, d, SYN, now=0.0)
    assert t.refresh(k, SYN, now=1.0) is None  # unconfirmed: lookup's job
    t.lookup(k, ACK, now=1.0)  # ESTABLISHED, confirmed
    c = t.refresh(k, PSH | ACK, now=2.0)
    assert c is not None and c.state == ESTABLISHED and c.expires == 2.0 + 900
    assert t.refresh(k, FIN | ACK, now=3.0) is None  # a state change: lookup's job
    assert t.get(k).state == ESTABLISHED and t.get(k).expires == 2.0 + 900  # nothing changed
    d.available = False
    assert t.refresh(k, ACK, now=3.0) is None  # a down server: lookup decides keep or reschedule
    d.available = True
    assert t.refresh(k, ACK, now=2.0 + 900) is None  # expired
    assert t.get(k) is not None  # ... and left for lookup to count and remove


REFRESH_OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "packet", "packet", "packet", "sweep", "down", "up"]),
        st.integers(0, 8),
        st.sampled_from([SYN, ACK, FIN | ACK, RST, PSH | ACK, 0]),
        st.floats(0, 400),
    ),
    max_size=80,
)


def _snapshot(t: ConnTable):
    return ([(c.key, c.state, c.expires, c.dest.addr, c.confirmed) for c in t],
            t.evicted, t.expired, list(t._confirmed), list(t._unconfirmed))


@settings(max_examples=300, deadline=None)
@given(REFRESH_OPS)
def test_refresh_then_lookup_is_exactly_lookup(ops):
    """The engine tries refresh first and falls back to lookup: the table must not tell."""
    tables = [ConnTable(max_entries=6), ConnTable(max_entries=6)]
    dests = [[rs(1), rs(2)], [rs(1), rs(2)]]
    for ds in dests:
        ds[1].reschedule = True
    now = 0.0
    for op, flow, flags, step in ops:
        now += step
        proto = 17 if flow % 3 == 0 else 6
        k, fl = key(flow, proto), (flags if proto == 6 else 0)
        results = []
        for t, ds, fast in ((tables[0], dests[0], False), (tables[1], dests[1], True)):
            if op == "add":
                t.add(k, ds[flow % 2], fl, now)
            elif op == "packet":
                c = t.refresh(k, fl, now) if fast else None
                if c is None or flow % 4 == 0:  # sometimes the caller cannot use the entry
                    c = t.lookup(k, fl, now)
                results.append(None if c is None else (c.state, c.expires))
            elif op == "sweep":
                t.sweep(now, budget=3)
            else:
                ds[flow % 2].available = op == "up"
        assert len(set(map(str, results))) <= 1
        assert _snapshot(tables[0]) == _snapshot(tables[1])
        assert counts(*dests[0]) == counts(*dests[1])


def test_install_takes_a_synced_flow_with_its_state_expiry_and_counters():
    import pytest

    from director.dataplane.scheduler import Template

    d = Dest(b"\x0a\x01\x00\x0b")
    t = Template(d, 500.0)
    table = ConnTable(max_entries=2)
    key = b"\x06" + bytes(12)
    c = table.install(key, d, ESTABLISHED, 400.0, 10.0, t)
    assert (c.state, c.expires, c.confirmed, d.active, d.inactive, t.controlled) == (ESTABLISHED, 400.0, True, 1, 0, 1)
    assert table.lookup(key, 0x10, 11.0) is c  # an ACK: the established flow goes on
    table.install(key, d, FIN_WAIT, 30.0, 12.0, confirmed=False)  # replaces: counters follow
    assert (d.active, d.inactive, t.controlled, len(table), table.unconfirmed) == (0, 1, 0, 1, 1)
    with pytest.raises(ValueError):
        table.install(key, d, UDP, 30.0, 12.0)  # a TCP flow in the UDP state
    with pytest.raises(ValueError):
        table.install(b"\x11" + bytes(12), d, ESTABLISHED, 30.0, 12.0)
    table.sweep(100.0)
    assert len(table) == 0 and d.inactive == 0
