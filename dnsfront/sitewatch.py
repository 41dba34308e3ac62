"""Which sites changed in a way an answer can see, and when time alone will change one.

Pure (no I/O): takes ``DeploymentState`` values and ``now``, returns site names
and times. It is what keeps a state change's cost proportional to what
changed: the engine rebuilds only the names of the sites reported here.

A site's *condition* is everything ``policy.assess`` reads about it: whether
there is a snapshot, ``withdrawn``, each service's ``up`` and
``healthy_fraction``, the site override's ``drain`` and ``weight``, and two
facts of time: is it stale (age > ``stale_after``), is its heartbeat overdue
(age > ``OVERDUE_HEARTBEATS`` heartbeats). A heartbeat moves only
``published_at``, counters and rates, so it leaves the condition as it was
and costs one comparison per site.

Time changes a condition with no message at all: each site has a *deadline*,
the next local time its age crosses one of the two thresholds. ``changed``
re-examines a site when its snapshot or override object is not the one seen
last, when its deadline has passed, or, for every site, when the state's
clock offset or frozen time moved (a resync or a Redis outage).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from glb.state import DeploymentState

from dnsfront.policy import OVERDUE_HEARTBEATS

NO_STATE = ("no state",)
"""The condition of every site before the first load from Redis."""

_UNSEEN = object()


class SiteWatch:
    """Per-site conditions and deadlines, for the sites of one config."""

    def __init__(self, heartbeats: Mapping[str, float], stale_after: float):
        """``heartbeats``: each configured site's director heartbeat interval."""
        self.stale_after = stale_after
        self._thresholds = {s: (stale_after, OVERDUE_HEARTBEATS * hb) for s, hb in heartbeats.items()}
        self._targets = {s: f"site:{s}" for s in heartbeats}
        self.conditions: dict[str, tuple] = {}
        self.deadlines: dict[str, float] = {s: math.inf for s in heartbeats}
        """Local time at which each site's condition may next change by time alone."""
        self._seen: dict[str, tuple[object, object]] = {}
        self._state: object = _UNSEEN
        self.published: list[str] = []
        """Of the last call's changed sites, those that changed with a newly
        published snapshot (empty when every site was looked at afresh)."""

    def next_deadline(self) -> float:
        """The earliest site deadline (``math.inf`` when none is pending)."""
        return min(self.deadlines.values(), default=math.inf)

    def changed(self, state: DeploymentState | None, now: float) -> set[str]:
        """Sites whose condition differs from the last call's (every site on the first)."""
        prev, self._state = self._state, state
        if prev is _UNSEEN or state is None or prev is None:
            every = True
        else:
            assert isinstance(prev, DeploymentState)
            every = (state.clock_offset != prev.clock_offset or state.frozen_at != prev.frozen_at
                     or state.paused != prev.paused)
        out = set()
        self.published = published = []
        sites = state.sites if state is not None else {}
        overrides = state.overrides if state is not None else {}
        seen, deadlines = self._seen, self.deadlines
        for site, target in self._targets.items():
            snap, ov = sites.get(site), overrides.get(target)
            held = seen.get(site)
            if not every and held is not None and held[0] is snap and held[1] is ov and deadlines[site] > now:
                continue  # the common case: another site's heartbeat
            seen[site] = (snap, ov)
            cond, deadlines[site] = self._assess(state, site, now)
            if self.conditions.get(site) != cond:
                self.conditions[site] = cond
                out.add(site)
                if not every and snap is not None and (held is None or held[0] is not snap):
                    published.append(site)
        return out

    def _assess(self, state: DeploymentState | None, site: str, now: float) -> tuple[tuple, float]:
        """(condition, deadline) of one site at ``now``."""
        if state is None:
            return NO_STATE, math.inf
        snap = state.sites.get(site)
        ov = state.overrides.get(self._targets[site])
        override = None if ov is None else (ov.drain, ov.weight)
        if snap is None:
            return (None, override), math.inf
        age = state.site_age(site, now)
        assert age is not None
        crossed = tuple(age > t for t in self._thresholds[site])
        # Ages stop while frozen (see DeploymentState.frozen_at): no deadline then.
        # (A pause after an outage only shifts the age: the deadline follows from it.)
        ahead = [t - age for t in self._thresholds[site] if t >= age]
        running = state.frozen_at is None or now < state.frozen_at
        deadline = now + min(ahead) if ahead and running else math.inf
        services = tuple((s.name, s.up, s.healthy_fraction) for s in snap.services)
        return (snap.withdrawn, services, override, crossed), deadline
