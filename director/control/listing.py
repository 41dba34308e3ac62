"""`glb director list`: a running director's table, the way ``ipvsadm -Ln --stats --rate`` shows it.

The table is read from the director's ``/status`` (on the site's
``director.status_listen``), so it is what the director decides now, not what
Redis last heard. ``render`` is pure: a /status document in, text out.

```
site dc1, director dc1-a (glb 0.1.0), up 2m05s; redis connected, state version 42 published 0.2s ago
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port  Forward  Weight  State     ActiveConn  InActConn  CPS  PPS  BPS  Last check
TCP  192.0.2.10:80 wlc  (conns 0, pkts 0, bytes 0)  web: up, 100% healthy (quorum 50%), http check every 1s
  -> 10.1.0.11:80        Route    100     up        0           0          0    0    0    ok HTTP 200 (1.2ms, 0.4s ago)
```

Real servers configured without a port take the VIP's port: the table shows
that port, or ``*`` when the service's VIPs use several.
"""

from __future__ import annotations

from typing import Any

from director.modes import MODES
from glb.errors import AdminError

FORWARD = {name: mode.label for name, mode in MODES.items()}
HEADER = ("  -> RemoteAddress:Port", "Forward", "Weight", "State", "ActiveConn", "InActConn",
          "CPS", "PPS", "BPS", "Last check")


def list_site(config_path: str, site: str) -> int:
    """``glb director list --config FILE --site NAME``: print the table; AdminError if unreachable."""
    from glb import config
    from glb.admin import DirectorClient

    cfg = config.load(config_path)
    client = DirectorClient.for_status(cfg, site)
    doc = client.status()
    try:
        text = render(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise AdminError(f"{client.label} sent a /status this glb does not understand "
                         f"({type(e).__name__}: {e}): are both the same version?") from None
    print(text)
    return 0


# --------------------------------------------------------------------------
# Rendering (pure)


def render(doc: dict[str, Any]) -> str:
    """The table for one /status document."""
    now = float(doc["now"])
    lines = [_headline(doc, now)]
    if doc.get("pair"):
        lines.append(pair_line(doc["pair"], now))
    if doc.get("drained"):
        lines.append("SITE DRAINED by an operator: DNS does not answer it (glb undrain to return it)")
    lines.append("Prot LocalAddress:Port Scheduler Flags")
    # Rows are either a free line (a virtual service, as ipvsadm prints it) or
    # a real server's cells, aligned across the whole table.
    rows: list[str | tuple[str, ...]] = [HEADER]
    overridden = False
    for svc in doc["services"]:
        vips = [_split_vip(v["vip"]) for v in svc["vips"]]
        ports = {port for _, port, _ in vips}
        flags = _flags(svc)
        for i, ((host, port, proto), v) in enumerate(zip(vips, svc["vips"])):
            line = f"{proto.upper():<4} {host}:{port} {svc['scheduler']}{flags}"
            line += f"  (conns {_num(v['connections'])}, pkts {_num(v['packets'])}, bytes {_num(v['bytes'])})"
            if i == 0:
                line += f"  {_service_summary(svc)}"
            rows.append(line)
        if not vips:
            rows.append(f"-    (no VIP) {svc['scheduler']}{flags}  {_service_summary(svc)}")
        forward = FORWARD.get(svc["forwarding"], svc["forwarding"])
        for rs in svc["real_servers"]:
            weight = str(rs["weight"])
            if rs.get("weight_override") is not None:
                weight += "*"
                overridden = True
            rows.append((
                f"  -> {_server_address(rs['address'], rs['port'], ports)}",
                forward,
                weight,
                _state(rs),
                _num(rs["active_conns"]),
                _num(rs["inactive_conns"]),
                _rate(rs["new_conns_per_s"]),
                _rate(rs["packets_per_s"]),
                _rate(rs["bytes_per_s"]),
                _last_check(rs, now),
            ))
        if svc.get("spill"):
            rows += _spill_rows(svc["spill"], ports)
    cells = [r for r in rows if isinstance(r, tuple)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(HEADER))]
    for r in rows:
        if isinstance(r, str):
            lines.append(r)
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if not doc["services"]:
        lines.append("(no services)")
    if overridden:
        lines.append("* weight set by an operator override ('glb weight ... clear' restores the configured weight)")
    return "\n".join(lines)


def _spill_rows(spill: dict[str, Any], ports: set[int]) -> list[str | tuple[str, ...]]:
    """The spill line and the other sites' servers holding spilled connections (always tunnelled)."""
    to = ", ".join(spill["to"])
    if spill["spilling_to"]:
        line = f"  SPILLING to {spill['spilling_to']}: new connections go to its real servers"
    elif spill["triggered"]:
        line = f"  SPILL WANTED ({spill['when']}) but no site of [{to}] can take it: new connections are dropped"
    else:
        line = f"  spill to [{to}] when {spill['when']}: not now"
    rows: list[str | tuple[str, ...]] = [line + f" ({_num(spill['conns'])} spilled conns)"]
    for rs in spill["servers"]:
        rows.append((
            f"  -> {_server_address(rs['address'], rs['port'], ports)}",
            FORWARD["tun"],
            str(rs["weight"]),
            f"@{rs['site']}",
            _num(rs["active_conns"]),
            _num(rs["inactive_conns"]),
            _rate(rs["new_conns_per_s"]),
            _rate(rs["packets_per_s"]),
            _rate(rs["bytes_per_s"]),
            "spilled",
        ))
    return rows


def _headline(doc: dict[str, Any], now: float) -> str:
    version = doc.get("glb_version")
    head = f"site {doc['site']}, director {doc['director_id']}"
    if version:
        head += f" (glb {version})"
    head += f", up {_duration(doc.get('uptime') or 0.0)}"
    redis = doc.get("redis") or {}
    if redis.get("connected") is False:
        since = redis.get("outage_since")
        head += "; redis UNREACHABLE"
        if since:
            head += f" for {_duration(now - since)}"
        if redis.get("last_error"):
            head += f" ({redis['last_error']})"
        head += ", publishing when it returns"
    elif redis.get("connected") is None:
        head += "; redis not reached yet"
    else:
        head += "; redis connected"
    if redis.get("last_version") is not None:
        head += f", state version {redis['last_version']}"
        if redis.get("last_published_at"):
            head += f" published {_duration(now - redis['last_published_at'])} ago"
    return head


def pair_line(pair: dict[str, Any], now: float) -> str:
    """``pair vrid 51: dc1-a MASTER (this one, for 2m05s); dc1-b backup, healthy, heard 0.4s ago``."""
    parts = []
    for m in pair["members"]:
        role = m["role"].upper() if m["role"] == "master" else m["role"]
        if m["id"] == pair["member"]:
            parts.append(f"{m['id']} {role} (this one, for {_duration(now - pair['since'])})")
            continue
        text = f"{m['id']} {role}"
        if m["role"] != "master":
            text += ", healthy" if m["healthy"] else ", NOT HEALTHY" if m["present"] else ""
        if m.get("last_heard") is not None:
            text += f", heard {_duration(now - m['last_heard'])} ago"
        elif not m["present"]:
            text += ", never heard"
        parts.append(text)
    return f"pair vrid {pair['virtual_router_id']}: " + "; ".join(parts)


def _split_vip(text: str) -> tuple[str, int, str]:
    """``192.0.2.10:80/tcp`` / ``[2001:db8::10]:80/tcp`` -> (host as printed, port, proto)."""
    hostport, _, proto = text.rpartition("/")
    host, _, port = hostport.rpartition(":")
    return host, int(port), proto


def _flags(svc: dict[str, Any]) -> str:
    p = svc.get("persistence")
    if not p:
        return ""
    return f" persistent {p['timeout']:g} mask /{p['netmask']} /{p['netmask6']}"


def _service_summary(svc: dict[str, Any]) -> str:
    text = f"{svc['name']}: {'up' if svc['up'] else 'DOWN'}, {svc['healthy_fraction']:.0%} healthy"
    if svc.get("quorum"):
        text += f" (quorum {svc['quorum']:.0%})"
    if svc.get("sorry_server"):
        text += f", sorry server {svc['sorry_server']}" + (" ACTIVE" if svc.get("sorry_active") else "")
    check = svc.get("health_check") or {}
    if check:
        text += f", {check['type']} check every {check['interval']:g}s"
    return text


def _server_address(address: str, port: int, vip_ports: set[int]) -> str:
    if port == 0:  # the VIP's port
        shown = str(next(iter(vip_ports))) if len(vip_ports) == 1 else "*"
    else:
        shown = str(port)
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{shown}"


def _state(rs: dict[str, Any]) -> str:
    state = rs["state"]
    if rs.get("admin") == "drain" and state != "draining":
        state += " (drained)"
    return state


def _last_check(rs: dict[str, Any], now: float) -> str:
    if rs.get("last_check") is None:
        return "- " + (rs.get("last_result") or "not checked yet")
    verdict = "ok" if rs.get("last_ok") else "FAIL"
    detail = []
    if rs.get("last_latency") is not None:
        detail.append(f"{rs['last_latency'] * 1000:.1f}ms")
    detail.append(f"{_duration(now - rs['last_check'])} ago")
    return f"{verdict} {rs.get('last_result', '')} ({', '.join(detail)})"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _num(n: float) -> str:
    """ipvsadm's large numbers: exact below 100000, then K/M/G/T."""
    n = int(n)
    if n < 100_000:
        return str(n)
    for suffix in ("K", "M", "G", "T"):
        n //= 1000
        if n < 100_000:
            return f"{n}{suffix}"
    return f"{n}P"


def _rate(x: float) -> str:
    if 0 < x < 10 and x != int(x):
        return f"{x:.1f}"
    return _num(round(x))
