"""The director's packet codec: Ethernet frames in, decisions and frames out.

Pure: no sockets, no clock; bytes (or memoryviews of a ring) in, bytes out.
Nothing here raises on packet contents: a frame that cannot be used yields a
:class:`Drop` reason, which the engine counts.

Parsing (:func:`parse`) returns a :class:`Packet` (a NamedTuple; one small
allocation) whose ``key`` is the connection-table key (:func:`flow_key`):
the bytes ``proto | client addr | VIP addr | client port | VIP port``, which
for IPv4 without options are the frame's own bytes 23 and 26-37 in that
order, so the engine's fast path (``Forwarder.fast``) can take the key
straight from the wire. Kinds:

* ``FLOW``: a TCP or UDP packet to a VIP. ``frag`` tells a non-fragment, a
  first fragment (has ports) and a later fragment (no ports, ``key`` None:
  place it with ``(proto, src, dst, frag_id)`` in a FragmentTable);
* ``ICMP_ERROR``: an ICMP/ICMPv6 error about a packet a real server sent
  from the VIP. Its key is the *inner* flow turned round to the
  client -> VIP direction, so one lookup finds the owning server; forward
  the whole frame there (DR or TUN) and never create a flow for it;
* ``ARP_REQUEST`` / ``NEIGHBOR_SOLICIT``: someone asks for a VIP: answer with
  :func:`arp_reply` / :func:`neighbor_advert`.

Output:

* DR: only the MACs change (:func:`dr_rewrite` in place, :func:`dr_frame`
  copying); the IP packet is untouched, so checksums and a virtio_net_hdr
  stay valid and GSO super-frames pass through;
* TUN: :class:`Tunnel` precomputes everything constant per real server and
  prepends the outer IPv4 (protocol 4) or IPv6 (next header 41) header as
  IPVS does: outer TOS/traffic class, TTL/hop limit and (IPv4) DF copied
  from the inner packet, IPv6 flow label zero, correct IPv4 checksum;
* too big after encapsulation: IPv4 with DF and all IPv6 get ICMP
  "fragmentation needed" / ICMPv6 "packet too big" back to the client
  advertising ``mtu - overhead`` (:func:`too_big`); IPv4 without DF is
  fragmented into the tunnel (:meth:`Tunnel.fragments`: each inner fragment
  in a whole outer packet, which every decapsulator unwraps).

Checksums from veth/virtio (PACKET_VNET_HDR): see :func:`parse_vnet`,
:func:`complete_checksum` and :func:`vnet_for_tun`, and docs/packet-path.md.

Speed: fixed-layout headers are read with precompiled ``struct.Struct``
``unpack_from`` directly on the buffer; the only allocations on the fast path
are the unpacked tuples, the two address ``bytes``, the key and the Packet.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ETH_HLEN = 14

IPPROTO_ICMP = 1
IPPROTO_IPIP = 4
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_IPV6 = 41
IPPROTO_ICMPV6 = 58

BROADCAST_MAC = b"\xff" * 6
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
ALL_NODES_MAC = bytes.fromhex("333300000001")

# Packet.kind (REPLY, REPLY_ICMP_ERROR: a NAT real server's side, director/dataplane/nat.py)
FLOW, ICMP_ERROR, ARP_REQUEST, NEIGHBOR_SOLICIT, REPLY, REPLY_ICMP_ERROR = range(6)
# Packet.frag
NOT_FRAGMENT, FIRST_FRAGMENT, LATER_FRAGMENT = range(3)

MAX_EXTENSION_HEADERS = 8
"""IPv6 extension headers walked before giving up (bounds the per-packet cost)."""
ICMP4_ERROR_MAX = 576
"""RFC 1812 4.3.2.3: an ICMPv4 error carries as much as fits in 576 bytes."""
ICMP6_ERROR_MAX = 1280
"""RFC 4443 2.4(c): an ICMPv6 error must not exceed the minimum IPv6 MTU."""
ICMP_TTL = 64


class Drop(str, enum.Enum):
    """Why a frame was not forwarded. The value is the metrics label."""

    # from parse()
    TRUNCATED = "truncated"
    UNSUPPORTED_ETHERTYPE = "unsupported_ethertype"
    BAD_VERSION = "bad_version"
    BAD_IHL = "bad_ihl"
    BAD_LENGTH = "bad_length"
    NOT_VIP = "not_vip"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    UNSUPPORTED_EXTENSION = "unsupported_extension"
    ICMP_UNSUPPORTED = "icmp_unsupported"
    ICMP_NOT_OURS = "icmp_not_ours"
    ICMP_FRAGMENTED = "icmp_fragmented"
    ARP_UNSUPPORTED = "arp_unsupported"
    NDP_INVALID = "ndp_invalid"
    BAD_CHECKSUM = "bad_checksum"
    # from the virtio_net_hdr helpers
    BAD_VNET_HDR = "bad_vnet_hdr"
    GSO_UNSUPPORTED = "gso_unsupported"
    # for the engine, so every drop is counted under one enum
    NO_SERVICE = "no_service"
    NO_DESTINATION = "no_destination"
    NO_CONNECTION = "no_connection"
    FRAGMENT_UNKNOWN = "fragment_unknown"
    TOO_BIG = "too_big"
    NO_NEIGHBOUR = "no_neighbour"
    REPLY_NO_CONNECTION = "reply_no_connection"
    """A NAT real server's packet for no flow the director knows (never forwarded with its private source)."""

    def __str__(self) -> str:
        return self.value


class Packet(NamedTuple):
    """What the director needs to know about one frame."""

    kind: int
    """FLOW, ICMP_ERROR, ARP_REQUEST or NEIGHBOR_SOLICIT."""
    family: int
    """4 or 6 (4 for ARP)."""
    l3: int
    """Offset of the IP (or ARP) header in the frame."""
    length: int
    """Length of the IP packet, header included, without Ethernet padding."""
    proto: int
    """TCP or UDP (for ICMP_ERROR: of the inner packet)."""
    src: bytes
    """Client address (ARP/NDP: the asker's address)."""
    sport: int
    dst: bytes
    """VIP (ARP/NDP: the address asked for)."""
    dport: int
    flags: int
    """TCP flags byte (0 for UDP and everything else)."""
    frag: int
    """NOT_FRAGMENT, FIRST_FRAGMENT or LATER_FRAGMENT."""
    frag_id: int
    """IPv4 identification / IPv6 fragment identification (0 when not a fragment)."""
    key: bytes | None
    """flow_key(proto, src, dst, sport, dport) for the connection table; None
    for later fragments, ARP and NDP."""


_new = tuple.__new__
_KEY4 = struct.Struct("!B4s4sHH")
_KEY6 = struct.Struct("!B16s16sHH")


def flow_key(proto: int, src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    """The connection-table key of a client -> VIP flow.

    ``proto | src | dst | sport | dport`` (13 bytes for IPv4, 37 for IPv6):
    the order the fields have on the wire, so an IPv4 packet without options
    yields the same key as ``frame[23:24] + frame[26:38]``. IPv4 and IPv6 keys
    differ in length and never collide.
    """
    return (_KEY4 if len(src) == 4 else _KEY6).pack(proto, src, dst, sport, dport)


def split_key(key: bytes) -> tuple[int, bytes, bytes, int, int]:
    """(proto, src, dst, sport, dport) of a :func:`flow_key`."""
    return (_KEY4 if len(key) == _KEY4.size else _KEY6).unpack(key)
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_ETH_IP4 = struct.Struct("!12xHBBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_PORTS = struct.Struct("!HH")
_TCP = struct.Struct("!HH9xB")  # ports and the flags byte at offset 13
_U16 = struct.Struct("!H")
_FRAG6 = struct.Struct("!BxHI")
_ARP = struct.Struct("!HHBBH6s4s6s4s")


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


def parse(frame, vips) -> Packet | Drop:
    """Parse an Ethernet frame addressed to one of ``vips`` (packed addresses).

    ``frame`` is bytes, bytearray or a memoryview (e.g. into a TPACKET ring).
    Never raises on any input; returns a Drop reason instead.
    """
    n = len(frame)
    if n < 34:  # shorter than Ethernet + a minimal IPv4 header
        if n < ETH_HLEN:
            return Drop.TRUNCATED
        ethertype = frame[12] << 8 | frame[13]
        return Drop.TRUNCATED if ethertype == ETH_P_IP else _parse_other(frame, n, vips, ethertype)
    # One unpack reads the ethertype and a whole IPv4 header: IPv4 is the path
    # 300k packets/s take, everything else branches off at once.
    ethertype, vihl, _tos, total, ident, frag, _ttl, proto, _csum, src, dst = _ETH_IP4.unpack_from(frame, 0)
    if ethertype != ETH_P_IP:
        return _parse_other(frame, n, vips, ethertype)
    if vihl >> 4 != 4:
        return Drop.BAD_VERSION
    hlen = (vihl & 15) << 2
    if hlen < 20:
        return Drop.BAD_IHL
    if total < hlen:
        return Drop.BAD_LENGTH
    end = 14 + total
    if end > n:
        return Drop.TRUNCATED
    if dst not in vips:
        return Drop.NOT_VIP
    l4 = 14 + hlen
    if proto == IPPROTO_TCP or proto == IPPROTO_UDP:
        if frag & 0x1FFF:  # later fragment: no L4 header here
            return _new(Packet, (FLOW, 4, 14, total, proto, src, 0, dst, 0, 0, LATER_FRAGMENT, ident, None))
        if proto == IPPROTO_TCP:
            if l4 + 14 > end:  # need ports and flags; refuses tiny first fragments (RFC 1858)
                return Drop.TRUNCATED
            sport, dport, flags = _TCP.unpack_from(frame, l4)
        else:
            if l4 + 8 > end:
                return Drop.TRUNCATED
            sport, dport = _PORTS.unpack_from(frame, l4)
            flags = 0
        return _new(Packet, (
            FLOW, 4, 14, total, proto, src, sport, dst, dport, flags,
            FIRST_FRAGMENT if frag & 0x2000 else NOT_FRAGMENT, ident if frag & 0x2000 else 0,
            _KEY4.pack(proto, src, dst, sport, dport),
        ))
    if proto == IPPROTO_ICMP:
        return _parse_icmp4(frame, l4, end, total, frag, dst)
    return Drop.UNSUPPORTED_PROTOCOL


def _parse_other(frame, n: int, vips, ethertype: int) -> Packet | Drop:
    if ethertype == ETH_P_IPV6:
        return _parse6(frame, n, vips)
    if ethertype == ETH_P_ARP:
        return _parse_arp(frame, n, vips)
    return Drop.UNSUPPORTED_ETHERTYPE


def _parse_icmp4(frame, l4: int, end: int, total: int, frag: int, dst: bytes) -> Packet | Drop:
    """An ICMPv4 error about a packet our VIP sent: key the inner flow."""
    if frag & 0x3FFF:
        return Drop.ICMP_FRAGMENTED  # errors are small; we do not reassemble
    if l4 + 8 > end:
        return Drop.TRUNCATED
    icmp_type = frame[l4]
    if icmp_type != 3 and icmp_type != 11 and icmp_type != 12:
        return Drop.ICMP_UNSUPPORTED  # echo and friends are not load-balanced
    inner = l4 + 8
    if inner + 20 > end:
        return Drop.TRUNCATED
    vihl, _tos, _total, _ident, ifrag, _ttl, iproto, _csum, isrc, idst = _IP4.unpack_from(frame, inner)
    ihlen = (vihl & 15) << 2
    if vihl >> 4 != 4 or ihlen < 20:
        return Drop.ICMP_NOT_OURS
    if iproto != IPPROTO_TCP and iproto != IPPROTO_UDP:
        return Drop.ICMP_NOT_OURS
    if ifrag & 0x1FFF or isrc != dst:
        return Drop.ICMP_NOT_OURS  # no ports to match, or not sent from this VIP
    if inner + ihlen + 4 > end:
        return Drop.TRUNCATED
    vport, cport = _PORTS.unpack_from(frame, inner + ihlen)
    return _new(Packet, (ICMP_ERROR, 4, 14, total, iproto, idst, cport, isrc, vport, 0,
                         NOT_FRAGMENT, 0, _KEY4.pack(iproto, idst, isrc, cport, vport)))


def _walk6(frame, nh: int, off: int, end: int):
    """Skip IPv6 extension headers: (next header, offset, frag kind, frag id) or a Drop."""
    frag = NOT_FRAGMENT
    frag_id = 0
    for _ in range(MAX_EXTENSION_HEADERS):
        if nh == IPPROTO_TCP or nh == IPPROTO_UDP or nh == IPPROTO_ICMPV6:
            return nh, off, frag, frag_id
        if nh == 0 or nh == 60 or nh == 43:  # hop-by-hop, destination options, routing
            if off + 8 > end:
                return Drop.TRUNCATED
            if nh == 43 and frame[off + 3]:
                return Drop.UNSUPPORTED_EXTENSION  # segments left: the VIP is not the final destination
            nh, off = frame[off], off + ((frame[off + 1] + 1) << 3)
        elif nh == 44:  # fragment
            if off + 8 > end:
                return Drop.TRUNCATED
            nxt, offset_flags, ident = _FRAG6.unpack_from(frame, off)
            nh, off = nxt, off + 8
            if offset_flags & 0xFFF8:
                return nh, off, LATER_FRAGMENT, ident
            if offset_flags & 1:  # M set, offset 0: the first fragment
                frag, frag_id = FIRST_FRAGMENT, ident
            # offset 0 and no M: an atomic fragment, a whole packet (RFC 6946)
        else:
            return Drop.UNSUPPORTED_PROTOCOL  # ESP, AH, no next header, anything else
    return Drop.UNSUPPORTED_EXTENSION


def _parse6(frame, n: int, vips) -> Packet | Drop:
    if n < 54:
        return Drop.TRUNCATED
    vtf, plen, nh, hlim, src, dst = _IP6.unpack_from(frame, 14)
    if vtf >> 28 != 6:
        return Drop.BAD_VERSION
    if plen == 0:
        return Drop.BAD_LENGTH  # jumbograms (RFC 2675) are not for us
    end = 54 + plen
    if end > n:
        return Drop.TRUNCATED
    length = 40 + plen
    off = 54
    if dst not in vips:
        # Only a neighbour solicitation (to a solicited-node group) may be for
        # us without being addressed to a VIP.
        if nh == IPPROTO_ICMPV6 and frame[54] == 135:
            return _parse_ns(frame, off, end, length, hlim, src, dst, vips)
        return Drop.NOT_VIP
    if nh == IPPROTO_TCP or nh == IPPROTO_UDP:  # the common case: no extension header
        frag, frag_id = NOT_FRAGMENT, 0
    else:
        walked = _walk6(frame, nh, off, end)
        if walked.__class__ is Drop:
            return walked
        nh, off, frag, frag_id = walked
        if nh == IPPROTO_ICMPV6:
            return _parse_icmp6(frame, off, end, length, frag, hlim, src, dst, vips)
        if nh != IPPROTO_TCP and nh != IPPROTO_UDP:
            return Drop.UNSUPPORTED_PROTOCOL  # a later fragment of something else
    if frag == LATER_FRAGMENT:
        return _new(Packet, (FLOW, 6, 14, length, nh, src, 0, dst, 0, 0, LATER_FRAGMENT, frag_id, None))
    if nh == IPPROTO_TCP:
        if off + 14 > end:
            return Drop.TRUNCATED
        sport, dport, flags = _TCP.unpack_from(frame, off)
    else:
        if off + 8 > end:
            return Drop.TRUNCATED
        sport, dport = _PORTS.unpack_from(frame, off)
        flags = 0
    return _new(Packet, (FLOW, 6, 14, length, nh, src, sport, dst, dport, flags, frag, frag_id,
                         _KEY6.pack(nh, src, dst, sport, dport)))


def _parse_icmp6(frame, off, end, length, frag, hlim, src, dst, vips) -> Packet | Drop:
    if frag != NOT_FRAGMENT:
        return Drop.ICMP_FRAGMENTED
    if off + 8 > end:
        return Drop.TRUNCATED
    icmp_type = frame[off]
    if icmp_type == 135:
        return _parse_ns(frame, off, end, length, hlim, src, dst, vips)
    if not 1 <= icmp_type <= 4:  # unreachable, packet too big, time exceeded, parameter problem
        return Drop.ICMP_UNSUPPORTED
    inner = off + 8
    if inner + 40 > end:
        return Drop.TRUNCATED
    ivtf, _plen, inh, _hlim, isrc, idst = _IP6.unpack_from(frame, inner)
    if ivtf >> 28 != 6 or isrc != dst:
        return Drop.ICMP_NOT_OURS
    walked = _walk6(frame, inh, inner + 40, end)
    if walked.__class__ is Drop:
        return Drop.ICMP_NOT_OURS if walked is not Drop.TRUNCATED else walked
    inh, ioff, ifrag, _ = walked
    if (inh != IPPROTO_TCP and inh != IPPROTO_UDP) or ifrag == LATER_FRAGMENT:
        return Drop.ICMP_NOT_OURS
    if ioff + 4 > end:
        return Drop.TRUNCATED
    vport, cport = _PORTS.unpack_from(frame, ioff)
    return _new(Packet, (ICMP_ERROR, 6, 14, length, inh, idst, cport, isrc, vport, 0,
                         NOT_FRAGMENT, 0, _KEY6.pack(inh, idst, isrc, cport, vport)))


def solicited_node(addr: bytes) -> bytes:
    """The solicited-node multicast address of an IPv6 address (RFC 4291 2.7.1)."""
    return bytes.fromhex("ff0200000000000000000001ff") + bytes(addr[13:16])


def _parse_ns(frame, off, end, length, hlim, src, dst, vips) -> Packet | Drop:
    """A neighbour solicitation for a VIP (RFC 4861 7.1.1 validity checks)."""
    if hlim != 255 or end - off < 24 or frame[off + 1] != 0:
        return Drop.NDP_INVALID
    target = bytes(frame[off + 8:off + 24])
    if target not in vips:
        return Drop.NOT_VIP
    if dst != target and dst != solicited_node(target):
        return Drop.NDP_INVALID
    if _csum(_pseudo6(src, dst, end - off, IPPROTO_ICMPV6) + bytes(frame[off:end])) != 0:
        return Drop.BAD_CHECKSUM
    return _new(Packet, (NEIGHBOR_SOLICIT, 6, 14, length, IPPROTO_ICMPV6, src, 0, target, 0, 0,
                         NOT_FRAGMENT, 0, None))


def _parse_arp(frame, n: int, vips) -> Packet | Drop:
    if n < 42:
        return Drop.TRUNCATED
    htype, ptype, hlen, plen, op, _sha, spa, _tha, tpa = _ARP.unpack_from(frame, 14)
    if htype != 1 or ptype != ETH_P_IP or hlen != 6 or plen != 4 or op != 1:
        return Drop.ARP_UNSUPPORTED  # only Ethernet/IPv4 requests are answered
    if tpa not in vips:
        return Drop.NOT_VIP
    if spa == tpa:
        return Drop.ARP_UNSUPPORTED  # someone else announcing the VIP: not a question
    return _new(Packet, (ARP_REQUEST, 4, 14, 28, 0, spa, 0, tpa, 0, 0, NOT_FRAGMENT, 0, None))


def is_df(frame, pkt: Packet) -> bool:
    """IPv4 Don't Fragment set (IPv6 packets are never fragmented on the way)."""
    return pkt.family == 6 or bool(frame[pkt.l3 + 6] & 0x40)


# --------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------


def _sum16(data) -> int:
    """Ones' complement sum of 16-bit big-endian words, folded (0 only for all-zero data).

    Uses 2**16 == 1 (mod 0xFFFF): the end-around-carry sum is the value of
    the whole buffer as one big integer, modulo 0xFFFF. One C-speed pass.
    """
    v = int.from_bytes(data, "big")
    if len(data) & 1:
        v <<= 8
    if v == 0:
        return 0
    return v % 0xFFFF or 0xFFFF


def _csum(data) -> int:
    """The Internet checksum (RFC 1071) of ``data``; 0 when ``data`` already includes a valid one."""
    return ~_sum16(data) & 0xFFFF


def internet_checksum(data) -> int:
    """The value to store in a checksum field over ``data`` (field zeroed)."""
    return _csum(data)


def _pseudo6(src: bytes, dst: bytes, length: int, nh: int) -> bytes:
    return src + dst + struct.pack("!II", length, nh)


# --------------------------------------------------------------------------
# Direct routing
# --------------------------------------------------------------------------


def mac_bytes(mac: str) -> bytes:
    """'aa:bb:cc:dd:ee:ff' -> 6 bytes."""
    return bytes.fromhex(mac.replace(":", "").replace("-", ""))


def dr_rewrite(buf, macs: bytes) -> None:
    """DR in place: ``macs`` = real server MAC + director MAC (12 bytes)."""
    buf[0:12] = macs


def dr_frame(frame, macs: bytes) -> bytes:
    """DR as a new frame: the same frame with the MACs replaced."""
    return b"".join((macs, frame[12:]))


# --------------------------------------------------------------------------
# IP-in-IP tunnelling
# --------------------------------------------------------------------------

_OUT4 = struct.Struct("!BBHHHBBH4s4s")
_OUT6 = struct.Struct("!IHBB16s16s")
_TOS_FLAGS_TTL = struct.Struct("!xB4xBxB")  # IPv4 TOS, flags byte, TTL
_VTF_HLIM = struct.Struct("!I3xB")  # IPv6 version/class/flow, hop limit


class Tunnel:
    """IP-in-IP towards one real server: IPv4 in IPv4 (protocol 4) or IPv6 in IPv6 (41).

    Built once per real server (attach it to Dest.tx); ``encap`` then does one
    pack, one checksum fold and one join per packet. ``mtu`` is the MTU of
    the link towards the real server; ``max_inner`` = mtu - outer header is
    what fits, and what too_big() advertises.
    """

    __slots__ = ("family", "src", "dst", "eth", "mtu", "overhead", "max_inner", "_sum")

    def __init__(self, src: bytes, dst: bytes, dst_mac: bytes, src_mac: bytes, mtu: int = 1500) -> None:
        if len(src) != len(dst) or len(src) not in (4, 16):
            raise ValueError("tunnel endpoints must be two IPv4 or two IPv6 addresses")
        self.family = 4 if len(src) == 4 else 6
        self.src, self.dst, self.mtu = src, dst, mtu
        self.overhead = 20 if self.family == 4 else 40
        self.max_inner = mtu - self.overhead
        self.eth = dst_mac + src_mac + (b"\x08\x00" if self.family == 4 else b"\x86\xdd")
        # Constant part of the outer IPv4 header checksum: version/IHL,
        # protocol and both addresses; per packet only TOS, length, id, DF
        # and TTL are added.
        self._sum = 0x4500 + IPPROTO_IPIP + sum(_U16.unpack_from(src + dst, i)[0] for i in range(0, 8, 2))

    def fits(self, pkt: Packet) -> bool:
        return pkt.length <= self.max_inner

    def header(self, frame, pkt: Packet, ident: int = 0) -> bytes:
        """Ethernet + outer IP header for this packet (scatter/gather senders add the inner packet)."""
        return self.header_at(frame, pkt.l3, pkt.length, ident)

    def header_at(self, buf, l3: int, length: int, ident: int = 0) -> bytes:
        """:meth:`header` for the inner IP packet of ``length`` bytes at ``buf[l3:]``."""
        if self.family == 4:
            tos, flags, ttl = _TOS_FLAGS_TTL.unpack_from(buf, l3)
            df = (flags & 0x40) << 8
            total = length + 20
            s = self._sum + tos + total + ident + df + (ttl << 8)
            s = (s & 0xFFFF) + (s >> 16)
            s = (s & 0xFFFF) + (s >> 16)
            return self.eth + _OUT4.pack(0x45, tos, total, ident, df, ttl, IPPROTO_IPIP, ~s & 0xFFFF,
                                         self.src, self.dst)
        vtf, hlim = _VTF_HLIM.unpack_from(buf, l3)
        tclass = vtf >> 20 & 0xFF
        return self.eth + _OUT6.pack(0x60000000 | tclass << 20, length, IPPROTO_IPV6, hlim,
                                     self.src, self.dst)

    def encap(self, frame, pkt: Packet, ident: int = 0) -> bytes:
        """The encapsulated frame. Check ``fits`` first (see too_big / fragments)."""
        l3 = pkt.l3
        return b"".join((self.header(frame, pkt, ident), frame[l3:l3 + pkt.length]))

    def fragments(self, frame, pkt: Packet, ident: int) -> list[bytes]:
        """An IPv4 packet without DF that does not fit: fragmented as a router forwarding it onto the
        tunnel (a link of ``max_inner`` bytes) fragments it, each fragment in a tunnel packet of its own.

        The real server decapsulates each one like any other (its tc-BPF decapsulator never sees an
        outer fragment, which it could not unwrap) and its stack reassembles the client's packet.
        Fragmenting the outer packet instead (IPVS's way) left that packet to a reassembly before
        decapsulation, which a real server without an ``ipip`` driver cannot do in the kernel. The
        inner packet may itself be a fragment: offsets and its MF carry on. RFC 791: later fragments
        keep only the options with the copied flag. Outer packets get ``ident``, ``ident + 1``, ...
        """
        l3 = pkt.l3
        ihl = (frame[l3] & 0x0F) * 4
        header = bytes(frame[l3:l3 + ihl])
        payload = bytes(frame[l3 + ihl:l3 + pkt.length])
        word = _U16.unpack_from(header, 6)[0]
        offset, more = word & 0x1FFF, word & 0x2000
        later = header[:20] + _copied_options(header[20:])
        out = []
        pos = 0
        while pos < len(payload):
            h = header if pos == 0 else later
            piece = payload[pos:pos + ((self.max_inner - len(h)) & ~7)]
            last = pos + len(piece) >= len(payload)
            inner = bytearray(h + piece)
            inner[0] = 0x40 | len(h) >> 2
            _U16.pack_into(inner, 2, len(inner))
            _U16.pack_into(inner, 6, (more if last else 0x2000) | (offset + (pos >> 3)))
            _U16.pack_into(inner, 10, 0)
            _U16.pack_into(inner, 10, _csum(inner[:len(h)]))
            out.append(self.header_at(inner, 0, len(inner), (ident + len(out)) & 0xFFFF) + bytes(inner))
            pos += len(piece)
        return out


def _copied_options(options: bytes) -> bytes:
    """The IPv4 options a later fragment keeps (the copied flag, 0x80), padded to 4 bytes."""
    out = bytearray()
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:  # end of options
            break
        if kind == 1:  # no-operation
            i += 1
            continue
        size = options[i + 1] if i + 1 < len(options) else 0
        if size < 2:
            break  # malformed: keep what came before
        if kind & 0x80:
            out += options[i:i + size]
        i += size
    return bytes(out + bytes(-len(out) % 4))


def _ipv4_header(tos: int, total: int, ident: int, frag: int, ttl: int, proto: int, src: bytes, dst: bytes) -> bytes:
    hdr = bytearray(_OUT4.pack(0x45, tos, total, ident, frag, ttl, proto, 0, src, dst))
    _U16.pack_into(hdr, 10, _csum(hdr))
    return bytes(hdr)


# --------------------------------------------------------------------------
# ICMP generated by the director
# --------------------------------------------------------------------------


def too_big(frame, pkt: Packet, mtu: int, ident: int = 0) -> bytes | Drop:
    """ICMP "fragmentation needed" / ICMPv6 "packet too big" back to the client.

    ``mtu`` is what the client may send (the tunnel's ``max_inner``). The
    reply goes from the VIP to the client, out the way the packet came (MACs
    swapped). Returns Drop.ICMP_UNSUPPORTED for what must not get an error:
    ICMP errors themselves and non-first fragments (RFC 1122 3.2.2).
    """
    if pkt.kind != FLOW or pkt.frag == LATER_FRAGMENT:
        return Drop.ICMP_UNSUPPORTED
    l3 = pkt.l3
    eth = bytes(frame[6:12]) + bytes(frame[0:6]) + bytes(frame[12:14])
    if pkt.family == 4:
        quote = bytes(frame[l3:l3 + min(pkt.length, ICMP4_ERROR_MAX - 28)])
        icmp = bytearray(struct.pack("!BBHHH", 3, 4, 0, 0, mtu & 0xFFFF) + quote)
        _U16.pack_into(icmp, 2, _csum(icmp))
        # TOS 0xc0 (internetwork control) as Linux's icmp_send uses for errors.
        ip = _ipv4_header(0xC0, 20 + len(icmp), ident, 0, ICMP_TTL, IPPROTO_ICMP, pkt.dst, pkt.src)
        return eth + ip + bytes(icmp)
    quote = bytes(frame[l3:l3 + min(pkt.length, ICMP6_ERROR_MAX - 48)])
    icmp = bytearray(struct.pack("!BBHI", 2, 0, 0, mtu) + quote)
    _U16.pack_into(icmp, 2, _csum(_pseudo6(pkt.dst, pkt.src, len(icmp), IPPROTO_ICMPV6) + icmp))
    ip = _OUT6.pack(0x60000000, len(icmp), IPPROTO_ICMPV6, ICMP_TTL, pkt.dst, pkt.src)
    return eth + ip + bytes(icmp)


# --------------------------------------------------------------------------
# VIP ownership: ARP and NDP
# --------------------------------------------------------------------------

_ARP_HEAD = struct.pack("!HHBB", 1, ETH_P_IP, 6, 4)


def arp_reply(frame, pkt: Packet, mac: bytes) -> bytes:
    """Answer an ARP request for a VIP: the VIP is at ``mac`` (the director)."""
    asker_mac = bytes(frame[22:28])
    return (asker_mac + mac + b"\x08\x06" + _ARP_HEAD + b"\x00\x02"
            + mac + pkt.dst + asker_mac + pkt.src)


def gratuitous_arp(vip: bytes, mac: bytes) -> bytes:
    """An ARP announcement (RFC 5227: a broadcast request for our own address).

    Sent when taking over a VIP so neighbours update their caches at once.
    """
    return BROADCAST_MAC + mac + b"\x08\x06" + _ARP_HEAD + b"\x00\x01" + mac + vip + bytes(6) + vip


def _na(vip: bytes, mac: bytes, dst_ip: bytes, dst_mac: bytes, solicited: bool) -> bytes:
    flags = 0x20000000 | (0x40000000 if solicited else 0)  # O (override), S when answering
    icmp = bytearray(struct.pack("!BBHI", 136, 0, 0, flags) + vip + b"\x02\x01" + mac)
    _U16.pack_into(icmp, 2, _csum(_pseudo6(vip, dst_ip, len(icmp), IPPROTO_ICMPV6) + icmp))
    ip = _OUT6.pack(0x60000000, len(icmp), IPPROTO_ICMPV6, 255, vip, dst_ip)
    return dst_mac + mac + b"\x86\xdd" + ip + bytes(icmp)


def neighbor_advert(frame, pkt: Packet, mac: bytes) -> bytes:
    """Answer a neighbour solicitation for a VIP with a solicited advertisement.

    A solicitation from the unspecified address (duplicate address
    detection) is answered to all-nodes, unsolicited, as RFC 4861 7.2.4 says.
    """
    if pkt.src == bytes(16):
        return _na(pkt.dst, mac, ALL_NODES, ALL_NODES_MAC, solicited=False)
    return _na(pkt.dst, mac, pkt.src, bytes(frame[6:12]), solicited=True)


def unsolicited_na(vip: bytes, mac: bytes) -> bytes:
    """An unsolicited neighbour advertisement to all-nodes (override set): IPv6's gratuitous ARP."""
    return _na(vip, mac, ALL_NODES, ALL_NODES_MAC, solicited=False)


# --------------------------------------------------------------------------
# virtio_net_hdr (PACKET_VNET_HDR)
# --------------------------------------------------------------------------

VNET_HDR_LEN = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80
VNET_NONE = bytes(VNET_HDR_LEN)
"""A header saying: complete packet, no offload."""

# Host byte order: af_packet fills the header with the host's endianness
# (virtio_legacy_is_little_endian()).
_VNET = struct.Struct("=BBHHHH")


class VnetHdr(NamedTuple):
    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    """Offset from the frame start where checksumming starts (the L4 header)."""
    csum_offset: int
    """Offset of the checksum field from csum_start."""

    def pack(self) -> bytes:
        return _VNET.pack(*self)


def parse_vnet(buf) -> VnetHdr | Drop:
    """The 10-byte virtio_net_hdr that precedes each frame with PACKET_VNET_HDR."""
    if len(buf) < VNET_HDR_LEN:
        return Drop.TRUNCATED
    h = _new(VnetHdr, _VNET.unpack_from(buf, 0))
    if h.flags & ~(VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID):
        return Drop.BAD_VNET_HDR
    return h


def complete_checksum(buf, csum_start: int, csum_offset: int, end: int) -> Drop | None:
    """Finish a partial checksum in place (what skb_checksum_help does).

    With NEEDS_CSUM the L4 checksum field holds only the pseudo-header sum;
    summing from ``csum_start`` to ``end`` (the end of the IP packet, not of
    the frame: Ethernet padding is not data) over that value and storing the
    complement gives the full checksum. ``buf`` must be writable (bytearray
    or a writable memoryview). Returns a Drop if the offsets are outside.
    """
    field = csum_start + csum_offset
    if csum_start < ETH_HLEN or field + 2 > end or end > len(buf):
        return Drop.BAD_VNET_HDR
    s = _csum(buf[csum_start:end])
    # 0 and 0xFFFF are the same in ones' complement; UDP reserves 0 for "none".
    _U16.pack_into(buf, field, s or 0xFFFF)
    return None


def vnet_for_tun(h: VnetHdr, overhead: int) -> bytes | Drop:
    """The virtio_net_hdr to send with a tunnelled frame (TX socket with PACKET_VNET_HDR).

    A partial checksum stays partial, shifted by the outer header, so the
    kernel completes it on the way out at no Python cost. GSO cannot pass:
    virtio_net_hdr cannot say "IP-in-IP" (SKB_GSO_IPXIP4), so the kernel would
    refuse to segment; such frames are dropped (turn GRO/TSO off towards a
    TUN director, see docs/packet-path.md).
    """
    if h.gso_type != VIRTIO_NET_HDR_GSO_NONE:
        return Drop.GSO_UNSUPPORTED
    if not h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        return VNET_NONE
    return _VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, h.csum_start + overhead, h.csum_offset)
