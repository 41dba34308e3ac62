"""The dashboard's pure core: what the page shows, the 15-minute samples and the event timeline.

Everything here takes the config, a ``DeploymentState`` and ``now`` and
returns plain data (what the page receives as JSON); no asyncio, aiohttp or
redis. The answer columns come from ``glb.overview.build_report``, which runs
dnsfront's own policy code, so the page, ``glb status`` and the DNS tier
cannot disagree about what is answered and why.

The timeline is a diff of *observations*: each site's verdict and active
director, each real server's state, each override. Observing on every state
change and on every sample tick (staleness is a matter of time, not of a
message) turns the differences into events.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from glb.admin import server_label
from glb.config import Config
from glb.overview import build_report
from glb.state import DeploymentState, Override, SiteSnapshot, parse_target

SAMPLE_INTERVAL = 1.0
"""Seconds between two samples of the charts."""
HISTORY = 15 * 60
"""Seconds of samples kept in memory (15 minutes at one a second)."""
MAX_EVENTS = 500
"""Timeline entries kept in memory (the newest)."""


# --------------------------------------------------------------------------
# The view: one JSON document with everything the page draws


def server_key(site: str, service: str, address: str, port: int) -> str:
    """How the page, the samples and the actions name one real server."""
    return f"{site}/{service}/{server_label(address, port)}"


def _override_json(ov: Override | None) -> dict[str, Any] | None:
    if ov is None:
        return None
    return {"drain": ov.drain, "weight": ov.weight, "who": ov.who, "why": ov.why, "when": ov.when}


def _directors(cfg_site: Any, snap: SiteSnapshot | None) -> dict[str, Any]:
    """Active director (who published) and the standby members: as the active one last heard them
    (the snapshot's ``pair``: role, and whether heard and able to take over), else as the config names them."""
    active = snap.director_id if snap else None
    if snap is not None and snap.pair:
        standby = [m.id + ("" if m.present and m.healthy else " (not heard)" if not m.present else " (not healthy)")
                   for m in snap.pair if m.id != active]
        return {"active": active, "standby": standby}
    pair = cfg_site.director.pair
    standby = [m.id for m in pair.members if m.id != active] if pair else []
    return {"active": active, "standby": standby}


ServerOverrides = Mapping[tuple[str, str, str, int], Override]


def _server_overrides(state: DeploymentState) -> ServerOverrides:
    """The server overrides by (site, service, address, port): parsed once per view, not once per
    server (``server_target`` validates its arguments: most of a large view's time otherwise)."""
    out = {}
    for target, ov in state.overrides.items():
        t = parse_target(target)
        if t.kind == "server":
            out[(t.site, t.service or "", t.address or "", t.port or 0)] = ov
    return out


def _servers(overrides: ServerOverrides, site: str, service: Any, snap: SiteSnapshot | None) -> list[dict]:
    published = snap.service(service.name) if snap else None
    rows = []
    seen = set()
    for rs in published.real_servers if published else ():
        seen.add(rs.address)
        rows.append({
            "key": server_key(site, service.name, rs.address, rs.port),
            "address": rs.address, "port": rs.port, "label": server_label(rs.address, rs.port),
            "state": rs.state, "weight": rs.weight,
            "active_conns": rs.active_conns, "inactive_conns": rs.inactive_conns,
            "new_conns_per_s": rs.new_conns_per_s, "packets_per_s": rs.packets_per_s,
            "last_check": rs.last_check, "last_result": rs.last_result,
            "override": _override_json(overrides.get((site, service.name, rs.address, rs.port))),
        })
    # Configured but not (yet) published: shown, so a missing server is visible.
    for rs in service.real_servers:
        if str(rs.address) not in seen:
            port = rs.port or 0
            rows.append({
                "key": server_key(site, service.name, str(rs.address), port),
                "address": str(rs.address), "port": port, "label": server_label(str(rs.address), port),
                "state": "unknown", "weight": rs.weight, "active_conns": 0, "inactive_conns": 0,
                "new_conns_per_s": 0.0, "packets_per_s": 0.0, "last_check": None, "last_result": "",
                "override": _override_json(overrides.get((site, service.name, str(rs.address), port))),
            })
    return rows


def build_view(cfg: Config, state: DeploymentState, now: float, *, redis: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the page shows now. ``redis`` is the follower's health
    (``connected``, ``last_error``, ``since``), shown as the page's stale banner."""
    report = build_report(cfg, state, now)
    by_site = {s["site"]: s for s in report["sites"]}
    overrides = _server_overrides(state)
    sites = []
    for cfg_site in cfg.sites:
        row = by_site[cfg_site.name]
        snap = state.sites.get(cfg_site.name)
        services = []
        for svc_row, svc in zip(row["services"], cfg_site.services):
            published = snap.service(svc.name) if snap else None
            services.append({
                **svc_row,
                "vips": list(published.vips) if published else [str(v) for v in svc.vips],
                "new_conns_per_s": published.new_conns_per_s if published else 0.0,
                "packets_per_s": published.packets_per_s if published else 0.0,
                "real_servers": _servers(overrides, cfg_site.name, svc, snap),
            })
        sites.append({
            **row,
            "directors": _directors(cfg_site, snap),
            "override": _override_json(state.site_override(cfg_site.name)),
            "capacity": _capacity(services),
            "load": {
                "active_conns": sum(s["active_conns"] for s in services),
                "new_conns_per_s": sum(s["new_conns_per_s"] for s in services),
                "packets_per_s": sum(s["packets_per_s"] for s in services),
            },
            "services": services,
        })
    return {"now": now, "version": state.version, "redis": dict(redis), "sites": sites, "names": report["names"]}


def _capacity(services: list[dict]) -> dict[str, Any]:
    """Servers up of configured, and the healthy fraction of configured weight (mean over services)."""
    fractions = [s["healthy_fraction"] for s in services]
    return {
        "servers_up": sum(s["servers_up"] for s in services),
        "servers": sum(s["servers"] for s in services),
        "healthy_fraction": round(sum(fractions) / len(fractions), 3) if fractions else 0.0,
    }


# --------------------------------------------------------------------------
# Samples: 15 minutes of numbers at 1 s, for the charts


def sample_values(view: Mapping[str, Any], dns_rates: Mapping[str, float]) -> dict[str, float]:
    """One sample: series name -> value. Series are grouped by their prefix
    (one chart each): ``dns:``, ``site_conns:``, ``site_pps:``,
    ``server_conns:``, ``server_pps:``, ``share:``."""
    values: dict[str, float] = {f"dns:{k}": v for k, v in dns_rates.items()}
    for site in view["sites"]:
        values[f"site_conns:{site['site']}"] = site["load"]["active_conns"]
        values[f"site_pps:{site['site']}"] = site["load"]["packets_per_s"]
        for svc in site["services"]:
            for rs in svc["real_servers"]:
                values[f"server_conns:{rs['key']}"] = rs["active_conns"]
                values[f"server_pps:{rs['key']}"] = rs["packets_per_s"]
    for name in view["names"]:
        for m in name["members"]:
            values[f"share:{name['name']} {name['type']} {m['site']}"] = m["share"]
    return values


class Samples:
    """The last ``HISTORY`` seconds of samples, oldest first."""

    def __init__(self, keep: int = int(HISTORY / SAMPLE_INTERVAL)):
        self._points: deque[tuple[float, dict[str, float]]] = deque(maxlen=keep)

    def add(self, t: float, values: dict[str, float]) -> dict[str, Any]:
        self._points.append((t, values))
        return {"t": t, "values": values}

    def __len__(self) -> int:
        return len(self._points)

    def columns(self) -> dict[str, Any]:
        """Columnar, as the charts take it: ``t`` and one list per series (None where absent)."""
        keys = sorted({k for _, v in self._points for k in v})
        return {"t": [t for t, _ in self._points],
                "series": {k: [v.get(k) for _, v in self._points] for k in keys}}


def dns_responses_total(metrics: str) -> float:
    """All responses a dnsfront has sent, from its /metrics text (ValueError if it has none)."""
    from prometheus_client.parser import text_string_to_metric_families

    families = [f for f in text_string_to_metric_families(metrics) if f.name.startswith("dnsfront_responses")]
    if not families:
        raise ValueError("no dnsfront_responses in /metrics: is a dnsfront listening there?")
    return float(sum(s.value for f in families for s in f.samples if s.name == "dnsfront_responses_total"))


class RateMeter:
    """Per-second rates from monotonic counters (dnsfront's responses total).

    A counter that went down (the process restarted) starts over: no rate for
    that step rather than a negative one."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, float]] = {}

    def rate(self, key: str, total: float, now: float) -> float | None:
        held = self._last.get(key)
        self._last[key] = (total, now)
        if held is None or total < held[0] or now <= held[1]:
            return None
        return (total - held[0]) / (now - held[1])


# --------------------------------------------------------------------------
# The timeline


@dataclass(frozen=True, slots=True)
class Observation:
    """What the timeline compares between two moments."""

    sites: Mapping[str, tuple[str, str | None]]
    """Site -> (verdict, active director id)."""
    servers: Mapping[str, tuple[str, str]]
    """Server key -> (state, last check result)."""
    overrides: Mapping[str, Override]


def observe(view: Mapping[str, Any], state: DeploymentState) -> Observation:
    sites = {s["site"]: (s["state"], s["directors"]["active"]) for s in view["sites"]}
    servers = {rs["key"]: (rs["state"], rs["last_result"])
               for s in view["sites"] for svc in s["services"] for rs in svc["real_servers"]
               if rs["state"] != "unknown"}
    return Observation(sites, servers, dict(state.overrides))


def event(t: float, kind: str, text: str, *, who: str = "", why: str = "", target: str = "") -> dict[str, Any]:
    return {"t": t, "kind": kind, "text": text, "who": who, "why": why, "target": target}


def target_label(target: str) -> str:
    """``server:dc1/web/10.0.0.1:80`` -> ``server dc1/web/10.0.0.1:80`` (as the page names it)."""
    t = parse_target(target)
    if t.kind == "site":
        return f"site {t.site}"
    return f"server {server_key(t.site, t.service or '', t.address or '', t.port or 0)}"


def _override_text(ov: Override) -> str:
    parts = []
    if ov.drain:
        parts.append("drained")
    if ov.weight is not None:
        parts.append(f"weight {ov.weight}")
    return " and ".join(parts)


def _site_events(old: Observation, new: Observation, now: float) -> Iterable[dict[str, Any]]:
    for site, (verdict, director) in new.sites.items():
        before = old.sites.get(site)
        if before is None:
            continue
        if verdict != before[0]:
            yield event(now, f"site_{verdict.replace(' ', '_')}", f"site {site}: {before[0]} -> {verdict}", target=site)
        if director and before[1] and director != before[1]:
            yield event(now, "takeover", f"site {site}: director {director} took over from {before[1]}", target=site)


SERVER_KINDS = {"up": "server_up", "down": "server_down"}
"""Event kind of a server's new state; any other state is ``server_state``."""


def _server_events(old: Observation, new: Observation, now: float) -> Iterable[dict[str, Any]]:
    for key, (st, result) in new.servers.items():
        before = old.servers.get(key)
        if before is None or before[0] == st:
            continue
        check = f" (last check: {result})" if result and st == "down" else ""
        yield event(now, SERVER_KINDS.get(st, "server_state"), f"{key}: {before[0]} -> {st}{check}", target=key)


def _override_events(old: Observation, new: Observation, now: float) -> Iterable[dict[str, Any]]:
    for target, ov in new.overrides.items():
        if old.overrides.get(target) != ov:
            yield event(ov.when or now, "override_set", f"{target_label(target)}: {_override_text(ov)}",
                        who=ov.who, why=ov.why, target=target)
    for target in old.overrides.keys() - new.overrides.keys():
        yield event(now, "override_cleared", f"{target_label(target)}: override cleared", target=target)


DIFFS: tuple[Callable[[Observation, Observation, float], Iterable[dict[str, Any]]], ...] = (
    _site_events, _server_events, _override_events,
)
"""Each turns two observations into events; one per kind of thing observed."""


def diff(old: Observation | None, new: Observation, now: float) -> list[dict[str, Any]]:
    """Events between two observations. The first observation has none, but
    for the overrides already held (with their own who/when/why): after a
    dashboard restart the timeline still says who drained what and why."""
    if old is None:
        old = Observation({}, {}, {})
        return sorted(_override_events(old, new, now), key=lambda e: e["t"])
    return [e for d in DIFFS for e in d(old, new, now)]


class Timeline:
    """The newest ``MAX_EVENTS`` events, and the observation they were diffed from."""

    def __init__(self, keep: int = MAX_EVENTS):
        self.events: deque[dict[str, Any]] = deque(maxlen=keep)
        self._seen: Observation | None = None

    def observe(self, view: Mapping[str, Any], state: DeploymentState, now: float) -> list[dict[str, Any]]:
        """Record what changed since the last observation; returns the new events."""
        new = observe(view, state)
        events = diff(self._seen, new, now)
        self._seen = new
        self.events.extend(events)
        return events

    def add(self, e: dict[str, Any]) -> dict[str, Any]:
        self.events.append(e)
        return e

