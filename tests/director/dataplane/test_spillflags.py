"""The spill flags (director/dataplane/spillflags.py): the workers' rule and the cells' numbering; time made up."""

from __future__ import annotations

import math
from dataclasses import replace

from director.control.health import ServerKey
from director.dataplane.forwarder import Plan, ServerPlan, SpillPlan
from director.dataplane.spillflags import NOT_ARMED, SpillFlags, spills
from tests.director.dataplane.test_forwarder import P, plan, server, RS

STANDBY = SpillPlan("dc2", (ServerPlan(ServerKey("web@dc2", "10.3.0.21", 0), P("10.3.0.21"), 1, True),), active=False)


def test_a_standby_target_is_used_from_the_armed_time_on():
    assert not spills(STANDBY, NOT_ARMED, 1e9)
    assert not spills(STANDBY, 5.0, 4.999)
    assert spills(STANDBY, 5.0, 5.0) and spills(STANDBY, 5.0, 6.0)
    assert spills(STANDBY, -math.inf, 0.0)  # spill is on (the control plane's hold is over)


def test_the_plan_wins_when_it_is_active_and_nothing_spills_without_a_target():
    active = SpillPlan("dc2", STANDBY.servers)
    assert spills(active, NOT_ARMED, 0.0)
    assert not spills(None, 0.0, 1.0)


def with_spill(*names: str) -> Plan:
    """A plan whose services ``names`` each have a standby target."""
    p = plan(server(RS[0]), spill=STANDBY)
    return replace(p, services=tuple(replace(p.services[0], name=n) for n in names))


def flags_of(p) -> dict[str, int]:
    return {svc.name: svc.spill.flag for svc in p.services if svc.spill is not None}


def test_cells_are_numbered_stably_and_cleared_when_a_service_leaves():
    f = SpillFlags([0.0] * 2)
    assert f.cells == [NOT_ARMED, NOT_ARMED]
    placed, unplaced = f.place(with_spill("web", "api"))
    assert flags_of(placed) == {"web": 0, "api": 1} and unplaced == []
    f.arm("api", 3.0)
    assert f.cells == [NOT_ARMED, 3.0] and f.armed("api") == 3.0
    placed, unplaced = f.place(with_spill("api", "web", "mail"))  # no cell left for mail: its plan decides
    assert flags_of(placed) == {"web": 0, "api": 1, "mail": -1} and unplaced == ["mail"]
    placed, _ = f.place(with_spill("mail"))
    assert flags_of(placed) == {"mail": 0} and f.cells == [NOT_ARMED, NOT_ARMED]


def test_a_service_armed_before_it_has_a_cell_gets_it_armed():
    f = SpillFlags([0.0])
    f.arm("web", 7.0)  # no target in the last plan yet
    assert f.armed("web") == NOT_ARMED
    f.place(with_spill("web"))
    assert f.cells == [7.0]
    f.arm("web", None)
    assert f.cells == [NOT_ARMED]
