"""Spill flags: the control plane's spill verdict, read by the packet workers without waiting for a plan.

Why: the control plane decides that a service spills (director/control/spill.py)
in the same call that records the health transition, but the workers learnt
it only from the next plan: built, pickled, sent down a pipe and applied
between two batches, a few milliseconds in which new connections still went
to the dead local servers (the failover benchmark lost 2 of 2,765 requests
there, docs/benchmarks.md). A plan already carries the standby target
(``SpillPlan.active`` False, its next hops resolved, its schedulers built);
what the workers lacked was only *when* to use it.

So each spill-capable service has one cell of shared memory, written by the
control plane at the moment of its decision and read by every worker for
each new connection:

    cells[flag] = the time (the workers' clock, ``time.monotonic``) from which
                  the service spills, or +inf (not armed)

The control plane writes ``SpillBook.armed_at``: the moment the trigger
started holding plus ``after`` while the hysteresis hold runs (so the worker
starts at the same instant the control plane does, without a message at
that instant), the past once spill is on, +inf while the trigger is clear.
The worker's rule, :func:`spills`, is one comparison; leaving spill is the
plan's (``recover_after`` is the control plane's: the flag is cleared when
the hold ends, and the plan that says so follows at once).

:class:`SpillFlags` numbers the services (a cell each, stable while the
service has spill configured) and puts the number in the plan
(``SpillPlan.flag``). Pure: no I/O; the cells are any buffer of doubles (the
engine hands a ``multiprocessing`` shared array, tests a list). A 64-bit
aligned store is atomic, so no lock.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

NOT_ARMED = math.inf
DEFAULT_FLAGS = 1024
"""Cells in the engine's array: services with spill configured (beyond that, plans alone decide)."""


def spills(spill: Any, armed_at: float, now: float) -> bool:
    """The worker's rule: does a new connection of a service go to its spill target now?

    ``spill``: the plan's SpillPlan (None: no target qualifies, nothing to spill to);
    ``armed_at``: the service's flag (:data:`NOT_ARMED` without one); ``now``: the
    workers' clock. The plan's ``active`` wins; a standby target is used from
    ``armed_at`` on, before the plan that makes it active arrives.
    """
    return spill is not None and (spill.active or now >= armed_at)


class SpillFlags:
    """The flags' cells and which service has which (the engine's side)."""

    def __init__(self, cells: Any) -> None:
        self.cells = cells
        self._by_service: dict[str, int] = {}
        self._wanted: dict[str, float] = {}
        """What :meth:`arm` last said per service, for a cell given out later."""
        for i in range(len(cells)):
            cells[i] = NOT_ARMED

    def place(self, plan: Any) -> tuple[Any, list[str]]:
        """``plan`` (a forwarder Plan) with each spilling-capable service's ``SpillPlan.flag`` set,
        and the services left without a cell (all taken). A service that left the plan, or has no
        spill target in it, gives its cell back (cleared: its next owner starts unarmed)."""
        wanted = [sp.name for sp in plan.services if sp.spill is not None]
        for name in set(self._by_service) - set(wanted):
            self.cells[self._by_service.pop(name)] = NOT_ARMED
        free = sorted(set(range(len(self.cells))) - set(self._by_service.values()), reverse=True)
        unplaced = []
        services = []
        for sp in plan.services:
            if sp.spill is not None:
                i = self._by_service.get(sp.name)
                if i is None and free:
                    i = self._by_service[sp.name] = free.pop()
                    self.cells[i] = self._wanted.get(sp.name, NOT_ARMED)
                if i is None:
                    unplaced.append(sp.name)
                else:
                    sp = dataclasses.replace(sp, spill=dataclasses.replace(sp.spill, flag=i))
            services.append(sp)
        return dataclasses.replace(plan, services=tuple(services)), unplaced

    def arm(self, service: str, at: float | None) -> None:
        """From ``at`` (the workers' clock) new connections of ``service`` spill; None: they do not.
        A service without a cell yet (no target in the last plan) gets it with its cell."""
        value = NOT_ARMED if at is None else at
        self._wanted[service] = value
        i = self._by_service.get(service)
        if i is not None:
            self.cells[i] = value

    def armed(self, service: str) -> float:
        i = self._by_service.get(service)
        return NOT_ARMED if i is None else self.cells[i]
