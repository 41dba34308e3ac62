"""`glb status`: the whole deployment as Redis has it, and what DNS would answer now.

The answer column comes from dnsfront's own policy code run on the same state,
so the CLI can never disagree with the DNS tier about why a site is (not)
answered.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from glb import config as configmod
from glb.state import DeploymentState


def print_status(config_path: str, as_json: bool = False) -> int:
    cfg = configmod.load(config_path)
    state = asyncio.run(_load(cfg))
    report = build_report(cfg, state, time.time())
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 0


async def _load(cfg: configmod.Config) -> DeploymentState:
    from glb.store import RedisStore

    store = RedisStore(cfg.redis)
    try:
        return await store.load()
    finally:
        await store.close()


def build_report(cfg: configmod.Config, state: DeploymentState, now: float) -> dict[str, Any]:
    """Pure: the status as plain data (also the --json output)."""
    from dnsfront.policy import plan

    sites_by_name = {s.name: s for s in cfg.sites}
    sites = []
    for site in cfg.sites:
        snap = state.sites.get(site.name)
        age = state.site_age(site.name, now) if snap else None
        if snap is None:
            verdict = "no snapshot"
        elif snap.withdrawn:
            verdict = "withdrawn"
        elif state.is_drained(site.name):
            verdict = "drained"
        elif state.site_is_up(site.name, now, cfg.redis.stale_after):
            verdict = "up"
        else:
            verdict = "stale"
        services = []
        for svc in site.services:
            published = snap.service(svc.name) if snap else None
            servers = published.real_servers if published else ()
            services.append(
                {
                    "name": svc.name,
                    "up": bool(published and published.up),
                    "healthy_fraction": published.healthy_fraction if published else 0.0,
                    "servers_up": sum(1 for r in servers if r.state == "up"),
                    "servers": len(svc.real_servers),
                    "active_conns": published.active_conns if published else 0,
                    "spilling_to": published.spilling_to if published else None,
                    "spilled_conns": published.spilled_conns if published else 0,
                }
            )
        sites.append(
            {
                "site": site.name,
                "state": verdict,
                "director": snap.director_id if snap else None,
                "age": round(age, 3) if age is not None else None,
                "version": snap.version if snap else None,
                "pair": [{"id": m.id, "role": m.role, "present": m.present, "healthy": m.healthy,
                          "heard_ago": round(now - m.last_heard, 3) if m.last_heard is not None else None}
                         for m in snap.pair] if snap else [],
                "services": services,
            }
        )
    names = []
    for lb in cfg.names:
        for family, rtype in ((4, "A"), (6, "AAAA")):
            p = plan(lb, sites_by_name, state, now, cfg.redis.stale_after, family)
            if not p.members:
                continue
            # Shares among the sites the plan can actually pick first (e.g. only
            # the active priority group of a failover name), by effective weight.
            candidates = {c.sites[0] for c in p.choices if c.sites}
            total = sum(m.weight for m in p.members if m.live and m.site in candidates)
            names.append(
                {
                    "name": lb.name,
                    "type": rtype,
                    "policy": lb.policy,
                    "kind": p.kind,
                    "degraded": p.degraded,
                    "reason": p.reason,
                    "ttls": sorted({c.ttl for c in p.choices}),
                    "members": [
                        {
                            "site": m.site,
                            "live": m.live,
                            "status": m.status,
                            "weight": m.weight,
                            "share": round(m.weight / total, 3) if total and m.live and m.site in candidates else 0.0,
                        }
                        for m in p.members
                    ],
                }
            )
    return {"redis": {"version": state.version}, "sites": sites, "names": names}


def render(report: dict[str, Any]) -> str:
    lines = [f"state version {report['redis']['version']}", "", "SITES"]
    rows = [("site", "state", "age", "director", "services")]
    for s in report["sites"]:
        svc = ", ".join(
            f"{v['name']} {'up' if v['up'] else 'DOWN'} {v['healthy_fraction']:.0%} ({v['servers_up']}/{v['servers']} servers)"
            + _spill_text(v)
            for v in s["services"]
        )
        age = f"{s['age']:.1f}s" if s["age"] is not None else "-"
        rows.append((s["site"], s["state"], age, _director(s), svc))
    lines += _table(rows)
    lines += ["", "NAMES"]
    rows = [("name", "type", "policy", "answers now", "ttl", "why")]
    for n in report["names"]:
        if n["kind"] == "servfail":
            answers = "SERVFAIL"
        else:
            answers = ", ".join(
                f"{m['site']} {m['share']:.0%}" if m["live"] else f"{m['site']} - ({m['status']})" for m in n["members"]
            )
        ttl = "/".join(str(t) for t in n["ttls"]) or "-"
        rows.append((n["name"], n["type"], n["policy"], answers, ttl, n["reason"]))
    lines += _table(rows)
    return "\n".join(lines)


def _director(site: dict[str, Any]) -> str:
    """The publishing director, and for a pair its standbys: ``dc1-a (dc1-b backup ok)``."""
    text = site["director"] or "-"
    others = [m for m in site.get("pair", []) if m["id"] != site["director"]]
    if others:
        text += " (" + ", ".join(
            f"{m['id']} {m['role']}" + (" ok" if m["healthy"] else " NOT HEALTHY" if m["present"] else "")
            for m in others) + ")"
    return text


def _spill_text(service: dict[str, Any]) -> str:
    """`` SPILLING to dc2 (3 conns)`` while it spills, `` (2 spilled conns)`` while spilled flows remain."""
    if service.get("spilling_to"):
        return f" SPILLING to {service['spilling_to']} ({service['spilled_conns']} conns)"
    return f" ({service['spilled_conns']} spilled conns)" if service.get("spilled_conns") else ""


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
