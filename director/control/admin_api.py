"""The director's admin API: its own listener, optional TLS, scoped tokens.

Apart from ``status_listen`` (``/healthz``, ``/status``, ``/metrics``: read-only,
unauthenticated, fit for Prometheus): ``director.admin_listen`` serves

* ``GET /healthz``: which site this director serves (the CLI asks before acting);
* ``GET /status``: the same document as on the status listener, for a ``read`` token;
* ``POST /admin/{drain,undrain,weight}`` and ``/admin/site/{drain,undrain}``:
  for an ``operate`` token (``add_admin_routes``).

A missing, malformed or unknown token is one 401 with one body, whichever part
was wrong; a known token without the scope is 403 (it proved who it is). Every
action is logged with the token's name, the operator's ``who`` and ``why``.

``AdminAPI.reload`` (SIGHUP) re-reads the tokens file and the certificate and
key into the listener's live ``SSLContext``: new connections get the new
certificate, the listening socket stays. Anything that does not load keeps
the running credentials (logged), as a bad config file does.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from glb.config import AdminConfig, ListenAddress
from glb.errors import AdminError, DirectorError, StateError, StoreError
from glb.http import Served, serve
from glb.state import MAX_WEIGHT, Override, merge_override, override_to_json, server_target, site_target
from glb.tokens import OPERATE, READ, Token, Tokens, load_tokens
from director.control.health import ServerKey
from director.control.status import StatusSource, status_document

log = logging.getLogger("glb.director.admin")

UNAUTHORIZED = "unauthorized"
"""The whole body of every 401: nothing about which part of the credentials was wrong."""


class OverrideStore(Protocol):
    """The part of ``glb.store.RedisStore`` the admin endpoints need."""

    async def update_override(self, target: str, change: Callable[[Override | None], Override | None]
                              ) -> tuple[Override | None, int]: ...


# --------------------------------------------------------------------------
# Credentials


def server_tls(admin: AdminConfig) -> ssl.SSLContext | None:
    """A server context holding ``admin.tls_cert``/``tls_key``, or None without TLS; AdminError if they do not load."""
    if admin.tls_cert is None or admin.tls_key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_certificate(ctx, admin)
    return ctx


def load_certificate(ctx: ssl.SSLContext, admin: AdminConfig) -> None:
    """Load the certificate and key into ``ctx``, after proving them on a scratch
    context: a key that fails half-way must not leave a live context with the
    new certificate and the old key."""
    assert admin.tls_cert is not None and admin.tls_key is not None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(admin.tls_cert, admin.tls_key)
        ctx.load_cert_chain(admin.tls_cert, admin.tls_key)
    except FileNotFoundError as e:
        raise AdminError(f"admin TLS: {e.filename or admin.tls_cert}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
        raise AdminError(f"admin TLS: cannot load {admin.tls_cert} with key {admin.tls_key}: {reason}") from None


# --------------------------------------------------------------------------
# The routes


def _problem(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


class _Refused(Exception):
    def __init__(self, response: web.Response):
        self.response = response


def _authorize(tokens: Callable[[], Tokens], request: web.Request, need: str) -> Token:
    token = tokens().authenticate(request.headers.get("Authorization"))
    if token is None:
        log.info("admin: %s %s from %s refused: no valid token (401)", request.method, request.path, request.remote)
        raise _Refused(_problem(401, UNAUTHORIZED, **{"WWW-Authenticate": 'Bearer realm="glb"'}))
    if not token.allows(need):
        log.info("admin: %s %s from %s refused: token %s has scope %s (403)",
                 request.method, request.path, request.remote, token.name, token.scope)
        raise _Refused(_problem(403, f"token {token.name} has scope {token.scope}; this needs {need}"))
    return token


async def _body_of(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise _Refused(_problem(400, "body is not valid JSON")) from None
    if not isinstance(body, dict):
        raise _Refused(_problem(400, "body must be a JSON object"))
    return body


def _who_of(token: Token, body: dict[str, Any]) -> tuple[str, str]:
    """(who, why) to record. The token's name is the part a client cannot choose:
    a ``who`` the client gives is kept, followed by the token it came with."""
    who, why = body.get("who"), body.get("why", "")
    if (who is not None and not isinstance(who, str)) or not isinstance(why, str):
        raise _Refused(_problem(400, "who and why must be strings"))
    if not who or who == token.name:
        return token.name, why
    return f"{who} via {token.name}", why


def _weight_of(body: dict[str, Any]) -> dict[str, Any]:
    weight = body.get("weight")
    if weight is not None and (not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= MAX_WEIGHT):
        raise _Refused(_problem(400, f"weight must be an integer 0..{MAX_WEIGHT} or null"))
    return {"weight": weight}


def _server_of(src: StatusSource) -> Callable[[dict[str, Any]], str]:
    def target(body: dict[str, Any]) -> str:
        service, address, port = body.get("service"), body.get("address"), body.get("port", 0)
        if not isinstance(service, str) or not isinstance(address, str):
            raise _Refused(_problem(400, "service and address are required"))
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            raise _Refused(_problem(400, f"not an IP address: {address!r}")) from None
        if not isinstance(port, int) or isinstance(port, bool):
            raise _Refused(_problem(400, "port must be an integer (0 = the VIP's port)"))
        if ServerKey(service, address, port) not in src.table:
            raise _Refused(_problem(404, f"no real server {address} port {port} in service {service!r}"))
        return server_target(src.table.site.name, service, address, port)

    return target


Handler = Callable[[web.Request], Awaitable[web.Response]]


def add_admin_routes(app: web.Application, src: StatusSource, tokens: Callable[[], Tokens],
                     store: OverrideStore) -> None:
    """POST /admin/{drain,undrain,weight} for a real server, /admin/site/{drain,undrain}.

    Each writes an ``Override`` (who, when, why) to Redis; the director, like
    every other GLB process, applies it when it sees it there, so it survives
    restarts and the DNS tier sees a drained site. A server's drain and
    weight live in one override document: changing one keeps the other; when
    neither is left the override is cleared. The read-modify-write is one
    compare-and-set in Redis (``RedisStore.update_override``): two operators
    acting on the same target at once both take effect.
    """

    def handler(action: str, target_of: Callable[[dict[str, Any]], str],
                change: Callable[[dict[str, Any]], dict[str, Any]]) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            try:
                token = _authorize(tokens, request, OPERATE)
                body = await _body_of(request)
                who, why = _who_of(token, body)
                target = target_of(body)
                changes = change(body)
                stored, version = await store.update_override(
                    target, lambda held: merge_override(held, target, **changes, who=who, why=why))
            except _Refused as r:
                return r.response
            except StateError as e:
                return _problem(400, str(e))
            except StoreError as e:
                log.warning("admin: %s of %s from %s failed: %s", action, request.path, request.remote, e)
                return _problem(503, str(e))
            log.info("admin: %s %s by %s (token %s, from %s), why %r: version %d",
                     action, target, who, token.name, request.remote, why, version)
            return web.json_response({"target": target, "version": version,
                                      "override": None if stored is None else override_to_json(stored)})

        return handle

    server_of = _server_of(src)
    site_of = lambda _body: site_target(src.table.site.name)  # noqa: E731
    app.router.add_post("/admin/drain", handler("drain", server_of, lambda _: {"drain": True}))
    app.router.add_post("/admin/undrain", handler("undrain", server_of, lambda _: {"drain": False}))
    app.router.add_post("/admin/weight", handler("weight", server_of, _weight_of))
    app.router.add_post("/admin/site/drain", handler("site drain", site_of, lambda _: {"drain": True}))
    app.router.add_post("/admin/site/undrain", handler("site undrain", site_of, lambda _: {"drain": False}))


def make_admin_app(src: StatusSource, tokens: Callable[[], Tokens], store: OverrideStore) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "site": src.table.site.name})

    async def status(request: web.Request) -> web.Response:
        try:
            _authorize(tokens, request, READ)
        except _Refused as r:
            return r.response
        return web.json_response(status_document(src, time.time()))

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status)
    add_admin_routes(app, src, tokens, store)
    return app


# --------------------------------------------------------------------------
# The listener


class AdminAPI:
    """The admin listener of one director: ``start``, ``reload`` on SIGHUP, ``stop``."""

    def __init__(self, src: StatusSource, store: OverrideStore, admin: AdminConfig):
        self.admin = admin
        self.tokens = load_tokens(admin.tokens_file, admin.token)
        self.tls = server_tls(admin)
        self.app = make_admin_app(src, lambda: self.tokens, store)
        self.port: int | None = None
        self._served: Served | None = None

    @classmethod
    def create(cls, src: StatusSource, store: OverrideStore, admin: AdminConfig) -> AdminAPI:
        """As the constructor, with a bad tokens file or certificate as the director's one-line startup error."""
        try:
            return cls(src, store, admin)
        except AdminError as e:
            raise DirectorError(str(e)) from None

    async def start(self, listen: ListenAddress) -> int:
        self._served = await serve(self.app, listen, what="the admin API", error=DirectorError, ssl_context=self.tls)
        self.port = self._served.port
        log.info("admin API on %s:%d (%s, %d tokens)", listen.host, self.port,
                 "TLS" if self.tls is not None else "plain HTTP", len(self.tokens))
        return self.port

    def reload(self, admin: AdminConfig) -> bool:
        """New tokens and certificate for new connections; False (and the old ones kept) if they do not load."""
        try:
            tokens = load_tokens(admin.tokens_file, admin.token)
            if (admin.tls_cert is None) != (self.tls is None):
                raise AdminError("admin TLS switched on or off: that takes a restart")
            if self.tls is not None:
                load_certificate(self.tls, admin)
        except AdminError as e:
            log.error("reload: keeping the running admin credentials: %s", e)
            return False
        self.tokens, self.admin = tokens, admin
        log.info("reload: admin API: %d tokens%s", len(tokens), ", certificate reloaded" if self.tls else "")
        return True

    async def stop(self) -> None:
        if self._served is not None:
            await self._served.close()
            self._served = None
