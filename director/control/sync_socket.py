"""Connection sync on the LAN: the UDP channel, and the driver that moves datagrams between it and the pure sync core.

:class:`UDPChannel` is a :class:`~director.control.datagram.Channel` on one
UDP port, bound to the pair's interface, that joined the sync multicast
group there (IPVS's 224.0.0.81:8848 by default) unless the pair is unicast.
Multicast TTL 1 (sync never leaves the LAN) and loop off (a director never
applies its own changes).

:class:`SyncLink` runs a :class:`~director.control.sync.SyncSender` and a
:class:`~director.control.sync.SyncReceiver` over a channel: it sends what
the sender's rate allows to every destination (the group, or each peer),
and applies what arrives while :attr:`SyncLink.accepting` (a backup accepts,
a master does not: the director flips it on each VRRP state change).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import time
from collections import Counter
from typing import Callable

from director.control.datagram import Channel, QueuedReader
from director.control.sync import SyncReceiver, SyncSender, is_hello
from director.control.vrrp_packet import Address, Received
from glb.errors import HAError


class UDPChannel:
    """UDP ``port`` on ``interface`` from ``address``; joined ``group`` if given."""

    def __init__(self, interface: str, address: Address, port: int, group: Address | None = None) -> None:
        self.address, self.port = address, port
        self.counters: Counter = Counter()
        try:
            ifindex = socket.if_nametoindex(interface)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            sock.bind(("", port))
            if group is not None:
                mreqn = struct.pack("4s4si", group.packed, address.packed, ifindex)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        except OSError as e:
            raise HAError("socket", f"sync socket on {interface} port {port}: {e.strerror or e}") from None
        self.sock = sock
        self._reader = QueuedReader(sock, self._parse, self.counters)

    def _parse(self, data: bytes, ancillary, addr) -> Received:
        return Received(ipaddress.ip_address(addr[0]), self.address, 0, data)

    async def recv(self) -> Received:
        return await self._reader.get()

    def send(self, dst: Address, payload: bytes) -> None:
        try:
            self.sock.sendto(payload, (str(dst), self.port))
        except OSError:
            self.counters["send_error"] += 1

    def close(self) -> None:
        self._reader.close()


class SyncLink:
    """Drives sync both ways over one channel until cancelled."""

    def __init__(self, sender: SyncSender, receiver: SyncReceiver, channel: Channel,
                 destinations: tuple[Address, ...], *, clock: Callable[[], float] = time.monotonic) -> None:
        self.sender, self.receiver, self.channel = sender, receiver, channel
        self.destinations = destinations
        self.clock = clock
        self.accepting = False
        """Apply what arrives (a backup); a master's copy of the table is the one being sent."""
        self.accept_until = float("-inf")
        """A new master applies what arrives until then (``clock``) too: the last flows of the member it
        preempted, which that member sends as it yields (director/control/pair.py YIELD_GRACE)."""
        self.counters: Counter = Counter()
        """ignored: datagrams that arrived while not accepting; late: applied as a new master."""
        self.on_hello: Callable[[bytes, Address], None] | None = None
        """Member hellos (sync.is_hello) go here, whatever ``accepting`` says: the master reads them."""
        self._wake = asyncio.Event()

    def poke(self) -> None:
        """Something was queued on the sender: send now if the rate allows."""
        self._wake.set()

    async def run(self) -> None:
        await asyncio.gather(self._send_loop(), self._recv_loop())

    async def _send_loop(self) -> None:
        while True:
            due = self.sender.next_due(self.clock())
            if due is None or due > self.clock():
                self._wake.clear()
                timeout = None if due is None else due - self.clock()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                continue
            for datagram in self.sender.poll(self.clock()):
                for dst in self.destinations:
                    self.channel.send(dst, datagram)

    async def _recv_loop(self) -> None:
        while True:
            pkt = await self.channel.recv()
            if self.on_hello is not None and is_hello(pkt.payload):
                self.on_hello(pkt.payload, pkt.src)
            elif self.accepting:
                self.receiver.apply(pkt.payload, self.clock(), sender=pkt.src)
            elif self.clock() < self.accept_until:
                self.counters["late"] += 1
                self.receiver.apply(pkt.payload, self.clock(), sender=pkt.src)
            else:
                self.counters["ignored"] += 1
