"""The VRRP socket adapter: raw IP protocol 112 on one interface, and an in-memory LAN for tests.

A channel does three things: :meth:`recv` the next packet as a
:class:`~director.control.vrrp_packet.Received`, :meth:`send` bytes to an
address, :meth:`close`. The state machine (:mod:`director.control.vrrp`)
never sees a socket; the speaker (:mod:`director.control.vrrp_speaker`)
moves bytes between the two.

:class:`RawChannel` is the real one. Per RFC 5798 5.1 and what keepalived
does:

* IPv4: a raw socket bound to the interface (``SO_BINDTODEVICE``) that
  joined 224.0.0.18 there; TTL and multicast TTL 255; the source address is
  pinned per packet with ``IP_PKTINFO``, because a VRRPv3 checksum covers it.
  The kernel hands the IP header over, :func:`parse_ipv4` takes TTL and
  addresses from it;
* IPv6: joined ff02::12, hop limits 255, ``IPV6_RECVHOPLIMIT`` and
  ``IPV6_RECVPKTINFO`` so the hop limit and destination come with each
  packet, ``IPV6_PKTINFO`` on send for the (link-local) source. The kernel
  is not asked to check the checksum (``IPV6_CHECKSUM``), so a bad one is
  counted by the core instead of vanishing;
* multicast loop off: a speaker never hears itself.

Advertisements go from the interface's own MAC, not the virtual router MAC
00-00-5E-00-01-{VRID} (keepalived's default without ``use_vmac``): VIP
ownership is announced by gratuitous ARP / unsolicited NA from the master.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections import Counter

from director.control import vrrp_packet as wire
from director.control.vrrp_packet import Address, Received
from glb.errors import HAError

IP_PKTINFO = 8  # <linux/in.h>; the socket module does not export it
_QUEUE = 256
"""Packets waiting for the speaker; beyond it they are dropped and counted (``queue_full``)."""


class RawChannel:
    """IP protocol 112 on ``interface``, from ``address``; multicast group, plus unicast peers' replies."""

    def __init__(self, interface: str, address: Address) -> None:
        self.interface = interface
        self.address = address
        self.counters: Counter = Counter()
        """Packets dropped before the core saw them (``length``: not an IP datagram; ``queue_full``)."""
        try:
            self.ifindex = socket.if_nametoindex(interface)
            self.sock = self._open_v4() if address.version == 4 else self._open_v6()
        except OSError as e:
            raise HAError("socket", f"VRRP socket on {interface}: {e.strerror or e}") from None
        self.sock.setblocking(False)
        self._queue: asyncio.Queue[Received] = asyncio.Queue(_QUEUE)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def _open_v4(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, wire.PROTO)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.interface.encode())
        mreqn = struct.pack("4s4si", wire.GROUP_V4.packed, self.address.packed, self.ifindex)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, wire.TTL)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, wire.TTL)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        return s

    def _open_v6(self) -> socket.socket:
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, wire.PROTO)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.interface.encode())
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, struct.pack("16sI", wire.GROUP_V6.packed, self.ifindex))
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self.ifindex)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, wire.TTL)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, wire.TTL)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        return s

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
                pkt = wire.parse_ipv4(data) if self.address.version == 4 else _v6_received(data, anc, addr)
            except HAError as e:
                self.counters[e.reason] += 1
                continue
            try:
                self._queue.put_nowait(pkt)
            except asyncio.QueueFull:
                self.counters["queue_full"] += 1

    async def recv(self) -> Received:
        return await self._queue.get()

    def send(self, dst: Address, payload: bytes) -> None:
        """Send one VRRP message to ``dst`` from our address; a full or failing socket costs this packet only."""
        try:
            if dst.version == 4:
                info = struct.pack("I4s4s", self.ifindex, self.address.packed, b"\0" * 4)
                self.sock.sendmsg([payload], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, (str(dst), 0))
            else:
                info = struct.pack("16sI", self.address.packed, self.ifindex)
                self.sock.sendmsg([payload], [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info)], 0,
                                  (str(dst), 0, 0, self.ifindex))
        except OSError:
            self.counters["send_error"] += 1

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


def _v6_received(data: bytes, ancillary, addr) -> Received:
    ttl, dst = -1, None
    for level, kind, value in ancillary:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_HOPLIMIT:
            ttl = struct.unpack("i", value[:4])[0]
        elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            dst = ipaddress.IPv6Address(value[:16])
    if dst is None or ttl < 0:
        raise HAError(wire.BAD_LENGTH, "IPv6 packet without hop limit or destination")
    return Received(ipaddress.IPv6Address(addr[0].split("%")[0]), dst, ttl, data)


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
