"""`glb dnsfront`: process lifecycle (workers, signals, reload, status).

One worker = one process with one asyncio loop running the UDP/TCP server,
the Redis follower and the answer engine (``Worker``). With ``--workers 1``
that process also serves the status endpoints. With N > 1 the parent process
is a supervisor: it starts N workers (each binds the DNS addresses with
SO_REUSEPORT and follows Redis on its own), restarts one that dies, collects
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
import logging
import multiprocessing
import os
import signal
import time
from contextlib import suppress
from multiprocessing.connection import Connection
from typing import Any

from glb import config as configmod
from glb.config import Config
from glb.errors import DNSFrontError, GLBError
from glb.state import DeploymentState

from dnsfront.answers import Engine
from dnsfront.follower import AnswerUpdater
from dnsfront.server import DNSServer, probe_listen
from dnsfront.status import StatusServer

log = logging.getLogger("glb.dnsfront")

REPORT_INTERVAL = 1.0
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class Worker:
    """One serving process: DNS server + Redis follower + engine."""

    def __init__(self, config_path: str, config: Config, index: int = 0):
        self.config_path = config_path
        self.config = config
        self.index = index
        self.started_at = time.time()
        self.engine = Engine(config)
        self.server = DNSServer(config.dnsfront, self.engine.handle)
        self.updater = AnswerUpdater(config.redis, lambda: self.engine)
        self.reloads = 0
        self._reload_lock = asyncio.Lock()

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
                None, _prepare, self.config_path, self.updater.state)
        except GLBError as e:  # ConfigError included: its problems, one line
            log.error("reload failed, keeping the running config: %s", "; ".join(str(e).splitlines()))
            return False
        if new.dnsfront.listen != self.config.dnsfront.listen or new.dnsfront.status_listen != self.config.dnsfront.status_listen:
            log.warning("reload: listen addresses changed; restart dnsfront to apply them")
        engine.take_counters(self.engine)  # a reload must not reset the metrics
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
                "tcp_idle_closed": sc.tcp_idle_closed,
                "tcp_queries": sc.tcp_queries,
                "tcp_open": sc.tcp_open,
            },
        }


def _prepare(config_path: str, state: DeploymentState | None) -> tuple[Config, Engine]:
    """A new config and its engine, fully built from ``state`` (run in a thread)."""
    config = configmod.load(config_path)
    engine = Engine(config)
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


def _worker_main(config_path: str, index: int, log_level: str, conn: Connection) -> None:
    """Entry point of a worker process (spawned: nothing inherited but args)."""
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s %(name)s[w{index}]: %(message)s")
    # The supervisor handles Ctrl-C for the group; a worker waits for SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(_worker_async(config_path, index, conn))
    except GLBError as e:
        with suppress(OSError):
            conn.send(("error", str(e)))
    except Exception as e:  # noqa: BLE001 - report, the parent prints it
        with suppress(OSError):
            conn.send(("error", f"internal error: {type(e).__name__}: {e}"))


async def _worker_async(config_path: str, index: int, conn: Connection) -> None:
    config = configmod.load(config_path)
    worker = Worker(config_path, config, index)
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


class _Child:
    def __init__(self, ctx: Any, config_path: str, index: int, log_level: str):
        self.index = index
        parent, child = ctx.Pipe(duplex=False)
        self.conn: Connection = parent
        self.proc = ctx.Process(target=_worker_main, args=(config_path, index, log_level, child),
                                name=f"dnsfront-worker-{index}", daemon=True)
        self.proc.start()
        child.close()
        self.report: dict[str, Any] | None = None
        self.report_at = 0.0
        self.ready = False
        self.error: str | None = None

    def poll(self) -> None:
        """Read every message waiting on the pipe (non-blocking)."""
        try:
            while self.conn.poll():
                kind, payload = self.conn.recv()
                if kind == "report":
                    self.report, self.report_at = payload, time.time()
                elif kind == "ready":
                    self.ready = True
                elif kind == "error":
                    self.error = payload
        except (EOFError, OSError):
            pass

    def signal(self, sig: int) -> None:
        if self.proc.pid is not None and self.proc.is_alive():
            with suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)


async def _supervise(config_path: str, config: Config, workers: int, log_level: str) -> int:
    ctx = multiprocessing.get_context("spawn")
    children = [_Child(ctx, config_path, i, log_level) for i in range(workers)]

    def stop_all() -> None:
        for c in children:
            c.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for c in children:
            c.proc.join(max(0.0, deadline - time.monotonic()))
            if c.proc.is_alive():
                c.proc.kill()
                c.proc.join(1.0)

    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(c.ready for c in children):
            for c in children:
                c.poll()
                if c.error or (not c.proc.is_alive() and not c.ready):
                    c.poll()
                    raise DNSFrontError(c.error or f"worker {c.index} exited with code {c.proc.exitcode}")
            if time.monotonic() > deadline:
                raise DNSFrontError(f"workers did not start within {READY_TIMEOUT:.0f}s")
            await asyncio.sleep(0.02)

        def reports() -> list[dict[str, Any]]:
            now = time.time()
            for c in children:
                c.poll()
            return [c.report for c in children if c.report is not None and now - c.report_at < 5 * REPORT_INTERVAL]

        status = StatusServer(config.dnsfront.status_listen, reports, expected_workers=workers)
        await status.start()
    except BaseException:
        stop_all()
        raise

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def hup() -> None:
        log.info("SIGHUP: reloading %d workers", len(children))
        for c in children:
            c.signal(signal.SIGHUP)

    _install_signals(loop, stop, hup)
    log.info("dnsfront serving %s with %d workers; status on %s", config.summary(), workers, config.dnsfront.status_listen)
    restarts: list[float] = []
    try:
        while not stop.is_set():
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            for i, c in enumerate(children):
                c.poll()
                if c.proc.is_alive() or stop.is_set():
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > 5 * workers:
                    log.error("workers keep dying (%d restarts in 60 s); giving up", len(restarts))
                    return 1
                log.error("worker %d (pid %s) exited with code %s; restarting it", c.index, c.proc.pid, c.proc.exitcode)
                children[i] = _Child(ctx, config_path, c.index, log_level)
    finally:
        log.info("dnsfront stopping %d workers", len(children))
        await status.stop()
        await loop.run_in_executor(None, stop_all)
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
