"""Real-server health: dampening, the state table, and per-service decisions.

This is the director's pure core for health. It takes probe results, operator
overrides and configuration changes, each with an explicit ``now``, and returns
what changed. It does no I/O and never reads a clock, so every rule below is
tested with tables and made-up times (``tests/director/control/test_health.py``).

Three layers, each one small:

1. **Dampening** (``dampen``) turns a stream of probe results into a health
   verdict, ``up`` or ``down``. Semantics follow gdnsd and keepalived:

   * a down server comes up after ``rise`` successes *in a row*;
   * an up server goes down after ``fall`` failures, counted *since the last
     run of ``rise`` successes in a row*. A run of ``rise`` successes forgives
     earlier failures (gdnsd's ``ok_thresh``); isolated successes do not. So a
     server that alternates pass/fail goes down after ``fall`` failures and
     stays down (it never gets ``rise`` in a row), instead of flapping the pool
     or lingering up while failing half its checks. With ``rise: 1`` this is
     plain keepalived counting (``fall`` consecutive failures).

2. **The state table** (``STATE_TABLE``) combines the health verdict with the
   operator's admin mode into the published state and what the packet path
   must do with it. It is the single place that defines the four states.

3. **Service decisions** (``evaluate_service``): healthy capacity fraction,
   quorum, and whether the sorry server takes new flows.

``HealthTable`` holds the current record of every configured real server and
applies the three layers; it reports every change of published state as a
``Transition`` so callers can log, count and publish at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from glb.config import HealthCheck, Service, Site

# Health verdicts (the output of dampening).
UP = "up"
DOWN = "down"

# Admin modes, set by operators through overrides.
ADMIN_NONE = "none"
ADMIN_DRAIN = "drain"
"""Take no new flows; established flows stay on the server (IPVS weight 0)."""
ADMIN_DISABLE = "disable"
"""Taken out by the operator: treated like a server removed from the config."""
ADMIN_MODES = (ADMIN_NONE, ADMIN_DRAIN, ADMIN_DISABLE)

# What happens to a server's established flows.
KEEP = "keep"
"""Established flows stay on the server until they end or time out."""
PER_SERVICE = "per-service"
"""The service's ``on_server_down`` decides (keep, or reschedule at once)."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the state table: a published state and its consequences."""

    state: str
    """Published state: up, down, draining or disabled (``glb.state.SERVER_STATES``)."""
    new_flows: bool
    """The scheduler may pick this server for new flows (weight > 0)."""
    established: str
    """``KEEP`` or ``PER_SERVICE``: what its established flows do."""
    capacity: bool
    """Counts toward the service's healthy capacity."""


STATE_TABLE: Mapping[tuple[str, str], Rule] = MappingProxyType(
    {
        # (health, admin)        state        new flows  established   capacity
        (UP, ADMIN_NONE): Rule("up", True, KEEP, True),
        (DOWN, ADMIN_NONE): Rule("down", False, PER_SERVICE, False),
        # Draining is an operator's promise that the server still works:
        # established flows are kept whatever the service's on_server_down says.
        (UP, ADMIN_DRAIN): Rule("draining", False, KEEP, False),
        # A drained server that then fails its checks is down: its flows are
        # no better off staying than any other dead server's.
        (DOWN, ADMIN_DRAIN): Rule("down", False, PER_SERVICE, False),
        # Disabled = removed by the operator, whatever its health.
        (UP, ADMIN_DISABLE): Rule("disabled", False, PER_SERVICE, False),
        (DOWN, ADMIN_DISABLE): Rule("disabled", False, PER_SERVICE, False),
    }
)


# --------------------------------------------------------------------------
# Dampening


@dataclass(frozen=True, slots=True)
class Dampening:
    """Health verdict plus the counters that decide the next one."""

    health: str
    successes: int = 0
    """Successes in a row (capped at ``rise``; more carry no information)."""
    failures: int = 0
    """Failures since the last run of ``rise`` successes in a row."""


def initial_dampening(check: HealthCheck) -> Dampening:
    """The verdict before any probe ran: the check's ``initial`` state."""
    return Dampening(UP if check.initial == "up" else DOWN)


def dampen(d: Dampening, ok: bool, rise: int, fall: int) -> Dampening:
    """The verdict after one more probe result (see the module docstring)."""
    if ok and d.health == UP and d.successes == rise and not d.failures:
        return d  # up and passing, as nearly every result says: nothing to count
    if ok:
        successes = min(d.successes + 1, rise)
        if successes < rise:
            return replace(d, successes=successes)
        # rise successes in a row: a down server comes up, an up one is
        # forgiven its earlier failures.
        return Dampening(UP, successes, 0)
    failures = min(d.failures + 1, fall)
    if d.health == UP and failures >= fall:
        return Dampening(DOWN, 0, 0)
    return Dampening(d.health, 0, failures)


# --------------------------------------------------------------------------
# Server records


@dataclass(frozen=True, slots=True, order=True)
class ServerKey:
    """A real server of one service. ``port`` 0 means "the VIP's port", as published."""

    service: str
    address: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.service}/{host}:{self.port}"

    @property
    def server(self) -> str:
        """``addr:port`` without the service, for labels and logs."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


def server_keys(service: Service) -> list[ServerKey]:
    """The keys of a service's configured real servers, in config order."""
    return [ServerKey(service.name, str(rs.address), rs.port or 0) for rs in service.real_servers]


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """Everything the director knows about one real server's fitness."""

    key: ServerKey
    configured_weight: int
    damp: Dampening
    admin: str = ADMIN_NONE
    weight_override: int | None = None
    last_check: float | None = None
    """``now`` of the last probe result, None before the first."""
    last_ok: bool | None = None
    last_result: str = "not checked yet"
    last_latency: float | None = None
    result_since: float | None = None
    """``now`` of the first check of the current run of equal results (same
    ok and detail): what the published snapshot carries as ``last_check``, so a
    check that changes nothing leaves the snapshot as it was."""
    since: float = 0.0
    """``now`` when the published state last changed (or the server was added)."""

    @property
    def rule(self) -> Rule:
        return STATE_TABLE[(self.damp.health, self.admin)]

    @property
    def state(self) -> str:
        return self.rule.state

    @property
    def health(self) -> str:
        return self.damp.health

    @property
    def base_weight(self) -> int:
        """The configured weight, or the operator's override of it."""
        return self.configured_weight if self.weight_override is None else self.weight_override

    @property
    def weight(self) -> int:
        """Effective scheduling weight: 0 for any state that takes no new flows."""
        return self.base_weight if self.rule.new_flows else 0


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of published state, of a server or of a whole service."""

    service: str
    server: ServerKey | None
    """None for a service-level change (up <-> down)."""
    old: str
    """Previous state; ``"new"`` for a server just added by configuration."""
    new: str
    """New state; ``"removed"`` for a server dropped by configuration."""
    reason: str
    at: float

    def __str__(self) -> str:
        what = str(self.server) if self.server else f"service {self.service}"
        return f"{what}: {self.old} -> {self.new} ({self.reason})"


# --------------------------------------------------------------------------
# Service decisions


@dataclass(frozen=True, slots=True)
class ServiceHealth:
    """What one service looks like now, for the scheduler, DNS and operators."""

    name: str
    healthy_fraction: float
    """Weight of servers in state up / configured weight, 0..1."""
    up: bool
    """Able to take new flows and at or above quorum: DNS may send clients here."""
    quorum: float
    sorry_active: bool
    """No real server takes new flows and a sorry server is configured: it does."""
    servers: tuple[ServerStatus, ...]


def healthy_fraction(servers: Iterable[ServerStatus]) -> float:
    """Sum of weights of servers that count as capacity / sum of configured weights.

    An operator's weight override counts (raising a weight can at most restore
    full capacity: the result is clamped to 1). With every configured weight 0
    the service was configured quiesced; then any positive override means 1.
    """
    servers = list(servers)
    total = sum(s.configured_weight for s in servers)
    healthy = sum(s.base_weight for s in servers if s.rule.capacity)
    if total == 0:
        return 1.0 if healthy > 0 else 0.0
    return min(1.0, healthy / total)


def evaluate_service(service: Service, servers: Iterable[ServerStatus]) -> ServiceHealth:
    """Quorum and sorry-server decisions for one service (keepalived semantics).

    The service is up when some server takes new flows and the healthy
    fraction is at least the quorum. Below quorum the packet path keeps
    forwarding to the servers that are left; only DNS moves clients away.
    """
    servers = tuple(servers)
    fraction = healthy_fraction(servers)
    serving = any(s.weight > 0 for s in servers)
    return ServiceHealth(
        name=service.name,
        healthy_fraction=fraction,
        up=serving and fraction >= service.quorum,
        quorum=service.quorum,
        sorry_active=not serving and service.sorry_server is not None,
        servers=servers,
    )


# --------------------------------------------------------------------------
# The table


def _with_result(old: ServerStatus, check: HealthCheck, ok: bool, detail: str, now: float,
                 latency: float | None) -> ServerStatus:
    """``old`` after one more probe result. Built field by field, not with
    ``dataclasses.replace`` (generic, several times the cost): this runs for
    every check, thousands a second."""
    same = old.last_ok == ok and old.last_result == detail
    return ServerStatus(old.key, old.configured_weight, dampen(old.damp, ok, check.rise, check.fall), old.admin,
                        old.weight_override, now, ok, detail, latency, old.result_since if same else now, old.since)



class HealthTable:
    """The current ``ServerStatus`` of every real server of one site.

    Every mutator takes ``now`` and returns the list of ``Transition`` it
    caused (server and service changes), empty when the published state did
    not change. Records are immutable; the table swaps them whole.
    """

    def __init__(self, site: Site, now: float):
        self._site = site
        self._servers: dict[ServerKey, ServerStatus] = {}
        self._service_up: dict[str, bool] = {}
        self.reconfigure(site, now)

    # -- queries

    @property
    def site(self) -> Site:
        return self._site

    def __contains__(self, key: object) -> bool:
        return key in self._servers

    def __len__(self) -> int:
        return len(self._servers)

    def server(self, key: ServerKey) -> ServerStatus:
        """The record for ``key``; KeyError if it is not configured."""
        return self._servers[key]

    def keys(self) -> list[ServerKey]:
        return list(self._servers)

    def service(self, name: str) -> ServiceHealth:
        svc = self._site.service(name)
        if svc is None:
            raise KeyError(name)
        return evaluate_service(svc, (self._servers[k] for k in self._keys[name]))

    def services(self) -> list[ServiceHealth]:
        """Every service, in config order."""
        return [self.service(s.name) for s in self._site.services]

    def check_for(self, key: ServerKey) -> HealthCheck:
        svc = self._site.service(key.service)
        if svc is None:
            raise KeyError(key)
        return svc.health_check

    # -- mutators

    def record(
        self, key: ServerKey, ok: bool, detail: str, now: float, latency: float | None = None
    ) -> list[Transition]:
        """Feed one probe result. Results for unknown keys (a server removed by
        a reload while its probe was in flight) are ignored."""
        old = self._servers.get(key)
        if old is None:
            return []
        new = _with_result(old, self._checks[key.service], ok, detail, now, latency)
        reason = f"{'passed' if ok else 'failed'}: {detail}"
        return self._swap(old, new, reason, now)

    def record_many(
        self, results: Iterable[tuple[ServerKey, bool, str, float | None]], now: float
    ) -> list[Transition]:
        """Feed a batch of probe results ``(key, ok, detail, latency)``, all at
        ``now``: the servers' transitions in order, then the services' changes,
        evaluated once for the whole batch (a service that went down and up
        again inside one batch reports nothing)."""
        transitions: list[Transition] = []
        services_moved = False
        servers = self._servers
        checks = self._checks
        for key, ok, detail, latency in results:
            old = servers.get(key)
            if old is None:
                continue
            new = _with_result(old, checks[key.service], ok, detail, now, latency)
            if new.damp is old.damp:
                servers[key] = new  # the common case: no state can have changed
                continue
            changes = self._swap(old, new, f"{'passed' if ok else 'failed'}: {detail}", now, services=False)
            if changes:
                transitions.extend(changes)
                services_moved = services_moved or self._moves_service(old, self._servers[key])
        if services_moved:
            transitions.extend(self._service_changes(now, "health checks"))
        return transitions

    def set_override(
        self, key: ServerKey, admin: str, weight: int | None, now: float, reason: str = "operator"
    ) -> list[Transition]:
        """Apply an operator's admin mode and weight override (None = configured)."""
        if admin not in ADMIN_MODES:
            raise ValueError(f"unknown admin mode {admin!r}")
        old = self._servers.get(key)
        if old is None:
            return []
        return self._swap(old, replace(old, admin=admin, weight_override=weight), reason, now)

    def reconfigure(self, site: Site, now: float) -> list[Transition]:
        """Adopt a new config for the same site (SIGHUP).

        Servers that are kept (same service, address and port) keep their
        health, counters, overrides and last result, so a reload never flaps
        them; only their configured weight follows the file. New servers start
        in their check's initial state; removed ones are reported as removed.
        """
        self._site = site
        # Per result, a dict lookup instead of a walk over the services.
        self._checks = {svc.name: svc.health_check for svc in site.services}
        self._keys = {svc.name: server_keys(svc) for svc in site.services}
        transitions: list[Transition] = []
        servers: dict[ServerKey, ServerStatus] = {}
        for svc in site.services:
            for rs, key in zip(svc.real_servers, self._keys[svc.name]):
                old = self._servers.get(key)
                if old is None:
                    new = ServerStatus(key, rs.weight, initial_dampening(svc.health_check), since=now)
                    transitions.append(Transition(svc.name, key, "new", new.state, "added by configuration", now))
                else:
                    new = replace(old, configured_weight=rs.weight)
                servers[key] = new
        for key, old in self._servers.items():
            if key not in servers:
                transitions.append(Transition(key.service, key, old.state, "removed", "removed by configuration", now))
        self._servers = servers
        transitions.extend(self._service_changes(now, "configuration"))
        return transitions

    # -- internals

    def _swap(self, old: ServerStatus, new: ServerStatus, reason: str, now: float,
              services: bool = True) -> list[Transition]:
        """Store ``new``; its transition, and (``services``) the services' changes it caused."""
        if new.damp == old.damp and new.admin == old.admin and new.weight_override == old.weight_override:
            # A result that changes no state (nearly every one): no service
            # evaluation, no Transition, nothing for anyone to rebuild.
            self._servers[old.key] = new
            return []
        transitions = []
        if new.state != old.state:
            new = replace(new, since=now)
            transitions.append(Transition(old.key.service, old.key, old.state, new.state, reason, now))
        self._servers[old.key] = new
        if services and self._moves_service(old, new):
            transitions.extend(self._service_changes(now, f"{old.key.server} {reason}"))
        return transitions

    @staticmethod
    def _moves_service(old: ServerStatus, new: ServerStatus) -> bool:
        """Can this change of one server change its service's evaluation?"""
        return new.weight != old.weight or new.rule.capacity != old.rule.capacity

    def _service_changes(self, now: float, reason: str) -> list[Transition]:
        changes = []
        current = {s.name: s for s in self.services()}
        for name, sh in current.items():
            was = self._service_up.get(name)
            if was is not None and was != sh.up:
                old, new = ("up", "down") if was else ("down", "up")
                why = f"healthy fraction {sh.healthy_fraction:.2f}, quorum {sh.quorum:g}; {reason}"
                changes.append(Transition(name, None, old, new, why, now))
        self._service_up = {name: sh.up for name, sh in current.items()}
        return changes
