"""Cross-site spill: when a service's own real servers cannot take new connections, whose can.

Pure: no I/O, no clock; every call takes the state and ``now``. The director
(director/control/main.py) asks :class:`SpillBook` after each health
transition, each change its follower reads from Redis and on a short tick
(time alone ends a hysteresis hold or makes a target stale); a changed
decision is a new plan for the packet path (``forwarder.build_plan``'s
``spill``), which schedules the service's **new** connections onto the
chosen site's healthy real servers and tunnels them there (IP-in-IP).

Rules (docs/director.md, "Cross-site spill"):

* The trigger (``spill.when``, :data:`TRIGGERS`) is read off the local
  health: ``all_down`` = no local server takes new connections (a sorry
  server does not count as taking them); ``below_quorum`` = the service is
  not up (below ``quorum``, or nothing serving).
* Hysteresis: spill starts once the trigger has held ``spill.after``
  seconds, and stops once it has been clear ``spill.recover_after``
  seconds; a flapping local pool does not flap new connections.
* The target: the first site of ``spill.to`` whose snapshot is fresh, not
  withdrawn, not drained, runs the service, is not spilling that service
  itself (never chain) and has a real server ``up`` with weight > 0. Its
  servers are scheduled by their published weights. None qualifies: no
  spill, and the packet path drops new connections as it does without
  spill.
* The target is chosen while the trigger does not hold too, as a standby
  (``Spill.active`` False): the packet path resolves the next hop towards
  its servers ahead, so the first spilled connection does not wait for a
  neighbour lookup.
* The packet workers need not wait for the plan: :meth:`SpillBook.armed_at`
  is when a service spills if nothing changes, which the director writes
  to the workers' spill flags (director/dataplane/spillflags.py) at once;
  with it a worker sends new connections to the standby target from that
  moment, before the plan making the target active arrives.
* Established connections are not this module's business: the forwarder
  keeps a spilled flow on its remote server until it ends, and local flows
  follow ``on_server_down``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from glb.state import DeploymentState

TRIGGERS: Mapping[str, Callable[[Any], bool]] = {
    # ServiceHealth (director/control/health.py) -> does the trigger hold?
    "all_down": lambda health: not any(s.weight > 0 for s in health.servers),
    "below_quorum": lambda health: not health.up,
}
"""``spill.when`` by name; the config's list of accepted names comes from here."""


SEP = "@"
"""Between service and site in the counters' name for a spilled-to server: ``web@dc2``
(never a service name: those have no '@'), so its figures never mix with a local server's."""


def spilling(spill: Spill | None) -> Spill | None:
    """``spill`` if new connections spill by it now, None for none or a standby target."""
    return spill if spill is not None and spill.active else None


def spill_service(service: str, site: str) -> str:
    """The service part of a spilled-to server's key (``ServerKey``), e.g. ``web@dc2``."""
    return f"{service}{SEP}{site}"


def spilled(service_label: str) -> tuple[str, str] | None:
    """``(service, site)`` if ``service_label`` names spilled-to servers, else None."""
    service, sep, site = service_label.partition(SEP)
    return (service, site) if sep else None


@dataclass(frozen=True, slots=True)
class RemoteServer:
    """A real server of another site, as its snapshot publishes it."""

    address: str
    port: int
    weight: int


@dataclass(frozen=True, slots=True)
class Spill:
    """One service's spill decision: where its new connections go now."""

    service: str
    site: str
    """The target site."""
    servers: tuple[RemoteServer, ...]
    """Its healthy real servers (state up, weight > 0), in its snapshot's order."""
    active: bool = True
    """False: the trigger does not hold; the target is only kept ready (next hops resolved)."""


@dataclass(slots=True)
class _Hold:
    """Hysteresis memory of one service: since when the trigger has held or been clear."""

    active: bool = False
    since: float | None = None
    """When the trigger last changed to the value that may flip ``active``; None = no change pending."""


def target(state: DeploymentState, service: str, sites: Iterable[str], now: float,
           stale_after: float) -> Spill | None:
    """The first of ``sites`` that can take ``service``'s spilled connections now, or None."""
    for name in sites:
        if not state.site_is_up(name, now, stale_after):
            continue  # absent, stale, withdrawn or drained
        svc = state.sites[name].service(service)
        if svc is None or svc.spilling_to is not None:
            continue  # never chain: a site that spills has nothing to lend
        servers = tuple(RemoteServer(rs.address, rs.port, rs.weight)
                        for rs in svc.real_servers if rs.state == "up" and rs.weight > 0)
        if servers:
            return Spill(service, name, servers)
    return None


class SpillBook:
    """Every spilling-capable service's hysteresis, and the decisions made from it.

    ``decide`` is called with the whole picture each time; it returns the
    decision for every service that has ``spill`` configured: None (no
    target qualifies), a standby target (``active`` False: new connections
    stay home) or the target new connections go to.
    """

    def __init__(self) -> None:
        self._holds: dict[str, _Hold] = {}

    def triggered(self, service: str) -> bool:
        """The trigger, after hysteresis: the service would spill if a target qualified."""
        hold = self._holds.get(service)
        return hold is not None and hold.active

    def decide(self, services: Iterable[Any], health: Mapping[str, Any], state: DeploymentState, now: float,
               stale_after: float) -> dict[str, Spill | None]:
        """``services``: glb.config.Service objects (those without ``spill`` are skipped);
        ``health``: service name -> ServiceHealth; ``now``: wall-clock seconds (the
        state's staleness rule takes the caller's ``time.time()``). A decision with
        ``active`` False is the standby target (see the module docstring)."""
        out: dict[str, Spill | None] = {}
        names = set()
        for svc in services:
            cfg = svc.spill
            if cfg is None:
                continue
            names.add(svc.name)
            sh = health.get(svc.name)
            holds = sh is not None and TRIGGERS[cfg.when](sh)
            hold = self._holds.setdefault(svc.name, _Hold())
            if holds == hold.active:
                hold.since = None
            else:
                if hold.since is None:
                    hold.since = now
                if now - hold.since >= (cfg.after if holds else cfg.recover_after):
                    hold.active, hold.since = holds, None
            chosen = target(state, svc.name, cfg.to, now, stale_after)
            out[svc.name] = chosen if chosen is None or hold.active else replace(chosen, active=False)
        for name in set(self._holds) - names:  # spill removed by a reload
            del self._holds[name]
        return out

    def armed_at(self, service: Any) -> float | None:
        """When ``service`` (a glb.config.Service) spills if nothing changes, as of the last
        ``decide`` (same clock): a past time while spill is on (also while a ``recover_after``
        hold runs: it goes on until the hold ends), the end of the ``after`` hold while one
        runs, None while the trigger is clear. What the packet workers' spill flag says."""
        hold = self._holds.get(service.name) if service.spill is not None else None
        if hold is None:
            return None
        if hold.active:
            return -math.inf
        return None if hold.since is None else hold.since + service.spill.after

    def next_change(self, services: Iterable[Any]) -> float | None:
        """When a pending hysteresis hold ends (wall-clock seconds), or None: the caller's timer."""
        due = []
        for svc in services:
            hold = self._holds.get(svc.name) if svc.spill is not None else None
            if hold is not None and hold.since is not None:
                due.append(hold.since + (svc.spill.recover_after if hold.active else svc.spill.after))
        return min(due) if due else None


def spill_document(service: Any, spill: Spill | None, triggered: bool, counters: Mapping[Any, Any]) -> dict[str, Any]:
    """A service's spill for /status: its configuration, whether and where it spills, and the
    connections other sites' servers hold for it (``counters``: ServerKey -> ServerCounters, the
    packet path's; spilled flows outlive the spill, so every spilled-to server is listed, with
    weight 0 unless the current target publishes it)."""
    cfg = service.spill
    spill = spilling(spill)
    targets = {(spill.site, r.address, r.port): r.weight for r in spill.servers} if spill is not None else {}
    rows: dict[tuple[str, str, int], Any] = {k: None for k in targets}
    for key, c in counters.items():
        owner = spilled(key.service)
        if owner is not None and owner[0] == service.name:
            rows[(owner[1], key.address, key.port)] = c
    servers = []
    for (site, address, port), c in sorted(rows.items()):
        servers.append({
            "site": site, "address": address, "port": port, "weight": targets.get((site, address, port), 0),
            **{name: getattr(c, name, 0) for name in _COUNTERS},
        })
    return {
        "to": list(cfg.to),
        "when": cfg.when,
        "after": cfg.after,
        "recover_after": cfg.recover_after,
        "triggered": triggered,
        "spilling_to": spill.site if spill is not None else None,
        "conns": sum(s["active_conns"] + s["inactive_conns"] for s in servers),
        "servers": servers,
    }


_COUNTERS = ("active_conns", "inactive_conns", "packets", "bytes", "new_conns_per_s", "packets_per_s", "bytes_per_s")
