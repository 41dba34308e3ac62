"""The per-packet recipe (director/dataplane/forwarder.py), pure: scapy frames in, actions out, time made up.

Covers DR and TUN, IPv4 and IPv6, TCP and UDP, fragments, ICMP errors, the
too-big path, ARP/NDP answers, plans that add, drain, remove and take down
servers (keep vs reschedule), unresolved neighbours, the sorry server,
persistence, counters, and build_plan from a real config and health table.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers.inet import ICMP, IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6PacketTooBig, IPv6, IPv6ExtHdrDestOpt  # noqa: E402
from scapy.layers.l2 import ARP, Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from glb import config  # noqa: E402
from director.dataplane import codec  # noqa: E402
from director.dataplane.codec import Drop  # noqa: E402
from director.dataplane.conntable import ConnTable  # noqa: E402
from director.dataplane.forwarder import Forwarder, ForwarderStats, Plan, ServerPlan, ServicePlan, VipPlan, build_plan  # noqa: E402
from director.control.health import ADMIN_DRAIN, ADMIN_NONE, HealthTable, ServerKey  # noqa: E402

GW_MAC, DIR_MAC = "02:00:00:00:00:aa", "02:00:00:00:00:d1"
VIP4, VIP6 = "192.0.2.10", "2001:db8:10::10"
CLIENT4, CLIENT6 = "198.51.100.7", "2001:db8:100::7"
DIR4, DIR6 = "10.2.0.1", "2001:db8:2::1"
RS = ["10.2.0.11", "10.2.0.12", "10.2.0.13"]
RS6 = ["2001:db8:2::11", "2001:db8:2::12"]


def P(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def mac(i: int) -> bytes:
    return bytes([2, 0, 0, 0, 1, i])


def frame(l3) -> bytearray:
    return bytearray(bytes(Ether(dst=DIR_MAC, src=GW_MAC) / l3))


def syn(sport=40000, src=CLIENT4, dport=80, flags="S"):
    ip = IP(src=src, dst=VIP4) if ":" not in src else IPv6(src=src, dst=VIP6)
    return frame(ip / TCP(sport=sport, dport=dport, flags=flags))


def server(addr: str, weight=1, available=True, reschedule=False, m=None, service="web", mtu=1500) -> ServerPlan:
    i = RS.index(addr) + 1 if addr in RS else RS6.index(addr) + 0x61
    return ServerPlan(ServerKey(service, addr, 0), P(addr), weight, available, reschedule,
                      mac(i) if m is None else (m or None), mtu)


def plan(*servers: ServerPlan, forwarding="dr", scheduler="rr", vips=((VIP4, 80, 6),), **kw) -> Plan:
    vp = tuple(VipPlan(P(a), port, proto, f"{a}:{port}/{'tcp' if proto == 6 else 'udp'}") for a, port, proto in vips)
    svc = ServicePlan("web", forwarding, scheduler, vp, servers, **kw)
    return Plan(codec.mac_bytes(DIR_MAC), (svc,), P(DIR4), P(DIR6))


def dr_owner(action) -> str:
    """Which real server a DR action goes to (by the MAC it writes)."""
    assert action.__class__ is bytes and action[6:] == codec.mac_bytes(DIR_MAC)
    i = action[5]
    return RS[i - 1] if i < 0x61 else RS6[i - 0x61]


def fwd(f: Forwarder, data, now=0.0, vnet=None):
    return f.forward(memoryview(data), now, vnet)


@pytest.fixture
def f():
    f = Forwarder()
    f.apply(plan(server(RS[0]), server(RS[1])))
    return f


# --------------------------------------------------------------------------
# DR


def test_dr_schedules_a_syn_and_keeps_the_flow(f):
    first = dr_owner(fwd(f, syn(40000)))
    second = dr_owner(fwd(f, syn(40001)))
    assert {first, second} == {RS[0], RS[1]}  # rr spreads new flows
    for flags in ("A", "PA", "FA"):
        assert dr_owner(fwd(f, syn(40000, flags=flags), 1)) == first
    s = f.stats()
    assert s.servers[ServerKey("web", first, 0)][2:] == (4, 4 * 40, 1)  # packets, bytes (IP length), conns
    assert s.vips[f"{VIP4}:80/tcp"] == (5, 5 * 40, 2)
    assert s.forwarded == 5 and s.connections == 2


def test_dr_frame_rewrite_is_what_the_engine_sends(f):
    data = syn()
    macs = fwd(f, data)
    codec.dr_rewrite(data, macs)
    assert bytes(data) == bytes(Ether(dst=mac(1), src=DIR_MAC) / IP(src=CLIENT4, dst=VIP4) / TCP(sport=40000, dport=80, flags="S"))


def test_only_a_syn_opens_a_tcp_connection(f):
    assert fwd(f, syn(flags="A")) is None
    assert f.drops[Drop.NO_CONNECTION] == 1


def test_mh_picks_up_flows_mid_stream_and_they_stay():
    f = Forwarder()
    f.apply(plan(server(RS[0]), server(RS[1]), scheduler="mh", mh_table_size=251))
    owner = dr_owner(fwd(f, syn(40000, flags="A")))
    g = Forwarder()  # another director (a standby taking over) computes the same answer
    g.apply(plan(server(RS[0]), server(RS[1]), scheduler="mh", mh_table_size=251))
    assert dr_owner(fwd(g, syn(40000, flags="PA"))) == owner
    # ... but not with persistence: its templates are state.
    h = Forwarder()
    h.apply(plan(server(RS[0]), scheduler="mh", mh_table_size=251, persistence=(300.0, 24, 64)))
    assert fwd(h, syn(flags="A")) is None


def test_udp_and_ipv6():
    f = Forwarder()
    f.apply(plan(server(RS[0]), server(RS6[0]), vips=((VIP4, 53, 17), (VIP6, 53, 17))))
    udp4 = frame(IP(src=CLIENT4, dst=VIP4) / UDP(sport=5000, dport=53) / b"q")
    udp6 = frame(IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=5000, dport=53) / b"q")
    assert dr_owner(fwd(f, udp4)) == RS[0]  # each family schedules among its own servers
    assert dr_owner(fwd(f, udp6)) == RS6[0]
    assert fwd(f, frame(IP(src=CLIENT4, dst=VIP4) / UDP(sport=5000, dport=54))) is None
    assert f.drops[Drop.NO_SERVICE] == 1
    assert fwd(f, frame(IP(src=CLIENT4, dst="192.0.2.11") / UDP(sport=5000, dport=53))) is None
    assert f.drops[Drop.NOT_VIP] == 1


def test_fragments_follow_their_first_and_icmp_errors_their_flow():
    f = Forwarder()
    f.apply(plan(server(RS[0]), server(RS[1]), vips=((VIP4, 80, 17), (VIP4, 80, 6))))
    fwd(f, frame(IP(src=CLIENT4, dst=VIP4) / UDP(sport=1, dport=80)))  # rr moves on: the next flow gets RS[1]
    first = frame(IP(src=CLIENT4, dst=VIP4, id=77, flags="MF") / UDP(sport=5353, dport=80, len=1600) / Raw(b"a" * 1000))
    later = frame(IP(src=CLIENT4, dst=VIP4, id=77, frag=126, proto=17) / Raw(b"b" * 592))
    assert fwd(f, later) is None and f.drops[Drop.FRAGMENT_UNKNOWN] == 1
    owner = dr_owner(fwd(f, first))
    assert owner == RS[1] and dr_owner(fwd(f, later)) == owner
    # An ICMP error about a packet the owner sent from the VIP reaches the owner, without creating a flow.
    err = frame(IP(src="203.0.113.1", dst=VIP4) / ICMP(type=3, code=4, nexthopmtu=1400)
                / IP(src=VIP4, dst=CLIENT4) / UDP(sport=80, dport=5353))
    assert dr_owner(fwd(f, err)) == owner
    stray = frame(IP(src="203.0.113.1", dst=VIP4) / ICMP(type=3, code=4) / IP(src=VIP4, dst=CLIENT4) / TCP(sport=80, dport=9))
    assert fwd(f, stray) is None and f.drops[Drop.NO_CONNECTION] == 1
    assert len(f.table) == 2


def test_arp_and_ndp_for_a_vip_are_answered(f):
    f.apply(plan(server(RS[0]), vips=((VIP4, 80, 6), (VIP6, 80, 6))))
    req = frame(ARP(op=1, hwsrc=GW_MAC, psrc="192.0.2.1", pdst=VIP4))
    req[0:6] = b"\xff" * 6
    (reply,) = fwd(f, req)
    r = Ether(reply)
    assert r[ARP].op == 2 and r[ARP].psrc == VIP4 and r[ARP].hwsrc == DIR_MAC and r.dst == GW_MAC
    group = str(ipaddress.ip_address(codec.solicited_node(P(VIP6))))
    ns = frame(IPv6(src="2001:db8:10::1", dst=group, hlim=255) / ICMPv6ND_NS(tgt=VIP6))
    (na,) = fwd(f, ns)
    assert Ether(na)[ICMPv6ND_NA].tgt == VIP6
    assert f.stats().replies == 2


# --------------------------------------------------------------------------
# Plans: add, drain, remove, down


def established(f, sport, now=0.0) -> str:
    owner = dr_owner(fwd(f, syn(sport), now))
    assert dr_owner(fwd(f, syn(sport, flags="A"), now)) == owner
    return owner


def test_an_added_server_leaves_established_flows_alone(f):
    owners = {sport: established(f, sport) for sport in range(40000, 40010)}
    f.apply(plan(server(RS[0]), server(RS[1]), server(RS[2])))
    for sport, owner in owners.items():
        assert dr_owner(fwd(f, syn(sport, flags="PA"), 1)) == owner
    assert RS[2] in {dr_owner(fwd(f, syn(sport), 2)) for sport in range(41000, 41003)}


def test_weight_zero_drains_new_flows_but_keeps_established(f):
    owners = {sport: established(f, sport) for sport in range(40000, 40004)}
    f.apply(plan(server(RS[0], weight=0), server(RS[1])))
    for sport, owner in owners.items():
        assert dr_owner(fwd(f, syn(sport, flags="A"), 1)) == owner
    assert {dr_owner(fwd(f, syn(s), 1)) for s in range(41000, 41010)} == {RS[1]}
    key = ServerKey("web", RS[0], 0)
    assert f.stats().servers[key][0] == 2  # still two active connections on the drained server


@pytest.mark.parametrize("on_down", ["keep", "reschedule"])
def test_a_removed_server_gets_no_new_flows_established_per_on_server_down(f, on_down):
    owners = {sport: established(f, sport) for sport in range(40000, 40004)}
    f.apply(plan(server(RS[1]), on_server_down=on_down))
    assert {dr_owner(fwd(f, syn(s), 1)) for s in range(41000, 41010)} == {RS[1]}
    for sport, owner in owners.items():
        got = fwd(f, syn(sport, flags="A"), 1)
        if owner == RS[0] and on_down == "reschedule":
            assert got is None  # the entry is gone; a non-SYN cannot open a flow: the client resets
        else:
            assert dr_owner(got) == owner


def test_a_down_server_with_reschedule_loses_its_flows_to_the_others(f):
    owners = {sport: established(f, sport) for sport in range(40000, 40004)}
    f.apply(plan(server(RS[0], weight=0, available=False, reschedule=True), server(RS[1]), on_server_down="reschedule"))
    for sport, owner in owners.items():
        if owner == RS[0]:
            assert dr_owner(fwd(f, syn(sport), 1)) == RS[1]  # the client's retry (a SYN) lands elsewhere
        else:
            assert dr_owner(fwd(f, syn(sport, flags="A"), 1)) == owner


def test_a_server_without_a_mac_is_unreachable_so_treated_as_down():
    f = Forwarder()
    f.apply(plan(server(RS[0], m=b""), server(RS[1])))
    assert {dr_owner(fwd(f, syn(s))) for s in range(40000, 40006)} == {RS[1]}
    f.apply(plan(server(RS[0], m=b""), server(RS[1], m=b"")))
    assert fwd(f, syn(41000)) is None and f.drops[Drop.NO_DESTINATION] == 1


def test_the_sorry_server_takes_new_flows_only_while_active():
    sorry = ServerPlan(ServerKey("web", "10.2.0.99", 0), P("10.2.0.99"), 1, True, mac=mac(0x99))
    f = Forwarder()
    f.apply(plan(server(RS[0], weight=0, available=False), sorry=sorry, sorry_active=False))
    assert fwd(f, syn(40000)) is None
    f.apply(plan(server(RS[0], weight=0, available=False), sorry=sorry, sorry_active=True))
    assert fwd(f, syn(40001))[5] == 0x99


def test_persistence_sticks_a_client_network_to_one_server():
    f = Forwarder()
    f.apply(plan(server(RS[0]), server(RS[1]), persistence=(300.0, 24, 64)))
    owners = {dr_owner(fwd(f, syn(s, src=f"198.51.100.{s - 39990}"))) for s in range(40000, 40010)}
    assert len(owners) == 1
    other = dr_owner(fwd(f, syn(40000, src="198.51.200.1")))
    assert other != owners.pop()  # another /24: rr moved on


def test_counters_survive_a_new_plan_and_workers_merge(f):
    established(f, 40000)
    before = f.stats()
    f.apply(plan(server(RS[0]), server(RS[1])))
    assert f.stats().servers == before.servers
    merged = before.merge(before)
    key = next(iter(before.servers))
    assert merged.servers[key] == tuple(2 * x for x in before.servers[key])
    assert merged.connections == 2 and isinstance(merged, ForwarderStats)


def test_sweep_expires_flows_and_counts():
    f = Forwarder(ConnTable(tcp_syn=5))
    f.apply(plan(server(RS[0])))
    fwd(f, syn(40000), 0)
    assert f.sweep(100) == 1 and f.stats().expired == 1 and f.stats().connections == 0


def test_the_table_bound_holds_under_a_syn_flood(f):
    f.table = ConnTable(max_entries=50)
    keep = established(f, 1)
    for i in range(2000):
        fwd(f, syn(1000 + i, src=f"198.51.{i // 250}.{i % 250 + 1}"), 0.001 * i)
    assert len(f.table) == 50 and f.table.evicted > 1900
    assert dr_owner(fwd(f, syn(1, flags="A"), 3)) == keep  # the confirmed flow survived the flood


# --------------------------------------------------------------------------
# TUN


def tun_forwarder(*servers, **kw) -> Forwarder:
    f = Forwarder()
    f.apply(plan(*servers, forwarding="tun", **kw))
    return f


def test_tun_ipv4_header_matches_scapy():
    f = tun_forwarder(server(RS[0]))
    data = frame(IP(src=CLIENT4, dst=VIP4, tos=0x10, ttl=33, flags="DF") / TCP(sport=40000, dport=80, flags="S"))
    vnet, header, length = fwd(f, data)
    assert vnet is None and length == 40
    out = header + bytes(data[14:14 + length])
    inner = IP(src=CLIENT4, dst=VIP4, tos=0x10, ttl=33, flags="DF") / TCP(sport=40000, dport=80, flags="S")
    want = Ether(dst=mac(1), src=DIR_MAC) / IP(src=DIR4, dst=RS[0], proto=4, tos=0x10, ttl=33, flags="DF", id=1) / inner
    assert out == bytes(want)


def test_tun_ipv6_in_ipv6():
    f = tun_forwarder(server(RS6[0]), vips=((VIP6, 80, 6),))
    data = frame(IPv6(src=CLIENT6, dst=VIP6, tc=0x20, hlim=50) / TCP(sport=40000, dport=80, flags="S"))
    vnet, header, length = fwd(f, data)
    out = Ether(header + bytes(data[14:14 + length]))
    assert out[IPv6].src == DIR6 and out[IPv6].dst == RS6[0] and out[IPv6].nh == 41 and out[IPv6].hlim == 50
    assert out[IPv6].payload[IPv6].dst == VIP6


def test_tun_shifts_a_partial_checksum_and_refuses_gso():
    f = tun_forwarder(server(RS[0]))
    data = frame(IP(src=CLIENT4, dst=VIP4) / TCP(sport=40000, dport=80, flags="S"))
    partial = codec.VnetHdr(codec.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16).pack()
    vnet, _, _ = fwd(f, data, vnet=memoryview(partial))
    assert codec.parse_vnet(vnet) == codec.VnetHdr(codec.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 54, 16)
    gso = codec.VnetHdr(codec.VIRTIO_NET_HDR_F_NEEDS_CSUM, codec.VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16).pack()
    assert fwd(f, syn(40000, flags="A"), vnet=gso) is None
    assert f.drops[Drop.GSO_UNSUPPORTED] == 1


def test_tun_too_big_with_df_gets_frag_needed_back_to_the_client():
    f = tun_forwarder(server(RS[0]))
    fwd(f, syn(40000))
    big = frame(IP(src=CLIENT4, dst=VIP4, flags="DF") / TCP(sport=40000, dport=80, flags="A") / Raw(b"x" * 1460))
    (icmp,) = fwd(f, big)
    e = Ether(icmp)
    assert e.dst == GW_MAC and e[IP].src == VIP4 and e[IP].dst == CLIENT4
    assert (e[ICMP].type, e[ICMP].code, e[ICMP].nexthopmtu) == (3, 4, 1480)
    assert f.drops[Drop.TOO_BIG] == 1


def test_tun_too_big_ipv6_gets_packet_too_big():
    f = tun_forwarder(server(RS6[0]), vips=((VIP6, 80, 6),))
    fwd(f, syn(40000, src=CLIENT6))
    big = frame(IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=40000, dport=80, flags="A") / Raw(b"x" * 1440))
    (icmp,) = fwd(f, big)
    assert Ether(icmp)[ICMPv6PacketTooBig].mtu == 1460


def test_tun_too_big_without_df_is_fragmented_into_the_tunnel():
    f = tun_forwarder(server(RS[0]), vips=((VIP4, 53, 17),))
    big = frame(IP(src=CLIENT4, dst=VIP4, id=9) / UDP(sport=5000, dport=53) / Raw(b"y" * 1472))
    before = f.ident
    pieces = fwd(f, big)
    assert len(pieces) == 2
    outer = [Ether(p)[IP] for p in pieces]
    assert all(o.proto == 4 and o.dst == RS[0] and not o.flags.MF and o.frag == 0 for o in outer)  # whole
    assert [o.id for o in outer] == [before + 1, before + 2] and f.ident == before + 2
    inner = [IP(bytes(o.payload)) for o in outer]  # the client's packet in two fragments, id 9
    assert [(i.id, i.frag, i.flags.MF) for i in inner] == [(9, 0, 1), (9, (1480 - 20) // 8, 0)]
    assert b"".join(bytes(i.payload) for i in inner) == bytes(big[14 + 20:])


def test_tun_fragmenting_completes_a_partial_checksum_first():
    f = tun_forwarder(server(RS[0]), vips=((VIP4, 53, 17),))
    good = IP(src=CLIENT4, dst=VIP4, id=9) / UDP(sport=5000, dport=53) / Raw(b"y" * 1472)
    data = frame(good)
    want_sum = bytes(data[40:42])
    data[40:42] = b"\x12\x34"  # what veth leaves: only the pseudo-header sum (any value: completed over it)
    pseudo = codec.internet_checksum(P(CLIENT4) + P(VIP4) + struct.pack("!HH", 17, 1480))
    data[40:42] = struct.pack("!H", ~pseudo & 0xFFFF)
    vnet = codec.VnetHdr(codec.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6).pack()
    pieces = fwd(f, data, vnet=vnet)
    assert Ether(pieces[0])[IP].payload.build()[20 + 6:20 + 8] == want_sum


# --------------------------------------------------------------------------
# build_plan from a real config and health table

SITE = """
zones:
  - apex: example.net
    soa: {mname: ns1.example.net, rname: hostmaster@example.net}
    ns: [{name: ns1.example.net, addresses: [192.0.2.53]}]
sites:
  dc1:
    director: {interface: eth0, address: 10.2.0.1}
    services:
      - name: web
        vips: ["192.0.2.10:80/tcp"]
        forwarding: tun
        scheduler: mh
        on_server_down: reschedule
        persistence: {timeout: 60, netmask: 24}
        sorry_server: 10.2.0.99
        real_servers:
          - {address: 10.2.0.11, weight: 3}
          - {address: 10.2.0.12}
          - {address: 10.2.0.13}
        health_check: {type: tcp, rise: 1, fall: 1, initial: down}
"""


def test_build_plan_follows_the_health_table():
    site = config.loads(SITE).sites[0]
    table = HealthTable(site, 0)
    a, b, c = (ServerKey("web", addr, 0) for addr in RS)
    table.record(a, True, "ok", 1)
    table.record(b, True, "ok", 1)
    table.set_override(b, ADMIN_DRAIN, None, 2)
    macs = {P(RS[0]): mac(1), P(RS[1]): mac(2)}
    p = build_plan(site, table.services(), codec.mac_bytes(DIR_MAC), macs)
    (svc,) = p.services
    assert (svc.forwarding, svc.scheduler, svc.on_server_down, svc.persistence) == ("tun", "mh", "reschedule", (60.0, 24, 128))
    by = {s.key: s for s in svc.servers}
    assert (by[a].weight, by[a].available, by[a].mac) == (3, True, mac(1))
    assert (by[b].weight, by[b].available, by[b].reschedule) == (0, True, False)  # draining keeps its flows
    assert (by[c].weight, by[c].available, by[c].reschedule, by[c].mac) == (0, False, True, None)  # down
    assert svc.vips == (VipPlan(P(VIP4), 80, 6, "192.0.2.10:80/tcp"),)
    assert svc.sorry.address == P("10.2.0.99") and not svc.sorry_active
    assert p.source4 == P("10.2.0.1") and p.vips == {P(VIP4)}
    table.set_override(b, ADMIN_NONE, None, 3)
    assert build_plan(site, table.services(), codec.mac_bytes(DIR_MAC), macs) != p


# --------------------------------------------------------------------------
# Nothing raises


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["dr", "tun", "nat"]))
def test_forward_never_raises(data, forwarding):
    f = Forwarder()
    f.apply(plan(server(RS[0]), forwarding=forwarding, vips=((VIP4, 80, 6), (VIP4, 80, 17), (VIP6, 80, 6))))
    f.forward(memoryview(bytearray(syn())), 0.0, memoryview(bytes(10)))  # a flow (NAT: replies find it)
    rs_side = [bytes(frame(IP(src=RS[0], dst=CLIENT4, proto=p) / Raw(data))) for p in (1, 6, 17)]  # NAT replies
    for mutate in (data, bytes(syn())[:14] + data, bytes(frame(IP(src=CLIENT4, dst=VIP4))) + data, *rs_side):
        f.forward(memoryview(bytearray(mutate)), 0.0, memoryview(bytes(10)))


# --------------------------------------------------------------------------
# The engine's kernel filter and the ownership announcer (pure parts)


def test_bpf_filter_accepts_only_what_the_director_must_see():
    from director.dataplane.bpf import bpf_program, bpf_run

    prog = bpf_program({P(VIP4), P(VIP6)})
    ok = lambda l3, pkttype=0: bpf_run(prog, bytes(Ether(dst=DIR_MAC, src=GW_MAC) / l3), pkttype) > 0  # noqa: E731
    assert ok(IP(src=CLIENT4, dst=VIP4) / TCP())
    assert ok(IPv6(src=CLIENT6, dst=VIP6) / UDP())
    assert ok(ARP(op=1, psrc="192.0.2.1", pdst=VIP4))
    group = str(ipaddress.ip_address(codec.solicited_node(P(VIP6))))
    assert ok(IPv6(src=CLIENT6, dst=group, hlim=255) / ICMPv6ND_NS(tgt=VIP6))
    assert not ok(IP(src=CLIENT4, dst="192.0.2.11") / TCP())
    assert not ok(IPv6(src=CLIENT6, dst="2001:db8:10::11") / UDP())
    assert not ok(ARP(op=1, psrc="192.0.2.1", pdst="192.0.2.11"))
    assert not ok(IPv6(src=CLIENT6, dst=group, hlim=255) / ICMPv6ND_NS(tgt="2001:db8:10::11"))
    assert not ok(IP(src=CLIENT4, dst=VIP4) / TCP(), pkttype=4)  # our own outgoing frames
    assert not ok(IP(src=CLIENT4, dst=VIP4) / TCP(), pkttype=3)  # for another MAC (promiscuous)


def test_bpf_filter_also_accepts_a_modes_extra_matches():
    from director.dataplane.bpf import Match, bpf_program, bpf_run

    # say, replies from a real server (IPv4 source at 26, IPv6 source at 22)
    extra = {Match(codec.ETH_P_IP, 26, P(RS[0])), Match(codec.ETH_P_IPV6, 22, P(RS6[0]))}
    prog = bpf_program({P(VIP4)}, extra)
    ok = lambda l3: bpf_run(prog, bytes(Ether(dst=DIR_MAC, src=GW_MAC) / l3)) > 0  # noqa: E731
    assert ok(IP(src=CLIENT4, dst=VIP4) / TCP())
    assert ok(IP(src=RS[0], dst=CLIENT4) / TCP())
    assert ok(IPv6(src=RS6[0], dst=CLIENT6) / TCP())
    assert not ok(IP(src=RS[1], dst=CLIENT4) / TCP())
    assert not ok(IPv6(src=RS6[1], dst=CLIENT6) / TCP())
    assert not ok(IP(src=CLIENT4, dst=RS[0]) / TCP())
    with pytest.raises(ValueError):
        bpf_program(set(), {Match(codec.ETH_P_ARP, 28, P(RS[0]))})


def test_announcer_sends_garp_and_na_for_newly_taken_vips_only():
    from director.dataplane.announce import Announcer

    a = Announcer((0.0, 1.0))
    me = codec.mac_bytes(DIR_MAC)
    a.update({P(VIP4), P(VIP6)}, me, 10.0)
    now = a.due(10.0)
    assert sorted(len(f) for f in now) == [42, 86]  # a gratuitous ARP and an unsolicited NA
    assert Ether(next(f for f in now if len(f) == 42))[ARP].psrc == VIP4
    assert a.due(10.5) == [] and len(a.due(11.0)) == 2
    a.update({P(VIP4), P(VIP6), P("192.0.2.11")}, me, 20.0)
    assert [Ether(f)[ARP].pdst for f in a.due(20.0)] == ["192.0.2.11"]


# --------------------------------------------------------------------------
# The fast path is forward, only quicker


def _variants():
    """Frames of a few flows in every shape the fast path must either take or refuse."""
    out = []
    for sport in (40000, 40001):
        for flags in ("S", "A", "A", "PA", "PA", "FA", "R", "SA", ""):
            out.append(syn(sport, flags=flags))
        out.append(frame(IP(src=CLIENT4, dst=VIP4) / UDP(sport=sport, dport=80) / Raw(b"u" * 20)))
    for flags in ("S", "A", "PA", "FA"):
        out.append(syn(40000, src=CLIENT6, flags=flags))
    out.append(frame(IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=40000, dport=80) / Raw(b"u" * 20)))
    data = bytes(syn(40000, flags="A"))
    data6 = bytes(syn(40000, src=CLIENT6, flags="A"))
    out += [
        frame(IP(src=CLIENT4, dst=VIP4, options=[b"\x01\x01\x01\x00"]) / TCP(sport=40000, dport=80, flags="A")),
        frame(IP(src=CLIENT4, dst=VIP4, flags="MF", id=7) / TCP(sport=40000, dport=80, flags="A")),
        frame(IP(src=CLIENT4, dst=VIP4, frag=3, id=7, proto=6) / Raw(b"f" * 20)),
        frame(IP(src=CLIENT4, dst=VIP6[:0] or "192.0.2.99") / TCP(sport=40000, dport=80, flags="A")),  # not a VIP
        frame(IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrDestOpt() / TCP(sport=40000, dport=80, flags="A")),
        bytearray(data[:47]),  # truncated before the TCP flags
        bytearray(data[:16] + struct.pack("!H", 30) + data[18:]),  # IP total length too small for TCP
        bytearray(data[:16] + struct.pack("!H", 200) + data[18:]),  # longer than the frame
        bytearray(data[:14] + b"\x46" + data[15:]),  # IHL 6 without the option bytes
        bytearray(data[:12] + b"\x81\x00" + data[14:]),  # VLAN tag
        bytearray(data[:30]),
        bytearray(b""),
        bytearray(data6[:67]),  # IPv6, truncated before the TCP flags
        bytearray(data6[:18] + struct.pack("!H", 10) + data6[20:]),  # payload too short for TCP
        bytearray(data6[:18] + struct.pack("!H", 0) + data6[20:]),  # jumbogram
        bytearray(data6[:14] + b"\x50" + data6[15:]),  # version 5
    ]
    return [bytes(f) for f in out]


VARIANTS = _variants()
FAST_OPS = st.lists(
    st.tuples(st.sampled_from(["packet"] * 12 + ["down", "unreachable", "vip-gone", "vip-back", "sweep"]),
              st.integers(0, len(VARIANTS) - 1), st.sampled_from([0.0, 0.0, 0.5, 1.0, 30.0, 100.0, 400.0])),
    min_size=10, max_size=80,
)


def python_fast(f: Forwarder, data: bytes, now: float):
    """What the engine does with a frame: fast(), then forward() if it declines. -> (action, fast took it)."""
    r = f.fast(bytes(10) + data, 10, len(data), now)  # virtio_net_hdr first, as in the ring
    if r is not None:
        return r, True
    return f.forward(memoryview(bytearray(data)), now, memoryview(bytes(10))), False


def _fast_vs_forward(ops, forwarding: str, on_down: str, driver=python_fast) -> int:
    """Feed ``ops`` to a Forwarder using forward() alone and to one driven by ``driver``
    (fast() first); assert they act and count the same after every op. Returns how
    often the driver's fast path acted."""
    vips = ((VIP4, 80, 6), (VIP4, 80, 17), (VIP6, 80, 6))
    servers = {"down": False, "unreachable": False}  # each op toggles
    vip_gone = False

    def current():
        a = server(RS[0], available=not servers["down"], reschedule=on_down == "reschedule",
                   m=b"" if servers["unreachable"] else None)
        return plan(a, server(RS[1]), server(RS6[0]), forwarding=forwarding, on_server_down=on_down,
                    vips=vips[1:] if vip_gone else vips)

    pair = [Forwarder(ConnTable(max_entries=8)), Forwarder(ConnTable(max_entries=8))]
    for f in pair:
        f.apply(current())
    now = 0.0
    taken = 0
    for op, i, step in ops:
        now += step
        if op == "packet":
            data = VARIANTS[i]
            plain = pair[0].forward(memoryview(bytearray(data)), now, memoryview(bytes(10)))
            fast, took = driver(pair[1], data, now)
            taken += took
            assert fast == plain
        elif op == "sweep":
            for f in pair:
                f.sweep(now)
        else:
            if op in servers:
                servers[op] = not servers[op]
            else:
                vip_gone = op == "vip-gone"
            for f in pair:
                f.apply(current())
        a, b = pair[0].stats(), pair[1].stats()
        assert a == b
        assert [(c.key, c.state, c.expires, c.dest.key) for c in pair[0].table] == \
               [(c.key, c.state, c.expires, c.dest.key) for c in pair[1].table]
    return taken


@settings(max_examples=300, deadline=None)
@given(FAST_OPS, st.sampled_from(["dr", "tun", "nat"]), st.sampled_from(["keep", "reschedule"]))
def test_fast_then_forward_acts_exactly_as_forward(ops, forwarding, on_down):
    """The engine calls fast() and, when it declines, forward(): nothing may tell the difference."""
    _fast_vs_forward(ops, forwarding, on_down)


def long_random_ops(seed: int, n: int = 3000) -> list:
    """Mostly packets close together, so established flows (the fast path) are common."""
    rng = random.Random(seed)
    return [(rng.choice(["packet"] * 150 + ["down", "unreachable", "vip-gone", "vip-back", "sweep"]),
             rng.randrange(len(VARIANTS)), rng.choice([0.0, 0.1, 1.0, 1.0, 5.0, 70.0, 400.0]))
            for _ in range(n)]


@pytest.mark.parametrize("seed", range(4))  # DR, DR, TUN, TUN
def test_fast_then_forward_on_long_random_traffic(seed):
    taken = _fast_vs_forward(long_random_ops(seed), "dr" if seed < 2 else "tun", "keep" if seed % 2 else "reschedule")
    assert taken > 30  # the comparison covered the fast path, not only its refusals


def test_fast_takes_an_established_ipv4_flow_and_declines_the_rest(f):
    assert f.fast(bytes(syn(40000)), 0, 54, 0.0) is None  # a SYN: new flow, forward's job
    owner = dr_owner(fwd(f, syn(40000)))
    fwd(f, syn(40000, flags="A"), 0.5)  # handshake done: confirmed
    data = bytes(syn(40000, flags="PA"))
    assert dr_owner(f.fast(data, 0, len(data), 1.0)) == owner
    padded = b"\0" * 7 + data  # at an offset, as in a ring slot
    assert dr_owner(f.fast(padded, 7, len(data), 1.0)) == owner
    assert f.fast(data, 0, len(data) - 1, 1.0) is None  # the IP packet does not fit the frame
    assert f.stats().servers[ServerKey("web", owner, 0)][2] == 4


def test_fast_tunnels_an_established_flow_and_leaves_partial_checksums_to_forward():
    f = tun_forwarder(server(RS[0]))
    fwd(f, syn(40000), vnet=bytes(10))
    fwd(f, syn(40000, flags="A"), 0.5, vnet=bytes(10))
    data = bytes(syn(40000, flags="PA"))
    vnet, head, n = f.fast(bytes(10) + data, 10, len(data), 1.0)
    assert vnet == codec.VNET_NONE and n == len(data) - 14
    assert head == codec.Tunnel(P(DIR4), P(RS[0]), mac(1), codec.mac_bytes(DIR_MAC)).header_at(data, 14, n, f.ident)
    partial = codec.VnetHdr(codec.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16).pack()
    assert f.fast(partial + data, 10, len(data), 1.0) is None  # forward shifts the checksum offsets
