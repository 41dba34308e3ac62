"""VRRPv3 codec: golden bytes built independently (scapy, a keepalived capture), and every 7.1 drop reason."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.vrrp import VRRPv3

from director.control import vrrp_packet as wire
from director.control.vrrp_packet import Advertisement, Received
from glb.errors import HAError

A = ipaddress.ip_address
SRC4, SRC6 = A("10.0.0.1"), A("fe80::1")
VIPS4 = (A("10.0.0.100"), A("10.0.0.101"))
VIPS6 = (A("2001:db8::100"),)

# Captured with tcpdump from keepalived 2.2.7 (vrrp_version 3, virtual_router_id 51,
# priority 150, advert_int 1) on a namespace LAN: the IP header, then VRRP.
# IPv4: from 10.9.0.2, virtual address 10.9.0.100.
KEEPALIVED_V4 = bytes.fromhex("45c0002000010000ff70d08f0a090002e000001231339601006443600a090064")
# IPv6: from its link-local address, virtual address fd00:9::100.
KEEPALIVED_V6 = bytes.fromhex(
    "6c06d03a001870fffe800000000000004803e0fffe4d2949ff020000000000000000000000000012"
    "313396010064eba4fd000009000000000000000000000100")


def scapy_v4(vrid, prio, adv, addrs, src=SRC4, dst=wire.GROUP_V4):
    pkt = IP(src=str(src), dst=str(dst), ttl=255) / VRRPv3(vrid=vrid, priority=prio, adv=adv, addrlist=[str(a) for a in addrs])
    return bytes(IP(bytes(pkt))[VRRPv3])


def scapy_v6(vrid, prio, adv, addrs, src=SRC6, dst=wire.GROUP_V6):
    pkt = IPv6(src=str(src), dst=str(dst), hlim=255) / VRRPv3(vrid=vrid, priority=prio, adv=adv, addrlist=[str(a) for a in addrs])
    return bytes(IPv6(bytes(pkt))[VRRPv3])


GOLDEN = [
    # (advertisement, src, dst, expected bytes from scapy)
    (Advertisement(7, 100, 10, VIPS4[:1]), SRC4, wire.GROUP_V4, scapy_v4(7, 100, 10, VIPS4[:1])),
    (Advertisement(255, 255, 4095, VIPS4), SRC4, wire.GROUP_V4, scapy_v4(255, 255, 4095, VIPS4)),
    (Advertisement(1, 0, 100, VIPS4), SRC4, A("10.0.0.2"), scapy_v4(1, 0, 100, VIPS4, dst=A("10.0.0.2"))),
    (Advertisement(7, 100, 10, VIPS6), SRC6, wire.GROUP_V6, scapy_v6(7, 100, 10, VIPS6)),
    (Advertisement(42, 1, 1, ()), SRC6, A("fe80::2"), scapy_v6(42, 1, 1, (), dst=A("fe80::2"))),
]


def test_the_scapy_reference_is_what_we_think():
    # 3 1 | vrid 7 | prio 100 | 1 addr | 0 | 10 cs | checksum | 10.0.0.100
    assert GOLDEN[0][3] == bytes.fromhex("31076401000a75f90a000064")


@pytest.mark.parametrize("adv,src,dst,expected", GOLDEN)
def test_encode_matches_scapy(adv, src, dst, expected):
    assert wire.encode(adv, src, dst) == expected


@pytest.mark.parametrize("adv,src,dst,expected", GOLDEN)
def test_decode_scapy_bytes(adv, src, dst, expected):
    assert wire.decode(Received(src, dst, 255, expected)) == adv


def test_checksum_depends_on_the_pseudo_header():
    adv = Advertisement(7, 100, 10, VIPS4[:1])
    assert wire.encode(adv, SRC4, wire.GROUP_V4) != wire.encode(adv, SRC4, A("10.0.0.2"))
    with pytest.raises(HAError) as info:  # right bytes, other destination: checksum fails
        wire.decode(Received(SRC4, A("10.0.0.2"), 255, wire.encode(adv, SRC4, wire.GROUP_V4)))
    assert info.value.reason == "checksum"


def _reason(pkt: Received) -> str:
    with pytest.raises(HAError) as info:
        wire.decode(pkt)
    return info.value.reason


def _fix_checksum(data: bytes, src=SRC4, dst=wire.GROUP_V4) -> bytes:
    data = data[:6] + b"\0\0" + data[8:]
    csum = wire.checksum(wire._pseudo_header(src, dst, len(data)) + data)
    return data[:6] + csum.to_bytes(2, "big") + data[8:]


GOOD = wire.encode(Advertisement(7, 100, 10, VIPS4[:1]), SRC4, wire.GROUP_V4)


@pytest.mark.parametrize("payload,ttl,reason", [
    (GOOD, 254, "ttl"),
    (GOOD, 1, "ttl"),
    (_fix_checksum(bytes([0x21]) + GOOD[1:]), 255, "version"),  # a VRRPv2 packet
    (_fix_checksum(bytes([0x32]) + GOOD[1:]), 255, "type"),
    (GOOD[:7], 255, "length"),
    (GOOD[:-1], 255, "length"),  # address cut short
    (_fix_checksum(GOOD[:3] + b"\x02" + GOOD[4:]), 255, "length"),  # count says 2 addresses, 1 present
    (GOOD + b"\0\0\0\0", 255, "length"),
    (GOOD[:6] + b"\0\0" + GOOD[8:], 255, "checksum"),
    (GOOD[:-1] + b"\x65", 255, "checksum"),
    (_fix_checksum(GOOD[:4] + b"\x00\x00" + GOOD[6:]), 255, "interval_zero"),
    (b"", 255, "length"),
])
def test_every_bad_packet_has_its_reason(payload, ttl, reason):
    assert _reason(Received(SRC4, wire.GROUP_V4, ttl, payload)) == reason


def test_reserved_bits_are_ignored():
    adv = wire.decode(Received(SRC4, wire.GROUP_V4, 255, _fix_checksum(GOOD[:4] + b"\xf0\x0a" + GOOD[6:])))
    assert adv.max_adver_int == 10


def test_parse_ipv4_takes_the_ip_fields_and_drops_padding():
    ip = bytes(IP(src="10.0.0.1", dst="224.0.0.18", ttl=255, proto=112) / GOOD)
    rec = wire.parse_ipv4(ip + b"\0" * 6)  # Ethernet minimum-frame padding
    assert rec == Received(SRC4, wire.GROUP_V4, 255, GOOD)
    with_opts = bytes(IP(src="10.0.0.1", dst="224.0.0.18", ttl=7, proto=112, options=b"\x94\x04\x00\x00") / GOOD)
    assert wire.parse_ipv4(with_opts).payload == GOOD and wire.parse_ipv4(with_opts).ttl == 7
    for bad in (b"", ip[:19], b"\x60" + ip[1:], ip[:-1]):
        with pytest.raises(HAError):
            wire.parse_ipv4(bad)


def test_encode_refuses_what_the_wire_cannot_say():
    for adv in (Advertisement(0, 100, 10, ()), Advertisement(1, 256, 10, ()),
                Advertisement(1, 100, 0, ()), Advertisement(1, 100, 4096, ())):
        with pytest.raises(ValueError):
            wire.encode(adv, SRC4, wire.GROUP_V4)
    with pytest.raises(ValueError):
        wire.encode(Advertisement(1, 100, 10, VIPS6), SRC4, wire.GROUP_V4)


def test_keepalived_ipv4_capture_decodes_and_reencodes():
    rec = wire.parse_ipv4(KEEPALIVED_V4)
    assert (rec.src, rec.dst, rec.ttl) == (A("10.9.0.2"), wire.GROUP_V4, 255)
    adv = wire.decode(rec)
    assert adv == Advertisement(51, 150, 100, (A("10.9.0.100"),))
    assert wire.encode(adv, rec.src, rec.dst) == rec.payload


def test_keepalived_ipv6_capture_decodes_and_reencodes():
    raw = KEEPALIVED_V6
    rec = Received(ipaddress.IPv6Address(raw[8:24]), ipaddress.IPv6Address(raw[24:40]), raw[7], raw[40:])
    assert rec.dst == wire.GROUP_V6 and rec.ttl == 255 and raw[6] == wire.PROTO
    adv = wire.decode(rec)
    assert adv == Advertisement(51, 150, 100, (A("fd00:9::100"),))
    assert wire.encode(adv, rec.src, rec.dst) == rec.payload
