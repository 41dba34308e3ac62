"""TCP and plain-HTTP probes driven by event-loop callbacks: no task, no transport.

Profiling a director with 1,000 real servers (docs/benchmarks.md) showed most
of its time in asyncio's machinery around each probe, not in the probe: a task
per check, ``wait_for``'s inner task, ``create_connection``'s address checks,
a transport and a protocol object, ``asyncio.timeout``. A TCP check is one
non-blocking ``connect``; an HTTP check is that plus one ``send`` and a few
``recv``. Here each is a small object holding a socket, one epoll
registration and one deadline (on a ``TimerHeap``, not a loop timer each),
that calls ``done(token, result)`` once.

The timeout is measured on the probe itself. When its timer fires, the socket
is polled first (a connection the kernel completed, or a reply that arrived,
while the event loop was busy elsewhere is a success, not a timeout); and a
timer that fired later than the check's own timeout past its deadline means
the event loop, not the server, was slow: the result says ``stalled`` and the
checker does not count it (``director.control.checker``).

The sockets are watched by one ``Poller``: an epoll set of its own, itself
one reader on the event loop. At 5,000 checks a second asyncio's
``add_writer``/``remove_writer`` (a selector key, a handle and a transport
check per call, twice per probe) and one loop callback per socket were the
largest Python share of a check (cProfile, docs/benchmarks.md); one epoll
wakeup now serves every socket that is ready, through a dict lookup each.
The socket is a bare ``_socket.socket`` (no ``socket.socket`` wrapper to
build and close in Python), and a probe reports ``done(token, result)`` to a
callback the caller made once, not a closure per check.

``start(poller, timers, check, address, port, done, token)`` returns a cancel
function, or None when the check has no callback probe here (HTTPS, DNS, UDP,
exec: those stay coroutines in ``director.control.probes``). ``STARTERS`` is
the registry.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from director.control.timerheap import Entry, TimerHeap
from glb.config import HealthCheck, HttpCheck

DETAIL_MAX = 160
"""Characters of a result's detail kept (for /status and the logs)."""
BODY_LIMIT = 1 << 20
"""Bytes of an HTTP response searched for ``expect_body`` (as probes.BODY_LIMIT)."""
USER_AGENT = "glb-director-healthcheck"

Done = Callable[[Any, "FastResult"], None]
"""``done(token, result)``: one callback for every probe; ``token`` says whose result it is."""
_RESET = struct.pack("ii", 1, 0)
"""SO_LINGER on, 0 s: close() sends a reset."""


def one_line(text: str) -> str:
    """``text`` on one line of at most ``DETAIL_MAX`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= DETAIL_MAX else line[: DETAIL_MAX - 3] + "..."


class FastResult:
    """What a callback probe reports: ``probes.ProbeResult``'s fields, in a
    plain slotted object (a frozen dataclass costs more to build, and every
    detail here is one short line already), passed on as it is."""

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


class Poller:
    """One epoll set for every callback probe of a loop, one reader on the loop.

    ``watch(fd, events, probe)`` arms ``probe.on_event()`` for ``fd``; a
    descriptor leaves the set when its socket is closed (epoll drops closed
    files), so ``forget`` only drops the dict entry.
    """

    MAX_EVENTS = 1024
    """Events taken per ``epoll_wait``; more wait for the next loop iteration."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._epoll = select.epoll()
        self._probes: dict[int, _Probe] = {}
        loop.add_reader(self._epoll.fileno(), self._ready)

    def __len__(self) -> int:
        return len(self._probes)

    def watch(self, fd: int, events: int, probe: "_Probe") -> None:
        if fd in self._probes:
            self._epoll.modify(fd, events)
        else:
            self._epoll.register(fd, events)
        self._probes[fd] = probe

    def forget(self, fd: int) -> None:
        """``fd`` is about to be closed (that removes it from the epoll set)."""
        self._probes.pop(fd, None)

    def _ready(self) -> None:
        probes = self._probes
        for fd, _ in self._epoll.poll(0, self.MAX_EVENTS):
            # Absent: its probe ended earlier in this batch (a timeout, a cancel).
            probe = probes.get(fd)
            if probe is not None:
                try:
                    probe.on_event()
                except Exception as e:  # noqa: BLE001 - a probe must end, or its place in max_probes is lost
                    probe.finish(False, f"probe error: {type(e).__name__}")

    def close(self) -> None:
        if self._epoll.closed:
            return
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._probes.clear()


class _Probe:
    """One connect (and, for HTTP, one exchange) with a deadline."""

    __slots__ = ("loop", "poller", "timers", "check", "done", "token", "sock", "fd", "t0", "deadline", "timer",
                 "watching", "finished")

    def __init__(self, poller: Poller, timers: TimerHeap, loop: asyncio.AbstractEventLoop, check: HealthCheck,
                 done: Done, token: Any):
        self.loop = loop
        self.poller = poller
        self.timers = timers
        self.check = check
        self.done = done
        self.token = token
        self.sock: _socket.socket | None = None
        self.fd = -1
        self.t0 = time.perf_counter()
        self.deadline = loop.time() + check.timeout
        self.timer: Entry | None = None
        self.watching = ""  # "", "w" (writable) or "r" (readable)
        self.finished = False

    def begin(self, address: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
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
            self.watch("w")

    def watch(self, kind: str) -> None:
        self.poller.watch(self.fd, select.EPOLLOUT if kind == "w" else select.EPOLLIN, self)
        self.watching = kind

    def on_event(self) -> None:
        (self.on_writable if self.watching == "w" else self.on_readable)()

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
                self.on_event()
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
        self.done(self.token, FastResult(ok, detail, time.perf_counter() - self.t0, stalled))

    def close(self) -> None:
        self.finished = True
        if self.watching:
            self.poller.forget(self.fd)
            self.watching = ""
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

    def __init__(self, poller: Poller, timers: TimerHeap, loop: asyncio.AbstractEventLoop, check: HttpCheck,
                 done: Done, token: Any, address: str, port: int):
        super().__init__(poller, timers, loop, check, done, token)
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
        self.watch("r")

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
            self.finish(False, one_line(f"HTTP {self.status}, body lacks {check.expect_body!r}"))


def _start_tcp(poller, timers, loop, check, address, port, done, token) -> _Probe:
    p = _Probe(poller, timers, loop, check, done, token)
    p.begin(address, port)
    return p


def _start_http(poller, timers, loop, check, address, port, done, token) -> _Probe:
    p = _Http(poller, timers, loop, check, done, token, address, port)
    p.begin(address, port)
    return p


STARTERS: dict[str, Callable[..., _Probe]] = {"tcp": _start_tcp, "http": _start_http}
"""Check types with a callback probe; every other type runs as a coroutine."""


def start(poller: Poller, timers: TimerHeap, check: HealthCheck, address: str, port: int,
          done: Done, token: Any = None) -> Callable[[], None] | None:
    """Start ``check`` against ``address:port``, its socket on ``poller`` and
    its deadline on ``timers`` (both of the running loop); ``done(token,
    result)`` is called once, possibly before this returns (an immediate
    refusal), never after a cancel. Returns the cancel function, or None if
    this check type has no callback probe."""
    starter = STARTERS.get(check.type)
    if starter is None:
        return None
    return starter(poller, timers, asyncio.get_running_loop(), check, address, port, done, token).close
