"""`glb drain|undrain|weight --direct`: the override written to Redis by the CLI itself.

For a site whose director is down (or unreachable): nobody there can check the
request or record it, yet DNS must stop answering the site now. ``DirectClient``
has ``DirectorClient``'s admin methods and answers, so the commands in
``glb.admin`` do not care which one they hold, and writes through the same
compare-and-set (``RedisStore.update_override``) with the same merge of drain
and weight as the director, so it loses no concurrent update either.

Authorization is Redis's own: whoever holds Redis credentials can write
overrides, with or without GLB. ``$GLB_REDIS_URL`` gives the operator's own
Redis user (an ACL user limited to the override keys, see docs/operations.md)
instead of the URL in the shared config; the override records who and
``via redis:<user>``. The config stands in for the director's check: a real
server the config does not list is refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from glb.config import Config, RedisConfig
from glb.errors import AdminError, StoreError
from glb.state import Override, merge_override, override_to_json, server_target, site_target
from glb.store import RedisStore

REDIS_URL_ENV = "GLB_REDIS_URL"


def operator_acl(prefix: str = "{glb}") -> list[str]:
    """``ACL SETUSER <name> on >password`` followed by these: a Redis user that may
    change overrides (and nothing else) through ``update_override``'s script."""
    return ["resetkeys", f"~{prefix}:overrides", f"~{prefix}:version", "resetchannels", f"&{prefix}:changes",
            "-@all", "+hget", "+hset", "+hdel", "+incr", "+publish", "+time", "+evalsha", "+eval",
            "+script|load", "+ping", "+client|setname"]


def operator_redis(config: Config) -> RedisConfig:
    """The config's Redis settings, with ``$GLB_REDIS_URL`` (the operator's own user) when set."""
    url = os.environ.get(REDIS_URL_ENV)
    return replace(config.redis, url=url) if url else config.redis


class DirectClient:
    """Writes one site's overrides straight to Redis: ``DirectorClient``'s admin methods."""

    def __init__(self, config: Config, site: str):
        self.config = config
        self.site = site
        self.redis = operator_redis(config)
        user = urlsplit(self.redis.url).username or "default"
        self.via = f"redis:{user}"

    @property
    def label(self) -> str:
        return f"site {self.site} (direct to redis)"

    # The director's checks, from the config instead.

    def require_token(self) -> None:
        """No token: Redis's own credentials authorize a direct write."""

    def check_site(self) -> None:
        if self.config.site(self.site) is None:
            known = ", ".join(s.name for s in self.config.sites) or "none"
            raise AdminError(f"{self.config.source}: no site {self.site!r} (sites: {known})")

    def _server(self, service: str, address: str, port: int) -> str:
        site = self.config.site(self.site)
        svc = site.service(service) if site is not None else None
        ip = ipaddress.ip_address(address)
        if svc is None or not any(rs.address == ip and (rs.port or 0) == port for rs in svc.real_servers):
            raise AdminError(f"{self.config.source}: no real server {address} port {port} in service {service!r} "
                             f"of site {self.site}")
        return server_target(self.site, service, address, port)

    # -- the admin calls

    def drain(self, service: str, address: str, port: int, *, who: str, why: str) -> dict[str, Any]:
        return self._write(self._server(service, address, port), {"drain": True}, who, why)

    def undrain(self, service: str, address: str, port: int, *, who: str, why: str) -> dict[str, Any]:
        return self._write(self._server(service, address, port), {"drain": False}, who, why)

    def set_weight(self, service: str, address: str, port: int, weight: int | None, *,
                   who: str, why: str) -> dict[str, Any]:
        return self._write(self._server(service, address, port), {"weight": weight}, who, why)

    def drain_site(self, *, who: str, why: str) -> dict[str, Any]:
        return self._write(site_target(self.site), {"drain": True}, who, why)

    def undrain_site(self, *, who: str, why: str) -> dict[str, Any]:
        return self._write(site_target(self.site), {"drain": False}, who, why)

    def _write(self, target: str, changes: dict[str, Any], who: str, why: str) -> dict[str, Any]:
        recorded = f"{who} via {self.via}"

        def change(held: Override | None) -> Override | None:
            return merge_override(held, target, **changes, who=recorded, why=why)

        async def write() -> tuple[Override | None, int]:
            store = RedisStore(self.redis)
            try:
                return await store.update_override(target, change)
            finally:
                await store.close()

        try:
            stored, version = asyncio.run(write())
        except StoreError as e:
            raise AdminError(f"{self.label}: {e}") from None
        return {"target": target, "version": version, "override": None if stored is None else override_to_json(stored)}
