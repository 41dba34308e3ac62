"""The DNS benchmarks' config: app.example.net, weighted over two live sites (dc1, dc2).

    python benchmarks/dns_config.py REDIS_URL DNS_LISTEN STATUS_LISTEN [RRL_RATE]

prints it for dns_qps.sh (RRL_RATE: response rate limiting on at that many
responses per second); rrl_cost.py imports :func:`two_sites`. One config, so
the figures of both benchmarks are of the same name.
"""

from __future__ import annotations

import sys


def two_sites(redis_url: str | None = None, listen: str = "127.0.0.1:53", status_listen: str | None = None,
              rrl_rate: int | None = None) -> str:
    """The config text; without ``redis_url`` or ``status_listen`` those keys keep their defaults."""
    redis = f'redis: {{url: "{redis_url}"}}\n' if redis_url else ""
    status = f"  status_listen: {status_listen}\n" if status_listen else ""
    rrl = f"  rrl: {{enabled: true, responses_per_second: {rrl_rate}}}\n" if rrl_rate else ""
    return f"""{redis}dnsfront:
  listen: ["{listen}"]
{status}{rrl}zones:
  - apex: example.net
    soa: {{mname: ns1.example.net, rname: hostmaster@example.net}}
    ns: [{{name: ns1.example.net, addresses: [192.0.2.53]}}]
names:
  app.example.net:
    service: web
    policy: weighted
    ttl: 20
    members: [{{site: dc1, weight: 100}}, {{site: dc2, weight: 100}}]
sites:
  dc1:
    director: {{interface: eth0}}
    services: [{{name: web, vips: ["192.0.2.10:80/tcp"], real_servers: [10.1.0.1]}}]
  dc2:
    director: {{interface: eth0}}
    services: [{{name: web, vips: ["192.0.2.20:80/tcp"], real_servers: [10.2.0.1]}}]
"""


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit("usage: " + __doc__.split("\n\n")[1].strip())
    sys.stdout.write(two_sites(*sys.argv[1:4], rrl_rate=int(sys.argv[4]) if len(sys.argv) == 5 else None))
