"""VRRPv3 advertisements (RFC 5798 section 5) on the wire: encode, decode, validate.

Pure: bytes and addresses in, an :class:`Advertisement` or bytes out. The
socket adapter (:mod:`director.control.vrrp_socket`) hands each received
packet over as a :class:`Received` (source, destination, TTL or hop limit,
VRRP bytes); :func:`decode` applies the checks of RFC 5798 section 7.1 that
need nothing but the packet, and raises :class:`~glb.errors.HAError` whose
``reason`` is the drop counter. The checks that need the router's own
configuration (VRID, address owner, address family) are the state
machine's (:mod:`director.control.vrrp`).

    0                   1                   2                   3
    0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
   |Version| Type  | Virtual Rtr ID|   Priority    |Count IPvX Addr|
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
   |(rsvd) |     Max Adver Int     |          Checksum             |
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
   |                       IPvX Address(es)                        |

The checksum covers the VRRP message and the IPv4 or IPv6 pseudo-header
(RFC 5798 5.2.8, as RFC 2460 8.1): unlike VRRPv2, a v3 packet's checksum
depends on its source and destination addresses, so a packet is encoded per
destination.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from glb.errors import HAError

PROTO = 112
"""IP protocol number of VRRP."""
VERSION = 3
TYPE_ADVERTISEMENT = 1
TTL = 255
"""IPv4 TTL / IPv6 hop limit of every VRRP packet, sent and required (7.1)."""
GROUP_V4 = ipaddress.IPv4Address("224.0.0.18")
GROUP_V6 = ipaddress.IPv6Address("ff02::12")
MAX_INTERVAL_CS = 0x0FFF
"""Max Adver Int is 12 bits of centiseconds (40.95 s)."""
HEADER = 8

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Drop reasons of the codec (each a counter; the state machine adds its own).
BAD_TTL, BAD_VERSION, BAD_TYPE, BAD_LENGTH, BAD_CHECKSUM, BAD_INTERVAL = (
    "ttl", "version", "type", "length", "checksum", "interval_zero",
)


@dataclass(frozen=True)
class Advertisement:
    """One VRRPv3 ADVERTISEMENT, the fields a router acts on."""

    vrid: int
    priority: int
    max_adver_int: int
    """Centiseconds (1..4095)."""
    addresses: tuple[Address, ...]
    """The virtual router's addresses, all of one family."""


@dataclass(frozen=True)
class Received:
    """A VRRP packet as the socket adapter saw it: the IP fields that matter, then the VRRP bytes."""

    src: Address
    dst: Address
    ttl: int
    """IPv4 TTL or IPv6 hop limit."""
    payload: bytes


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header(src: Address, dst: Address, length: int) -> bytes:
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!BBH", 0, PROTO, length)
    return src.packed + dst.packed + struct.pack("!I3xB", length, PROTO)


def encode(adv: Advertisement, src: Address, dst: Address) -> bytes:
    """The VRRP bytes of ``adv`` sent from ``src`` to ``dst`` (the checksum depends on both)."""
    if not 1 <= adv.vrid <= 255 or not 0 <= adv.priority <= 255:
        raise ValueError("vrid is 1..255 and priority 0..255")
    if not 1 <= adv.max_adver_int <= MAX_INTERVAL_CS:
        raise ValueError("max_adver_int is 1..4095 centiseconds")
    if src.version != dst.version or any(a.version != src.version for a in adv.addresses):
        raise ValueError("source, destination and virtual addresses must be of one family")
    body = b"".join(a.packed for a in adv.addresses)
    head = struct.pack("!BBBBHH", VERSION << 4 | TYPE_ADVERTISEMENT, adv.vrid, adv.priority,
                       len(adv.addresses), adv.max_adver_int, 0)
    length = HEADER + len(body)
    csum = checksum(_pseudo_header(src, dst, length) + head + body)
    return head[:6] + struct.pack("!H", csum) + body


def decode(pkt: Received) -> Advertisement:
    """Check ``pkt`` as RFC 5798 7.1 says (TTL, version, type, completeness, checksum) and parse it.

    Raises :class:`HAError` with the drop reason. Also refuses a zero Max
    Adver Int (RFC 9568's erratum 8301 to the same section: a zero interval
    makes every backup's master-down timer zero).
    """
    data = pkt.payload
    if pkt.ttl != TTL:
        raise HAError(BAD_TTL, f"TTL/hop limit {pkt.ttl}, must be 255")
    if len(data) < HEADER:
        raise HAError(BAD_LENGTH, f"{len(data)} bytes, shorter than the header")
    vt, vrid, priority, count, interval, _ = struct.unpack_from("!BBBBHH", data)
    if vt >> 4 != VERSION:
        raise HAError(BAD_VERSION, f"version {vt >> 4}")
    if vt & 0x0F != TYPE_ADVERTISEMENT:
        raise HAError(BAD_TYPE, f"type {vt & 0x0F}")
    size = 4 if pkt.src.version == 4 else 16
    if len(data) != HEADER + count * size:
        raise HAError(BAD_LENGTH, f"{len(data)} bytes for {count} IPv{pkt.src.version} addresses")
    if checksum(_pseudo_header(pkt.src, pkt.dst, len(data)) + data) != 0:
        raise HAError(BAD_CHECKSUM, "checksum does not match")
    interval &= MAX_INTERVAL_CS
    if interval == 0:
        raise HAError(BAD_INTERVAL, "Max Adver Int is 0")
    factory = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
    addresses = tuple(factory(data[HEADER + i * size:HEADER + (i + 1) * size]) for i in range(count))
    return Advertisement(vrid, priority, interval, addresses)


def parse_ipv4(datagram: bytes) -> Received:
    """Split what an IPv4 raw socket returns (the IP header, then VRRP) into a :class:`Received`.

    A datagram too short for its IP header is a ``length`` drop; the IP
    total length bounds the payload (link padding is not VRRP).
    """
    if len(datagram) < 20 or datagram[0] >> 4 != 4:
        raise HAError(BAD_LENGTH, "not an IPv4 datagram")
    ihl = (datagram[0] & 0x0F) * 4
    total = struct.unpack_from("!H", datagram, 2)[0]
    if ihl < 20 or total < ihl or len(datagram) < total:
        raise HAError(BAD_LENGTH, "truncated IPv4 header")
    return Received(
        src=ipaddress.IPv4Address(datagram[12:16]),
        dst=ipaddress.IPv4Address(datagram[16:20]),
        ttl=datagram[8],
        payload=datagram[ihl:total],
    )
