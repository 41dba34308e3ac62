"""Incremental rebuilds: what a state change costs is what it changed.

The config (conftest): app and fo and multi have dc1+dc2, near and stick
dc1+dc2+dc3, sf only dc3; www is a CNAME to app. Heartbeats every 1 s
(overdue after 2 s), stale_after 3 s.
"""

from __future__ import annotations

import math
import random

import dns.message
import pytest

from glb.state import Override

from dnsfront.answers import Engine

ADDR = ("127.0.0.1", 40000)
ALL = {"app.example.net.", "fo.example.net.", "near.example.net.", "stick.example.net.", "sf.example.net.",
       "multi.example.net."}
WITH_DC3 = {"near.example.net.", "stick.example.net.", "sf.example.net."}


@pytest.fixture
def engine(config, st):
    e = Engine(config, rng=random.Random(3))
    e.update(st.all_up(), st.NOW)
    return e


def entries(engine):
    """Every precomputed entry, by (table, key), as the objects themselves."""
    return {(t, k): e for t, table in (("plain", engine.plain), ("edns", engine.edns)) for k, e in table.items()}


def ttl(engine, name, rtype="A"):
    r = dns.message.from_wire(engine.handle(dns.message.make_query(name, rtype).to_wire(), ADDR))
    return r.answer[-1].ttl


def test_a_heartbeat_that_changes_nothing_rebuilds_nothing(engine, st):
    before = entries(engine)
    plans = dict(engine.plans)
    # Every site heartbeats: new snapshot objects, new published_at, same condition.
    for i in range(1, 20):
        assert engine.apply(st.all_up(at=st.NOW + i * 0.1), st.NOW + i * 0.1) == 0
        assert not engine.pending
    assert entries(engine) == before and all(entries(engine)[k] is e for k, e in before.items())
    assert engine.plans == plans


def test_counters_and_rates_are_not_a_change(engine, st):
    from dataclasses import replace

    snap = st.snapshot("dc1")
    svc = replace(snap.services[0], active_conns=77, new_conns_per_s=12.5, packets_per_s=900.0)
    busy = replace(snap, services=(svc,), heartbeat=snap.heartbeat + 0.5, director_id="other", version=9)
    assert engine.apply(st.state(busy, st.snapshot("dc2"), st.snapshot("dc3")), st.NOW) == 0


def test_a_change_of_one_site_rebuilds_exactly_the_names_that_contain_it(engine, st):
    before = entries(engine)
    down = st.state(st.snapshot("dc1"), st.snapshot("dc2"), st.snapshot("dc3", up=False))
    assert engine.apply(down, st.NOW) == len(WITH_DC3)
    assert set(engine.pending) == WITH_DC3
    assert engine.build_pending() == len(WITH_DC3)
    after = entries(engine)
    changed = {e.label for k, e in before.items() if after.get(k) is not e}
    assert changed == WITH_DC3
    # Only that: the static entries and the other names' are the same objects.
    assert all(after[k] is e for k, e in before.items() if e.label not in WITH_DC3)
    # The rebuilt ones answer from the new state.
    assert engine.plans[("sf.example.net.", 4)].kind == "servfail"  # its only member is down
    assert ttl(engine, "near.example.net") == engine.names["near.example.net."].degraded_ttl


def test_a_changed_site_takes_cnames_to_its_names_along(engine, st):
    before = entries(engine)
    www = [k for k, e in before.items() if e.name == b"\x03www\x07example\x03net\x00" and e.qtype == 1]
    assert www and all(e.label == "app.example.net." for k, e in before.items() if k in www)
    engine.update(st.state(st.snapshot("dc1"), st.snapshot("dc2", hf=0.5), st.snapshot("dc3")), st.NOW)
    after = entries(engine)
    assert all(after[k] is not before[k] for k in www)
    assert ttl(engine, "www.example.net") == engine.names["app.example.net."].degraded_ttl


def test_overrides_rebuild_the_names_of_their_site_only(engine, st):
    weight = Override("site:dc3", weight=5, who="t")
    assert engine.apply(st.state(*st.all_up().sites.values(), overrides=(weight,)), st.NOW) == len(WITH_DC3)
    engine.build_pending()
    # A real server's override changes no answer; neither does who/why of a site override.
    server = Override("server:dc1/web/10.1.0.1:0", drain=True, who="t")
    again = Override("site:dc3", weight=5, who="someone else", why="moved")
    assert engine.apply(st.state(*st.all_up().sites.values(), overrides=(again, server)), st.NOW) == 0
    assert engine.apply(st.state(*st.all_up().sites.values()), st.NOW) == len(WITH_DC3)


def test_the_next_query_of_a_dropped_name_gets_the_new_answer_before_its_rebuild(engine, st):
    q = dns.message.make_query("fo.example.net", "A").to_wire()
    assert dns.message.from_wire(engine.handle(q, ADDR)).answer[0][0].address == "192.0.2.10"
    engine.apply(st.state(st.snapshot("dc1", withdrawn=True), st.snapshot("dc2"), st.snapshot("dc3")), st.NOW)
    slow = engine.slow
    assert dns.message.from_wire(engine.handle(q, ADDR)).answer[0][0].address == "192.0.2.20"
    # Answered from a plan made for it; its entries wait for build_pending.
    assert engine.slow == slow + 1 and "fo.example.net." in engine.pending
    assert ("fo.example.net.", 4) in engine.plans
    engine.build_pending()
    assert dns.message.from_wire(engine.handle(q, ADDR)).answer[0][0].address == "192.0.2.20"
    assert engine.slow == slow + 1  # back on the fast path


def test_staleness_deadlines_fire_at_the_right_now(engine, st):
    # dc3 last published at NOW; dc1 and dc2 keep heartbeating.
    def state(t):
        return st.state(st.snapshot("dc1", at=t), st.snapshot("dc2", at=t), st.snapshot("dc3", at=st.NOW))

    # Overdue (2 heartbeats of 1 s) first: the degraded TTL.
    assert engine.next_deadline() == pytest.approx(st.NOW + 2.0)
    assert engine.apply(state(st.NOW + 1.999), st.NOW + 1.999) == 0
    normal = ttl(engine, "stick.example.net")
    assert engine.apply(state(st.NOW + 2.001), st.NOW + 2.001) == len(WITH_DC3)
    assert set(engine.pending) == WITH_DC3
    assert ttl(engine, "stick.example.net") == engine.names["stick.example.net."].degraded_ttl < normal
    # Then stale (stale_after 3 s): out of the answers.
    assert engine.next_deadline() == pytest.approx(st.NOW + 3.0)
    assert engine.apply(state(st.NOW + 2.999), st.NOW + 2.999) == 0
    assert engine.apply(state(st.NOW + 3.001), st.NOW + 3.001) == len(WITH_DC3)
    assert "dc3 stale" in engine.plan("near.example.net.", 4).reason
    # Nothing left for time to change about dc3; the others' deadlines move with their heartbeats.
    assert engine.watch.deadlines["dc3"] == math.inf
    assert engine.next_deadline() == pytest.approx(st.NOW + 3.001 + 2.0)


def test_a_late_call_catches_up_on_every_deadline_passed(engine, st):
    late = st.NOW + 10
    # No call at the deadlines themselves: the next one sees dc1-3 stale.
    assert engine.apply(st.all_up(), late) == len(ALL)
    assert all(engine.plan(n, 4).kind != "answer" or "all members down" in engine.plan(n, 4).reason for n in ALL)


def test_a_frozen_state_has_no_deadlines(engine, st):
    frozen = st.all_up().frozen(st.NOW + 0.5)
    engine.apply(frozen, st.NOW + 0.5)
    assert engine.next_deadline() == math.inf
    assert engine.apply(frozen, st.NOW + 60) == 0  # a Redis outage does not age the last good state
