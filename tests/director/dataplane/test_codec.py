"""Golden packet tests for director.dataplane.codec.

scapy builds every input frame and, independently, every expected output
frame; the codec must produce the expected bytes exactly. Bad frames must come
back as a Drop reason, never an exception.
"""

from __future__ import annotations

import ipaddress
import logging
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption, fragment  # noqa: E402
from scapy.layers.inet6 import (  # noqa: E402
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptSrcLLAddr,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from director.dataplane import codec  # noqa: E402
from director.dataplane.codec import Drop  # noqa: E402

# ---- the lab ---------------------------------------------------------------

GW_MAC = "02:00:00:00:00:aa"  # the router that hands client traffic to the director
DIR_MAC = "02:00:00:00:00:d1"
RS_MAC = "02:00:00:00:00:11"  # DR: the real server; TUN: the next hop towards it
ASKER_MAC = "02:00:00:00:00:42"

VIP4, VIP6 = "192.0.2.10", "2001:db8:10::10"
CLIENT4, CLIENT6 = "198.51.100.7", "2001:db8:100::7"
RS4, RS6 = "10.2.0.11", "2001:db8:2::11"
DIR4, DIR6 = "192.0.2.130", "2001:db8:ffff::130"
ROUTER4, ROUTER6 = "203.0.113.1", "2001:db8:ff::1"


def packed(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


VIPS = frozenset({packed(VIP4), packed(VIP6)})
MACS = codec.mac_bytes(RS_MAC) + codec.mac_bytes(DIR_MAC)
TUN4 = codec.Tunnel(packed(DIR4), packed(RS4), codec.mac_bytes(RS_MAC), codec.mac_bytes(DIR_MAC), mtu=1500)
TUN6 = codec.Tunnel(packed(DIR6), packed(RS6), codec.mac_bytes(RS_MAC), codec.mac_bytes(DIR_MAC), mtu=1500)
IDENT = 0x1234


def frame(l3) -> bytes:
    """A frame as the director receives it: from the gateway to the director's MAC."""
    return bytes(Ether(dst=DIR_MAC, src=GW_MAC) / l3)


def expected_dr(l3) -> bytes:
    return bytes(Ether(dst=RS_MAC, src=DIR_MAC) / l3)


def expected_tun(l3) -> bytes:
    inner = bytes(l3)
    if isinstance(l3, IP):
        df = "DF" if l3.flags.DF else 0
        outer = IP(src=DIR4, dst=RS4, proto=4, tos=l3.tos, ttl=l3.ttl, id=IDENT, flags=df)
        return bytes(Ether(dst=RS_MAC, src=DIR_MAC, type=0x0800) / outer / Raw(inner))
    outer = IPv6(src=DIR6, dst=RS6, nh=41, tc=l3.tc, fl=0, hlim=l3.hlim)
    return bytes(Ether(dst=RS_MAC, src=DIR_MAC, type=0x86DD) / outer / Raw(inner))


# ---- golden forwarding table ------------------------------------------------

PAYLOAD = Raw(b"GET / HTTP/1.1\r\n\r\n")

FLOWS = [
    # id, L3 packet, expected key fields (proto, src, sport, dst, dport), flags, frag kind
    ("tcp4-syn", IP(src=CLIENT4, dst=VIP4, flags="DF") / TCP(sport=40000, dport=80, flags="S"),
     (6, CLIENT4, 40000, VIP4, 80), 0x02, codec.NOT_FRAGMENT),
    ("tcp4-data-tos", IP(src=CLIENT4, dst=VIP4, tos=0x28, ttl=57, flags="DF") / TCP(sport=40000, dport=80, flags="PA") / PAYLOAD,
     (6, CLIENT4, 40000, VIP4, 80), 0x18, codec.NOT_FRAGMENT),
    ("tcp4-ip-options", IP(src=CLIENT4, dst=VIP4, options=[b"\x01\x01\x01\x00"]) / TCP(sport=40001, dport=80, flags="A"),
     (6, CLIENT4, 40001, VIP4, 80), 0x10, codec.NOT_FRAGMENT),
    ("udp4", IP(src=CLIENT4, dst=VIP4) / UDP(sport=5353, dport=53) / Raw(b"q" * 30),
     (17, CLIENT4, 5353, VIP4, 53), 0, codec.NOT_FRAGMENT),
    ("udp4-first-fragment", IP(src=CLIENT4, dst=VIP4, id=777, flags="MF") / UDP(sport=5353, dport=53, len=3000) / Raw(b"a" * 1200),
     (17, CLIENT4, 5353, VIP4, 53), 0, codec.FIRST_FRAGMENT),
    ("udp4-later-fragment", IP(src=CLIENT4, dst=VIP4, id=777, frag=185, proto=17) / Raw(b"b" * 1000),
     None, 0, codec.LATER_FRAGMENT),
    ("tcp6-syn", IPv6(src=CLIENT6, dst=VIP6, tc=0x28, fl=0xBEEF, hlim=60) / TCP(sport=40000, dport=80, flags="S"),
     (6, CLIENT6, 40000, VIP6, 80), 0x02, codec.NOT_FRAGMENT),
    ("udp6", IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=5353, dport=53) / Raw(b"q" * 30),
     (17, CLIENT6, 5353, VIP6, 53), 0, codec.NOT_FRAGMENT),
    ("tcp6-extension-headers", IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / TCP(sport=40002, dport=80, flags="A"),
     (6, CLIENT6, 40002, VIP6, 80), 0x10, codec.NOT_FRAGMENT),
    ("udp6-first-fragment", IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrFragment(nh=17, offset=0, m=1, id=0xABCDEF) / UDP(sport=5353, dport=53, len=3000) / Raw(b"a" * 1000),
     (17, CLIENT6, 5353, VIP6, 53), 0, codec.FIRST_FRAGMENT),
    ("udp6-later-fragment", IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrFragment(nh=17, offset=126, m=0, id=0xABCDEF) / Raw(b"b" * 500),
     None, 0, codec.LATER_FRAGMENT),
    ("udp6-atomic-fragment", IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrFragment(nh=17, offset=0, m=0, id=9) / UDP(sport=5353, dport=53) / Raw(b"z"),
     (17, CLIENT6, 5353, VIP6, 53), 0, codec.NOT_FRAGMENT),
]


def _key(fields):
    proto, src, sport, dst, dport = fields
    return codec.flow_key(proto, packed(src), packed(dst), sport, dport)


@pytest.mark.parametrize("name,l3,key,flags,frag", FLOWS, ids=[f[0] for f in FLOWS])
def test_parse_flows(name, l3, key, flags, frag):
    pkt = codec.parse(frame(l3), VIPS)
    assert isinstance(pkt, codec.Packet), pkt
    assert pkt.kind == codec.FLOW
    assert pkt.family == (4 if isinstance(l3, IP) else 6)
    assert pkt.length == len(bytes(l3))
    assert pkt.frag == frag
    assert pkt.flags == flags
    if key is None:
        assert pkt.key is None and pkt.sport == 0 and pkt.dport == 0
        assert pkt.frag_id in (777, 0xABCDEF)
    else:
        assert pkt.key == _key(key)
        assert codec.flow_key(pkt.proto, pkt.src, pkt.dst, pkt.sport, pkt.dport) == pkt.key


@pytest.mark.parametrize("name,l3,key,flags,frag", FLOWS, ids=[f[0] for f in FLOWS])
def test_golden_dr(name, l3, key, flags, frag):
    f = frame(l3)
    assert codec.dr_frame(f, MACS) == expected_dr(l3)
    buf = bytearray(f)
    codec.dr_rewrite(memoryview(buf), MACS)
    assert bytes(buf) == expected_dr(l3)


@pytest.mark.parametrize("name,l3,key,flags,frag", FLOWS, ids=[f[0] for f in FLOWS])
def test_golden_tun(name, l3, key, flags, frag):
    f = frame(l3)
    pkt = codec.parse(memoryview(f), VIPS)  # a ring slot is a memoryview
    tun = TUN4 if pkt.family == 4 else TUN6
    assert tun.fits(pkt)
    assert tun.encap(memoryview(f), pkt, IDENT) == expected_tun(l3)


def test_tun_drops_ethernet_padding():
    l3 = IP(src=CLIENT4, dst=VIP4) / UDP(sport=1, dport=53) / Raw(b"x")
    padded = frame(l3) + bytes(60 - len(frame(l3)))  # a minimum-size Ethernet frame
    pkt = codec.parse(padded, VIPS)
    assert pkt.length == len(bytes(l3))
    assert TUN4.encap(padded, pkt, IDENT) == expected_tun(l3)
    assert codec.dr_frame(padded, MACS) == expected_dr(l3) + bytes(60 - len(frame(l3)))


def test_tun_header_plus_inner_is_encap():
    l3 = IP(src=CLIENT4, dst=VIP4) / TCP(sport=40000, dport=80, flags="A")
    f = frame(l3)
    pkt = codec.parse(f, VIPS)
    assert TUN4.header(f, pkt, IDENT) + bytes(l3) == TUN4.encap(f, pkt, IDENT)


def test_tunnel_rejects_mixed_families():
    with pytest.raises(ValueError):
        codec.Tunnel(packed(DIR4), packed(RS6), b"\x00" * 6, b"\x00" * 6)


# ---- too big after encapsulation --------------------------------------------


def test_too_big_ipv4_df_gets_frag_needed():
    l3 = IP(src=CLIENT4, dst=VIP4, flags="DF", id=99) / TCP(sport=40000, dport=443, flags="A") / Raw(b"d" * 1460)
    f = frame(l3)
    pkt = codec.parse(f, VIPS)
    assert pkt.length == 1500 and not TUN4.fits(pkt) and codec.is_df(f, pkt)
    reply = codec.too_big(f, pkt, TUN4.max_inner)
    quote = bytes(l3)[:548]  # 576 - IP - ICMP headers
    expected = Ether(dst=GW_MAC, src=DIR_MAC) / IP(src=VIP4, dst=CLIENT4, tos=0xC0, ttl=64, id=0) / ICMP(
        type=3, code=4, nexthopmtu=1480) / Raw(quote)
    assert reply == bytes(expected)
    # and the client's stack reads it as an error about its own flow
    err = codec.parse(frame(IP(bytes(expected[IP]))), frozenset({packed(CLIENT4)}))
    assert err.kind == codec.ICMP_ERROR


def _tunnelled(fragments, ident: int) -> list[bytes]:
    return [bytes(Ether(dst=RS_MAC, src=DIR_MAC) / IP(src=DIR4, dst=RS4, proto=4, id=ident + i, ttl=fr.ttl,
                                                      tos=fr.tos) / Raw(bytes(fr)))
            for i, fr in enumerate(fragments)]


def test_too_big_ipv4_without_df_is_fragmented_into_the_tunnel():
    """As a router fragments a packet onto a smaller link (the tunnel, max_inner bytes), each fragment
    then in an outer packet of its own: the real server unwraps each (no outer fragment, which its tc
    program could not unwrap) and reassembles the client's packet."""
    l3 = IP(src=CLIENT4, dst=VIP4, id=99, tos=0x10) / UDP(sport=5353, dport=53) / Raw(b"u" * 3000)
    f = frame(l3)
    pkt = codec.parse(f, VIPS)
    assert not TUN4.fits(pkt) and not codec.is_df(f, pkt)
    frames = TUN4.fragments(f, pkt, IDENT)
    assert frames == _tunnelled(fragment(IP(bytes(l3)), fragsize=1456), IDENT)  # 1480 - 20, a multiple of 8
    assert len(frames) == 3 and all(len(x) - 14 <= 1500 for x in frames)
    inner = [IP(bytes(Ether(x)[IP].payload)) for x in frames]
    assert b"".join(bytes(i.payload) for i in inner) == bytes(l3.payload)
    assert [i.frag * 8 for i in inner] == [0, 1456, 2912] and [i.flags.MF for i in inner] == [1, 1, 0]


def test_an_inner_fragment_with_options_is_fragmented_again():
    """A later fragment of the client's packet (offset and MF carry on), with options: the first piece keeps
    them all, the next only the copied ones (RFC 791: security 0x82 is copied, record route 0x07 is not)."""
    opts = [IPOption(b"\x82\x0b" + bytes(9)), IPOption(b"\x07\x07\x04" + bytes(4))]
    l3 = IP(src=CLIENT4, dst=VIP4, id=7, frag=100, flags="MF", options=opts) / UDP(dport=53) / Raw(b"v" * 2000)
    f = frame(l3)
    pkt = codec.parse(f, VIPS)
    frames = TUN4.fragments(f, pkt, 0xFFFF)
    inner = [IP(bytes(Ether(x)[IP].payload)) for x in frames]
    assert [Ether(x)[IP].id for x in frames] == [0xFFFF, 0]
    assert [i.frag for i in inner] == [100, 100 + (1480 - 40) // 8] and all(i.flags.MF for i in inner)
    assert [i.ihl for i in inner] == [10, 8]  # 20 + 20 bytes of options; then 20 + 12 (security, padded)
    assert bytes(inner[1])[20:31] == b"\x82\x0b" + bytes(9)
    assert b"".join(bytes(i.payload) for i in inner) == bytes(l3.payload)
    assert all(codec.internet_checksum(bytes(i)[:i.ihl * 4]) == 0 for i in inner)  # each header's checksum


def test_too_big_ipv6_gets_packet_too_big():
    l3 = IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=40000, dport=443, flags="A") / Raw(b"d" * 1440)
    f = frame(l3)
    pkt = codec.parse(f, VIPS)
    assert pkt.length == 1500 and not TUN6.fits(pkt)
    reply = codec.too_big(f, pkt, TUN6.max_inner)
    expected = Ether(dst=GW_MAC, src=DIR_MAC) / IPv6(src=VIP6, dst=CLIENT6, hlim=64) / ICMPv6PacketTooBig(
        mtu=1460) / Raw(bytes(l3)[:1232])
    assert reply == bytes(expected)
    assert len(reply) - 14 == 1280


def test_no_icmp_error_about_icmp_errors_or_later_fragments():
    err = IP(src=ROUTER4, dst=VIP4) / ICMP(type=11, code=0) / IP(src=VIP4, dst=CLIENT4) / TCP(sport=80, dport=40000)
    pkt = codec.parse(frame(err), VIPS)
    assert codec.too_big(frame(err), pkt, 1000) is Drop.ICMP_UNSUPPORTED
    later = IP(src=CLIENT4, dst=VIP4, frag=185, proto=17) / Raw(b"b" * 100)
    pkt = codec.parse(frame(later), VIPS)
    assert codec.too_big(frame(later), pkt, 1000) is Drop.ICMP_UNSUPPORTED


# ---- ICMP errors reach the real server that owns the flow --------------------

ICMP_ERRORS = [
    ("frag-needed-v4",
     IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=4, nexthopmtu=1400) / IP(src=VIP4, dst=CLIENT4, flags="DF") / TCP(sport=80, dport=40000, flags="A"),
     (6, CLIENT4, 40000, VIP4, 80)),
    ("port-unreachable-v4",
     IP(src=CLIENT4, dst=VIP4) / ICMP(type=3, code=3) / IP(src=VIP4, dst=CLIENT4) / UDP(sport=53, dport=5353),
     (17, CLIENT4, 5353, VIP4, 53)),
    ("time-exceeded-v4-8-bytes-only",
     IP(src=ROUTER4, dst=VIP4) / ICMP(type=11, code=0) / Raw(bytes(IP(src=VIP4, dst=CLIENT4) / TCP(sport=80, dport=40000))[:28]),
     (6, CLIENT4, 40000, VIP4, 80)),
    ("packet-too-big-v6",
     IPv6(src=ROUTER6, dst=VIP6) / ICMPv6PacketTooBig(mtu=1280) / IPv6(src=VIP6, dst=CLIENT6) / TCP(sport=80, dport=40000, flags="A") / Raw(b"r" * 100),
     (6, CLIENT6, 40000, VIP6, 80)),
    ("unreachable-v6-inner-extension",
     IPv6(src=ROUTER6, dst=VIP6) / ICMPv6DestUnreach(code=1) / IPv6(src=VIP6, dst=CLIENT6) / IPv6ExtHdrDestOpt() / UDP(sport=53, dport=5353),
     (17, CLIENT6, 5353, VIP6, 53)),
]


@pytest.mark.parametrize("name,l3,key", ICMP_ERRORS, ids=[e[0] for e in ICMP_ERRORS])
def test_icmp_error_keys_the_owning_flow(name, l3, key):
    f = frame(l3)
    pkt = codec.parse(f, VIPS)
    assert isinstance(pkt, codec.Packet), pkt
    assert pkt.kind == codec.ICMP_ERROR
    assert pkt.key == _key(key)  # the client -> VIP direction: the connection-table key
    assert pkt.length == len(bytes(l3))
    # forwarded whole, DR or TUN
    assert codec.dr_frame(f, MACS) == expected_dr(l3)
    tun = TUN4 if pkt.family == 4 else TUN6
    assert tun.encap(f, pkt, IDENT) == expected_tun(l3)


def test_icmp_error_finds_the_server_through_the_connection_table():
    from director.dataplane.conntable import ConnTable
    from director.dataplane.scheduler import Dest

    table = ConnTable()
    rs = Dest(packed(RS4))
    syn = codec.parse(frame(IP(src=CLIENT4, dst=VIP4) / TCP(sport=40000, dport=80, flags="S")), VIPS)
    table.add(syn.key, rs, syn.flags, now=0.0)
    err = codec.parse(frame(ICMP_ERRORS[0][1]), VIPS)
    assert table.peek(err.key, now=1.0).dest is rs


# ---- VIP ownership: ARP and NDP ----------------------------------------------


def test_arp_request_for_vip_gets_reply():
    req = Ether(dst="ff:ff:ff:ff:ff:ff", src=ASKER_MAC) / ARP(op=1, hwsrc=ASKER_MAC, psrc="192.0.2.1", pdst=VIP4)
    pkt = codec.parse(bytes(req), VIPS)
    assert pkt.kind == codec.ARP_REQUEST and pkt.dst == packed(VIP4) and pkt.src == packed("192.0.2.1")
    reply = codec.arp_reply(bytes(req), pkt, codec.mac_bytes(DIR_MAC))
    expected = Ether(dst=ASKER_MAC, src=DIR_MAC) / ARP(op=2, hwsrc=DIR_MAC, psrc=VIP4, hwdst=ASKER_MAC, pdst="192.0.2.1")
    assert reply == bytes(expected)


def test_arp_probe_is_answered():
    probe = Ether(dst="ff:ff:ff:ff:ff:ff", src=ASKER_MAC) / ARP(op=1, hwsrc=ASKER_MAC, psrc="0.0.0.0", pdst=VIP4)
    pkt = codec.parse(bytes(probe), VIPS)
    assert pkt.kind == codec.ARP_REQUEST  # answering defends the address (RFC 5227)


def test_gratuitous_arp():
    garp = codec.gratuitous_arp(packed(VIP4), codec.mac_bytes(DIR_MAC))
    expected = Ether(dst="ff:ff:ff:ff:ff:ff", src=DIR_MAC) / ARP(
        op=1, hwsrc=DIR_MAC, psrc=VIP4, hwdst="00:00:00:00:00:00", pdst=VIP4)
    assert garp == bytes(expected)


def test_neighbor_solicitation_for_vip_gets_advert():
    asker = "2001:db8:10::99"
    ns = Ether(dst="33:33:ff:00:00:10", src=ASKER_MAC) / IPv6(src=asker, dst=codec_str(codec.solicited_node(packed(VIP6))), hlim=255) / ICMPv6ND_NS(tgt=VIP6) / ICMPv6NDOptSrcLLAddr(lladdr=ASKER_MAC)
    pkt = codec.parse(bytes(ns), VIPS)
    assert pkt.kind == codec.NEIGHBOR_SOLICIT and pkt.dst == packed(VIP6)
    na = codec.neighbor_advert(bytes(ns), pkt, codec.mac_bytes(DIR_MAC))
    expected = Ether(dst=ASKER_MAC, src=DIR_MAC) / IPv6(src=VIP6, dst=asker, hlim=255) / ICMPv6ND_NA(
        tgt=VIP6, R=0, S=1, O=1) / ICMPv6NDOptDstLLAddr(lladdr=DIR_MAC)
    assert na == bytes(expected)


def test_unicast_neighbor_solicitation_is_answered():
    ns = Ether(dst=DIR_MAC, src=ASKER_MAC) / IPv6(src="2001:db8:10::99", dst=VIP6, hlim=255) / ICMPv6ND_NS(tgt=VIP6)
    assert codec.parse(bytes(ns), VIPS).kind == codec.NEIGHBOR_SOLICIT


def test_dad_solicitation_is_answered_to_all_nodes():
    ns = Ether(dst="33:33:ff:00:00:10", src=ASKER_MAC) / IPv6(src="::", dst=codec_str(codec.solicited_node(packed(VIP6))), hlim=255) / ICMPv6ND_NS(tgt=VIP6)
    pkt = codec.parse(bytes(ns), VIPS)
    na = codec.neighbor_advert(bytes(ns), pkt, codec.mac_bytes(DIR_MAC))
    assert na == codec.unsolicited_na(packed(VIP6), codec.mac_bytes(DIR_MAC))


def test_unsolicited_na():
    na = codec.unsolicited_na(packed(VIP6), codec.mac_bytes(DIR_MAC))
    expected = Ether(dst="33:33:00:00:00:01", src=DIR_MAC) / IPv6(src=VIP6, dst="ff02::1", hlim=255) / ICMPv6ND_NA(
        tgt=VIP6, R=0, S=0, O=1) / ICMPv6NDOptDstLLAddr(lladdr=DIR_MAC)
    assert na == bytes(expected)


def codec_str(addr: bytes) -> str:
    return str(ipaddress.ip_address(addr))


# ---- bad frames: dropped with a reason, never raised --------------------------


def _patch(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


GOOD4 = frame(IP(src=CLIENT4, dst=VIP4) / TCP(sport=40000, dport=80, flags="S"))
GOOD6 = frame(IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=40000, dport=80, flags="S"))
NS = bytes(Ether(dst="33:33:ff:00:00:10", src=ASKER_MAC) / IPv6(src="2001:db8:10::99", dst="ff02::1:ff00:10", hlim=255) / ICMPv6ND_NS(tgt=VIP6))

BAD = [
    ("empty", b"", Drop.TRUNCATED),
    ("short-ethernet", GOOD4[:13], Drop.TRUNCATED),
    ("ethernet-only", GOOD4[:14], Drop.TRUNCATED),
    ("short-ipv4-header", GOOD4[:30], Drop.TRUNCATED),
    ("vlan-tagged", bytes(Ether(dst=DIR_MAC, src=GW_MAC) / Dot1Q(vlan=5) / IP(src=CLIENT4, dst=VIP4) / TCP()), Drop.UNSUPPORTED_ETHERTYPE),
    ("lldp", _patch(GOOD4, 12, b"\x88\xcc"), Drop.UNSUPPORTED_ETHERTYPE),
    ("ipv4-bad-version", _patch(GOOD4, 14, b"\x65"), Drop.BAD_VERSION),
    ("ipv4-ihl-4", _patch(GOOD4, 14, b"\x44"), Drop.BAD_IHL),
    ("ipv4-ihl-0", _patch(GOOD4, 14, b"\x40"), Drop.BAD_IHL),
    ("ipv4-total-below-header", _patch(GOOD4, 16, b"\x00\x13"), Drop.BAD_LENGTH),
    ("ipv4-ihl-beyond-total", _patch(GOOD4, 14, b"\x4f"), Drop.BAD_LENGTH),
    ("ipv4-total-beyond-frame", _patch(GOOD4, 16, b"\x05\xdc"), Drop.TRUNCATED),
    ("ipv4-cut-frame", GOOD4[:-5], Drop.TRUNCATED),
    ("ipv4-not-vip", frame(IP(src=CLIENT4, dst="192.0.2.11") / TCP()), Drop.NOT_VIP),
    ("ipv4-gre-to-vip", frame(IP(src=CLIENT4, dst=VIP4, proto=47) / Raw(b"\x00" * 8)), Drop.UNSUPPORTED_PROTOCOL),
    ("ipv4-tcp-header-cut", frame(IP(src=CLIENT4, dst=VIP4, proto=6) / Raw(b"\x9c\x40\x00\x50" + b"\x00" * 6)), Drop.TRUNCATED),
    ("ipv4-udp-header-cut", frame(IP(src=CLIENT4, dst=VIP4, proto=17) / Raw(b"\x14\xe9\x00")), Drop.TRUNCATED),
    ("ipv4-tiny-first-fragment", frame(IP(src=CLIENT4, dst=VIP4, proto=6, flags="MF") / Raw(b"\x9c\x40\x00\x50\x00\x00\x00\x00")), Drop.TRUNCATED),
    ("icmp-echo-to-vip", frame(IP(src=CLIENT4, dst=VIP4) / ICMP(type=8)), Drop.ICMP_UNSUPPORTED),
    ("icmp-error-not-from-vip", frame(IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=4) / IP(src=CLIENT4, dst="192.0.2.99") / TCP()), Drop.ICMP_NOT_OURS),
    ("icmp-error-about-icmp", frame(IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=1) / IP(src=VIP4, dst=CLIENT4) / ICMP()), Drop.ICMP_NOT_OURS),
    ("icmp-error-inner-cut", frame(IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=4) / Raw(bytes(IP(src=VIP4, dst=CLIENT4) / TCP())[:22])), Drop.TRUNCATED),
    ("icmp-error-fragmented", frame(IP(src=ROUTER4, dst=VIP4, flags="MF") / ICMP(type=3, code=4) / IP(src=VIP4, dst=CLIENT4) / TCP()), Drop.ICMP_FRAGMENTED),
    ("icmp-header-cut", frame(IP(src=ROUTER4, dst=VIP4, proto=1) / Raw(b"\x03\x04")), Drop.TRUNCATED),
    ("ipv6-short", GOOD6[:50], Drop.TRUNCATED),
    ("ipv6-bad-version", _patch(GOOD6, 14, b"\x40"), Drop.BAD_VERSION),
    ("ipv6-jumbo-length-0", _patch(GOOD6, 18, b"\x00\x00"), Drop.BAD_LENGTH),
    ("ipv6-length-beyond-frame", _patch(GOOD6, 18, b"\x05\x00"), Drop.TRUNCATED),
    ("ipv6-not-vip", frame(IPv6(src=CLIENT6, dst="2001:db8:10::11") / TCP()), Drop.NOT_VIP),
    ("ipv6-esp", frame(IPv6(src=CLIENT6, dst=VIP6, nh=50) / Raw(b"\x00" * 16)), Drop.UNSUPPORTED_PROTOCOL),
    ("ipv6-later-fragment-of-esp", frame(IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrFragment(nh=50, offset=10, id=5) / Raw(b"\x00" * 16)), Drop.UNSUPPORTED_PROTOCOL),
    ("ipv4-later-fragment-of-gre", frame(IP(src=CLIENT4, dst=VIP4, proto=47, frag=10) / Raw(b"\x00" * 16)), Drop.UNSUPPORTED_PROTOCOL),
    ("ipv6-no-next-header", frame(IPv6(src=CLIENT6, dst=VIP6, nh=59) / Raw(b"\x00" * 8)), Drop.UNSUPPORTED_PROTOCOL),
    ("ipv6-extension-chain-too-long", frame(IPv6(src=CLIENT6, dst=VIP6) / (IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()) / TCP()), Drop.UNSUPPORTED_EXTENSION),
    ("ipv6-routing-segments-left", frame(IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrRouting(addresses=["2001:db8::1"], segleft=1) / TCP()), Drop.UNSUPPORTED_EXTENSION),
    ("ipv6-extension-cut", frame(IPv6(src=CLIENT6, dst=VIP6, nh=0) / Raw(b"\x06\x00\x00")), Drop.TRUNCATED),
    ("ipv6-tcp-header-cut", frame(IPv6(src=CLIENT6, dst=VIP6, nh=6) / Raw(b"\x00" * 10)), Drop.TRUNCATED),
    ("icmpv6-echo-to-vip", frame(IPv6(src=CLIENT6, dst=VIP6) / ICMPv6EchoRequest()), Drop.ICMP_UNSUPPORTED),
    ("icmpv6-error-not-from-vip", frame(IPv6(src=ROUTER6, dst=VIP6) / ICMPv6PacketTooBig() / IPv6(src=CLIENT6, dst=VIP6) / TCP()), Drop.ICMP_NOT_OURS),
    ("ns-hop-limit-not-255", _patch(NS, 21, b"\x40"), Drop.NDP_INVALID),
    ("ns-bad-checksum", _patch(NS, 56, b"\xde\xad"), Drop.BAD_CHECKSUM),
    ("ns-for-other-address", bytes(Ether(dst="33:33:ff:00:00:11", src=ASKER_MAC) / IPv6(src="2001:db8:10::99", dst="ff02::1:ff00:11", hlim=255) / ICMPv6ND_NS(tgt="2001:db8:10::11")), Drop.NOT_VIP),
    ("ns-wrong-multicast", bytes(Ether(dst="33:33:ff:00:00:11", src=ASKER_MAC) / IPv6(src="2001:db8:10::99", dst="ff02::1:ff00:11", hlim=255) / ICMPv6ND_NS(tgt=VIP6)), Drop.NDP_INVALID),
    ("arp-reply", bytes(Ether(dst=DIR_MAC, src=ASKER_MAC) / ARP(op=2, hwsrc=ASKER_MAC, psrc="192.0.2.1", pdst=VIP4)), Drop.ARP_UNSUPPORTED),
    ("arp-announcement-of-vip", bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=ASKER_MAC) / ARP(op=1, hwsrc=ASKER_MAC, psrc=VIP4, pdst=VIP4)), Drop.ARP_UNSUPPORTED),
    ("arp-for-other-address", bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=ASKER_MAC) / ARP(op=1, hwsrc=ASKER_MAC, psrc="192.0.2.1", pdst="192.0.2.11")), Drop.NOT_VIP),
    ("arp-cut", bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=ASKER_MAC) / ARP(op=1, pdst=VIP4))[:40], Drop.TRUNCATED),
]


@pytest.mark.parametrize("name,data,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_frames_are_dropped_with_a_reason(name, data, reason):
    assert codec.parse(data, VIPS) is reason
    assert codec.parse(memoryview(bytearray(data)), VIPS) is reason


def test_drop_reasons_are_metric_labels():
    assert str(Drop.NOT_VIP) == "not_vip"
    assert len({d.value for d in Drop}) == len(Drop)


# ---- fuzzing -----------------------------------------------------------------

SEEDS = [GOOD4, GOOD6, NS] + [frame(f[1]) for f in FLOWS] + [frame(e[1]) for e in ICMP_ERRORS] + [
    bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=ASKER_MAC) / ARP(op=1, hwsrc=ASKER_MAC, psrc="192.0.2.1", pdst=VIP4))]


def _exercise(data: bytes) -> None:
    """Parse, and for whatever parses, run every builder that applies: nothing may raise."""
    pkt = codec.parse(data, VIPS)
    assert isinstance(pkt, (codec.Packet, Drop))
    if isinstance(pkt, Drop):
        return
    if pkt.kind in (codec.FLOW, codec.ICMP_ERROR):
        codec.dr_frame(data, MACS)
        tun = TUN4 if pkt.family == 4 else TUN6
        if tun.fits(pkt):
            tun.encap(data, pkt, 1)
        codec.too_big(data, pkt, 1280)
    elif pkt.kind == codec.ARP_REQUEST:
        codec.arp_reply(data, pkt, b"\x02" * 6)
    else:
        codec.neighbor_advert(data, pkt, b"\x02" * 6)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data):
    _exercise(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x08\x06"]))
def test_random_payload_behind_real_ethertypes_never_raises(data, ethertype):
    _exercise(b"\x02" * 12 + ethertype + data)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=6),
       st.integers(0, 2000))
def test_mutated_frames_never_raise(seed, flips, cut):
    data = bytearray(seed)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    _exercise(bytes(data[:cut] if cut < len(data) else data))


# ---- virtio_net_hdr and partial checksums --------------------------------------


def _partial_tcp(l3) -> tuple[bytearray, int, int, int]:
    """A frame with CHECKSUM_PARTIAL as veth hands it over: the TCP checksum
    field holds only the folded pseudo-header sum."""
    full = bytearray(frame(l3))
    l4 = 14 + (full[14] & 15) * 4 if isinstance(l3, IP) else 54
    end = 14 + len(bytes(l3))
    if isinstance(l3, IP):
        pseudo = bytes(full[26:34]) + struct.pack("!BBH", 0, 6, end - l4)
    else:
        pseudo = bytes(full[22:54]) + struct.pack("!IxxxB", end - l4, 6)
    folded = ~codec.internet_checksum(pseudo) & 0xFFFF
    struct.pack_into("!H", full, l4 + 16, folded)
    return full, l4, 16, end


@pytest.mark.parametrize("l3", [
    IP(src=CLIENT4, dst=VIP4) / TCP(sport=40000, dport=80, flags="PA") / Raw(b"hello world!!"),
    IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=40000, dport=80, flags="PA") / Raw(b"odd-length"),
], ids=["v4", "v6"])
def test_complete_partial_checksum(l3):
    partial, start, offset, end = _partial_tcp(l3)
    assert bytes(partial) != frame(l3)
    assert codec.complete_checksum(partial, start, offset, end) is None
    assert bytes(partial) == frame(l3)  # scapy's full checksum


def test_complete_checksum_ignores_ethernet_padding_and_rejects_bad_offsets():
    l3 = IP(src=CLIENT4, dst=VIP4) / TCP(sport=1, dport=80, flags="A")
    partial, start, offset, end = _partial_tcp(l3)
    padded = partial + b"\xff" * 6
    assert codec.complete_checksum(padded, start, offset, end) is None
    assert bytes(padded[:end]) == frame(l3)
    assert codec.complete_checksum(bytearray(10), 4, 16, 10) is Drop.BAD_VNET_HDR
    assert codec.complete_checksum(bytearray(60), 34, 60, 60) is Drop.BAD_VNET_HDR


def test_vnet_header_round_trip_and_tun_shift():
    h = codec.VnetHdr(codec.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16)
    assert codec.parse_vnet(h.pack()) == h
    assert codec.parse_vnet(b"\x00" * 9) is Drop.TRUNCATED
    assert codec.parse_vnet(b"\x80" + b"\x00" * 9) is Drop.BAD_VNET_HDR
    shifted = codec.parse_vnet(codec.vnet_for_tun(h, TUN4.overhead))
    assert (shifted.flags, shifted.csum_start, shifted.csum_offset) == (1, 54, 16)
    assert codec.vnet_for_tun(codec.VnetHdr(0, 0, 0, 0, 0, 0), 20) == codec.VNET_NONE
    gso = codec.VnetHdr(1, codec.VIRTIO_NET_HDR_GSO_TCPV4, 66, 1448, 34, 16)
    assert codec.vnet_for_tun(gso, 20) is Drop.GSO_UNSUPPORTED


def test_partial_checksum_survives_tunnelling():
    """What the kernel does with the shifted header: completing at the new
    offset in the encapsulated frame yields a correct inner checksum."""
    l3 = IP(src=CLIENT4, dst=VIP4) / TCP(sport=40000, dport=80, flags="PA") / Raw(b"data")
    partial, start, offset, end = _partial_tcp(l3)
    pkt = codec.parse(bytes(partial), VIPS)
    out = bytearray(TUN4.encap(bytes(partial), pkt, IDENT))
    h = codec.parse_vnet(codec.vnet_for_tun(codec.VnetHdr(1, 0, 0, 0, start, offset), TUN4.overhead))
    assert codec.complete_checksum(out, h.csum_start, h.csum_offset, len(out)) is None
    assert bytes(out) == expected_tun(l3)


# ---- the whole pure path: the recipe the packet engine follows ----------------------


class PurePath:
    """parse -> connection table / fragments / scheduler -> DR frame, as the engine does it."""

    def __init__(self, scheduler_name: str = "wlc"):
        from director.dataplane.conntable import ConnTable, FragmentTable
        from director.dataplane.scheduler import Dest, make_scheduler

        self.dests = [Dest(packed(RS4), 1), Dest(packed("10.2.0.12"), 1)]
        for i, d in enumerate(self.dests):
            d.tx = codec.mac_bytes(f"02:00:00:00:01:{i:02x}") + codec.mac_bytes(DIR_MAC)
        self.sched = make_scheduler(scheduler_name, self.dests, family=4)
        self.table = ConnTable()
        self.frags = FragmentTable()

    def forward(self, data: bytes, now: float):
        p = codec.parse(data, VIPS)
        if p.__class__ is Drop:
            return p
        if p.kind == codec.ICMP_ERROR:
            c = self.table.peek(p.key, now)
            if c is None:
                return Drop.NO_CONNECTION
            dest = c.dest
        elif p.frag == codec.LATER_FRAGMENT:
            dest = self.frags.get((p.proto, p.src, p.dst, p.frag_id), now)
            if dest is None:
                return Drop.FRAGMENT_UNKNOWN
        else:
            c = self.table.lookup(p.key, p.flags, now)
            if c is None:
                if p.proto == 6 and not p.flags & 0x02:
                    return Drop.NO_CONNECTION  # IPVS: only a SYN opens a TCP connection
                dest = self.sched.schedule(p.src, p.sport, p.dst, p.dport, now)
                if dest is None:
                    return Drop.NO_DESTINATION
                c = self.table.add(p.key, dest, p.flags, now)
            dest = c.dest
            if p.frag == codec.FIRST_FRAGMENT:
                self.frags.add((p.proto, p.src, p.dst, p.frag_id), dest, now)
        return dest, codec.dr_frame(data, dest.tx)


def test_pure_path_flow_fragments_and_icmp_follow_one_server():
    path = PurePath()
    syn = frame(IP(src=CLIENT4, dst=VIP4) / TCP(sport=40000, dport=80, flags="S"))
    owner, out = path.forward(syn, 0)
    assert out[:6] == owner.tx[:6] and out[12:] == syn[12:]
    other_client = frame(IP(src="198.51.100.8", dst=VIP4) / TCP(sport=40000, dport=80, flags="S"))
    assert path.forward(other_client, 0)[0] is not owner  # wlc spreads
    for flags in ("A", "PA", "FA"):
        pkt = frame(IP(src=CLIENT4, dst=VIP4) / TCP(sport=40000, dport=80, flags=flags))
        assert path.forward(pkt, 1)[0] is owner
    err = frame(ICMP_ERRORS[0][1])
    assert path.forward(err, 2)[0] is owner
    # a fragmented UDP datagram: the first fragment places the later ones
    first = frame(IP(src=CLIENT4, dst=VIP4, id=4242, flags="MF") / UDP(sport=5353, dport=80, len=1600) / Raw(b"a" * 1000))
    later = frame(IP(src=CLIENT4, dst=VIP4, id=4242, frag=126, proto=17) / Raw(b"b" * 592))
    assert path.forward(later, 3) is Drop.FRAGMENT_UNKNOWN  # before its first: dropped, counted
    d1 = path.forward(first, 3)[0]
    assert path.forward(later, 3)[0] is d1


def test_pure_path_established_flow_stays_when_a_server_is_added_and_drained():
    from director.dataplane.scheduler import Dest

    path = PurePath()
    syn = frame(IP(src=CLIENT4, dst=VIP4) / TCP(sport=40000, dport=80, flags="S"))
    ack = frame(IP(src=CLIENT4, dst=VIP4) / TCP(sport=40000, dport=80, flags="A"))
    owner = path.forward(syn, 0)[0]
    path.forward(ack, 0)
    newcomer = Dest(packed("10.2.0.13"), 100)
    newcomer.tx = b"\x02" * 12
    path.dests.append(newcomer)
    path.sched.update(path.dests)
    owner.weight = 0  # drain
    path.sched.update()
    assert path.forward(ack, 10)[0] is owner
    fresh = frame(IP(src=CLIENT4, dst=VIP4) / TCP(sport=40001, dport=80, flags="S"))
    assert path.forward(fresh, 10)[0] is not owner  # a drained server takes no new flow
    assert path.forward(frame(IP(src=CLIENT4, dst=VIP4) / TCP(sport=40002, dport=80, flags="A")), 10) is Drop.NO_CONNECTION
