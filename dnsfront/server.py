"""UDP and TCP listeners: the I/O adapter around ``answers.Engine``.

UDP does not use asyncio's datagram protocol: its per-packet callbacks and
futures cost about 3x the whole fast path. Instead each UDP socket is
non-blocking, registered with ``loop.add_reader``, and each readiness event
drains up to ``UDP_BATCH`` datagrams with plain ``recvfrom``/``sendto`` calls,
which is as fast as a blocking loop under load and still lets TCP, the status
server and the state follower share one thread (so swapping the answer
table needs no locks).

TCP follows RFC 7766: several queries per connection, answered in order as
soon as each is complete (pipelining), length prefixes split across
segments, an idle timeout, a per-worker connection cap and a per-source one
(``tcp_max_per_source``), and a bound on unsent responses (a client that
stops reading is disconnected). TCP answers are never rate-limited: a TCP
client's address is proven by the handshake.

UDP answers are rate-limited by the engine (``dnsfront.rrl``) when RRL is
on; this server keeps the limiter's clock.

Every listening socket sets SO_REUSEPORT so ``--workers N`` processes can
bind the same address and the kernel spreads clients across them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from glb.config import DNSFrontConfig, ListenAddress
from glb.errors import DNSFrontError

from dnsfront.rrl import RateLimiter

log = logging.getLogger("glb.dnsfront")

UDP_BATCH = 256
"""Datagrams handled per readiness event before yielding to other tasks."""
UDP_RECV_SIZE = 65535
TCP_MAX_PENDING_WRITE = 256 * 1024
"""Unsent response bytes per TCP connection before we stop serving it."""

Handler = Callable[[bytes, Any, bool], "bytes | None"]


class ServerCounters:
    """Transport-level counters (the engine counts DNS-level ones)."""

    def __init__(self) -> None:
        self.udp_send_errors = 0
        self.tcp_accepted = 0
        self.tcp_refused = 0
        self.tcp_refused_source = 0
        self.tcp_queries = 0
        self.tcp_idle_closed = 0
        self.tcp_open = 0


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bind(addr: ListenAddress, kind: int) -> socket.socket:
    sock = socket.socket(_family(addr.host), kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if sock.family == socket.AF_INET6:
            # "::" serves IPv6 only; "0.0.0.0" is listed separately for IPv4.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_DGRAM:
            # A deeper receive queue absorbs bursts while we are busy elsewhere.
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            except OSError:
                pass
        sock.bind((addr.host, addr.port))
        sock.setblocking(False)
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
    except OSError as e:
        sock.close()
        proto = "udp" if kind == socket.SOCK_DGRAM else "tcp"
        raise DNSFrontError(f"cannot listen on {addr}/{proto}: {e.strerror or e}") from None
    return sock


def probe_listen(addresses: tuple[ListenAddress, ...]) -> None:
    """Fail if another process already serves one of ``addresses``.

    Our sockets set SO_REUSEPORT (for --workers), which would also let a
    second dnsfront bind the same port silently and steal half the queries.
    A probe bound *without* SO_REUSEPORT fails against any existing socket,
    so the supervisor (or the single process) probes once before binding.
    """
    for addr in addresses:
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            sock = socket.socket(_family(addr.host), kind)
            try:
                if sock.family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if kind == socket.SOCK_STREAM:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
                sock.bind((addr.host, addr.port))
            except OSError as e:
                proto = "udp" if kind == socket.SOCK_DGRAM else "tcp"
                raise DNSFrontError(f"cannot listen on {addr}/{proto}: {e.strerror or e}") from None
            finally:
                sock.close()


class DNSServer:
    """Serves ``handler`` on every ``listen`` address over UDP and TCP."""

    def __init__(self, config: DNSFrontConfig, handler: Handler, limiter: RateLimiter | None = None):
        self.config = config
        self.handler = handler
        """Replaceable at any time (reload); read once per datagram batch / TCP message."""
        self.limiter = limiter
        """The engine's response rate limiter (None: off), whose clock this server keeps."""
        self.counters = ServerCounters()
        self._per_source: dict[str, int] = {}
        self._udp: list[socket.socket] = []
        self._tcp: list[asyncio.AbstractServer] = []
        self._conns: set[_TCPConnection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) actually bound for UDP (useful with port 0 in tests)."""
        return [s.getsockname()[:2] for s in self._udp]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            for addr in self.config.listen:
                udp = _bind(addr, socket.SOCK_DGRAM)
                self._udp.append(udp)
                self._loop.add_reader(udp.fileno(), self._on_udp, udp)
                # TCP on the same port as UDP (port 0: the one UDP got).
                port = udp.getsockname()[1]
                tcp = _bind(ListenAddress(addr.host, port), socket.SOCK_STREAM)
                server = await self._loop.create_server(lambda: _TCPConnection(self), sock=tcp)
                self._tcp.append(server)
        except BaseException:
            await self.stop()
            raise
        log.info("dnsfront listening on %s (udp+tcp)", ", ".join(f"{h}:{p}" for h, p in self.addresses))

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        for s in self._udp:
            if self._loop is not None:
                self._loop.remove_reader(s.fileno())
            s.close()
        self._udp.clear()
        for server in self._tcp:
            server.close()
        for c in list(self._conns):
            c.close()
        for server in self._tcp:
            try:
                await asyncio.wait_for(server.wait_closed(), 1.0)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - shutting down anyway
                pass
        self._tcp.clear()

    # -- UDP

    def _on_udp(self, sock: socket.socket) -> None:
        recv, send = sock.recvfrom, sock.sendto
        handle = self.handler
        if self.limiter is not None:
            # The engine rate-limits UDP answers (on its fast path); the time is
            # read once per batch: a batch takes well under a millisecond.
            self.limiter.tick(time.monotonic())
        for _ in range(UDP_BATCH):
            try:
                data, addr = recv(UDP_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. ECONNREFUSED from an earlier ICMP: not fatal
            out = handle(data, addr, False)
            if out is not None:
                try:
                    send(out, addr)
                except OSError:
                    self.counters.udp_send_errors += 1

    # -- TCP bookkeeping

    def _opened(self, conn: _TCPConnection) -> bool:
        if len(self._conns) >= self.config.tcp_max_connections:
            self.counters.tcp_refused += 1
            return False
        # One source must not take the whole per-worker budget (slowloris-style).
        host = conn.peer[0] if conn.peer else ""
        n = self._per_source.get(host, 0)
        if n >= self.config.tcp_max_per_source:
            self.counters.tcp_refused_source += 1
            return False
        self._per_source[host] = n + 1
        self._conns.add(conn)
        self.counters.tcp_accepted += 1
        self.counters.tcp_open = len(self._conns)
        return True

    def _closed(self, conn: _TCPConnection) -> None:
        self._conns.discard(conn)
        host = conn.peer[0] if conn.peer else ""
        n = self._per_source.get(host, 0) - 1
        if n > 0:
            self._per_source[host] = n
        else:
            self._per_source.pop(host, None)
        self.counters.tcp_open = len(self._conns)


class _TCPConnection(asyncio.Protocol):
    """One DNS-over-TCP client (RFC 7766)."""

    def __init__(self, server: DNSServer):
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self.idle: asyncio.TimerHandle | None = None
        self.paused = False
        self.accepted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        if not self.server._opened(self):
            transport.abort()  # over the cap: close at once (RFC 7766 6.2.2 allows it)
            return
        self.accepted = True
        self._arm()

    def _arm(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        loop = asyncio.get_running_loop()
        self.idle = loop.call_later(self.server.config.tcp_idle_timeout, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self.server.counters.tcp_idle_closed += 1
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._arm()
        buf = self.buf
        handle = self.server.handler
        pos = 0
        # Answer every complete message; a partial one (even a split length
        # prefix) waits in the buffer for the next segment.
        while len(buf) - pos >= 2:
            length = (buf[pos] << 8) | buf[pos + 1]
            if len(buf) - pos - 2 < length:
                break
            msg = bytes(buf[pos + 2 : pos + 2 + length])
            pos += 2 + length
            self.server.counters.tcp_queries += 1
            out = handle(msg, self.peer, True)
            if out is not None and self.transport is not None:
                self.transport.write(struct.pack("!H", len(out)) + out)
        if pos:
            del buf[:pos]
        if self.transport is not None and self.transport.get_write_buffer_size() > TCP_MAX_PENDING_WRITE:
            log.debug("tcp client %s is not reading its answers; closing", self.peer)
            self.transport.abort()

    def pause_writing(self) -> None:
        # The client reads slower than it asks: stop reading its queries.
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # close once our answers are written

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle is not None:
            self.idle.cancel()
        if self.accepted:
            self.server._closed(self)
        self.transport = None
