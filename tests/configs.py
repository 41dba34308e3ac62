"""Config text the tests share (a config is validated whole, so even a director test needs a zone)."""

from __future__ import annotations

ZONES = """zones:
  - apex: example.net
    soa: {mname: ns1.example.net, rname: hostmaster@example.net}
    ns: [{name: ns1.example.net, addresses: [192.0.2.53]}]
"""
"""The one zone every test config needs."""


def head(redis_url: str, admin: str = "") -> str:
    """A config's first keys: Redis at ``redis_url`` (0.5 s timeout), the line ``admin`` (may be empty), the zone."""
    return f'\nredis: {{url: "{redis_url}", timeout: 0.5}}\n{admin}\n{ZONES}'


def app_name(*sites: str) -> str:
    """The name app.example.net, answered for the service web of ``sites`` (default policy and weights)."""
    members = ", ".join(f"{{site: {site}}}" for site in sites)
    return f"names:\n  app.example.net:\n    service: web\n    members: [{members}]\n"
