"""Benchmark helper: a GLB config with S sites and N load-balanced names.

    python benchmarks/dns_scale_config.py SITES NAMES REDIS_URL DNS_PORT STATUS_PORT > glb.yaml

Each site has one director and one service ``web`` with one VIP; each name
is ``weighted`` over 8 members picked at random (seeded, so a size always
gives the same config) among the sites. A random pick, rather than a window
of consecutive sites, gives every name its own member set: nothing a
rebuild could share between names that a real deployment would not have.
"""

from __future__ import annotations

import random
import sys

MEMBERS = 8
TTL = 30
DEGRADED_TTL = 5


def site_name(i: int) -> str:
    return f"s{i:03d}"


def site_vip(i: int) -> str:
    return f"10.{100 + i // 250}.{i % 250}.1"


def members_of(sites: int, names: int, seed: int = 18) -> list[list[int]]:
    """The member sites (indices) of every name."""
    rng = random.Random(seed)
    k = min(MEMBERS, sites)
    return [rng.sample(range(sites), k) for _ in range(names)]


def config_text(sites: int, names: int, redis_url: str, dns_port: int, status_port: int) -> str:
    out = [
        f'redis: {{url: "{redis_url}", stale_after: 3.0}}',
        "dnsfront:",
        f'  listen: ["127.0.0.1:{dns_port}"]',
        f"  status_listen: 127.0.0.1:{status_port}",
        "zones:",
        "  - apex: example.net",
        "    soa: {mname: ns1.example.net, rname: hostmaster@example.net}",
        "    ns: [{name: ns1.example.net, addresses: [192.0.2.53]}]",
        "names:",
    ]
    for n, members in enumerate(members_of(sites, names)):
        out.append(f"  n{n}.example.net:")
        out.append(f"    service: web\n    ttl: {TTL}\n    degraded_ttl: {DEGRADED_TTL}")
        out.append("    members: [" + ", ".join(f"{{site: {site_name(i)}, weight: 100}}" for i in members) + "]")
    out.append("sites:")
    for i in range(sites):
        out.append(f"  {site_name(i)}:")
        out.append("    director: {interface: eth0, heartbeat: 1.0}")
        out.append(f'    services: [{{name: web, vips: ["{site_vip(i)}:80/tcp"], real_servers: [10.250.0.1]}}]')
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    s, n, url, dport, sport = sys.argv[1:6]
    sys.stdout.write(config_text(int(s), int(n), url, int(dport), int(sport)))
