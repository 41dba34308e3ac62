"""IP-in-IP end to end: the real servers sit on another subnet behind a router (root).

client (10.0.1.2) -- router -- director (10.0.2.2, owns the VIPs: the router
routes them to it), router -- bridge -- rs1, rs2 (10.0.3.0/24). The real
servers run `glb realserver setup --mode tun` (this kernel has no ipip: the
userspace decapsulator holding the VIPs on a TUN device, or the tc-BPF
decapsulator with the VIPs on lo); `glb director`
encapsulates towards them through the router; replies go from the real
servers to the client through the router, never through the director.
"""

from __future__ import annotations

import functools
import json
import subprocess
from collections import Counter

import pytest

from tests.director.director_lab import (
    PY,
    DirectorLab,
    config_yaml,
    counting_table,
    curl,
    forward,
    nft_counters,
    real_server,
    running_lab,
    service_yaml,
    start_http,
    uplink,
)
from director.realserver import bpfdecap
from tests.environment import require
from tests.netns import Lab

pytestmark = pytest.mark.netns

VIP, VIP6 = "192.0.2.10", "2001:db8:10::10"
DIRECTOR, DIRECTOR6 = "10.0.2.2", "fd00:2::2"
RS = {1: "10.0.3.11", 2: "10.0.3.12"}
RS6 = {1: "fd00:3::11", 2: "fd00:3::12"}


class TunLab(DirectorLab):
    def __init__(self, lab: Lab, tmp, redis_port: int, dataplane: str, decap: str = "userspace") -> None:
        self.lab = lab
        self.dataplane = dataplane
        self.decap = decap
        self.tmp = tmp
        self.router = r = lab.netns("router")
        self.client, self.director = lab.netns("client"), lab.netns("director")
        for ns, net, name in ((self.client, 1, "rc"), (self.director, 2, "rd")):
            uplink(lab, ns, r, net, name, six=True)
        sw = lab.netns("sw")
        br = lab.bridge(sw)
        lab.port(sw, br, r, ["10.0.3.1/24", "fd00:3::1/64"], host_name="rs")
        forward(r)
        r.ip("route", "add", f"{VIP}/32", "via", DIRECTOR)
        r.ip("-6", "route", "add", f"{VIP6}/128", "via", DIRECTOR6)
        self.rs = {}
        for i in (1, 2):
            self.rs[i] = real_server(lab, sw, br, tmp, f"rs{i}", [f"{RS[i]}/24", f"{RS6[i]}/64"], [VIP, VIP6], "tun",
                                     via=["10.0.3.1", "fd00:3::1"], decap=decap)
            start_http(self.rs[i], f"rs{i}")
        counting_table(self.director, {"from_vip": f"ip saddr {VIP}", "from_vip6": f"ip6 saddr {VIP6}",
                                       "to_vip": f"ip daddr {VIP}"})
        self.start_director(tmp, redis_port, config_yaml(
            redis_port=6379, address=DIRECTOR, address6=DIRECTOR6,
            services=service_yaml("web", [f"{VIP}:80/tcp", f"{VIP}:5353/udp"], [(RS[1], 1), (RS[2], 1)],
                                  forwarding="tun")
            + service_yaml("web6", [f"[{VIP6}]:80/tcp"], [(RS6[1], 1), (RS6[2], 1)], forwarding="tun"),
            dataplane=dataplane))


@pytest.fixture(scope="module", params=[("userspace", "userspace"), ("kernel", "userspace"), ("kernel", "bpf")],
                ids=["engine-userspace_decap", "kernel-userspace_decap", "kernel-bpf_decap"])
def tun(request, tmp_path_factory, redis_server):
    """The lab with established flows tunnelled by the engine, then by the kernel's tc program; the real
    servers decapsulating in userspace, then with the tc-BPF decapsulator."""
    dataplane, decap = request.param
    require(bpfdecap.probe() if decap == "bpf" else None)
    with running_lab("tun", functools.partial(TunLab, decap=decap), tmp_path_factory.mktemp("tun"), redis_server,
                     dataplane, [RS[1], RS[2], RS6[1], RS6[2]]) as t:
        yield t


def test_the_real_servers_decapsulate_as_asked(tun):
    for i in (1, 2):
        assert json.loads((tun.tmp / f"rs{i}.json").read_text())["decap"] == tun.decap
        assert ("glb_decap" in tun.rs[i].ingress_programs()) == (tun.decap == "bpf")


def test_every_real_server_serves_through_the_tunnel_ipv4_and_ipv6(tun):
    assert Counter(curl(tun.client, f"http://{VIP}/") for _ in range(6)) == Counter({"rs1": 3, "rs2": 3})
    assert Counter(curl(tun.client, f"http://[{VIP6}]/") for _ in range(6)) == Counter({"rs1": 3, "rs2": 3})


def test_tunnelled_replies_go_straight_to_the_client(tun):
    def forwarded() -> dict[str, int]:
        return {address: s["packets"] for address, s in tun.d.servers().items()}

    nft_before, fwd_before = nft_counters(tun.director, "glbt"), forwarded()
    rx_before = tun.director.link_stats("eth0")["rx_packets"]
    assert set(fwd_before) == {RS[1], RS[2], RS6[1], RS6[2]}, fwd_before
    served = curl(tun.client, f"http://{VIP}/")
    assert served in ("rs1", "rs2")
    nft_after = nft_counters(tun.director, "glbt")
    # The client's packets crossed the director; the replies did not.
    if tun.dataplane == "kernel":  # nftables' ingress hook sees only what the tc program left
        assert tun.director.link_stats("eth0")["rx_packets"] - rx_before >= 5
        tun.lab.wait_for(lambda: tun.d.status()["packet_path"]["kernel"].get("forwarded_tun", 0) > 0, timeout=5,
                         what="packets tunnelled by the kernel")
    else:
        assert nft_after["to_vip"] - nft_before["to_vip"] >= 5
    assert nft_after["from_vip"] == 0 and nft_after["from_vip6"] == 0
    # The director tunnelled them to the server that answered (it samples the packet path each second;
    # the kernel's counters fold into the same per-server counts).
    rs = RS[1] if served == "rs1" else RS[2]
    tun.lab.wait_for(lambda: forwarded()[rs] - fwd_before[rs] >= 5, timeout=5,
                     what=f"the packets forwarded to {rs} to be counted")
    servers = tun.d.servers()
    assert set(servers) == set(fwd_before) and all(s["state"] == "up" for s in servers.values()), servers


DF_SENDER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: DF set, never fragment locally
s.connect((sys.argv[1], 5353))
s.send(b"x" * 1472)  # a 1500-byte packet: does not fit the tunnel (1480 inside)
import time
deadline = time.monotonic() + 5
while s.getsockopt(socket.IPPROTO_IP, 14) >= 1500 and time.monotonic() < deadline:  # until the ICMP is in
    time.sleep(0.01)
try:
    s.send(b"x" * 1472)
    print("sent")
except OSError as e:
    print("refused", e.errno)
print(s.getsockopt(socket.IPPROTO_IP, 14))  # IP_MTU: the path MTU the kernel learnt
"""


def test_a_df_packet_too_big_for_the_tunnel_gets_frag_needed_back(tun):
    out = tun.client.run([PY, "-c", DF_SENDER, VIP]).stdout.split()
    assert out == ["refused", "90", "1480"]  # EMSGSIZE: the client learnt the tunnel's MTU from the director
    tun.lab.wait_for(lambda: tun.d.status()["packet_path"]["drops"].get("too_big", 0) >= 1, timeout=5,
                     what="the director to count the too-big packet (it samples each second)")


UDP_SIZES = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5353))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(str(len(data)).encode(), peer)
"""

NO_DF_SENDER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: no DF, fragmented locally
s.settimeout(2)
s.connect((sys.argv[1], 5353))
for n in map(int, sys.argv[2:]):
    for _ in range(3):
        s.send(b"z" * n)
        try:
            print(s.recv(100).decode())
            break
        except (socket.timeout, ConnectionRefusedError):  # lost, or a port unreachable of an earlier try
            pass
    else:
        print("lost")
"""


def test_a_packet_without_df_too_big_for_the_tunnel_is_fragmented_into_it(tun):
    """1472 bytes (a 1500-byte packet, 1480 fit inside) and 4000 (three fragments from the client, each too
    big): the director fragments each into the tunnel, and the real server, with either decapsulator, unwraps
    every piece and reassembles the datagram. The tc-BPF decapsulator used to lose them: the director
    fragmented the outer packet, which only a kernel ipip driver could reassemble and unwrap."""
    servers = [tun.rs[i].popen([PY, "-c", UDP_SIZES, VIP], stdout=subprocess.PIPE, text=True) for i in (1, 2)]
    try:
        assert [proc.stdout.readline().strip() for proc in servers] == ["ready", "ready"]  # bound before we send
        out = tun.client.run([PY, "-c", NO_DF_SENDER, VIP, "1472", "4000", "200"], timeout=30).stdout.split()
        assert out == ["1472", "4000", "200"]
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()


def test_the_director_survives_and_keeps_serving_after_garbage(tun):
    garbage = r"""
import os, socket
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for i in range(300):
    body = os.urandom(i % 60)
    hdr = bytes([0x45 if i % 3 else 0x4f, 0]) + (20 + len(body)).to_bytes(2, "big") + bytes(4) + bytes([64, i % 256]) + bytes(2)
    hdr += socket.inet_aton("10.0.1.2") + socket.inet_aton("VIP")
    try:
        s.sendto(hdr + body, ("VIP", 0))
    except OSError:
        pass
""".replace("VIP", VIP)
    def dropped() -> int:
        return sum(tun.d.status()["packet_path"]["drops"].values())

    before = dropped()
    tun.client.run([PY, "-c", garbage])
    # The 200 with a valid IPv4 header (i % 3 != 0) cross the router: wait until the director has counted them.
    tun.lab.wait_for(lambda: dropped() - before >= 200, timeout=10, what="the garbage to be counted as dropped")
    assert tun.d.proc.poll() is None
    assert curl(tun.client, f"http://{VIP}/") in ("rs1", "rs2")
