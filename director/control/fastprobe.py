"""TCP and plain-HTTP probes driven by event-loop callbacks: no task, no transport.

Profiling a director with 1,000 real servers (docs/benchmarks.md) showed most
of its time in asyncio's machinery around each probe, not in the probe: a task
per check, ``wait_for``'s inner task, ``create_connection``'s address checks,
a transport and a protocol object, ``asyncio.timeout``. A TCP check is one
non-blocking ``connect``; an HTTP check is that plus one ``send`` and a few
``recv``. Here each is a small object holding a socket, one reader or writer
registration and one deadline (on a ``TimerHeap``, not a loop timer each),
that calls ``done(result)`` once.

The timeout is measured on the probe itself. When its timer fires, the socket
is polled first (a connection the kernel completed, or a reply that arrived,
while the event loop was busy elsewhere is a success, not a timeout); and a
timer that fired later than the check's own timeout past its deadline means
the event loop, not the server, was slow: the result says ``stalled`` and the
checker does not count it (``director.control.checker``).

``start(timers, check, address, port, done)`` returns a cancel function, or
None when the check has no callback probe here (HTTPS, DNS, UDP, exec: those
stay coroutines in ``director.control.probes``). ``STARTERS`` is the registry.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
import struct
import time
from collections.abc import Callable

from director.control.timerheap import Entry, TimerHeap
from glb.config import HealthCheck, HttpCheck

BODY_LIMIT = 1 << 20
"""Bytes of an HTTP response searched for ``expect_body`` (as probes.BODY_LIMIT)."""
USER_AGENT = "glb-director-healthcheck"

Done = Callable[["FastResult"], None]
_RESET = struct.pack("ii", 1, 0)
"""SO_LINGER on, 0 s: close() sends a reset."""


class FastResult:
    """What a callback probe reports (``probes.ProbeResult`` plus ``stalled``)."""

    __slots__ = ("ok", "detail", "latency", "stalled")

    def __init__(self, ok: bool, detail: str, latency: float, stalled: bool = False):
        self.ok = ok
        self.detail = detail
        self.latency = latency
        self.stalled = stalled


def _strerror(err: int) -> str:
    if err == errno.ECONNREFUSED:
        return "connection refused"
    if err == errno.ECONNRESET:
        return "connection reset"
    return os.strerror(err).lower()


class _Probe:
    """One connect (and, for HTTP, one exchange) with a deadline."""

    __slots__ = ("loop", "timers", "check", "done", "sock", "fd", "t0", "deadline", "timer", "watching", "finished")

    def __init__(self, timers: TimerHeap, loop: asyncio.AbstractEventLoop, check: HealthCheck, done: Done):
        self.loop = loop
        self.timers = timers
        self.check = check
        self.done = done
        self.sock: socket.socket | None = None
        self.fd = -1
        self.t0 = time.perf_counter()
        self.deadline = loop.time() + check.timeout
        self.timer: Entry | None = None
        self.watching = ""  # "", "w" (writer) or "r" (reader)
        self.finished = False

    def begin(self, address: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:
            self.finish(False, _strerror(e.errno or 0))
            return
        self.sock, self.fd = sock, sock.fileno()
        err = sock.connect_ex((address, port))
        if err not in (0, errno.EINPROGRESS):
            self.finish(False, _strerror(err))
            return
        self.timer = self.timers.call_at(self.deadline, _Probe.on_timeout, self)
        if err == 0:
            self.connected()
        else:
            self.watch("w", self.on_writable)

    def watch(self, kind: str, callback: Callable[[], None]) -> None:
        self.unwatch()
        (self.loop.add_writer if kind == "w" else self.loop.add_reader)(self.fd, callback)
        self.watching = kind

    def unwatch(self) -> None:
        if self.watching == "w":
            self.loop.remove_writer(self.fd)
        elif self.watching == "r":
            self.loop.remove_reader(self.fd)
        self.watching = ""

    def on_writable(self) -> None:
        assert self.sock is not None
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.finish(False, _strerror(err))
        else:
            self.connected()

    def connected(self) -> None:
        assert self.sock is not None
        # Close with a reset, as HAProxy's checks do: no FIN exchange and no
        # TIME_WAIT socket per check (thousands a second would fill the table).
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        self.finish(True, "connected")

    def ready(self) -> bool:
        """Would the socket's pending step complete now? (polled at the deadline)"""
        if self.fd < 0 or not self.watching:
            return False
        # poll, not select: with a thousand probes in flight descriptors pass 1023.
        poller = select.poll()
        poller.register(self.fd, select.POLLIN if self.watching == "r" else select.POLLOUT)
        return bool(poller.poll(0))

    def on_timeout(self) -> None:
        self.timer = None
        # Measured on the probe: give the socket its due before calling it a timeout.
        try:
            while not self.finished and self.ready():
                (self.on_writable if self.watching == "w" else self.on_readable)()
        except Exception as e:  # noqa: BLE001 - a probe must end, or its place in max_probes is lost
            self.finish(False, f"probe error: {type(e).__name__}")
        if self.finished:
            return
        late = self.loop.time() - self.deadline
        self.finish(False, f"timeout after {self.check.timeout:g}s", stalled=late > self.check.timeout)

    def on_readable(self) -> None:  # HTTP only
        raise NotImplementedError

    def finish(self, ok: bool, detail: str, stalled: bool = False) -> None:
        if self.finished:
            return
        self.close()
        self.done(FastResult(ok, detail, time.perf_counter() - self.t0, stalled))

    def close(self) -> None:
        self.finished = True
        self.unwatch()
        if self.timer is not None:
            TimerHeap.cancel(self.timer)
            self.timer = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self.fd = -1


class _Http(_Probe):
    """Plain HTTP/1.0: one request, status line and (if asked) body substring."""

    __slots__ = ("request", "buf", "status", "body_from")

    def __init__(self, timers: TimerHeap, loop: asyncio.AbstractEventLoop, check: HttpCheck, done: Done,
                 address: str, port: int):
        super().__init__(timers, loop, check, done)
        host = check.host or (f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
        self.request = (f"{check.method} {check.path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
                        "Accept: */*\r\nConnection: close\r\n\r\n").encode("latin-1")
        self.buf = b""
        self.status = 0
        self.body_from = 0

    def connected(self) -> None:
        assert self.sock is not None
        try:
            # A request this small fits any socket buffer: one send is the whole of it.
            self.sock.send(self.request)
        except OSError as e:
            self.finish(False, _strerror(e.errno or 0))
            return
        self.watch("r", self.on_readable)

    def on_readable(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            self.finish(False, _strerror(e.errno or 0))
            return
        self.buf += data
        self.verdict(eof=not data)

    def verdict(self, eof: bool) -> None:
        check: HttpCheck = self.check  # type: ignore[assignment]
        if not self.status:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if eof:
                    self.finish(False, "server disconnected")
                return
            line = self.buf.split(b"\r\n", 1)[0].split()
            if len(line) < 2 or not line[0].startswith(b"HTTP/") or not line[1].isdigit():
                self.finish(False, "malformed HTTP response")
                return
            self.status, self.body_from = int(line[1]), end + 4
            if self.status not in check.expect_status:
                want = ",".join(map(str, check.expect_status))
                self.finish(False, f"HTTP {self.status} (expected {want})")
                return
            if check.expect_body is None:
                self.finish(True, f"HTTP {self.status}")
                return
        if check.expect_body.encode() in self.buf[self.body_from:]:
            self.finish(True, f"HTTP {self.status}, body matched")
        elif eof or check.method == "HEAD" or len(self.buf) - self.body_from >= BODY_LIMIT:
            self.finish(False, f"HTTP {self.status}, body lacks {check.expect_body!r}")


def _start_tcp(timers, loop, check, address, port, done) -> _Probe:
    p = _Probe(timers, loop, check, done)
    p.begin(address, port)
    return p


def _start_http(timers, loop, check, address, port, done) -> _Probe:
    p = _Http(timers, loop, check, done, address, port)
    p.begin(address, port)
    return p


STARTERS: dict[str, Callable[..., _Probe]] = {"tcp": _start_tcp, "http": _start_http}
"""Check types with a callback probe; every other type runs as a coroutine."""


def start(timers: TimerHeap, check: HealthCheck, address: str, port: int,
          done: Done) -> Callable[[], None] | None:
    """Start ``check`` against ``address:port``, its deadline on ``timers``
    (of the running loop); ``done`` is called once, possibly before this
    returns (an immediate refusal), never after a cancel. Returns the cancel
    function, or None if this check type has no callback probe."""
    starter = STARTERS.get(check.type)
    if starter is None:
        return None
    return starter(timers, asyncio.get_running_loop(), check, address, port, done).close
