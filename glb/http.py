"""Serving an aiohttp app: the one place GLB binds its HTTP endpoints
(the director's and dnsfront's /healthz, /status, /metrics and admin API).

A port that cannot be bound is the startup error an operator most often has
to fix, so it is one line naming the address and what wanted it; the caller
chooses the error class of its tier (``DirectorError``, ``DNSFrontError``).
"""

from __future__ import annotations

import errno
import ssl

from aiohttp import web

from glb.config import ListenAddress
from glb.errors import GLBError


class Served:
    """An app being served: the port actually bound (the config may say 0) and ``close``."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self.runner = runner
        self.port = port

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve(app: web.Application, listen: ListenAddress, *, what: str,
                error: type[GLBError] = GLBError, ssl_context: ssl.SSLContext | None = None) -> Served:
    """Start serving ``app`` on ``listen`` (HTTPS with ``ssl_context``); ``error`` with one line if it cannot bind."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, listen.host, listen.port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        reason = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e)).lower()
        raise error(f"cannot listen on {listen} for {what}: {reason}") from None
    server = site._server  # noqa: SLF001 - the only way to learn an ephemeral port
    if server is None or not server.sockets:
        await runner.cleanup()
        raise error(f"cannot listen on {listen} for {what}: no socket bound")
    return Served(runner, server.sockets[0].getsockname()[1])
