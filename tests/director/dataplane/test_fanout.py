"""director.dataplane.fanout: every frame about one client goes to one worker."""

from __future__ import annotations

import ctypes
import ipaddress
import random
import socket
import struct

import pytest
from scapy.all import conf

conf.verb = 0
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment  # noqa: E402
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6, IPv6ExtHdrFragment  # noqa: E402
from scapy.layers.l2 import ARP, Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from director.dataplane import fanout  # noqa: E402
from director.dataplane.bpf import bpf_bytes  # noqa: E402
from tests.director.dataplane import cbpf  # noqa: E402

VIP4, VIP6 = "192.0.2.10", "2001:db8::10"
STICKY4, STICKY6 = "192.0.2.20", "2001:db8::20"
ROUTER4, ROUTER6 = "203.0.113.1", "2001:db8:ffff::1"


def P(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def eth(l3) -> bytes:
    return bytes(Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02") / l3)


def run(prog, l3) -> int:
    return cbpf.run(prog, eth(l3))


def clients(n: int, v6: bool, seed: int = 1) -> list[str]:
    rnd = random.Random(seed)
    if v6:
        return [str(ipaddress.IPv6Address(rnd.getrandbits(128))) for _ in range(n)]
    return [str(ipaddress.IPv4Address(rnd.getrandbits(32))) for _ in range(n)]


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_every_packet_of_a_client_lands_in_its_bucket(workers):
    prog = fanout.program(workers)
    seen = set()
    for c in clients(200, False):
        b = fanout.bucket(P(c), workers)
        seen.add(b)
        assert run(prog, IP(src=c, dst=VIP4) / TCP(sport=40000, dport=80, flags="S")) == b
        assert run(prog, IP(src=c, dst=VIP4) / TCP(sport=51234, dport=443, flags="A")) == b
        assert run(prog, IP(src=c, dst=VIP4) / UDP(sport=5353, dport=53)) == b
        assert run(prog, IP(src=c, dst=VIP4, options=b"\x01" * 4) / UDP(sport=1, dport=53)) == b  # ihl 6
        big = IP(src=c, dst=VIP4, id=7) / UDP(sport=9, dport=53) / Raw(b"x" * 3000)
        assert {run(prog, f) for f in fragment(big, 1000)} == {b}  # later fragments have no ports
        assert run(prog, IP(src=c, dst=VIP4) / ICMP(type=8)) == b  # an echo: its source
    for c in clients(200, True):
        b = fanout.bucket(P(c), workers)
        seen.add(b)
        assert run(prog, IPv6(src=c, dst=VIP6) / TCP(sport=40000, dport=80, flags="S")) == b
        assert run(prog, IPv6(src=c, dst=VIP6) / IPv6ExtHdrFragment(offset=100, id=1) / Raw(b"y" * 64)) == b
    assert seen == set(range(workers))  # every worker gets clients


def test_an_icmp_error_goes_where_its_client_went():
    """The error is about a reply VIP -> client: the client is the quoted destination."""
    prog = fanout.program(4)
    for c in clients(100, False, seed=2):
        quoted = IP(src=VIP4, dst=c) / TCP(sport=80, dport=40000, flags="SA")
        for t, code in ((3, 4), (11, 0), (12, 0)):
            err = IP(src=ROUTER4, dst=VIP4) / ICMP(type=t, code=code) / bytes(quoted)[:28]
            assert run(prog, err) == fanout.bucket(P(c), 4)
    for c in clients(100, True, seed=3):
        quoted = IPv6(src=VIP6, dst=c) / TCP(sport=80, dport=40000, flags="SA")
        err = IPv6(src=ROUTER6, dst=VIP6) / ICMPv6PacketTooBig(mtu=1280) / bytes(quoted)[:48]
        assert run(prog, err) == fanout.bucket(P(c), 4)


def test_a_persistence_netmask_keeps_a_client_network_on_one_worker():
    masks = {P(STICKY4): 24, P(STICKY6): 64}
    prog = fanout.program(4, masks)
    nets4 = {}
    for c in clients(300, False, seed=4):
        b = run(prog, IP(src=c, dst=STICKY4) / TCP(sport=1, dport=80))
        assert b == fanout.bucket(P(c), 4, 24)
        nets4.setdefault(ipaddress.ip_network(f"{c}/24", strict=False), set()).add(b)
        # The same client to a VIP without persistence: its whole address.
        assert run(prog, IP(src=c, dst=VIP4) / TCP(sport=1, dport=80)) == fanout.bucket(P(c), 4)
        # ICMP errors use the VIP's mask too.
        quoted = IP(src=STICKY4, dst=c) / TCP(sport=80, dport=1)
        assert run(prog, IP(src=ROUTER4, dst=STICKY4) / ICMP(type=3, code=4) / bytes(quoted)[:28]) == b
    base = ipaddress.ip_address("198.51.100.0")
    assert len({run(prog, IP(src=str(base + i), dst=STICKY4) / UDP(sport=1, dport=53)) for i in range(256)}) == 1
    for c in clients(300, True, seed=5):
        b = run(prog, IPv6(src=c, dst=STICKY6) / UDP(sport=1, dport=53))
        assert b == fanout.bucket(P(c), 4, 64)
        assert run(prog, IPv6(src=c, dst=VIP6) / UDP(sport=1, dport=53)) == fanout.bucket(P(c), 4)
    assert fanout.bucket(P("2001:db8:1:2::1"), 4, 64) == fanout.bucket(P("2001:db8:1:2:ffff::9"), 4, 64)


def test_masks_come_from_the_plan_and_the_coarser_one_wins():
    from tests.director.dataplane.test_forwarder import plan, server, RS
    from director.dataplane.forwarder import Plan, ServicePlan, VipPlan

    p = plan(server(RS[0]), persistence=(300.0, 24, 64), vips=((STICKY4, 80, 6), (STICKY6, 80, 6)))
    other = ServicePlan("mail", "dr", "wlc", (VipPlan(P(STICKY4), 25, 6, "x"),), (), persistence=(300.0, 16, 128))
    none = ServicePlan("dns", "dr", "wlc", (VipPlan(P(VIP4), 53, 17, "y"),), ())
    both = Plan(p.mac, (*p.services, other, none))
    assert fanout.masks(both) == {P(STICKY4): 16, P(STICKY6): 64}


def test_many_persistent_vips_still_assemble():
    masks = {(0xC0000000 + i).to_bytes(4, "big"): 24 for i in range(400)}
    masks.update({P(f"2001:db8::{i:x}"): 48 for i in range(1, 200)})
    prog = fanout.program(2, masks)
    c = "198.51.100.77"
    assert run(prog, IP(src=c, dst="192.0.1.143") / UDP(sport=1, dport=2)) == fanout.bucket(P(c), 2, 24)
    assert run(prog, IPv6(src="2001:db8:5::5", dst="2001:db8::c7") / UDP(sport=1, dport=2)) == \
        fanout.bucket(P("2001:db8:5::5"), 2, 48)


def test_arp_goes_to_the_first_socket():
    assert cbpf.run(fanout.program(3), bytes(Ether() / ARP(pdst=VIP4))) == 0


def test_members_replay_the_kernels_array_and_the_table_follows_workers():
    m = fanout.Members(3)
    for w in range(3):
        m.join(w)
    assert m.table() == (0, 1, 2)
    m.leave(0)  # the last socket (worker 2) takes position 0
    assert m.arr == [2, 1]
    t = m.table()
    assert t[1] == 1 and t[2] == 0 and t[0] in (0, 1)  # worker 0's clients go to a live worker
    m.join(0)  # back, appended
    assert m.arr == [2, 1, 0] and m.table() == (2, 1, 0)
    prog = fanout.program(3, table=m.table())
    for c in clients(50, False, seed=6):
        assert run(prog, IP(src=c, dst=VIP4) / UDP(sport=1, dport=2)) == m.table()[fanout.bucket(P(c), 3)]
    assert fanout.Members(2).table() == (0, 0)


def test_the_kernel_accepts_the_program():
    """The classic BPF checker the fanout setsockopt uses is the socket filter's too."""
    prog = fanout.program(2, {P(STICKY4): 24, P(STICKY6): 64}, table=(1, 0))
    code = ctypes.create_string_buffer(bpf_bytes(prog))
    fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(code))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, 26, fprog)  # SO_ATTACH_FILTER


@pytest.mark.parametrize("workers", [2, 3])
def test_a_nat_real_servers_packets_go_where_their_client_went(workers):
    """NAT: replies (and errors the real server sends) hash by their destination, masked as
    the real server's service masks its clients; other traffic is unchanged."""
    rip4, rip6 = "10.2.0.11", "fd00:2::11"
    prog = fanout.program(workers, {P(STICKY4): 24, P(STICKY6): 64}, None,
                          {P(rip4): 24, P("10.2.0.12"): 32, P(rip6): 64})
    for c in clients(100, False, seed=7):
        b24 = fanout.bucket(P(c), workers, 24)
        assert run(prog, IP(src=c, dst=STICKY4) / TCP(sport=1, dport=80)) == b24
        assert run(prog, IP(src=rip4, dst=c) / TCP(sport=8080, dport=1)) == b24
        assert run(prog, IP(src=rip4, dst=c) / ICMP(type=3, code=3) / bytes(IP(src=c, dst=rip4) / UDP())[:28]) == b24
        assert run(prog, IP(src="10.2.0.12", dst=c) / UDP(sport=53, dport=1)) == fanout.bucket(P(c), workers)
        assert run(prog, IP(src=c, dst=VIP4) / UDP(sport=1, dport=53)) == fanout.bucket(P(c), workers)
    for c in clients(100, True, seed=8):
        b64 = fanout.bucket(P(c), workers, 64)
        assert run(prog, IPv6(src=c, dst=STICKY6) / TCP(sport=1, dport=80)) == b64
        assert run(prog, IPv6(src=rip6, dst=c) / TCP(sport=8080, dport=1)) == b64
        # not a NAT real server's: by its source, as any packet
        assert run(prog, IPv6(src="fd00:2::12", dst=c) / TCP(sport=8080, dport=1)) == fanout.bucket(P("fd00:2::12"), workers)
