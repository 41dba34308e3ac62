"""The spill decision (director/control/spill.py): trigger, hysteresis, target choice; time passed in."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from director.control.health import HealthTable, ServerKey
from director.control.spill import RemoteServer, Spill, SpillBook, spilling, target
from glb import config
from glb.state import DeploymentState, RealServerState, ServiceState, SiteSnapshot

LAB = config.load(Path(__file__).resolve().parents[3] / "deploy" / "examples" / "lab.yaml")
STALE = 2.0
A, B = ServerKey("web", "10.1.0.11", 0), ServerKey("web", "10.1.0.12", 0)


def dc2(*servers: tuple[str, str, int], spilling_to: str | None = None, published_at: float = 100.0,
        withdrawn: bool = False, site: str = "dc2") -> SiteSnapshot:
    rs = tuple(RealServerState(a, 0, st, w) for a, st, w in servers)
    svc = ServiceState("web", ("192.0.2.140:80/tcp",), 1.0, True, rs, spilling_to=spilling_to)
    return SiteSnapshot(site, "d2", published_at, (svc,), withdrawn=withdrawn, version=5, published_at=published_at)


HEALTHY = (("10.2.0.11", "up", 100), ("10.2.0.12", "up", 50), ("10.2.0.13", "down", 100), ("10.2.0.14", "up", 0))
WANT = Spill("web", "dc2", (RemoteServer("10.2.0.11", 0, 100), RemoteServer("10.2.0.12", 0, 50)))


def table(up: int, now: float = 0.0, site: config.Site | None = None) -> HealthTable:
    """dc1's table with ``up`` of its two servers up (rise 2, fall 2 in the lab)."""
    t = HealthTable(site or LAB.site("dc1"), now)
    for key in (A, B)[:up]:
        t.record(key, True, "ok", now)
        t.record(key, True, "ok", now)
    return t


def decide(book: SpillBook, t: HealthTable, state: DeploymentState, now: float, site: config.Site | None = None,
           standby: bool = False):
    """The decisions; the active ones only (a standby target reads None) unless ``standby``."""
    site = site or t.site
    out = book.decide(site.services, {sh.name: sh for sh in t.services()}, state, now, STALE)
    return out if standby else {name: spilling(s) for name, s in out.items()}


def test_target_takes_the_healthy_servers_by_their_weights():
    state = DeploymentState.build([dc2(*HEALTHY)])
    assert target(state, "web", ["dc2"], 100.5, STALE) == WANT


@pytest.mark.parametrize("why, snap", [
    ("stale", dc2(*HEALTHY, published_at=97.0)),
    ("withdrawn", dc2(*HEALTHY, withdrawn=True)),
    ("itself spilling: never chain", dc2(*HEALTHY, spilling_to="dc3")),
    ("no healthy server", dc2(("10.2.0.11", "down", 100), ("10.2.0.12", "draining", 100))),
    ("another service only", replace(dc2(*HEALTHY), services=(replace(dc2(*HEALTHY).services[0], name="api"),))),
])
def test_no_target(why, snap):
    assert target(DeploymentState.build([snap]), "web", ["dc2"], 100.5, STALE) is None, why


def test_drained_or_absent_site_is_no_target_and_the_next_listed_is_taken():
    from glb.state import Override
    drained = DeploymentState.build([dc2(*HEALTHY)], [Override("site:dc2", drain=True)])
    assert target(drained, "web", ["dc2"], 100.5, STALE) is None
    both = DeploymentState.build([dc2(*HEALTHY, withdrawn=True), dc2(*HEALTHY, site="dc3")])
    assert target(both, "web", ["dc9", "dc2", "dc3"], 100.5, STALE) == replace(WANT, site="dc3")


def test_all_down_spills_at_once_and_stops_after_recover_after():
    book, state = SpillBook(), DeploymentState.build([dc2(*HEALTHY, published_at=103.0)])  # fresh throughout
    t = table(2)
    assert decide(book, t, state, 100.0) == {"web": None}
    for now in (100.1, 100.2):  # fall 2: both servers down at 100.2
        t.record(A, False, "refused", now)
        t.record(B, False, "refused", now)
    assert decide(book, t, state, 100.2) == {"web": WANT}
    assert book.triggered("web")
    for now in (101.0, 101.1):
        t.record(A, True, "ok", now)
    # Back up, but the trigger must be clear recover_after (2 s) before spill stops.
    assert decide(book, t, state, 101.1) == {"web": WANT}
    assert book.next_change(LAB.site("dc1").services) == pytest.approx(103.1)
    assert decide(book, t, state, 103.0) == {"web": WANT}
    assert decide(book, t, state, 103.1) == {"web": None}
    assert book.next_change(LAB.site("dc1").services) is None


def test_a_flap_shorter_than_recover_after_does_not_stop_spill():
    book, state = SpillBook(), DeploymentState.build([dc2(*HEALTHY, published_at=105.0)])
    t = table(0)
    assert decide(book, t, state, 100.0)["web"] == WANT
    t2 = table(1)
    assert decide(book, t2, state, 101.0)["web"] == WANT
    assert decide(book, t, state, 102.0)["web"] == WANT  # down again before 103.0: the hold restarts
    assert decide(book, t2, state, 103.5)["web"] == WANT
    assert decide(book, t2, state, 105.5)["web"] is None


def test_after_delays_the_start_and_a_stale_target_ends_spill_without_ending_the_trigger():
    site = LAB.site("dc1")
    svc = replace(site.services[0], spill=replace(site.services[0].spill, after=0.5))
    site = replace(site, services=(svc,))
    book, state = SpillBook(), DeploymentState.build([dc2(*HEALTHY)])
    t = table(0, site=site)
    assert decide(book, t, state, 100.0)["web"] is None
    assert book.next_change(site.services) == pytest.approx(100.5)
    assert decide(book, t, state, 100.5)["web"] == WANT
    assert decide(book, t, state, 102.1)["web"] is None  # dc2 silent for 2.1 s: stale
    assert book.triggered("web")


def test_below_quorum_spills_with_servers_left():
    site = LAB.site("dc1")
    svc = replace(site.services[0], quorum=0.75, spill=replace(site.services[0].spill, when="below_quorum"))
    site = replace(site, services=(svc,))
    book, state = SpillBook(), DeploymentState.build([dc2(*HEALTHY)])
    assert decide(book, table(2, site=site), state, 100.0)["web"] is None
    assert decide(book, table(1, site=site), state, 100.1)["web"] == WANT
    # all_down would not spill with one server left.
    assert decide(SpillBook(), table(1), state, 100.1)["web"] is None


def test_services_without_spill_get_no_decision_and_a_removed_spill_forgets_its_hold():
    book, state = SpillBook(), DeploymentState.build([dc2(*HEALTHY)])
    site = LAB.site("dc2")
    assert decide(book, table(0, site=site), state, 100.0, site) == {}
    decide(book, table(0), state, 100.0)
    assert book.triggered("web")
    decide(book, table(0, site=site), state, 100.0, site)
    assert not book.triggered("web")


def test_snapshot_and_status_count_the_connections_other_sites_hold():
    from director.control.site import ServerCounters, build_snapshot
    from director.control.spill import spill_document

    t = table(0)
    counters = {A: ServerCounters(1, 1), ServerKey("web@dc2", "10.2.0.11", 0): ServerCounters(3, 2, packets=7),
                ServerKey("web@dc3", "10.3.0.11", 0): ServerCounters(1, 0),
                ServerKey("api@dc2", "10.2.0.11", 0): ServerCounters(9, 9)}
    snap = build_snapshot(t, "d1", 100.0, counters, spills={"web": WANT})
    assert (snap.services[0].spilling_to, snap.services[0].spilled_conns) == ("dc2", 6)
    assert build_snapshot(t, "d1", 100.0, counters, withdrawn=True, spills={"web": WANT}).services[0].spilling_to is None
    doc = spill_document(LAB.site("dc1").service("web"), WANT, True, counters)
    assert (doc["spilling_to"], doc["triggered"], doc["conns"], doc["to"], doc["when"]) == ("dc2", True, 6, ["dc2"],
                                                                                            "all_down")
    rows = [(s["site"], s["address"], s["weight"], s["active_conns"], s["packets"]) for s in doc["servers"]]
    # The target's servers with their weights (10.2.0.12 not counted yet), and a former target's with weight 0.
    assert rows == [("dc2", "10.2.0.11", 100, 3, 7), ("dc2", "10.2.0.12", 50, 0, 0), ("dc3", "10.3.0.11", 0, 1, 0)]
    assert spill_document(LAB.site("dc1").service("web"), None, False, {})["servers"] == []


def test_the_target_is_kept_ready_while_the_trigger_does_not_hold():
    book, state = SpillBook(), DeploymentState.build([dc2(*HEALTHY)])
    assert decide(book, table(2), state, 100.0, standby=True) == {"web": replace(WANT, active=False)}
    assert decide(book, table(0), state, 100.1, standby=True) == {"web": WANT}
    stale = DeploymentState.build([dc2(*HEALTHY, published_at=90.0)])
    assert decide(SpillBook(), table(2), stale, 100.0, standby=True) == {"web": None}


def test_armed_at_is_when_spill_starts_for_the_workers_and_it_lasts_through_recover_after():
    site = LAB.site("dc1")
    svc = replace(site.services[0], spill=replace(site.services[0].spill, after=0.5))
    site = replace(site, services=(svc,))
    book, state = SpillBook(), DeploymentState.build([dc2(*HEALTHY, published_at=104.0)])
    up, down = table(2, site=site), table(0, site=site)
    decide(book, up, state, 100.0)
    assert book.armed_at(svc) is None
    assert decide(book, down, state, 100.2)["web"] is None
    assert book.armed_at(svc) == pytest.approx(100.7)  # the workers spill from the end of `after`
    decide(book, down, state, 100.3)
    assert book.armed_at(svc) == pytest.approx(100.7)
    decide(book, up, state, 100.4)  # back before `after` ran out: no spill, nor for the workers
    assert book.armed_at(svc) is None
    decide(book, down, state, 101.0)
    assert decide(book, down, state, 101.5)["web"] == WANT
    assert book.armed_at(svc) == -math.inf
    decide(book, up, state, 102.0)  # the recover_after hold (2 s) runs: still spilling
    assert book.armed_at(svc) == -math.inf
    assert decide(book, up, state, 104.0)["web"] is None
    assert book.armed_at(svc) is None
    assert SpillBook().armed_at(LAB.site("dc2").services[0]) is None  # no spill configured


def test_with_after_0_the_workers_spill_from_the_decision_on():
    book, state = SpillBook(), DeploymentState.build([dc2(*HEALTHY)])
    svc = LAB.site("dc1").services[0]
    decide(book, table(2), state, 100.0)
    decide(book, table(0), state, 100.1)
    assert book.armed_at(svc) == -math.inf
