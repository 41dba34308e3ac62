"""The userspace decapsulator's pure core: find and check the inner packet of a tunnelled one.

:func:`decapsulate` takes the bytes a raw socket returned and says where
the inner packet lies and which virtio_net_hdr goes with it, or why it is
dropped (a reason code that indexes the counters). No sockets, no clock;
the loop around it (sockets, the TUN device, counters, signals) is
director/realserver/decap.py.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from typing import NamedTuple

from glb.errors import RealServerError

IPPROTO_IPIP = 4
IPPROTO_IPV6 = 41
IPPROTO_TCP = 6
IPPROTO_UDP = 17

# <linux/virtio_net.h>: struct virtio_net_hdr, host byte order (legacy layout
# the tun driver uses unless TUNSETVNETBE/LE says otherwise).
VNET_HDR = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VNET_NONE = bytes(VNET_HDR.size)

# Counter slots, indexed by the reason codes decapsulate() returns (0 = deliver).
DELIVER = 0
DROP_TRUNCATED = 1
DROP_BAD_HEADER = 2
DROP_BAD_CHECKSUM = 3
DROP_NOT_VIP = 4
DROP_NESTED = 5
DROP_TUN_ERROR = 6
REASONS = {
    DROP_TRUNCATED: "truncated",
    DROP_BAD_HEADER: "bad_header",
    DROP_BAD_CHECKSUM: "bad_checksum",
    DROP_NOT_VIP: "not_vip",
    DROP_NESTED: "nested_tunnel",
    DROP_TUN_ERROR: "tun_write_error",
}

_H = struct.Struct("!H")


class Verdict(NamedTuple):
    """What to do with one received packet: deliver ``buf[start:end]`` after ``vnet``, or drop for ``reason``."""

    reason: int
    start: int = 0
    end: int = 0
    vnet: bytes = VNET_NONE


# Shared verdicts for drops: no allocation on the drop path.
_V_TRUNCATED = Verdict(DROP_TRUNCATED)
_V_BAD_HEADER = Verdict(DROP_BAD_HEADER)
_V_BAD_CHECKSUM = Verdict(DROP_BAD_CHECKSUM)
_V_NOT_VIP = Verdict(DROP_NOT_VIP)
_V_NESTED = Verdict(DROP_NESTED)
_new = tuple.__new__  # builds a Verdict without NamedTuple.__new__'s Python-level call
_IPV4 = struct.Struct("!BxHxxHxBH4s4s")  # ver/ihl, total length, flags/fragment offset, protocol, checksum, src, dst
_IPV6 = struct.Struct("!B3xHB17x16s")  # version/class, payload length, next header, (src skipped) dst
_CSUM_FIELD = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}
_from_bytes = int.from_bytes


def decapsulate(buf, n: int, outer_header: bool, inner_proto: int, vips4: frozenset, vips6: frozenset) -> Verdict:
    """Find and check the inner packet of a tunnelled packet ``buf[:n]``.

    ``outer_header``: the buffer starts with the outer IPv4 header (what an
    ``AF_INET`` raw socket returns); otherwise it starts with the inner
    packet (``AF_INET6`` raw sockets). ``inner_proto`` is the protocol the
    socket was opened for: 4 (IPv4 inside) or 41 (IPv6 inside). ``vips4`` /
    ``vips6`` hold packed addresses. Pure and total: any bytes give a
    Verdict, never an exception. (Written for speed: one ``unpack_from``
    per header, shared drop verdicts.)
    """
    start = 0
    if outer_header:
        if n < 20:
            return _V_TRUNCATED
        start = (buf[0] & 0x0F) << 2
        if start < 20:
            return _V_BAD_HEADER
    avail = n - start
    if inner_proto == IPPROTO_IPIP:
        if avail < 20:
            return _V_TRUNCATED
        b0, total, frag, proto, _, src, dst = _IPV4.unpack_from(buf, start)
        ihl = (b0 & 0x0F) << 2
        if b0 >> 4 != 4 or ihl < 20:
            return _V_BAD_HEADER
        if ihl > avail:
            return _V_TRUNCATED
        if total < ihl:
            return _V_BAD_HEADER
        if total > avail:
            return _V_TRUNCATED
        # Ones' complement sum of the header's 16-bit words == 0xFFFF, computed as the header's
        # value modulo 0xFFFF (2**16 is 1 modulo 0xFFFF): one C call instead of a Python sum.
        if _from_bytes(buf[start:start + ihl], "big") % 0xFFFF:
            return _V_BAD_CHECKSUM
        if dst not in vips4:
            return _V_NOT_VIP
        if proto == IPPROTO_IPIP or proto == IPPROTO_IPV6:
            return _V_NESTED
        vnet = VNET_NONE
        coff = _CSUM_FIELD.get(proto)
        if coff is not None and not frag & 0x3FFF and total - ihl >= coff + 2:
            # An unfragmented TCP/UDP packet: is its checksum only the pseudo-header sum (offload never ran)?
            # (src + dst + protocol + length) folded, the same modulo trick; 0 stands for 0xFFFF.
            p = (_from_bytes(buf[start + 12:start + 20], "big") + proto + total - ihl) % 0xFFFF or 0xFFFF
            if _H.unpack_from(buf, start + ihl + coff)[0] == p:
                vnet = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, ihl, coff)
        return _new(Verdict, (DELIVER, start, start + total, vnet))
    if inner_proto == IPPROTO_IPV6:
        if avail < 40:
            return _V_TRUNCATED
        b0, plen, nh, dst = _IPV6.unpack_from(buf, start)
        if b0 >> 4 != 6:
            return _V_BAD_HEADER
        if plen == 0:  # a jumbogram (hop-by-hop option) or garbage: not something a director sends
            return _V_BAD_HEADER
        if 40 + plen > avail:
            return _V_TRUNCATED
        if dst not in vips6:
            return _V_NOT_VIP
        if nh == IPPROTO_IPIP or nh == IPPROTO_IPV6:
            return _V_NESTED
        vnet = VNET_NONE
        coff = _CSUM_FIELD.get(nh)
        if coff is not None and plen >= coff + 2:
            p = (_from_bytes(buf[start + 8:start + 40], "big") + nh + plen) % 0xFFFF or 0xFFFF
            if _H.unpack_from(buf, start + 40 + coff)[0] == p:
                vnet = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 40, coff)
        return _new(Verdict, (DELIVER, start, start + 40 + plen, vnet))
    return _V_BAD_HEADER


def packed_vips(vips: Iterable[str]) -> tuple[frozenset, frozenset]:
    """Split VIP strings into packed IPv4 and IPv6 address sets; RealServerError on a bad one."""
    v4, v6 = set(), set()
    for text in vips:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            raise RealServerError(f"bad VIP {text!r}: expected an IPv4 or IPv6 address") from None
        (v4 if addr.version == 4 else v6).add(addr.packed)
    return frozenset(v4), frozenset(v6)
