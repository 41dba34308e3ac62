"""The pure health core: dampening, the state table, service decisions, and the
site snapshot built from them. Time is passed in; nothing sleeps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glb import config
from glb.state import SERVER_STATES, SiteSnapshot, decode_snapshot, encode_snapshot
from director.control.health import (
    ADMIN_DISABLE,
    ADMIN_DRAIN,
    ADMIN_NONE,
    DOWN,
    KEEP,
    PER_SERVICE,
    STATE_TABLE,
    UP,
    Dampening,
    HealthTable,
    ServerKey,
    dampen,
)
from director.control.site import ServerCounters, build_snapshot

BASE = """
zones:
  - apex: example.net
    soa: {mname: ns1.example.net, rname: hostmaster@example.net}
    ns: [{name: ns1.example.net, addresses: [192.0.2.53]}]
sites:
  dc1:
    director: {interface: lo, id: d1, status_listen: "127.0.0.1:9100"}
    services:
"""


def site_from(services_yaml: str) -> config.Site:
    indented = "\n".join("      " + line for line in services_yaml.strip("\n").splitlines())
    return config.loads(BASE + indented + "\n").sites[0]


WEB = """
- name: web
  vips: ["192.0.2.10:80/tcp", "[2001:db8::10]:80/tcp"]
  quorum: 0.5
  sorry_server: 192.0.2.99
  real_servers:
    - {address: 10.0.0.1, weight: 3}
    - {address: 10.0.0.2, weight: 1}
  health_check: {type: tcp, rise: 2, fall: 3, initial: down}
"""

A = ServerKey("web", "10.0.0.1", 0)
B = ServerKey("web", "10.0.0.2", 0)


# --------------------------------------------------------------------------
# Dampening


def run_dampening(start: str, results: str, rise: int, fall: int) -> str:
    """Feed "+"/"-" results; return the verdict after each as "U"/"D"."""
    d = Dampening(start)
    out = []
    for r in results:
        d = dampen(d, r == "+", rise, fall)
        out.append("U" if d.health == UP else "D")
    return "".join(out)


@pytest.mark.parametrize(
    "start, results, rise, fall, verdicts, why",
    [
        ("down", "++", 2, 3, "DU", "rise successes in a row bring it up"),
        ("down", "+-+", 2, 3, "DDD", "a failure restarts the rise count"),
        ("down", "+-++", 2, 3, "DDDU", "then rise in a row"),
        ("down", "+", 1, 1, "U", "rise 1: first success"),
        ("up", "--", 2, 3, "UU", "fewer than fall failures"),
        ("up", "---", 2, 3, "UUD", "fall failures"),
        ("up", "-+-+-", 2, 3, "UUUUD", "gdnsd: isolated successes do not forgive failures"),
        ("up", "--++---", 2, 3, "UUUUUUD", "rise successes in a row reset the failure count"),
        ("up", "--++--", 2, 3, "UUUUUU", "... so two more failures are not enough"),
        ("up", "-+-+-+-+", 1, 2, "UUUUUUUU", "rise 1: plain consecutive counting (keepalived)"),
        ("up", "--", 1, 2, "UD", "rise 1: fall consecutive failures"),
        ("down", "-+-+-+-+", 2, 3, "DDDDDDDD", "a flapping server stays down"),
        ("up", "-+-+-+-+", 2, 3, "UUUUDDDD", "a flapping up server goes down and stays down"),
        ("up", "---" + "+" * 5, 2, 3, "UUDDUUUU", "recovers after rise"),
        ("down", "+" * 20 + "-", 2, 1, "D" + "U" * 19 + "D", "long runs do not accumulate credit"),
    ],
)
def test_dampening(start, results, rise, fall, verdicts, why):
    assert run_dampening(start, results, rise, fall) == verdicts, why


def test_success_counter_is_capped():
    d = Dampening(UP)
    for _ in range(1000):
        d = dampen(d, True, 3, 3)
    assert d == Dampening(UP, 3, 0)


# --------------------------------------------------------------------------
# The state table


@pytest.mark.parametrize(
    "health, admin, state, new_flows, established, capacity",
    [
        (UP, ADMIN_NONE, "up", True, KEEP, True),
        (DOWN, ADMIN_NONE, "down", False, PER_SERVICE, False),
        (UP, ADMIN_DRAIN, "draining", False, KEEP, False),
        (DOWN, ADMIN_DRAIN, "down", False, PER_SERVICE, False),
        (UP, ADMIN_DISABLE, "disabled", False, PER_SERVICE, False),
        (DOWN, ADMIN_DISABLE, "disabled", False, PER_SERVICE, False),
    ],
)
def test_state_table(health, admin, state, new_flows, established, capacity):
    rule = STATE_TABLE[(health, admin)]
    assert (rule.state, rule.new_flows, rule.established, rule.capacity) == (state, new_flows, established, capacity)


def test_state_table_is_complete_and_uses_the_contract_states():
    assert set(STATE_TABLE) == {(h, a) for h in (UP, DOWN) for a in (ADMIN_NONE, ADMIN_DRAIN, ADMIN_DISABLE)}
    assert {r.state for r in STATE_TABLE.values()} == set(SERVER_STATES)


# --------------------------------------------------------------------------
# The table: events in, transitions out


def events(table: HealthTable, steps):
    """Apply (time, key, event) steps; return [(time, str(transition))]."""
    out = []
    for now, key, ev in steps:
        if ev in ("+", "-"):
            ts = table.record(key, ev == "+", "ok" if ev == "+" else "refused", now)
        elif ev.startswith("admin="):
            ts = table.set_override(key, ev.split("=", 1)[1], table.server(key).weight_override, now)
        elif ev.startswith("weight="):
            w = ev.split("=", 1)[1]
            ts = table.set_override(key, table.server(key).admin, None if w == "none" else int(w), now)
        else:
            raise AssertionError(ev)
        out += [(now, str(t)) for t in ts]
    return out


def test_transitions_with_time_passed_in():
    table = HealthTable(site_from(WEB), now=100.0)
    assert table.server(A).state == "down" and table.server(A).last_check is None
    got = events(table, [
        (101.0, A, "+"),
        (102.0, A, "+"),  # A up: 3/4 capacity >= quorum 0.5: service up
        (103.0, B, "+"),
        (104.0, B, "+"),  # B up
        (105.0, A, "admin=drain"),  # A draining: 1/4 < quorum: service down
        (106.0, A, "-"),
        (107.0, A, "-"),
        (108.0, A, "-"),  # A down while drained
        (109.0, A, "admin=none"),  # still down: no transition
        (110.0, A, "+"),
        (111.0, A, "+"),  # A up again
        (112.0, B, "admin=disable"),
    ])
    assert got == [
        (102.0, "web/10.0.0.1:0: down -> up (passed: ok)"),
        (102.0, "service web: down -> up (healthy fraction 0.75, quorum 0.5; 10.0.0.1:0 passed: ok)"),
        (104.0, "web/10.0.0.2:0: down -> up (passed: ok)"),
        (105.0, "web/10.0.0.1:0: up -> draining (operator)"),
        (105.0, "service web: up -> down (healthy fraction 0.25, quorum 0.5; 10.0.0.1:0 operator)"),
        (108.0, "web/10.0.0.1:0: draining -> down (failed: refused)"),
        (111.0, "web/10.0.0.1:0: down -> up (passed: ok)"),
        (111.0, "service web: down -> up (healthy fraction 1.00, quorum 0.5; 10.0.0.1:0 passed: ok)"),
        (112.0, "web/10.0.0.2:0: up -> disabled (operator)"),
    ]
    a = table.server(A)
    assert (a.since, a.last_check, a.last_result, a.last_ok) == (111.0, 111.0, "ok", True)


@pytest.mark.parametrize(
    "states, weights, fraction, up, sorry",
    [
        # states of (A weight 3, B weight 1); weights are operator overrides
        (("up", "up"), (None, None), 1.0, True, False),
        (("up", "down"), (None, None), 0.75, True, False),
        (("down", "up"), (None, None), 0.25, False, False),  # below quorum 0.5, still serving
        (("down", "down"), (None, None), 0.0, False, True),  # nobody takes flows: sorry server
        (("draining", "down"), (None, None), 0.0, False, True),
        (("up", "up"), (0, None), 0.25, False, False),  # weight 0 = quiesced
        (("up", "up"), (0, 0), 0.0, False, True),
        (("up", "down"), (10, None), 1.0, True, False),  # raised weight: clamped to 1
    ],
)
def test_service_decisions(states, weights, fraction, up, sorry):
    table = HealthTable(site_from(WEB), 0.0)
    for key, state, weight in zip((A, B), states, weights):
        if state in ("up", "draining"):
            table.record(key, True, "ok", 1.0)
            table.record(key, True, "ok", 2.0)
        table.set_override(key, ADMIN_DRAIN if state == "draining" else ADMIN_NONE, weight, 3.0)
    sh = table.service("web")
    assert [s.state for s in sh.servers] == list(states)
    assert (sh.healthy_fraction, sh.up, sh.sorry_active) == (pytest.approx(fraction), up, sorry)


def test_initial_up_and_weights():
    site = site_from(WEB.replace("initial: down", "initial: up"))
    table = HealthTable(site, 0.0)
    assert [table.server(k).state for k in (A, B)] == ["up", "up"]
    assert table.service("web").up
    assert table.server(A).weight == 3
    table.set_override(A, ADMIN_DRAIN, None, 1.0)
    assert table.server(A).weight == 0 and table.server(A).base_weight == 3


def test_reconfigure_keeps_kept_servers_state():
    table = HealthTable(site_from(WEB), 0.0)
    for now in (1.0, 2.0):
        table.record(A, True, "ok", now)
        table.record(B, True, "ok", now)
    table.set_override(B, ADMIN_DRAIN, None, 3.0)
    new_site = site_from(WEB.replace("- {address: 10.0.0.1, weight: 3}", "- {address: 10.0.0.1, weight: 5}")
                         .replace("- {address: 10.0.0.2, weight: 1}", "- {address: 10.0.0.3, weight: 1}"))
    changes = [str(t) for t in table.reconfigure(new_site, 10.0)]
    C = ServerKey("web", "10.0.0.3", 0)
    assert changes == [
        "web/10.0.0.3:0: new -> down (added by configuration)",
        "web/10.0.0.2:0: draining -> removed (removed by configuration)",
    ]
    assert table.keys() == [A, C]
    a = table.server(A)
    assert (a.state, a.weight, a.configured_weight, a.last_check) == ("up", 5, 5, 2.0)
    assert table.server(C).state == "down"
    # A probe result for the removed server, still in flight at reload, is ignored.
    assert table.record(B, False, "late", 11.0) == []


def test_weight_zero_config_and_multiple_services():
    site = site_from(WEB + """
- name: dns
  vips: ["192.0.2.10:53/udp"]
  real_servers: [{address: 10.0.0.5, port: 53, weight: 0}]
  health_check: {type: udp, send: ping, rise: 1, fall: 1}
""")
    table = HealthTable(site, 0.0)
    d = ServerKey("dns", "10.0.0.5", 53)
    table.record(d, True, "reply", 1.0)
    dns = table.service("dns")
    # Configured weight 0 = quiesced: up, but no capacity and no new flows.
    assert (table.server(d).state, dns.healthy_fraction, dns.up) == ("up", 0.0, False)
    table.set_override(d, ADMIN_NONE, 5, 2.0)
    assert table.service("dns").healthy_fraction == 1.0 and table.service("dns").up


def test_unknown_admin_mode_is_a_bug():
    table = HealthTable(site_from(WEB), 0.0)
    with pytest.raises(ValueError):
        table.set_override(A, "maintenance", None, 1.0)


# --------------------------------------------------------------------------
# The snapshot


def test_snapshot_follows_the_table_and_round_trips():
    table = HealthTable(site_from(WEB), 0.0)
    table.record(A, True, "ok", 1.0)
    table.record(A, True, "ok", 2.0)
    counters = {A: ServerCounters(active_conns=4, inactive_conns=1, new_conns_per_s=2.5, packets_per_s=10, bytes_per_s=999)}
    snap = build_snapshot(table, "d1", 5.0, counters)
    assert isinstance(snap, SiteSnapshot)
    assert (snap.site, snap.director_id, snap.heartbeat, snap.withdrawn) == ("dc1", "d1", 5.0, False)
    (web,) = snap.services
    assert web.vips == ("192.0.2.10:80/tcp", "[2001:db8::10]:80/tcp")
    assert (web.healthy_fraction, web.up, web.active_conns, web.new_conns_per_s) == (0.75, True, 4, 2.5)
    rs = {r.address: r for r in web.real_servers}
    assert (rs["10.0.0.1"].state, rs["10.0.0.1"].weight, rs["10.0.0.1"].active_conns) == ("up", 3, 4)
    assert (rs["10.0.0.1"].new_conns_per_s, rs["10.0.0.1"].packets_per_s, rs["10.0.0.1"].bytes_per_s) == (2.5, 10, 999)
    assert (rs["10.0.0.2"].new_conns_per_s, rs["10.0.0.2"].packets_per_s, rs["10.0.0.2"].bytes_per_s) == (0, 0, 0)
    assert (rs["10.0.0.2"].state, rs["10.0.0.2"].weight, rs["10.0.0.2"].last_check) == ("down", 0, None)
    assert decode_snapshot(encode_snapshot(snap)) == snap


def test_withdrawn_snapshot_reads_as_down_everywhere():
    table = HealthTable(site_from(WEB.replace("initial: down", "initial: up")), 0.0)
    snap = build_snapshot(table, "d1", 5.0, withdrawn=True)
    assert snap.withdrawn
    assert [(s.up, s.healthy_fraction) for s in snap.services] == [(False, 0.0)]
    # Server states stay truthful: operators see what the director last knew.
    assert {r.state for r in snap.services[0].real_servers} == {"up"}


# --------------------------------------------------------------------------
# Batches (the checker hands the table a loop turn's results at once)

_RESULT = st.tuples(st.sampled_from([A, B, ServerKey("web", "10.9.9.9", 0)]), st.booleans(),
                    st.sampled_from(["ok", "refused", "timeout"]), st.sampled_from([None, 0.001]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_RESULT, max_size=6), max_size=12))
def test_a_batch_makes_the_transitions_its_results_make_one_by_one(batches):
    one_by_one = HealthTable(site_from(WEB), 0.0)
    batched = HealthTable(site_from(WEB), 0.0)
    for i, batch in enumerate(batches):
        now = float(i + 1)
        was_up = batched.service("web").up
        singles = [t for key, ok, detail, latency in batch for t in one_by_one.record(key, ok, detail, now, latency)]
        together = batched.record_many(batch, now)
        # Every server's transitions, in the same order; the records end the same.
        assert [t for t in together if t.server] == [t for t in singles if t.server]
        assert [batched.server(k) for k in (A, B)] == [one_by_one.server(k) for k in (A, B)]
        # The service: its state after the batch, reported once if it changed.
        assert batched.service("web") == one_by_one.service("web")
        service_changes = [(t.old, t.new) for t in together if t.server is None]
        now_up = batched.service("web").up
        assert service_changes == ([] if now_up == was_up else [("up" if was_up else "down", "up" if now_up else "down")])
