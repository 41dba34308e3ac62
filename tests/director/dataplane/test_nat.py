"""LVS-NAT's packet path, pure: golden frames (scapy builds the input and the expected output).

Client packets DNAT'd to RIP:8080, replies SNAT'd back to VIP:80, IPv4 and
IPv6, TCP and UDP, partial checksums from veth, ICMP errors both ways, the
two-way TCP state table, replies without a connection, bad frames.
"""

from __future__ import annotations

import ipaddress
import logging
import struct

import pytest

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror  # noqa: E402
from scapy.layers.inet6 import ICMPv6DestUnreach, IPerror6, IPv6  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from director.control.health import ServerKey  # noqa: E402
from director.dataplane import codec, nat  # noqa: E402
from director.dataplane.codec import Drop  # noqa: E402
from director.dataplane.conntable import CLOSE_WAIT, ESTABLISHED, FIN_WAIT, SYN_RECV, TIME_WAIT, ConnTable  # noqa: E402
from director.dataplane.forwarder import Forwarder, Plan, ServerPlan, ServicePlan, VipPlan  # noqa: E402

CLIENT_SIDE_MAC, PUB_MAC, LAN_MAC = "02:00:00:00:00:aa", "02:00:00:00:00:d1", "02:00:00:00:00:d2"
RS_MAC = "02:00:00:00:01:01"
VIP4, VIP6 = "192.0.2.10", "2001:db8:10::10"
CLIENT4, CLIENT6 = "198.51.100.7", "2001:db8:100::7"
RIP4, RIP6 = "10.2.0.11", "fd00:2::11"
DIP4 = "10.2.0.1"
M = codec.mac_bytes


def P(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def plan(proto: int = 6, port: int = 8080) -> Plan:
    vips = (VipPlan(P(VIP4), 80, proto, f"{VIP4}:80/{'tcp' if proto == 6 else 'udp'}"),
            VipPlan(P(VIP6), 80, proto, f"[{VIP6}]:80/{'tcp' if proto == 6 else 'udp'}"))
    servers = (ServerPlan(ServerKey("web", RIP4, port), P(RIP4), 1, True, mac=M(RS_MAC)),
               ServerPlan(ServerKey("web", RIP6, port), P(RIP6), 1, True, mac=M(RS_MAC)))
    return Plan(M(PUB_MAC), (ServicePlan("web", "nat", "rr", vips, servers),), lan_mac=M(LAN_MAC),
                local=frozenset({P(DIP4)}))


def fwd(proto: int = 6) -> Forwarder:
    f = Forwarder(ConnTable())
    f.apply(plan(proto))
    return f


def ip(src, dst):
    return IP(src=src, dst=dst) if ":" not in src else IPv6(src=src, dst=dst)


def client(l4, c=CLIENT4, v=VIP4) -> bytes:
    return bytes(Ether(dst=PUB_MAC, src=CLIENT_SIDE_MAC) / ip(c, v) / l4)


def server(l4, r=RIP4, c=CLIENT4) -> bytes:
    return bytes(Ether(dst=LAN_MAC, src=RS_MAC) / ip(r, c) / l4)


def to_server(l4, r=RIP4, c=CLIENT4) -> bytes:
    return bytes(Ether(dst=RS_MAC, src=LAN_MAC) / ip(c, r) / l4)


def to_client(l4, c=CLIENT4, v=VIP4) -> bytes:
    return bytes(Ether(dst=CLIENT_SIDE_MAC, src=PUB_MAC) / ip(v, c) / l4)


def sent(action) -> bytes:
    assert action.__class__ is bytearray, action
    assert bytes(action[:10]) == codec.VNET_NONE
    return bytes(action[10:])


FAMILIES = [(CLIENT4, VIP4, RIP4), (CLIENT6, VIP6, RIP6)]


@pytest.mark.parametrize("c, v, r", FAMILIES, ids=["ipv4", "ipv6"])
def test_tcp_in_and_out_golden(c, v, r):
    f = fwd()
    out = f.forward(client(TCP(sport=40000, dport=80, flags="S", seq=1) / Raw(b"x" * 7), c, v), 0.0)
    assert sent(out) == to_server(TCP(sport=40000, dport=8080, flags="S", seq=1) / Raw(b"x" * 7), r, c)
    back = f.forward(server(TCP(sport=8080, dport=40000, flags="SA", seq=9, ack=2), r, c), 0.1)
    assert sent(back) == to_client(TCP(sport=80, dport=40000, flags="SA", seq=9, ack=2), c, v)


@pytest.mark.parametrize("c, v, r", FAMILIES, ids=["ipv4", "ipv6"])
def test_udp_in_and_out_golden(c, v, r):
    f = fwd(17)
    out = f.forward(client(UDP(sport=5353, dport=80) / Raw(b"query"), c, v), 0.0)
    assert sent(out) == to_server(UDP(sport=5353, dport=8080) / Raw(b"query"), r, c)
    back = f.forward(server(UDP(sport=8080, dport=5353) / Raw(b"answer!"), r, c), 0.1)
    assert sent(back) == to_client(UDP(sport=80, dport=5353) / Raw(b"answer!"), c, v)


def test_ipv4_udp_without_checksum_keeps_none():
    f = fwd(17)
    frame = bytearray(client(UDP(sport=5353, dport=80) / Raw(b"q")))
    frame[40:42] = b"\0\0"
    out = sent(f.forward(frame, 0.0))
    assert out[40:42] == b"\0\0"
    assert out[36:38] == struct.pack("!H", 8080)


def partial(frame: bytes, family: int) -> tuple[bytearray, bytes]:
    """The frame as veth hands it over with NEEDS_CSUM: the TCP checksum field holds
    the (uncomplemented) pseudo-header sum, and its virtio_net_hdr."""
    b = bytearray(frame)
    l4 = 34 if family == 4 else 54
    length = len(b) - l4
    if family == 4:
        pseudo = bytes(b[26:34]) + struct.pack("!BBH", 0, 6, length)
    else:
        pseudo = bytes(b[22:54]) + struct.pack("!II", length, 6)
    s = (~codec.internet_checksum(pseudo)) & 0xFFFF
    b[l4 + 16:l4 + 18] = struct.pack("!H", s)
    vnet = codec.VnetHdr(codec.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, l4, 16).pack()
    return b, vnet


@pytest.mark.parametrize("c, v, r", FAMILIES, ids=["ipv4", "ipv6"])
def test_partial_checksums_from_veth_stay_partial_and_complete_right(c, v, r):
    fam = 4 if ":" not in c else 6
    f = fwd()
    frame, vnet = partial(client(TCP(sport=40000, dport=80, flags="S") / Raw(b"hello"), c, v), fam)
    out = f.forward(frame, 0.0, vnet)
    assert bytes(out[:10]) == vnet  # sent as it came: the kernel completes the checksum
    got = bytearray(out[10:])
    want = to_server(TCP(sport=40000, dport=8080, flags="S") / Raw(b"hello"), r, c)
    expect_partial, _ = partial(want, fam)
    assert bytes(got) == bytes(expect_partial)
    l4 = 34 if fam == 4 else 54
    assert codec.complete_checksum(got, l4, 16, len(got)) is None
    assert bytes(got) == want
    frame, vnet = partial(server(TCP(sport=8080, dport=40000, flags="SA") / Raw(b"world!"), r, c), fam)
    back = f.forward(frame, 0.1, vnet)
    got = bytearray(back[10:])
    assert codec.complete_checksum(got, l4, 16, len(got)) is None
    assert bytes(got) == to_client(TCP(sport=80, dport=40000, flags="SA") / Raw(b"world!"), c, v)


def test_a_partial_checksum_elsewhere_is_a_bad_vnet_header():
    f = fwd()
    frame, _ = partial(client(TCP(sport=40000, dport=80, flags="S")), 4)
    vnet = codec.VnetHdr(codec.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6).pack()
    assert f.forward(frame, 0.0, vnet) is None
    assert f.drops[Drop.BAD_VNET_HDR] == 1


def test_icmp_error_from_the_client_side_reaches_the_real_server():
    f = fwd()
    f.forward(client(TCP(sport=40000, dport=80, flags="S")), 0.0)
    # A router on the client's side cannot deliver a reply (VIP:80 -> client) and says so.
    err = client(ICMP(type=3, code=1) / IPerror(src=VIP4, dst=CLIENT4) / TCPerror(sport=80, dport=40000, flags="SA"),
                 "203.0.113.1", VIP4)
    out = sent(f.forward(err, 0.1))
    want = bytes(Ether(dst=RS_MAC, src=LAN_MAC) / IP(src="203.0.113.1", dst=RIP4) / ICMP(type=3, code=1)
                 / IPerror(src=RIP4, dst=CLIENT4) / TCPerror(sport=8080, dport=40000, flags="SA"))
    assert out == want


def test_icmp_error_from_the_real_server_reaches_the_client_from_the_vip():
    f = fwd(17)
    f.forward(client(UDP(sport=5353, dport=80) / Raw(b"q")), 0.0)
    # The real server's port is closed: it says so about the client's (translated) packet.
    err = server(ICMP(type=3, code=3) / IPerror(src=CLIENT4, dst=RIP4) / UDPerror(sport=5353, dport=8080) / Raw(b"q"))
    out = sent(f.forward(err, 0.1))
    want = to_client(ICMP(type=3, code=3) / IPerror(src=CLIENT4, dst=VIP4) / UDPerror(sport=5353, dport=80) / Raw(b"q"))
    assert out == want


def test_icmpv6_error_from_the_real_server_reaches_the_client_from_the_vip():
    f = fwd(17)
    f.forward(client(UDP(sport=5353, dport=80) / Raw(b"q"), CLIENT6, VIP6), 0.0)
    err = server(ICMPv6DestUnreach(code=4) / IPerror6(src=CLIENT6, dst=RIP6) / UDPerror(sport=5353, dport=8080)
                 / Raw(b"q"), RIP6, CLIENT6)
    out = sent(f.forward(err, 0.1))
    want = to_client(ICMPv6DestUnreach(code=4) / IPerror6(src=CLIENT6, dst=VIP6) / UDPerror(sport=5353, dport=80)
                     / Raw(b"q"), CLIENT6, VIP6)
    assert out == want


def test_a_reply_without_a_connection_is_dropped_and_counted():
    f = fwd()
    assert f.forward(server(TCP(sport=8080, dport=40000, flags="SA")), 0.0) is None
    assert f.drops[Drop.REPLY_NO_CONNECTION] == 1
    # An answer to the director's own probe is the kernel's: not a drop.
    assert f.forward(server(TCP(sport=8080, dport=33333, flags="SA"), RIP4, DIP4), 0.0) is None
    assert f.drops[Drop.REPLY_NO_CONNECTION] == 1
    # Someone else's traffic is not a real server's.
    assert f.forward(server(TCP(sport=8080, dport=40000), "10.2.0.99"), 0.0) is None
    assert f.drops[Drop.NOT_VIP] == 1


def test_bad_frames_from_the_real_server_side():
    f = fwd()
    good = server(TCP(sport=8080, dport=40000, flags="SA"))
    assert f.forward(good[:40], 0.0) is None
    assert f.drops[Drop.TRUNCATED] == 1
    bad = bytearray(good)
    bad[14] = 0x41  # IHL 1
    assert f.forward(bad, 0.0) is None
    assert f.drops[Drop.BAD_IHL] == 1
    assert f.forward(server(ICMP(type=8) / Raw(b"ping")), 0.0) is None
    assert f.drops[Drop.ICMP_UNSUPPORTED] == 1


def test_two_way_tcp_states_and_counters_in_both_directions():
    f = fwd()
    key = codec.flow_key(6, P(CLIENT4), P(VIP4), 40000, 80)
    f.forward(client(TCP(sport=40000, dport=80, flags="S")), 0.0)
    assert f.table.get(key).state == SYN_RECV
    f.forward(server(TCP(sport=8080, dport=40000, flags="SA")), 0.1)
    assert f.table.get(key).state == SYN_RECV
    f.forward(client(TCP(sport=40000, dport=80, flags="A")), 0.2)
    c = f.table.get(key)
    assert c.state == ESTABLISHED and c.confirmed
    f.forward(server(TCP(sport=8080, dport=40000, flags="FA")), 0.3)  # the server closes first
    assert f.table.get(key).state == FIN_WAIT
    f.forward(client(TCP(sport=40000, dport=80, flags="FA")), 0.4)
    assert f.table.get(key).state == TIME_WAIT
    st = f.stats()
    k = ServerKey("web", RIP4, 8080)
    assert st.servers[k][2] == 3 and st.outbound[k][0] == 2
    # The client closing first: IPVS's INPUT table says CLOSE_WAIT (INPUT-ONLY would say FIN_WAIT).
    f.forward(client(TCP(sport=40001, dport=80, flags="S")), 1.0)
    f.forward(server(TCP(sport=8080, dport=40001, flags="SA")), 1.0)
    f.forward(client(TCP(sport=40001, dport=80, flags="A")), 1.0)
    f.forward(client(TCP(sport=40001, dport=80, flags="FA")), 1.1)
    assert f.table.get(codec.flow_key(6, P(CLIENT4), P(VIP4), 40001, 80)).state == CLOSE_WAIT


def test_udp_is_confirmed_by_the_answer_and_its_entry_goes_with_it():
    f = fwd(17)
    key = codec.flow_key(17, P(CLIENT4), P(VIP4), 5353, 80)
    f.forward(client(UDP(sport=5353, dport=80)), 0.0)
    assert not f.table.get(key).confirmed
    f.forward(server(UDP(sport=8080, dport=5353)), 0.1)
    assert f.table.get(key).confirmed
    f.table.remove(key)
    assert f.forward(server(UDP(sport=8080, dport=5353)), 0.2) is None
    assert f.drops[Drop.REPLY_NO_CONNECTION] == 1


def test_port_of_the_vip_when_the_server_names_none():
    f = Forwarder(ConnTable())
    p = plan(port=0)
    f.apply(p)
    out = sent(f.forward(client(TCP(sport=40000, dport=80, flags="S")), 0.0))
    assert out == to_server(TCP(sport=40000, dport=80, flags="S"))


def test_adjust_matches_a_full_recomputation():
    data = bytearray(b"\x12\x34\xab\xcd\x00\x00\xff\xff\x01\x02")
    before = codec.internet_checksum(data)
    new = bytearray(data)
    new[2:6] = b"\xfe\xdc\x00\x01"
    assert nat.adjust(before, data[2:6], new[2:6]) == codec.internet_checksum(new)


def test_adjust_matches_a_full_recomputation_on_random_data():
    import random

    rng = random.Random(13)
    for _ in range(2000):
        n = rng.randrange(1, 20) * 2
        data = bytearray(rng.randbytes(n))
        at = rng.randrange(0, n // 2) * 2
        width = min(rng.choice([2, 4, 6, 16, 18]), n - at) & ~1
        new = bytearray(data)
        new[at:at + width] = rng.randbytes(width)
        assert nat.adjust(codec.internet_checksum(data), data[at:at + width], new[at:at + width]) \
            in {codec.internet_checksum(new), codec.internet_checksum(new) ^ 0xFFFF if codec.internet_checksum(new) in (0, 0xFFFF) else -1}
        # partial: the uncomplemented sum moves by the same change
        s = (~codec.internet_checksum(data)) & 0xFFFF
        want = (~codec.internet_checksum(new)) & 0xFFFF
        assert nat.adjust(s, data[at:at + width], new[at:at + width], partial=True) % 0xFFFF == want % 0xFFFF
