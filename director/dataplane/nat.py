"""NAT's packet rewriting (LVS-NAT): client packets DNAT'd to a real server, its replies SNAT'd back. Pure.

The director sees both directions of a NAT flow:

* **in** (client -> VIP:vport): the destination becomes RIP:rport
  (:func:`translate`, ``dst=True``), the frame goes to the real server's
  MAC from the director's LAN-side MAC;
* **out** (RIP:rport -> client, the real server's reply, which reaches the
  director because it is the real server's gateway): the source becomes
  VIP:vport (``dst=False``) and the frame goes back to the MAC the client's
  packets came from (learnt per connection: the client or its router);
* **ICMP errors** both ways (:func:`translate_icmp`): an error from the
  client's side about a reply (outer destination the VIP, quoting
  VIP:vport -> client) reaches the real server about RIP:rport; an error
  from the real server's side about a client's packet (quoting
  client -> RIP:rport) reaches the client from the VIP, quoting VIP:vport.

Checksums are updated incrementally (RFC 1624): the IPv4 header's, the
TCP/UDP checksum over the pseudo-header and port. A frame from veth/virtio
may carry a *partial* checksum (virtio_net_hdr NEEDS_CSUM: the field holds
only the pseudo-header sum, not complemented; the kernel completes it on
the way out): then only the address change is folded in, plainly, and the
frame leaves with its own virtio_net_hdr (GSO super-frames too, since the
header lengths do not change). IPv4 UDP without a checksum (0) keeps none.
ICMP errors get their ICMP checksum recomputed (the quote changed).

Replies are parsed by :func:`parse_reply` (the codec's :func:`~codec.parse`
only takes packets to a VIP): a TCP/UDP packet from a NAT real server
address, or an ICMP error quoting a packet to one. Its ``key`` is the flow's
key as the real server's packets carry it (``codec.flow_key(proto, RIP,
client, rport, cport)``), under which the connection table indexes NAT flows
(``ConnTable.reply``).
"""

from __future__ import annotations

import struct

from director.dataplane import codec
from director.dataplane.codec import (
    FIRST_FRAGMENT,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    LATER_FRAGMENT,
    NOT_FRAGMENT,
    REPLY,
    REPLY_ICMP_ERROR,
    Drop,
    Packet,
)

_new = tuple.__new__
_U16 = struct.Struct("!H")
_KEY4 = struct.Struct("!B4s4sHH")
_KEY6 = struct.Struct("!B16s16sHH")


_from = int.from_bytes


def adjust(field: int, old, new, partial: bool = False) -> int:
    """A checksum field after ``old`` bytes it covers became ``new`` (RFC 1624 eqn. 3).

    ``partial``: the field holds a pseudo-header sum to be completed later
    (not complemented), so the change is added plainly. Ones' complement
    sums are sums modulo 0xFFFF (2**16 = 1 mod 0xFFFF), so whole byte
    strings are read as one integer each (C speed); a sum that is 0 modulo
    0xFFFF is 0xFFFF, as an end-around-carry sum of something nonzero is.
    """
    start = field if partial else ~field & 0xFFFF
    r = (start + _from(new, "big") - _from(old, "big")) % 0xFFFF or 0xFFFF
    return r if partial else ~r & 0xFFFF


def _l4(buf, family: int, end: int):
    """(protocol, L4 offset, fragment kind) of the IP packet at ``buf[14:end]``, or a Drop."""
    if family == 4:
        frag = _U16.unpack_from(buf, 20)[0]
        kind = LATER_FRAGMENT if frag & 0x1FFF else (FIRST_FRAGMENT if frag & 0x2000 else NOT_FRAGMENT)
        return buf[23], 14 + ((buf[14] & 15) << 2), kind
    nh = buf[20]
    if nh == IPPROTO_TCP or nh == IPPROTO_UDP:
        return nh, 54, NOT_FRAGMENT
    walked = codec._walk6(buf, nh, 54, end)
    if walked.__class__ is Drop:
        return walked
    return walked[0], walked[1], walked[2]


def _csum_field(proto: int, l4: int) -> int:
    return l4 + (16 if proto == IPPROTO_TCP else 6)


def _copy_swapping(frame, p: Packet, vnet: bytes, eth: bytes, addr: bytes, dst: bool):
    """(the frame copied behind ``vnet`` with ``eth`` as its MACs and its destination
    (``dst``) or source address replaced, a view of the frame in it, the old address);
    the IPv4 header checksum adjusted."""
    end = 14 + p.length
    out = bytearray(codec.VNET_HDR_LEN + end)
    out[0:10] = vnet
    buf = memoryview(out)[10:]
    buf[0:12] = eth
    buf[12:end] = frame[12:end]
    if p.family == 4:
        a = 30 if dst else 26
        old = bytes(buf[a:a + 4])
        buf[a:a + 4] = addr
        _U16.pack_into(buf, 24, adjust(_U16.unpack_from(buf, 24)[0], old, addr))
    else:
        a = 38 if dst else 22
        old = bytes(buf[a:a + 16])
        buf[a:a + 16] = addr
    return out, buf, old


def translate(frame, p: Packet, eth: bytes, addr: bytes, port: int, dst: bool, vnet=None) -> bytearray | Drop:
    """``vnet`` + ``eth`` + the IP packet of ``p`` with its destination (``dst``) or source
    address and port replaced by ``addr`` and ``port``; checksums kept valid.

    ``vnet``: the frame's virtio_net_hdr (None: complete checksums); the
    result starts with the header to send it with. ``eth``: 12 MAC bytes.
    """
    h = None
    if vnet is not None:
        h = codec.parse_vnet(vnet)
        if h.__class__ is Drop:
            return h
    partial = h is not None and bool(h.flags & codec.VIRTIO_NET_HDR_F_NEEDS_CSUM)
    end = 14 + p.length
    fam = p.family
    out, buf, old = _copy_swapping(frame, p, vnet if h is not None else codec.VNET_NONE, eth, addr, dst)
    info = _l4(buf, fam, end)
    if info.__class__ is Drop:
        buf.release()
        return info
    proto, l4, frag = info
    if frag != LATER_FRAGMENT:
        f = _csum_field(proto, l4)
        if f + 2 > end:
            buf.release()
            return Drop.TRUNCATED
        po = l4 + (2 if dst else 0)
        oldport = bytes(buf[po:po + 2])
        newport = _U16.pack(port)
        buf[po:po + 2] = newport
        if partial:
            if h.csum_start + h.csum_offset != f:
                buf.release()
                return Drop.BAD_VNET_HDR
            # The field holds the pseudo-header sum: only the address is in it.
            _U16.pack_into(buf, f, adjust(_U16.unpack_from(buf, f)[0], old, addr, partial=True))
        else:
            c = _U16.unpack_from(buf, f)[0]
            if not (c == 0 and proto == IPPROTO_UDP and fam == 4):  # IPv4 UDP without a checksum
                c = adjust(c, old + oldport, addr + newport)
                if proto == IPPROTO_UDP and c == 0:
                    c = 0xFFFF
                _U16.pack_into(buf, f, c)
    buf.release()
    return out


def translate_icmp(frame, p: Packet, eth: bytes, outer: bytes, outer_dst: bool, inner: bytes, port: int,
                   inner_src: bool) -> bytearray | Drop:
    """An ICMP error with its outer destination (``outer_dst``) or source replaced by
    ``outer``, and in the quoted packet the source (``inner_src``) or destination
    address and port replaced by ``inner`` and ``port``. The quoted IPv4 header's
    checksum and the quoted TCP/UDP checksum (when quoted) are adjusted; the ICMP
    checksum is recomputed. Sent with a virtio_net_hdr saying nothing (complete).
    """
    end = 14 + p.length
    fam = p.family
    out, buf, _ = _copy_swapping(frame, p, codec.VNET_NONE, eth, outer, outer_dst)
    try:
        if fam == 4:
            icmp = 14 + ((buf[14] & 15) << 2)
            q = icmp + 8
            ia = q + (12 if inner_src else 16)
            iold = bytes(buf[ia:ia + 4])
            buf[ia:ia + 4] = inner
            _U16.pack_into(buf, q + 10, adjust(_U16.unpack_from(buf, q + 10)[0], iold, inner))
            iproto, il4 = buf[q + 9], q + ((buf[q] & 15) << 2)
        else:
            walked = codec._walk6(buf, buf[20], 54, end)
            if walked.__class__ is Drop:
                return walked
            icmp = walked[1]
            q = icmp + 8
            ia = q + (8 if inner_src else 24)
            iold = bytes(buf[ia:ia + 16])
            buf[ia:ia + 16] = inner
            walked = codec._walk6(buf, buf[q + 6], q + 40, end)
            if walked.__class__ is Drop:
                return walked
            iproto, il4 = walked[0], walked[1]
        po = il4 + (0 if inner_src else 2)
        if po + 2 > end:
            return Drop.TRUNCATED
        oldport = bytes(buf[po:po + 2])
        newport = _U16.pack(port)
        buf[po:po + 2] = newport
        f = _csum_field(iproto, il4)
        if f + 2 <= end:  # the quoted checksum, when the quote holds it
            c = _U16.unpack_from(buf, f)[0]
            if not (c == 0 and iproto == IPPROTO_UDP and fam == 4):
                c = adjust(c, iold + oldport, inner + newport)
                _U16.pack_into(buf, f, 0xFFFF if c == 0 and iproto == IPPROTO_UDP else c)
        buf[icmp + 2:icmp + 4] = b"\0\0"
        if fam == 4:
            s = codec.internet_checksum(buf[icmp:end])
        else:
            s = codec.internet_checksum(bytes(buf[22:54]) + struct.pack("!II", end - icmp, IPPROTO_ICMPV6)
                                        + bytes(buf[icmp:end]))
        _U16.pack_into(buf, icmp + 2, s)
        return out
    finally:
        buf.release()


# --------------------------------------------------------------------------
# The real servers' packets
# --------------------------------------------------------------------------


def parse_reply(frame, sources) -> Packet | Drop:
    """A packet from a NAT real server (``sources``: packed addresses), or an ICMP error
    about a packet to one. Never raises.

    Kinds: ``REPLY`` (src = the real server, sport its port, dst = the
    client), ``REPLY_ICMP_ERROR`` (src/sport/dst/dport as the quoted
    packet's reply would carry them). ``key``: the real server's key of the
    flow (None for a later fragment: place it by ``(proto, src, dst, frag_id)``).
    """
    n = len(frame)
    if n < 34:
        return Drop.TRUNCATED
    ethertype = frame[12] << 8 | frame[13]
    if ethertype == codec.ETH_P_IP:
        vihl = frame[14]
        if vihl >> 4 != 4:
            return Drop.BAD_VERSION
        hlen = (vihl & 15) << 2
        total = _U16.unpack_from(frame, 16)[0]
        if hlen < 20 or total < hlen:
            return Drop.BAD_IHL if hlen < 20 else Drop.BAD_LENGTH
        end = 14 + total
        if end > n:
            return Drop.TRUNCATED
        src, dst = bytes(frame[26:30]), bytes(frame[30:34])
        proto = frame[23]
        frag = _U16.unpack_from(frame, 20)[0]
        family, length, l4 = 4, total, 14 + hlen
        kind = LATER_FRAGMENT if frag & 0x1FFF else (FIRST_FRAGMENT if frag & 0x2000 else NOT_FRAGMENT)
        ident = _U16.unpack_from(frame, 18)[0] if kind != NOT_FRAGMENT else 0
    elif ethertype == codec.ETH_P_IPV6:
        if n < 54:
            return Drop.TRUNCATED
        if frame[14] >> 4 != 6:
            return Drop.BAD_VERSION
        plen = _U16.unpack_from(frame, 18)[0]
        if plen == 0:
            return Drop.BAD_LENGTH
        end = 54 + plen
        if end > n:
            return Drop.TRUNCATED
        src, dst = bytes(frame[22:38]), bytes(frame[38:54])
        walked = codec._walk6(frame, frame[20], 54, end)
        if walked.__class__ is Drop:
            return walked
        proto, l4, kind, ident = walked
        family, length = 6, 40 + plen
    else:
        return Drop.UNSUPPORTED_ETHERTYPE
    if proto == IPPROTO_TCP or proto == IPPROTO_UDP:
        if src not in sources:
            return Drop.NOT_VIP
        if kind == LATER_FRAGMENT:
            return _new(Packet, (REPLY, family, 14, length, proto, src, 0, dst, 0, 0, kind, ident, None))
        if l4 + (14 if proto == IPPROTO_TCP else 8) > end:
            return Drop.TRUNCATED
        sport, dport = struct.unpack_from("!HH", frame, l4)
        flags = frame[l4 + 13] if proto == IPPROTO_TCP else 0
        key = (_KEY4 if family == 4 else _KEY6).pack(proto, src, dst, sport, dport)
        return _new(Packet, (REPLY, family, 14, length, proto, src, sport, dst, dport, flags, kind, ident, key))
    if proto == (IPPROTO_ICMP if family == 4 else IPPROTO_ICMPV6):
        return _parse_icmp_reply(frame, family, l4, end, length, kind, sources)
    return Drop.UNSUPPORTED_PROTOCOL


def _parse_icmp_reply(frame, family: int, l4: int, end: int, length: int, frag: int, sources) -> Packet | Drop:
    """An ICMP error quoting a client's packet to a NAT real server (from it or a router on the way)."""
    if frag != NOT_FRAGMENT:
        return Drop.ICMP_FRAGMENTED
    if l4 + 8 > end:
        return Drop.TRUNCATED
    t = frame[l4]
    if family == 4 and t not in (3, 11, 12) or family == 6 and not 1 <= t <= 4:
        return Drop.ICMP_UNSUPPORTED
    q = l4 + 8
    if family == 4:
        if q + 20 > end:
            return Drop.TRUNCATED
        if frame[q] >> 4 != 4 or _U16.unpack_from(frame, q + 6)[0] & 0x1FFF:
            return Drop.ICMP_NOT_OURS
        iproto, isrc, idst, il4 = frame[q + 9], bytes(frame[q + 12:q + 16]), bytes(frame[q + 16:q + 20]), \
            q + ((frame[q] & 15) << 2)
    else:
        if q + 40 > end:
            return Drop.TRUNCATED
        if frame[q] >> 4 != 6:
            return Drop.ICMP_NOT_OURS
        isrc, idst = bytes(frame[q + 8:q + 24]), bytes(frame[q + 24:q + 40])
        walked = codec._walk6(frame, frame[q + 6], q + 40, end)
        if walked.__class__ is Drop:
            return Drop.ICMP_NOT_OURS if walked is not Drop.TRUNCATED else walked
        iproto, il4, ifrag, _ = walked
        if ifrag == LATER_FRAGMENT:
            return Drop.ICMP_NOT_OURS
    if iproto != IPPROTO_TCP and iproto != IPPROTO_UDP or idst not in sources:
        return Drop.ICMP_NOT_OURS
    if il4 + 4 > end:
        return Drop.TRUNCATED
    cport, rport = struct.unpack_from("!HH", frame, il4)
    key = (_KEY4 if family == 4 else _KEY6).pack(iproto, idst, isrc, rport, cport)
    return _new(Packet, (REPLY_ICMP_ERROR, family, 14, length, iproto, idst, rport, isrc, cport, 0,
                         NOT_FRAGMENT, 0, key))


def vip_of(key: bytes) -> tuple[bytes, int]:
    """(VIP address, VIP port) from a client -> VIP flow key (codec.flow_key)."""
    if len(key) == 13:
        return key[5:9], key[11] << 8 | key[12]
    return key[17:33], key[35] << 8 | key[36]

