"""The VRRP socket adapter: raw IP protocol 112 on one interface.

A :class:`~director.control.datagram.Channel` (its in-memory fake for tests
is :class:`~director.control.datagram.MemoryLAN`). The state machine (:mod:`director.control.vrrp`)
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

import ipaddress
import socket
import struct
from collections import Counter

from director.control import vrrp_packet as wire
from director.control.datagram import QueuedReader
from director.control.vrrp_packet import Address, Received
from glb.errors import HAError

IP_PKTINFO = 8  # <linux/in.h>; the socket module does not export it


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
        self._reader = QueuedReader(self.sock, self._parse, self.counters)

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

    def _parse(self, data: bytes, ancillary, addr) -> Received:
        return wire.parse_ipv4(data) if self.address.version == 4 else _v6_received(data, ancillary, addr)

    async def recv(self) -> Received:
        return await self._reader.get()

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
        self._reader.close()


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
