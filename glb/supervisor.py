"""Worker processes for dnsfront and the director: spawn, ready handshake, restart, stop.

A worker is ``target(*args(index), conn)`` in a spawned process, with
``conn`` its end of a duplex pipe. It sends ``("ready", payload)`` once it
serves, or ``("error", message)`` and exits if it cannot start; everything
it sends after that goes to ``on_message``. It leaves on SIGTERM.

The supervisor (:class:`Supervisor`, the adapter) starts ``workers`` of
them and waits for each one's handshake; when one dies it is started again
after a backoff, and when they keep dying the supervisor gives up (``failed``)
instead of burning a CPU on restarts. Stopping sends SIGTERM and kills
whatever is still alive at the deadline. Which restart happens when is the
pure :class:`RestartBook` (time passed in), unit-tested without processes.

``serial``: at most one worker starting at a time, in index order at start.
The director needs it: its workers join a PACKET_FANOUT group, whose
members the kernel keeps in join order (director/dataplane/fanout.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable

from glb.errors import SupervisorError

log = logging.getLogger("glb.supervisor")


@dataclass(frozen=True)
class RestartPolicy:
    """When a dead worker is started again."""

    backoff: float = 0.1
    """Delay before the first restart of a worker; doubled for each quick death in a row."""
    backoff_max: float = 5.0
    stable_after: float = 30.0
    """A worker that lived this long died of something new: its backoff starts over."""
    window: float = 60.0
    crash_limit: int = 5
    """More than crash_limit x workers deaths within ``window`` seconds: a crash loop, give up."""


class RestartBook:
    """Restart decisions (pure): who restarts when, and when to give up."""

    def __init__(self, policy: RestartPolicy, workers: int) -> None:
        self.policy = policy
        self.workers = workers
        self.restarts = [0] * workers
        """Restarts per worker since the start (/status shows them)."""
        self._started = [0.0] * workers
        self._delay = [0.0] * workers
        self._deaths: list[float] = []

    def started(self, index: int, now: float) -> None:
        self._started[index] = now

    def died(self, index: int, now: float) -> float | None:
        """When to start ``index`` again, or None: a crash loop, stop restarting."""
        p = self.policy
        self._deaths = [t for t in self._deaths if now - t < p.window] + [now]
        if len(self._deaths) > p.crash_limit * self.workers:
            return None
        if now - self._started[index] >= p.stable_after or self._delay[index] == 0.0:
            self._delay[index] = p.backoff
        else:
            self._delay[index] = min(self._delay[index] * 2, p.backoff_max)
        self.restarts[index] += 1
        return now + self._delay[index]


class _Child:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx: Any, name: str, target: Callable, args: tuple) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(*args, child), name=name, daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.error: str | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc.pid is not None and self.proc.is_alive():
            with suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)


class Supervisor:
    """Runs ``workers`` copies of ``target``; call :meth:`poll` regularly (or from a thread)."""

    def __init__(
        self,
        name: str,
        target: Callable,
        args: Callable[[int], tuple],
        workers: int,
        *,
        policy: RestartPolicy = RestartPolicy(),
        serial: bool = False,
        ready_timeout: float = 30.0,
        on_message: Callable[[int, Any], None] | None = None,
        on_ready: Callable[[int, Any], None] | None = None,
        on_exit: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``args(index)`` is called at each (re)start, so a restarted worker gets today's arguments."""
        self.name = name
        self.target = target
        self.args = args
        self.workers = workers
        self.serial = serial
        self.ready_timeout = ready_timeout
        self.on_message = on_message or (lambda i, m: None)
        self.on_ready = on_ready or (lambda i, p: None)
        self.on_exit = on_exit or (lambda i: None)
        self.clock = clock
        self.book = RestartBook(policy, workers)
        self.failed: str | None = None
        """Why the supervisor stopped restarting (a crash loop); None while all is well."""
        self._ctx = multiprocessing.get_context("spawn")
        self._children: list[_Child | None] = [None] * workers
        self._due: dict[int, float] = {}  # index -> when to restart it
        self._starting_since: dict[int, float] = {}
        self._lock = threading.RLock()
        self._stopping = False

    # -- start ----------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        now = self.clock()
        c = _Child(self._ctx, f"{self.name}-{index}", self.target, self.args(index))
        self._children[index] = c
        self._starting_since[index] = now
        self.book.started(index, now)

    def start(self) -> None:
        """Start every worker and wait for their handshakes; SupervisorError if one fails."""
        try:
            for i in range(self.workers):
                self._spawn(i)
                if self.serial:
                    self._await_ready([i])
            self._await_ready(range(self.workers))
        except BaseException:
            self.stop()
            raise

    def _await_ready(self, indexes) -> None:
        deadline = self.clock() + self.ready_timeout
        for i in indexes:
            c = self._children[i]
            assert c is not None
            while not c.ready:
                left = deadline - self.clock()
                if left <= 0:
                    raise SupervisorError(f"{self.name} worker {i} did not start within {self.ready_timeout:g}s")
                wait([c.conn, c.proc.sentinel], min(left, 0.5))
                self._read(i, c)
                if c.error:
                    raise SupervisorError(c.error)
                if not c.ready and not c.proc.is_alive():
                    self._read(i, c)
                    if not c.ready:
                        raise SupervisorError(c.error or f"{self.name} worker {i} exited with code {c.proc.exitcode}"
                                              " while starting")

    # -- run ------------------------------------------------------------------

    def _read(self, i: int, c: _Child) -> bool:
        """Every message waiting on a child's pipe; False once the pipe is closed."""
        try:
            while c.conn.poll():
                msg = c.conn.recv()
                kind = msg[0]
                if kind == "ready" and not c.ready:
                    c.ready = True
                    self._starting_since.pop(i, None)
                    self.on_ready(i, msg[1] if len(msg) > 1 else None)
                elif kind == "error" and not c.ready:
                    c.error = msg[1]
                else:
                    self.on_message(i, msg)
        except (EOFError, OSError):
            return False
        return True

    def poll(self, timeout: float = 0.0) -> None:
        """Handle what the workers sent, bury the dead, restart those due. Waits up to ``timeout``."""
        with self._lock:
            live = [(i, c) for i, c in enumerate(self._children) if c is not None]
        waitables = [c.conn for _, c in live] + [c.proc.sentinel for _, c in live]
        if waitables:
            wait(waitables, timeout)
        elif timeout:
            time.sleep(timeout)
        now = self.clock()
        for i, c in live:
            open_ = self._read(i, c)
            starting = self._starting_since.get(i)
            hung = starting is not None and now - starting > self.ready_timeout
            if hung:
                log.error("%s worker %d did not start within %gs; killing it", self.name, i, self.ready_timeout)
                c.proc.kill()
            if (not open_ or hung or not c.proc.is_alive()) and not self._stopping:
                c.proc.join(1.0)
                if c.proc.is_alive():
                    continue  # the pipe closed first; bury it on the next round
                self._buried(i, c, now)
        self._restart_due(now)

    def _buried(self, i: int, c: _Child, now: float) -> None:
        with self._lock:
            self._children[i] = None
            self._starting_since.pop(i, None)
        c.conn.close()
        self.on_exit(i)
        when = self.book.died(i, now)
        if when is None:
            deaths = self.policy_summary()
            self.failed = f"{self.name} workers keep dying ({deaths}); not restarting them"
            log.error("%s", self.failed)
            return
        log.error("%s worker %d (pid %s) exited with code %s%s; restarting it in %.1fs", self.name, i, c.pid,
                  c.proc.exitcode, f" ({c.error})" if c.error else "", when - now)
        self._due[i] = when

    def policy_summary(self) -> str:
        p = self.book.policy
        return f"more than {p.crash_limit * self.workers} exits in {p.window:g}s"

    def _restart_due(self, now: float) -> None:
        if self.failed or self._stopping:
            return
        for i, when in sorted(self._due.items(), key=lambda x: x[1]):
            if when > now:
                continue
            if self.serial and self._starting_since:
                return  # one at a time
            del self._due[i]
            with self._lock:
                self._spawn(i)

    # -- talk -----------------------------------------------------------------

    def send(self, index: int, msg: Any) -> bool:
        """Send to one worker; False if it is not there (dead, starting over)."""
        with self._lock:
            c = self._children[index]
            if c is None:
                return False
            try:
                c.conn.send(msg)
                return True
            except (BrokenPipeError, OSError):
                return False

    def broadcast(self, msg: Any) -> None:
        for i in range(self.workers):
            self.send(i, msg)

    def signal(self, sig: int) -> None:
        for c in list(self._children):
            if c is not None:
                c.signal(sig)

    @property
    def pids(self) -> list[int | None]:
        return [c.pid if c is not None else None for c in self._children]

    @property
    def restarts(self) -> list[int]:
        return list(self.book.restarts)

    def alive(self, index: int) -> bool:
        c = self._children[index]
        return c is not None and c.ready and c.proc.is_alive()

    # -- stop -----------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every worker; kill those still alive after ``timeout`` seconds."""
        self._stopping = True
        children = [c for c in self._children if c is not None]
        for c in children:
            c.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for c in children:
            c.proc.join(max(0.0, deadline - time.monotonic()))
            if c.proc.is_alive():
                c.proc.kill()
                c.proc.join(1.0)
            c.conn.close()
        with self._lock:
            self._children = [None] * self.workers
