"""Datagram channels, the interface both pair protocols (VRRP, connection sync) talk through, and their in-memory fake.

A channel does three things: ``recv()`` the next packet as a
:class:`~director.control.vrrp_packet.Received` (source, destination, TTL,
payload), ``send(dst, payload)``, ``close()``, and keeps ``counters`` of
what it dropped before anyone saw it. The real ones are
:class:`~director.control.vrrp_socket.RawChannel` (IP protocol 112) and
:class:`~director.control.sync_socket.UDPChannel`; :class:`MemoryLAN` is the
fake every unit test uses.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from typing import Any, Callable, Protocol

from director.control import vrrp_packet as wire
from director.control.vrrp_packet import Address, Received
from glb.errors import HAError

QUEUE = 256
"""Packets waiting for their reader; beyond it they are dropped and counted (``queue_full``)."""


class Channel(Protocol):
    counters: Counter

    async def recv(self) -> Received: ...

    def send(self, dst: Address, payload: bytes) -> None: ...

    def close(self) -> None: ...


class QueuedReader:
    """Drains a non-blocking socket when the loop says it is readable; ``parse`` turns each packet into a Received.

    A packet ``parse`` refuses (:class:`HAError`) is counted under its reason.
    """

    def __init__(self, sock: socket.socket, parse: Callable[[bytes, Any, Any], Received], counters: Counter) -> None:
        self.sock, self.parse, self.counters = sock, parse, counters
        sock.setblocking(False)
        self._queue: asyncio.Queue[Received] = asyncio.Queue(QUEUE)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data, anc, _, addr = self.sock.recvmsg(65535, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.counters["recv_error"] += 1
                return
            try:
                pkt = self.parse(data, anc, addr)
            except HAError as e:
                self.counters[e.reason] += 1
                continue
            try:
                self._queue.put_nowait(pkt)
            except asyncio.QueueFull:
                self.counters["queue_full"] += 1

    async def get(self) -> Received:
        return await self._queue.get()

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


class MemoryLAN:
    """An in-memory LAN for unit tests: channels hear each other's multicast and their own unicast."""

    def __init__(self) -> None:
        self.channels: list[MemoryChannel] = []
        self.sent: list[tuple[Address, Address, bytes]] = []
        """Every (source, destination, payload) sent, in order."""

    def channel(self, address: Address) -> MemoryChannel:
        ch = MemoryChannel(self, address)
        self.channels.append(ch)
        return ch

    def deliver(self, src: Address, dst: Address, payload: bytes, ttl: int = wire.TTL) -> None:
        """Hand ``payload`` to every other channel (multicast ``dst``) or to ``dst``'s."""
        self.sent.append((src, dst, payload))
        for ch in self.channels:
            if ch.address != src and (dst.is_multicast or dst == ch.address):
                ch.inbox.put_nowait(Received(src, dst, ttl, payload))


class MemoryChannel:
    def __init__(self, lan: MemoryLAN, address: Address) -> None:
        self.lan = lan
        self.address = address
        self.counters: Counter = Counter()
        self.inbox: asyncio.Queue[Received] = asyncio.Queue()

    async def recv(self) -> Received:
        return await self.inbox.get()

    def send(self, dst: Address, payload: bytes) -> None:
        self.lan.deliver(self.address, dst, payload)

    def close(self) -> None:
        if self in self.lan.channels:
            self.lan.channels.remove(self)
