"""`glb dnsfront`: process lifecycle (workers, signals, reload, status).

One worker = one process with one asyncio loop running the UDP/TCP server,
the Redis follower and the answer engine (``Worker``). With ``--workers 1``
that process also serves the status endpoints. With N > 1 the parent process
is a supervisor (glb/supervisor.py): it starts N workers (each binds the DNS
addresses with SO_REUSEPORT and follows Redis on its own), restarts one that
dies (after a backoff; it gives up and exits 1 on a crash loop), collects
their reports over a pipe every second for /status and /metrics, forwards
SIGHUP (reload) and SIGTERM (exit) to them, and stops them all on exit.

Signals: SIGHUP reloads the config file; a bad file is logged and the old
config keeps serving. The new config is read and its engine built and
warmed with the current state in a thread, while the old engine keeps
answering; the swap is one assignment in the event loop, so no query is
dropped or answered half-old/half-new. Changing the
listen addresses, the status address or the worker count needs a restart
(logged). SIGTERM/SIGINT: stop listening, stop following, exit 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import signal
import sys
import time
from contextlib import suppress
from multiprocessing.connection import Connection
from typing import Any

from glb import config as configmod
from glb.config import Config
from glb.errors import DNSFrontError, GLBError, SupervisorError
from glb.supervisor import Supervisor
from glb.state import DeploymentState

from dnsfront import cookies
from dnsfront.answers import Engine
from dnsfront.cookies import CookieJar
from dnsfront.rrl import RateLimiter, RRLCounters
from dnsfront.follower import AnswerUpdater
from dnsfront.server import DNSServer, probe_listen
from dnsfront.status import StatusServer

log = logging.getLogger("glb.dnsfront")

REPORT_INTERVAL = 1.0
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class Worker:
    """One serving process: DNS server + Redis follower + engine."""

    def __init__(self, config_path: str, config: Config, index: int = 0, cookie_master: bytes | None = None):
        self.config_path = config_path
        self.config = config
        self.index = index
        self.started_at = time.time()
        self.cookie_master = cookie_master or os.urandom(16)
        """Random per start unless the config names a secret file; the supervisor gives all workers one."""
        self.engine = Engine(config, cookies=cookie_jar(config, self.cookie_master))
        limiter = self._limiter(config)
        self.engine.limit = limiter.check if limiter is not None else None
        self.server = DNSServer(config.dnsfront, self.engine.handle, limiter)
        self.updater = AnswerUpdater(config.redis, lambda: self.engine)
        self.reloads = 0
        self._reload_lock = asyncio.Lock()

    def _limiter(self, config: Config) -> RateLimiter | None:
        rrl = config.dnsfront.rrl
        if not rrl.enabled:
            return None
        return RateLimiter(rrl, cookie_valid=self._cookie_valid,
                           badcookie=functools.partial(cookies.badcookie, payload=config.dnsfront.udp_payload))

    def _cookie_valid(self, query: bytes, addr: Any) -> bool:
        """Whether ``query`` presents a valid server cookie (RRL exemption); wall-clock time."""
        jar = self.engine.cookies
        return jar is not None and cookies.presents_valid(jar, query, addr, time.time())

    async def start(self) -> None:
        await self.updater.start()
        try:
            await self.server.start()
        except BaseException:
            await self.updater.stop()
            raise

    async def stop(self) -> None:
        await self.server.stop()
        await self.updater.stop()

    async def reload(self) -> bool:
        """Re-read the config file and swap in a new engine; False if it is invalid.

        Reading, checking and building a big config takes seconds: it runs in
        a thread, on a new engine nothing else sees, while this loop keeps
        answering from the old one. The swap is one assignment; changes that
        arrived meanwhile are then applied to the new engine (incrementally).
        """
        async with self._reload_lock:  # SIGHUPs in a row: one reload at a time
            return await self._reload()

    async def _reload(self) -> bool:
        try:
            new, engine = await asyncio.get_running_loop().run_in_executor(
                None, _prepare, self.config_path, self.updater.state, self.cookie_master)
        except GLBError as e:  # ConfigError included: its problems, one line
            log.error("reload failed, keeping the running config: %s", "; ".join(str(e).splitlines()))
            return False
        if new.dnsfront.listen != self.config.dnsfront.listen or new.dnsfront.status_listen != self.config.dnsfront.status_listen:
            log.warning("reload: listen addresses changed; restart dnsfront to apply them")
        engine.take_counters(self.engine)  # a reload must not reset the metrics
        if new.dnsfront.rrl != self.config.dnsfront.rrl or new.dnsfront.udp_payload != self.config.dnsfront.udp_payload:
            old = self.server.limiter
            self.server.limiter = self._limiter(new)
            if old is not None and self.server.limiter is not None:
                self.server.limiter.counters = old.counters  # buckets start over, counters do not
        engine.limit = self.server.limiter.check if self.server.limiter is not None else None
        self.engine = engine
        self.server.handler = engine.handle
        self.server.config = dataclasses.replace(new.dnsfront, listen=self.config.dnsfront.listen)
        if new.redis != self.config.redis:
            await self.updater.stop()
            self.updater = AnswerUpdater(new.redis, lambda: self.engine)
            await self.updater.start()
        else:
            self.updater.apply()
        self.config = new
        self.reloads += 1
        log.info("reloaded %s: %s", self.config_path, new.summary())
        return True

    def report(self) -> dict[str, Any]:
        """Plain data for the status server (picklable: it crosses a pipe)."""
        c = self.engine.counters()
        f = self.updater.follower
        sc = self.server.counters
        state = self.updater.state
        return {
            "worker": self.index,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "reloads": self.reloads,
            "zones": [z.apex for z in self.config.zones],
            "names": self.engine.names_status(),
            "rebuild": self.updater.report(),
            "redis": {
                "connected": bool(getattr(f, "connected", False)),
                "synced": state is not None,
                "last_sync": getattr(f, "last_sync", None),
                "state_age": (time.time() - f.last_sync) if getattr(f, "last_sync", None) else None,
                "last_error": getattr(f, "last_error", None),
                "state_version": state.version if state is not None else 0,
                "frozen": bool(state is not None and state.frozen_at is not None),
                "answers_rebuilt_at": self.updater.last_rebuild,
                # A follower that reconnects in a loop shows here: full_loads
                # climbs faster than one per resync_interval.
                "full_loads": getattr(f, "full_loads", 0),
                "changes_applied": getattr(f, "changes_applied", 0),
                "fetches_skipped": getattr(f, "fetches_skipped", 0),
                "keepalives_answered": getattr(f, "keepalives_answered", 0),
            },
            "counters": {
                "responses": [[q, r, n] for (q, r), n in c["responses"].items()],
                "site_answers": [[name, site, n] for (name, site), n in c["site_answers"].items()],
                "dropped": c["dropped"],
                "malformed": c["malformed"],
                "internal_errors": c["internal_errors"],
                "fast": c["fast"],
                "slow": c["slow"],
                "udp_send_errors": sc.udp_send_errors,
                "tcp_accepted": sc.tcp_accepted,
                "tcp_refused": sc.tcp_refused,
                "tcp_refused_source": sc.tcp_refused_source,
                **self._rrl_counters(),
                "tcp_idle_closed": sc.tcp_idle_closed,
                "tcp_queries": sc.tcp_queries,
                "tcp_open": sc.tcp_open,
            },
        }


    def _rrl_counters(self) -> dict[str, int]:
        lim = self.server.limiter
        c = lim.counters if lim is not None else RRLCounters()
        return {"rrl_limited": c.limited, "rrl_slipped": c.slipped, "rrl_exempt_cookie": c.exempt_cookie}


def cookie_jar(config: Config, master: bytes) -> CookieJar | None:
    """The server-cookie maker for ``config`` (None: cookies off); the config's secret wins over ``master``."""
    c = config.dnsfront.cookies
    if not c.enabled:
        return None
    return CookieJar(c.secret or master, c.rotate)


def _prepare(config_path: str, state: DeploymentState | None, master: bytes) -> tuple[Config, Engine]:
    """A new config and its engine, fully built from ``state`` (run in a thread)."""
    config = configmod.load(config_path)
    engine = Engine(config, cookies=cookie_jar(config, master))
    engine.update(state, time.time())
    return config, engine


def _install_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, on_hup: Any) -> None:
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)


# ---------------------------------------------------------------------------
# One process


async def _serve_single(config_path: str, config: Config) -> int:
    worker = Worker(config_path, config)
    await worker.start()
    status = StatusServer(config.dnsfront.status_listen, lambda: [worker.report()])
    try:
        await status.start()
    except BaseException:
        await worker.stop()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    _install_signals(loop, stop, lambda: loop.create_task(worker.reload()))
    log.info("dnsfront serving %s; status on %s", config.summary(), config.dnsfront.status_listen)
    try:
        await stop.wait()
    finally:
        log.info("dnsfront stopping")
        await status.stop()
        await worker.stop()
    return 0


# ---------------------------------------------------------------------------
# Several processes


def _worker_main(config_path: str, index: int, log_level: str, cookie_master: bytes, conn: Connection) -> None:
    """Entry point of a worker process (spawned: nothing inherited but args).

    A worker that cannot run sends the reason to the supervisor and exits 1,
    so a restarted worker's failure is told apart from a clean exit.
    """
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s %(name)s[w{index}]: %(message)s")
    # The supervisor handles Ctrl-C for the group; a worker waits for SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(_worker_async(config_path, index, cookie_master, conn))
    except GLBError as e:
        with suppress(OSError):
            conn.send(("error", "; ".join(str(e).splitlines())))
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - report, the parent prints it
        with suppress(OSError):
            conn.send(("error", f"internal error: {type(e).__name__}: {e}"))
        sys.exit(1)


async def _worker_async(config_path: str, index: int, cookie_master: bytes, conn: Connection) -> None:
    config = configmod.load(config_path)
    worker = Worker(config_path, config, index, cookie_master)
    await worker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(worker.reload()))
    conn.send(("ready", os.getpid()))
    try:
        while not stop.is_set():
            try:
                conn.send(("report", worker.report()))
            except OSError:
                break  # the supervisor is gone: so are we
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), REPORT_INTERVAL)
    finally:
        await worker.stop()


async def _supervise(config_path: str, config: Config, workers: int, log_level: str) -> int:
    reports: dict[int, tuple[float, dict[str, Any]]] = {}

    def on_message(index: int, msg: Any) -> None:
        if msg[0] == "report":
            reports[index] = (time.time(), msg[1])

    # One cookie secret for every worker (and every restart of one): a client's
    # server cookie must verify whichever worker SO_REUSEPORT hands it to.
    master = os.urandom(16)
    sup = Supervisor("dnsfront-worker", _worker_main, lambda i: (config_path, i, log_level, master), workers,
                     ready_timeout=READY_TIMEOUT, on_message=on_message)
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, sup.start)
    except SupervisorError as e:
        raise DNSFrontError(str(e)) from None

    def fresh_reports() -> list[dict[str, Any]]:
        sup.poll()
        now = time.time()
        return [r for at, r in reports.values() if now - at < 5 * REPORT_INTERVAL]

    status = StatusServer(config.dnsfront.status_listen, fresh_reports, expected_workers=workers)
    try:
        await status.start()
    except BaseException:
        await loop.run_in_executor(None, sup.stop, STOP_TIMEOUT)
        raise

    stop = asyncio.Event()

    def hup() -> None:
        log.info("SIGHUP: reloading %d workers", workers)
        sup.signal(signal.SIGHUP)

    _install_signals(loop, stop, hup)
    log.info("dnsfront serving %s with %d workers; status on %s", config.summary(), workers, config.dnsfront.status_listen)
    try:
        while not stop.is_set():
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            if not stop.is_set():
                sup.poll()
            if sup.failed:
                return 1
    finally:
        log.info("dnsfront stopping %d workers", workers)
        await status.stop()
        await loop.run_in_executor(None, sup.stop, STOP_TIMEOUT)
    return 0


# ---------------------------------------------------------------------------


def run(config_path: str, workers: int | None = None, log_level: str = "info") -> int:
    """Run dnsfront until SIGTERM/SIGINT; returns the exit code.

    Raises ``GLBError`` (ConfigError, DNSFrontError) with a one-line message
    for operator mistakes: bad config, address in use, no permission.
    """
    config = configmod.load(config_path)
    n = workers or config.dnsfront.workers
    if n < 1:
        raise DNSFrontError(f"--workers must be at least 1, got {n}")
    probe_listen(config.dnsfront.listen)
    if n == 1:
        return asyncio.run(_serve_single(config_path, config))
    return asyncio.run(_supervise(config_path, config, n, log_level))
