"""Answer policy, with time and randomness passed in."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dnsfront import policy
from dnsfront.policy import ANSWER, NODATA, SERVFAIL, Client


@pytest.fixture
def sites(config):
    return {s.name: s for s in config.sites}


@pytest.fixture
def lb(config):
    return lambda name: config.lbname(name)


def test_config_accepts_exactly_the_registered_policies():
    from glb.config import POLICIES as CONFIG_NAMES

    assert CONFIG_NAMES == tuple(policy.POLICIES)
    assert all(p.name == name for name, p in policy.POLICIES.items())


def shares(plan, n=20000, seed=1, client=None):
    rng = random.Random(seed)
    c = Counter()
    for _ in range(n):
        choice, _ = plan.choose(rng.random(), client)
        c[choice.sites[0] if choice.sites else choice.addresses] += 1
    return {k: v / n for k, v in c.items()}


def test_no_state_answers_from_configured_weights(lb, sites, st):
    p = policy.plan(lb("app.example.net."), sites, None, st.NOW, 3.0, 4)
    assert p.kind == ANSWER
    assert "no Redis state" in p.reason
    assert all(c.ttl == 5 for c in p.choices)  # degraded TTL until we know
    s = shares(p)
    assert s["dc1"] == pytest.approx(0.75, abs=0.02)


def test_weighted_full_health_uses_normal_ttl(lb, sites, st):
    p = policy.plan(lb("app.example.net."), sites, st.all_up(), st.NOW + 1, 3.0, 4)
    assert not p.degraded and {c.ttl for c in p.choices} == {20}
    assert shares(p)["dc1"] == pytest.approx(0.75, abs=0.02)


def test_effective_weight_is_weight_times_healthy_fraction(lb, sites, st):
    s = st.state(st.snapshot("dc1", hf=1 / 3), st.snapshot("dc2"))
    p = policy.plan(lb("app.example.net."), sites, s, st.NOW, 3.0, 4)
    assert p.degraded and {c.ttl for c in p.choices} == {5}
    assert shares(p)["dc1"] == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize(
    "dc1,why",
    [
        ({"withdrawn": True}, "withdrawn"),
        ({"up": False}, "service down"),
        ({"hf": 0.0}, "no healthy capacity"),
        ({"at": 1_000_000.0 - 10}, "stale"),
        ({"service": "other"}, "no service"),
    ],
)
def test_unhealthy_site_gets_nothing(lb, sites, st, dc1, why):
    s = st.state(st.snapshot("dc1", **dc1), st.snapshot("dc2"))
    p = policy.plan(lb("app.example.net."), sites, s, st.NOW, 3.0, 4)
    assert [c.sites[0] for c in p.choices] == ["dc2"]
    assert why in p.reason


def test_missing_snapshot_is_down(lb, sites, st):
    p = policy.plan(lb("app.example.net."), sites, st.state(st.snapshot("dc2")), st.NOW, 3.0, 4)
    assert [c.sites[0] for c in p.choices] == ["dc2"] and "no snapshot" in p.reason


def test_drain_and_weight_overrides(lb, sites, st):
    O = st.Override
    s = st.state(st.snapshot("dc1"), st.snapshot("dc2"), overrides=(O("site:dc1", drain=True),))
    p = policy.plan(lb("app.example.net."), sites, s, st.NOW, 3.0, 4)
    assert [c.sites[0] for c in p.choices] == ["dc2"] and "drained" in p.reason
    s = st.state(st.snapshot("dc1"), st.snapshot("dc2"), overrides=(O("site:dc1", weight=100),))
    p = policy.plan(lb("app.example.net."), sites, s, st.NOW, 3.0, 4)
    assert shares(p)["dc1"] == pytest.approx(0.5, abs=0.02)


def test_frozen_state_keeps_sites_up_during_redis_outage(lb, sites, st):
    s = st.all_up().frozen(st.NOW + 1)
    p = policy.plan(lb("app.example.net."), sites, s, st.NOW + 3600, 3.0, 4)
    assert len(p.choices) == 2 and not p.degraded


def test_all_down_fail_open(lb, sites, st):
    p = policy.plan(lb("app.example.net."), sites, st.state(), st.NOW, 3.0, 4)
    assert p.kind == ANSWER and len(p.choices) == 1
    assert set(p.choices[0].addresses) == {"192.0.2.10", "192.0.2.20"}
    assert p.choices[0].ttl == 5 and "fail-open" in p.reason


def test_all_down_fallback_and_servfail(lb, sites, st):
    p = policy.plan(lb("fo.example.net."), sites, st.state(), st.NOW, 3.0, 4)
    assert p.choices[0].addresses == ("192.0.2.99",)
    p6 = policy.plan(lb("fo.example.net."), sites, st.state(), st.NOW, 3.0, 6)
    assert p6.kind == NODATA  # no IPv6 sorry address
    p = policy.plan(lb("sf.example.net."), sites, st.state(), st.NOW, 3.0, 4)
    assert p.kind == SERVFAIL


def test_failover_takes_lowest_priority_group(lb, sites, st):
    p = policy.plan(lb("fo.example.net."), sites, st.all_up(), st.NOW, 3.0, 4)
    assert [c.sites[0] for c in p.choices] == ["dc1"]
    p = policy.plan(lb("fo.example.net."), sites, st.state(st.snapshot("dc2")), st.NOW, 3.0, 4)
    assert [c.sites[0] for c in p.choices] == ["dc2"] and "failover to priority 2" in p.reason


def test_family_without_addresses(lb, sites, st):
    p = policy.plan(lb("app.example.net."), sites, st.all_up(), st.NOW, 3.0, 6)
    # Only dc1 has an IPv6 VIP: AAAA answers come from dc1 alone.
    assert [c.addresses for c in p.choices] == [("2001:db8:10::10",)]
    p = policy.plan(lb("near.example.net."), sites, st.state(st.snapshot("dc2")), st.NOW, 3.0, 6)
    assert p.kind == ANSWER and "fail-open" in p.reason  # dc1 (the only v6 member) is down


def test_answers_n_appends_next_sites(lb, sites, st):
    p = policy.plan(lb("multi.example.net."), sites, st.all_up(), st.NOW, 3.0, 4)
    assert sorted(c.addresses for c in p.choices) == [("192.0.2.10", "192.0.2.20"), ("192.0.2.20", "192.0.2.10")]


def test_standby_weight_zero(sites, st, config):
    from dataclasses import replace

    from glb.config import PoolMember

    base = config.lbname("app.example.net.")
    lbz = replace(base, members=(PoolMember("dc1", 100), PoolMember("dc2", 0)))
    p = policy.plan(lbz, sites, st.all_up(), st.NOW, 3.0, 4)
    assert [c.sites[0] for c in p.choices] == ["dc1"]
    p = policy.plan(lbz, sites, st.state(st.snapshot("dc2")), st.NOW, 3.0, 4)
    assert [c.sites[0] for c in p.choices] == ["dc2"] and "standby" in p.reason


def v4(text: str, bits: int = 32) -> Client:
    import ipaddress

    return Client(4, int(ipaddress.ip_address(text)), bits)


def test_topology_by_client_network_with_scope(lb, sites, st):
    p = policy.plan(lb("near.example.net."), sites, st.all_up(), st.NOW, 3.0, 4)
    choice, scope = p.choose(0.5, v4("198.51.100.7"))
    assert choice.sites[0] == "dc1" and scope == 24
    choice, scope = p.choose(0.5, v4("203.0.113.9", 24))
    assert choice.sites[0] == "dc2" and scope == 24
    # 10.9/16 (dc3) is inside 10/8 (dc2): the more specific wins, scope 16.
    choice, scope = p.choose(0.5, v4("10.9.1.1"))
    assert choice.sites[0] == "dc3" and scope == 16
    choice, scope = p.choose(0.5, v4("10.1.1.1"))
    # 10.1.1.1 first differs from 10.9/16 at bit 13: 10.0/13 all stays outside dc3.
    assert choice.sites[0] == "dc2" and scope == 13
    # Outside every network: weighted, and the scope only as long as needed.
    choice, scope = p.choose(0.5, v4("192.0.2.1"))
    assert scope <= 8
    # ECS /0: not tailored, scope 0.
    assert p.choose(0.5, v4("0.0.0.0", 0))[1] == 0


def test_topology_preferred_site_down_falls_back(lb, sites, st):
    s = st.state(st.snapshot("dc2"), st.snapshot("dc3"))
    p = policy.plan(lb("near.example.net."), sites, s, st.NOW, 3.0, 4)
    # 10.9.x prefers dc3 (up), 198.51.100.x prefers dc1 (down) -> weighted over dc2/dc3
    assert p.choose(0.1, v4("10.9.0.1"))[0].sites[0] == "dc3"
    got = {p.choose(r / 10, v4("198.51.100.1"))[0].sites[0] for r in range(10)}
    assert got == {"dc2", "dc3"}


def test_one_live_member_is_not_tailored(lb, sites, st):
    # Only dc2 is live: topology and sticky have one answer for everyone, scope 0.
    s = st.state(st.snapshot("dc2"))
    for name in ("near.example.net.", "stick.example.net."):
        p = policy.plan(lb(name), sites, s, st.NOW, 3.0, 4)
        assert p.choose(0.5, v4("198.51.100.7")) == (p.choices[0], 0)
        assert not p.selector.client_dependent


def test_sticky_is_stable_and_moves_only_a_share(lb, sites, st, config):
    from dataclasses import replace

    from glb.config import PoolMember

    lbs = lb("stick.example.net.")
    before = policy.plan(lbs, sites, st.all_up(), st.NOW, 3.0, 4)
    rng = random.Random(7)
    clients = [Client(4, rng.getrandbits(32) & ~0xFF, 24) for _ in range(3000)]
    first = {c.address: before.choose(rng.random(), c) for c in clients}
    # Same subnet, any random number: same site, scope 24.
    for c in clients[:50]:
        assert before.choose(0.99, c) == first[c.address]
        assert first[c.address][1] == 24
    counts = Counter(ch.sites[0] for ch, _ in first.values())
    for site in ("dc1", "dc2", "dc3"):
        assert counts[site] / len(clients) == pytest.approx(1 / 3, abs=0.05)
    # Double dc3's weight: only clients moving *to* dc3 change, about 1/3 -> 1/2 of all.
    lbs2 = replace(lbs, members=(PoolMember("dc1"), PoolMember("dc2"), PoolMember("dc3", 200)))
    after = policy.plan(lbs2, sites, st.all_up(), st.NOW, 3.0, 4)
    moved = 0
    for c in clients:
        a = after.choose(0.5, c)[0].sites[0]
        b = first[c.address][0].sites[0]
        if a != b:
            moved += 1
            assert a == "dc3"
    assert moved / len(clients) == pytest.approx(0.5 - 1 / 3, abs=0.05)
    # dc1 dies: only dc1's clients move.
    dead = policy.plan(lbs, sites, st.state(st.snapshot("dc2"), st.snapshot("dc3")), st.NOW, 3.0, 4)
    for c in clients:
        if first[c.address][0].sites[0] != "dc1":
            assert dead.choose(0.5, c)[0].sites[0] == first[c.address][0].sites[0]


def test_weight_slots_are_proportional():
    t = policy.weight_slots([3, 1])
    assert len(t) == policy.SLOTS and t.count(0) == 3 * policy.SLOTS // 4
    t = policy.weight_slots([1_000_000, 1])
    assert t.count(1) == 1  # a tiny positive weight is never starved
    t = policy.weight_slots([0, 5])
    assert t.count(0) == 0


def test_overdue_heartbeat_shortens_ttl_before_the_site_goes_stale(lb, sites, st):
    # heartbeat 1 s (default), stale_after 3 s: from 2 s late the site is still
    # answered, but with the degraded TTL, so resolvers come back soon.
    s = st.all_up()
    on_time = policy.plan(lb("app.example.net."), sites, s, st.NOW + 1.9, 3.0, 4)
    assert not on_time.degraded and {c.ttl for c in on_time.choices} == {20}
    late = policy.plan(lb("app.example.net."), sites, s, st.NOW + 2.5, 3.0, 4)
    assert late.degraded and {c.ttl for c in late.choices} == {5}
    assert {c.sites[0] for c in late.choices} == {"dc1", "dc2"}
    assert "heartbeat overdue" in late.reason
    stale = policy.plan(lb("app.example.net."), sites, s, st.NOW + 3.5, 3.0, 4)
    assert stale.kind == ANSWER and "stale" in stale.reason
