"""`glb dashboard`: the live page, its JSON and its Server-Sent Events stream (aiohttp).

Thin I/O around ``glb.dashboard.model``: a ``StateFollower`` (the same
subscription dnsfront uses) marks the view dirty on every state change and a
pusher sends it to every open page at once; a sampler, once a second, scrapes
dnsfront's /metrics, records a sample and re-judges staleness. Pages get the
whole history on connect (``init``), then ``view``, ``sample`` and ``events``
messages.

Security (docs/dashboard.md): reading needs nothing; an action needs the admin
token in an ``Authorization`` header (the page keeps it in sessionStorage,
never in a URL or a log), a same-origin ``Origin`` and the double-submit CSRF
token (cookie = header). Every response carries a Content-Security-Policy
without inline scripts. Bound to loopback, the Host header must name loopback
too, so a rebinding DNS name cannot reach the page from a browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from glb import config as configmod
from glb.admin import connect_address
from glb.aio import cancel_and_wait
from glb.config import Config, ListenAddress
from glb.dashboard import actions, model
from glb.errors import AdminError, DashboardError
from glb.http import serve
from glb.store import StateFollower

log = logging.getLogger("glb.dashboard")

STATIC = Path(__file__).with_name("static")
DEFAULT_LISTEN = ListenAddress("127.0.0.1", 9180)
CSRF_COOKIE = "glb_csrf"
CSRF_HEADER = "X-GLB-CSRF"
SCRAPE_TIMEOUT = 0.5
"""Seconds a dnsfront has to answer /metrics before its sample is left empty."""
KEEPALIVE = 15.0
"""Seconds of silence after which the stream sends a comment (proxies close idle streams)."""
COALESCE = 0.05
"""Seconds the pusher waits after a change, so a burst of changes is one message."""
QUEUE = 64
"""Messages a slow page may fall behind by before it is cut off (it reconnects and gets init)."""

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


class Dashboard:
    """The running dashboard's state: follower, samples, timeline, open streams."""

    def __init__(self, cfg: Config, dnsfronts: tuple[str, ...] = (),
                 directors: Mapping[str, tuple[str, int]] | None = None):
        self.cfg = cfg
        if not dnsfronts:
            host, port = connect_address(cfg.dnsfront.status_listen)
            dnsfronts = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}",)
        self.dnsfronts = tuple(dict.fromkeys(dnsfronts))
        """host:port of each dnsfront status listener whose /metrics is sampled."""
        self.directors = dict(directors or {})
        """Site -> (host, port) of its director's admin API, where the config's bind address will not do."""
        unknown = sorted(set(self.directors) - {s.name for s in cfg.sites})
        if unknown:
            raise DashboardError(f"--director {unknown[0]}=...: {cfg.source} has no site {unknown[0]!r}")
        self.follower = StateFollower(cfg.redis, self._changed)
        self.samples = model.Samples()
        self.timeline = model.Timeline()
        self.rates = model.RateMeter()
        self.dns: dict[str, dict[str, Any]] = {a: {"address": a, "qps": None, "error": None} for a in self.dnsfronts}
        self.view: dict[str, Any] = {}
        self._streams: set[asyncio.Queue[str | None]] = set()
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None

    # -- lifecycle

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT))
        self._refresh(time.time())
        await self.follower.start()
        self._tasks = [asyncio.create_task(self._pusher(), name="dashboard-pusher"),
                       asyncio.create_task(self._sampler(), name="dashboard-sampler")]

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        await self.follower.stop()
        for q in list(self._streams):
            self._cut(q)
        if self._http is not None:
            await self._http.close()

    # -- what the page gets

    def _redis(self) -> dict[str, Any]:
        f = self.follower
        return {"connected": f.connected, "synced": f.last_sync is not None, "last_error": f.last_error,
                "frozen_at": f.state.frozen_at}

    def _refresh(self, now: float) -> list[dict[str, Any]]:
        """Rebuild the view from the follower's state; returns the timeline's new events."""
        view = model.build_view(self.cfg, self.follower.state, now, redis=self._redis())
        view["dnsfronts"] = list(self.dns.values())
        self.view = view
        if self.follower.last_sync is None:
            return []  # nothing loaded yet: "no snapshot -> up" for every site would be noise, not events
        return self.timeline.observe(view, self.follower.state, now)

    def snapshot(self) -> dict[str, Any]:
        return {"view": self.view, "samples": self.samples.columns(), "events": list(self.timeline.events)}

    def _send(self, kind: str, data: Any) -> None:
        message = f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
        for q in list(self._streams):
            if q.full():  # a page that cannot keep up is cut off: it reconnects and starts over with init
                self._cut(q)
            else:
                q.put_nowait(message)

    def _cut(self, q: asyncio.Queue[str | None]) -> None:
        """End a page's stream: drop what it has not read, then the end mark."""
        self._streams.discard(q)
        while not q.empty():
            q.get_nowait()
        q.put_nowait(None)

    def _publish(self, events: list[dict[str, Any]]) -> None:
        self._send("view", self.view)
        if events:
            self._send("events", events)

    def record(self, e: dict[str, Any]) -> None:
        """An event that is not a state difference (an action from the page)."""
        self.timeline.add(e)
        self._send("events", [e])

    # -- the tasks

    def _changed(self, state: Any) -> None:
        self._dirty.set()

    async def _pusher(self) -> None:
        took = 0.0
        while True:
            await self._dirty.wait()
            # At least as long as the last rebuild took: with many sites heartbeating, the
            # dashboard spends at most about half a core on rebuilding (docs/dashboard.md).
            await asyncio.sleep(max(COALESCE, took))
            self._dirty.clear()
            started = time.monotonic()
            self._publish(self._refresh(time.time()))
            took = time.monotonic() - started

    async def _sampler(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += model.SAMPLE_INTERVAL
            await self._scrape_dns()
            now = time.time()
            self._publish(self._refresh(now))
            rates = {a: d["qps"] for a, d in self.dns.items() if d["qps"] is not None}
            self._send("sample", self.samples.add(now, model.sample_values(self.view, rates)))
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _scrape_dns(self) -> None:
        await asyncio.gather(*(self._scrape_one(a) for a in self.dnsfronts))

    async def _scrape_one(self, address: str) -> None:
        assert self._http is not None
        entry = self.dns[address]
        try:
            async with self._http.get(f"http://{address}/metrics") as r:
                text = await r.text()
                if r.status != 200:
                    raise DashboardError(f"HTTP {r.status}")
            total = model.dns_responses_total(text)
        except (aiohttp.ClientError, asyncio.TimeoutError, DashboardError, ValueError) as e:
            entry.update(qps=None, error=str(e) or type(e).__name__)
            return
        entry.update(qps=self.rates.rate(address, total, time.monotonic()), error=None)

    # -- streams

    def open_stream(self) -> asyncio.Queue[str | None]:
        q: asyncio.Queue[str | None] = asyncio.Queue(QUEUE)
        self._streams.add(q)
        return q

    def close_stream(self, q: asyncio.Queue[str | None]) -> None:
        self._streams.discard(q)


# --------------------------------------------------------------------------
# HTTP


DASH: web.AppKey[Dashboard] = web.AppKey("dashboard", Dashboard)
LOOPBACK_ONLY: web.AppKey[bool] = web.AppKey("loopback_only", bool)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _security(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.app[LOOPBACK_ONLY] and _host_name(request.host) not in LOOPBACK_HOSTS:
        response: web.StreamResponse = _error(421, "this dashboard answers on loopback names only")
    else:
        response = await handler(request)
    for k, v in SECURITY_HEADERS.items():
        response.headers.setdefault(k, v)
    # Static files revalidate (Last-Modified), so an upgraded dashboard never runs an old script.
    response.headers.setdefault("Cache-Control", "no-cache" if request.path.startswith("/static/") else "no-store")
    return response


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _index(request: web.Request) -> web.Response:
    csrf = request.cookies.get(CSRF_COOKIE) or ""
    if len(csrf) != 43 or not csrf.replace("-", "").replace("_", "").isalnum():
        csrf = secrets.token_urlsafe(32)
    page = (STATIC / "index.html").read_text(encoding="utf-8").replace("{{csrf}}", csrf)
    response = web.Response(text=page, content_type="text/html")
    # Double submit: the page echoes the token in a header; another origin can
    # neither read this page nor send our cookie (SameSite=Strict).
    response.set_cookie(CSRF_COOKIE, csrf, httponly=True, samesite="Strict", path="/")
    return response


async def _state(request: web.Request) -> web.Response:
    return web.json_response(request.app[DASH].snapshot())


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "redis_connected": request.app[DASH].follower.connected})


async def _stream(request: web.Request) -> web.StreamResponse:
    dash = request.app[DASH]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
    await response.prepare(request)
    q = dash.open_stream()
    try:
        # Reconnect after a second (a dashboard restart), then the whole picture.
        await response.write(b"retry: 1000\n\n")
        await response.write(f"event: init\ndata: {json.dumps(dash.snapshot(), separators=(',', ':'))}\n\n".encode())
        while True:
            try:
                message = await asyncio.wait_for(q.get(), KEEPALIVE)
            except asyncio.TimeoutError:
                message = ": keepalive\n\n"
            if message is None:
                break
            await response.write(message.encode())
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        dash.close_stream(q)
    return response


def _refuse_cross_site(request: web.Request) -> web.Response | None:
    """None when the request comes from our own page; else the refusal."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return _error(403, f"cross-origin request from {origin} refused")
    cookie, header = request.cookies.get(CSRF_COOKIE, ""), request.headers.get(CSRF_HEADER, "")
    if not cookie or not hmac.compare_digest(cookie.encode(), header.encode()):
        return _error(403, "missing or wrong CSRF token: reload the page")
    return None


async def _action(request: web.Request) -> web.Response:
    refused = _refuse_cross_site(request)
    if refused is not None:
        return refused
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _error(401, "actions need the admin token: sign in first")
    dash = request.app[DASH]
    try:
        req = actions.parse_action(dash.cfg, await request.json())
    except ValueError:
        return _error(400, "expected a JSON object")
    except AdminError as e:
        return _error(400, str(e))
    line = actions.describe(req)
    try:
        answer = await actions.perform(dash.cfg, req, token.strip(), dash.directors.get(req.site))
    except AdminError as e:
        log.warning("action refused: %s by %s (%s): %s", line, req.who, req.why, e)
        dash.record(model.event(time.time(), "action_refused", f"{line}: {e}", who=req.who, why=req.why))
        return _error(403, str(e))
    log.info("action: %s by %s (%s)", line, req.who, req.why)
    dash.record(model.event(time.time(), "action", line, who=req.who, why=req.why))
    return web.json_response({"ok": True, "message": line, "version": answer.get("version")})


def make_app(dash: Dashboard, *, loopback_only: bool = True) -> web.Application:
    app = web.Application(middlewares=[_security], client_max_size=16 * 1024)
    app[DASH] = dash
    app[LOOPBACK_ONLY] = loopback_only
    app.router.add_get("/", _index)
    app.router.add_get("/api/state", _state)
    app.router.add_get("/api/stream", _stream)
    app.router.add_post("/api/action", _action)
    app.router.add_get("/healthz", _healthz)
    app.router.add_static("/static/", STATIC, follow_symlinks=False)
    return app


def is_loopback(host: str) -> bool:
    return host.strip("[]") in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


async def start(cfg: Config, listen: ListenAddress, dnsfronts: tuple[str, ...] = (),
                directors: Mapping[str, tuple[str, int]] | None = None) -> tuple[Dashboard, Any]:
    """Start following and serving; returns the dashboard and the served app (``.port``, ``.close()``)."""
    dash = Dashboard(cfg, dnsfronts, directors)
    await dash.start()
    try:
        served = await serve(make_app(dash, loopback_only=is_loopback(listen.host)), listen,
                             what="the dashboard", error=DashboardError)
    except BaseException:
        await dash.close()
        raise
    return dash, served


def parse_listen(text: str) -> ListenAddress:
    """``HOST:PORT``, ``[V6]:PORT`` or ``HOST`` (port 9180), as the config spells listen addresses."""
    try:
        return configmod._hostport(DEFAULT_LISTEN.port)(text)  # noqa: SLF001 - the one HOST:PORT parser
    except configmod._Bad as e:  # noqa: SLF001
        raise ValueError(str(e)) from None


def parse_director(text: str) -> tuple[str, tuple[str, int]]:
    """``SITE=HOST:PORT`` (``--director``): where that site's director is reached."""
    site, sep, address = text.partition("=")
    if not sep or not site:
        raise ValueError(f"expected SITE=HOST:PORT, got {text!r}")
    listen = parse_listen(address)
    return site, (listen.host, listen.port)


def run(config_path: str, listen: ListenAddress = DEFAULT_LISTEN, dnsfronts: tuple[str, ...] = (),
        directors: Mapping[str, tuple[str, int]] | None = None) -> int:
    cfg = configmod.load(config_path)
    return asyncio.run(_main(cfg, listen, dnsfronts, directors))


async def _main(cfg: Config, listen: ListenAddress, dnsfronts: tuple[str, ...],
                directors: Mapping[str, tuple[str, int]] | None) -> int:
    dash, served = await start(cfg, listen, dnsfronts, directors)
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    log.info("dashboard at http://%s:%d/", host, served.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await dash.close()
        with contextlib.suppress(Exception):
            await served.close()
    return 0
