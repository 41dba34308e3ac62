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

from collections.abc import Mapping
from dataclasses import dataclass

from glb.config import Site
from glb.state import RealServerState, ServiceState, SiteSnapshot
from director.control.health import HealthTable, ServerKey, ServiceHealth
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


def service_state(
    site: Site,
    health: ServiceHealth,
    counters: Mapping[ServerKey, ServerCounters],
    *,
    withdrawn: bool = False,
    spill: Spill | None = None,
) -> ServiceState:
    servers = []
    for s in health.servers:
        c = counters.get(s.key, ZERO)
        servers.append(
            RealServerState(
                address=s.key.address,
                port=s.key.port,
                state=s.state,
                weight=s.weight,
                active_conns=c.active_conns,
                inactive_conns=c.inactive_conns,
                last_check=s.last_check,
                last_result=s.last_result,
                new_conns_per_s=c.new_conns_per_s,
                packets_per_s=c.packets_per_s,
                bytes_per_s=c.bytes_per_s,
            )
        )
    per_server = [counters.get(s.key, ZERO) for s in health.servers]
    return ServiceState(
        name=health.name,
        vips=vip_names(site, health.name),
        # A withdrawn site is published as down in every field, so a reader
        # that ignores the withdrawn flag still moves clients away.
        healthy_fraction=0.0 if withdrawn else health.healthy_fraction,
        up=False if withdrawn else health.up,
        real_servers=tuple(servers),
        active_conns=sum(c.active_conns for c in per_server),
        new_conns_per_s=sum(c.new_conns_per_s for c in per_server),
        packets_per_s=sum(c.packets_per_s for c in per_server),
        bytes_per_s=sum(c.bytes_per_s for c in per_server),
        spilling_to=spill.site if spilling(spill) is not None and not withdrawn else None,
        spilled_conns=sum(c.active_conns + c.inactive_conns for k, c in counters.items()
                          if (spilled(k.service) or ("",))[0] == health.name),
    )


def build_snapshot(
    table: HealthTable,
    director_id: str,
    now: float,
    counters: Mapping[ServerKey, ServerCounters] | None = None,
    *,
    withdrawn: bool = False,
    spills: Mapping[str, Spill | None] | None = None,
) -> SiteSnapshot:
    """The snapshot of ``table.site`` as of ``now`` (wall-clock seconds).

    ``version`` and ``published_at`` stay 0: the store stamps them.
    """
    site = table.site
    counters = counters or {}
    return SiteSnapshot(
        site=site.name,
        director_id=director_id,
        heartbeat=now,
        services=tuple(service_state(site, sh, counters, withdrawn=withdrawn, spill=(spills or {}).get(sh.name))
                       for sh in table.services()),
        withdrawn=withdrawn,
    )
