"""Build the site's published snapshot from config, health and traffic counters.

Pure: no I/O, no clock (``now`` is passed in). The publisher calls
``build_snapshot`` for every publication and hands the result to the store;
/status renders the same snapshot, so operators and the DNS tier always see
the same numbers.

Traffic counters (connections, rates) come from the packet path as a mapping
``ServerKey -> ServerCounters`` and per VIP as ``VipCounters``; a server the
packet path has not reported reads zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from glb.config import Site
from glb.state import PairMemberState, RealServerState, ServiceState, SiteSnapshot
from director.control.health import HealthTable, ServerKey, ServerStatus, ServiceHealth
from director.control.spill import Spill, spilled, spilling


@dataclass(frozen=True, slots=True)
class ServerCounters:
    """What the packet path reports for one real server."""

    active_conns: int = 0
    inactive_conns: int = 0
    new_conns_per_s: float = 0.0
    packets_per_s: float = 0.0
    bytes_per_s: float = 0.0
    packets: int = 0
    """Packets forwarded since start (for /metrics)."""
    bytes: int = 0
    out_packets: int = 0
    """NAT: the real server's packets sent back to clients since start (ipvsadm's OutPkts)."""
    out_bytes: int = 0


ZERO = ServerCounters()


@dataclass(frozen=True, slots=True)
class VipCounters:
    """What the packet path reports for one VIP (``addr:port/proto``)."""

    packets: int = 0
    bytes: int = 0
    connections: int = 0


def vip_names(site: Site, service: str) -> tuple[str, ...]:
    """The service's VIPs as ``addr:port/proto`` strings (glb.state's format)."""
    svc = site.service(service)
    return tuple(str(v) for v in svc.vips) if svc is not None else ()


class SnapshotCache:
    """The documents of the last snapshot, reused while their inputs are equal.

    A heartbeat every second used to rebuild and validate every real server's
    document (``RealServerState`` checks its address, state and numbers); at
    thousands of servers that was a large share of the director's CPU for a
    snapshot that had not changed. With a cache, a server's document is
    rebuilt only when what it shows changed (state, weight, result, traffic
    counters), and a service's only when one of its servers' or its own
    figures did. Publish ``result_since`` as ``last_check`` for the same
    reason (``glb.state.RealServerState.last_check``).
    """

    def __init__(self) -> None:
        self._servers: dict[ServerKey, tuple[tuple, RealServerState]] = {}
        self._services: dict[str, ServiceState] = {}

    def server(self, s: ServerStatus, c: ServerCounters) -> RealServerState:
        inputs = (s.state, s.weight, s.result_since, s.last_result, c)
        held = self._servers.get(s.key)
        if held is not None and held[0] == inputs:
            return held[1]
        rs = _server_state(s, c)
        self._servers[s.key] = (inputs, rs)
        return rs

    def held_service(self, name: str) -> ServiceState | None:
        return self._services.get(name)

    def hold_service(self, state: ServiceState) -> ServiceState:
        self._services[state.name] = state
        return state

    def forget(self, servers: int, keys: Callable[[], Iterable[ServerKey]]) -> None:
        """Drop servers a reload removed (only looked for when there are more
        held than the table's ``servers``)."""
        if len(self._servers) > servers:
            keep = set(keys())
            for key in [k for k in self._servers if k not in keep]:
                del self._servers[key]


def _server_state(s: ServerStatus, c: ServerCounters) -> RealServerState:
    return RealServerState(
        address=s.key.address,
        port=s.key.port,
        state=s.state,
        weight=s.weight,
        active_conns=c.active_conns,
        inactive_conns=c.inactive_conns,
        last_check=s.result_since,
        last_result=s.last_result,
        new_conns_per_s=c.new_conns_per_s,
        packets_per_s=c.packets_per_s,
        bytes_per_s=c.bytes_per_s,
    )


def service_state(
    site: Site,
    health: ServiceHealth,
    counters: Mapping[ServerKey, ServerCounters],
    *,
    withdrawn: bool = False,
    cache: SnapshotCache | None = None,
    spill: Spill | None = None,
    spilled_conns: int = 0,
) -> ServiceState:
    per_server = [counters.get(s.key, ZERO) for s in health.servers]
    if cache is None:
        servers = tuple(_server_state(s, c) for s, c in zip(health.servers, per_server))
    else:
        servers = tuple(cache.server(s, c) for s, c in zip(health.servers, per_server))
        held = cache.held_service(health.name)
        if held is not None and held.vips == vip_names(site, health.name) and len(held.real_servers) == len(servers) and all(
            a is b for a, b in zip(held.real_servers, servers)
        ):
            # Same server documents: only the service's own figures can differ.
            figures = _figures(health, per_server, withdrawn, spill, spilled_conns)
            if figures == (held.healthy_fraction, held.up, held.active_conns, held.new_conns_per_s,
                           held.packets_per_s, held.bytes_per_s, held.spilling_to, held.spilled_conns):
                return held
    fraction, up, active, new_conns, packets, octets, spilling_to, spilled = _figures(
        health, per_server, withdrawn, spill, spilled_conns)
    state = ServiceState(
        name=health.name,
        vips=vip_names(site, health.name),
        healthy_fraction=fraction,
        up=up,
        real_servers=servers,
        active_conns=active,
        new_conns_per_s=new_conns,
        packets_per_s=packets,
        bytes_per_s=octets,
        spilling_to=spilling_to,
        spilled_conns=spilled,
    )
    return state if cache is None else cache.hold_service(state)


def _figures(health: ServiceHealth, per_server: list[ServerCounters], withdrawn: bool, spill: Spill | None,
             spilled_conns: int) -> tuple:
    return (
        # A withdrawn site is published as down in every field, so a reader
        # that ignores the withdrawn flag still moves clients away.
        0.0 if withdrawn else health.healthy_fraction,
        False if withdrawn else health.up,
        sum(c.active_conns for c in per_server),
        sum(c.new_conns_per_s for c in per_server),
        sum(c.packets_per_s for c in per_server),
        sum(c.bytes_per_s for c in per_server),
        spill.site if spilling(spill) is not None and not withdrawn else None,
        spilled_conns,
    )


def build_snapshot(
    table: HealthTable,
    director_id: str,
    now: float,
    counters: Mapping[ServerKey, ServerCounters] | None = None,
    *,
    withdrawn: bool = False,
    pair: tuple[PairMemberState, ...] = (),
    cache: SnapshotCache | None = None,
    spills: Mapping[str, Spill | None] | None = None,
) -> SiteSnapshot:
    """The snapshot of ``table.site`` as of ``now`` (wall-clock seconds); ``pair``: the director pair's members.

    ``version`` and ``published_at`` stay 0: the store stamps them. With a
    ``cache`` (the director keeps one), unchanged documents are reused.
    """
    site = table.site
    counters = counters or {}
    spills = spills or {}
    spilled_conns: dict[str, int] = {}
    if spills:  # flows on other sites' servers count under a spill key (director.control.spill)
        for k, c in counters.items():
            of = spilled(k.service)
            if of is not None:
                spilled_conns[of[0]] = spilled_conns.get(of[0], 0) + c.active_conns + c.inactive_conns
    services = tuple(service_state(site, sh, counters, withdrawn=withdrawn, cache=cache, spill=spills.get(sh.name),
                                   spilled_conns=spilled_conns.get(sh.name, 0)) for sh in table.services())
    if cache is not None:
        cache.forget(len(table), table.keys)
    return SiteSnapshot(
        site=site.name,
        director_id=director_id,
        heartbeat=now,
        services=services,
        withdrawn=withdrawn,
        pair=pair,
    )
