"""LVS-NAT end to end: the classic lab, with port mapping (root).

client (10.0.1.2) -- eth0 [director] eth1 -- bridge -- rs1, rs2 (10.0.2.0/24)

The director has two interfaces: the public side, where it owns the VIP,
and the real servers' private network (10.0.2.1, director.lan). The real
servers run `glb realserver setup --mode nat --gateway 10.0.2.1` (their
default route through the director) and serve HTTP on 8080 and 8081; the
director maps VIP:80 -> :8080 (wlc) and VIP:8000 -> :8081 (persistent). The
director's kernel forwards IPv4 (as a router's would): the NAT guard must
keep it from sending the real servers' replies on with their private
source. veth offloads stay on towards the real servers, so their replies
come with partial checksums (and as GSO frames).
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.director.director_lab import (
    KEEPALIVE_CLIENT,
    PY,
    DirectorLab,
    config_yaml,
    counting_table,
    curl,
    lab_per_dataplane,
    nft_counters,
    real_server,
    service_yaml,
    start_http,
)
from tests.netns import Lab

pytestmark = pytest.mark.netns

VIP = "192.0.2.10"
CLIENT, DIR_PUBLIC, DIR_LAN = "10.0.1.2", "10.0.1.1", "10.0.2.1"
RS = {1: "10.0.2.11", 2: "10.0.2.12"}


class NatLab(DirectorLab):
    def __init__(self, lab: Lab, tmp, redis_port: int, dataplane: str) -> None:
        self.lab = lab
        self.dataplane = dataplane
        self.client, self.director = lab.netns("client"), lab.netns("director")
        lab.veth(self.client, self.director, f"{CLIENT}/24", f"{DIR_PUBLIC}/24", a_name="eth0", b_name="eth0")
        self.client.ip("route", "add", f"{VIP}/32", "dev", "eth0")  # on-link: the director answers ARP for it
        sw = lab.netns("sw")
        br = lab.bridge(sw)
        lab.port(sw, br, self.director, f"{DIR_LAN}/24", host_name="eth1")
        self.director.sysctl("net.ipv4.ip_forward", 1)
        self.rs = {}
        self.http = {}
        for i in (1, 2):
            # Some other gateway before setup (setup replaces it with the director).
            ns = real_server(lab, sw, br, tmp, f"rs{i}", [f"{RS[i]}/24"], [], "nat", via=["10.0.2.254"],
                             gateways=[DIR_LAN], offload=True)
            self.http[(i, 8080)] = start_http(ns, f"rs{i}", 8080)
            self.http[(i, 8081)] = start_http(ns, f"rs{i}", 8081)
            self.rs[i] = ns
        # What reaches the client: from the VIP only, never from a real server's address.
        counting_table(self.client, {"from_vip": f"ip saddr {VIP}", "from_private": "ip saddr 10.0.2.0/24"})
        servers = [(RS[1], 1), (RS[2], 1)]
        self.start_director(tmp, redis_port, config_yaml(
            redis_port=6379, dataplane=dataplane, lan=f"{{interface: eth1, address: {DIR_LAN}/24}}",
            services=service_yaml("web", [f"{VIP}:80/tcp"], servers, forwarding="nat", scheduler="wlc", port=8080)
            + service_yaml("sticky", [f"{VIP}:8000/tcp"], servers, forwarding="nat", scheduler="rr", port=8081,
                           extra="persistence: {timeout: 60}")))


@pytest.fixture(scope="module", params=["userspace", "kernel"])
def natlab(request, tmp_path_factory, redis_server):
    """The lab with the userspace engine, then with the kernel's tc program on the client side."""
    yield from lab_per_dataplane("nat", NatLab, [RS[1], RS[2]], request, tmp_path_factory, redis_server)


def test_both_real_servers_serve_and_the_client_only_sees_the_vip(natlab):
    before = nft_counters(natlab.client, "glbt")
    assert Counter(curl(natlab.client, f"http://{VIP}/") for _ in range(6)) == Counter({"rs1": 3, "rs2": 3})
    after = nft_counters(natlab.client, "glbt")
    assert after["from_vip"] - before["from_vip"] >= 6 * 4  # SYN-ACK, answer, FIN, ACKs: all from the VIP
    assert after["from_private"] == 0  # neither the engine nor the director's kernel leaked a private source


def test_counters_show_both_directions(natlab):
    def counts() -> dict[str, tuple[int, int]]:
        web = next(svc for svc in natlab.d.status()["services"] if svc["name"] == "web")
        return {s["address"]: (s["packets"], s["out_packets"]) for s in web["real_servers"]}

    before = counts()
    served = curl(natlab.client, f"http://{VIP}/")
    rs = RS[1] if served == "rs1" else RS[2]
    natlab.lab.wait_for(lambda: counts()[rs][0] - before[rs][0] >= 4 and counts()[rs][1] - before[rs][1] >= 3,
                        timeout=5, what=f"{rs}'s packets in both directions to be counted")


def test_wlc_sends_new_connections_away_from_a_busy_server(natlab):
    held = natlab.client.popen([PY, "-c", KEEPALIVE_CLIENT, VIP], stdin=-1, stdout=-1, text=True)
    try:
        held.stdin.write("go\n")
        held.stdin.flush()
        busy = held.stdout.readline().strip()
        assert busy in ("rs1", "rs2"), busy
        # An established connection weighs 256 inactive ones (IPVS's wlc): new ones go to the other server.
        other = "rs2" if busy == "rs1" else "rs1"
        assert [curl(natlab.client, f"http://{VIP}/") for _ in range(4)] == [other] * 4
        held.stdin.write("again\n")
        held.stdin.flush()
        assert held.stdout.readline().strip() == busy  # the held connection stays where it was
    finally:
        held.stdin.close()
        held.wait(10)


def test_persistence_keeps_a_client_on_one_server(natlab):
    served = [curl(natlab.client, f"http://{VIP}:8000/") for _ in range(6)]
    assert served[0] in ("rs1", "rs2") and served == [served[0]] * 6


def test_a_reply_without_a_connection_is_dropped_and_counted(natlab):
    def dropped() -> int:
        return natlab.d.status()["packet_path"]["drops"].get("reply_no_connection", 0)

    before = dropped()
    stray = ("from scapy.all import IP, TCP, send; "
             f"send(IP(src='{RS[1]}', dst='{CLIENT}') / TCP(sport=8080, dport=40999, flags='SA'), verbose=0)")
    natlab.rs[1].run([PY, "-c", stray])
    natlab.lab.wait_for(lambda: dropped() > before, timeout=5, what="the stray reply to be counted")
    assert nft_counters(natlab.client, "glbt")["from_private"] == 0


def test_established_nat_flows_take_the_kernel_both_ways(natlab):
    """Requests on one kept-alive connection: with the kernel data plane, after the handshake its
    packets and the real server's replies are the tc program's (DNAT in, SNAT out; the real
    servers' veth offloads on: partial checksums), counted on the route both ways as in userspace."""
    def kernel() -> dict[str, int]:
        return natlab.d.status()["packet_path"].get("kernel", {})

    def counts() -> dict[str, tuple[int, int]]:
        web = next(svc for svc in natlab.d.status()["services"] if svc["name"] == "web")
        return {s["address"]: (s["packets"], s["out_packets"]) for s in web["real_servers"]}

    before, k0 = counts(), kernel()
    held = natlab.client.popen([PY, "-c", KEEPALIVE_CLIENT, VIP], stdin=-1, stdout=-1, text=True)
    try:
        answers = []
        for _ in range(8):
            held.stdin.write("go\n")
            held.stdin.flush()
            answers.append(held.stdout.readline().strip())
        assert answers[0] in ("rs1", "rs2") and answers == [answers[0]] * 8
    finally:
        held.stdin.close()
        held.wait(10)
    rs = RS[1] if answers[0] == "rs1" else RS[2]
    # 8 requests and 8 answers at least (ACKs aside), whoever forwarded them
    natlab.lab.wait_for(lambda: counts()[rs][0] - before[rs][0] >= 8 and counts()[rs][1] - before[rs][1] >= 8,
                        timeout=5, what=f"{rs}'s packets in both directions to be counted")
    if natlab.dataplane == "kernel":
        def grew(reason: str) -> int:
            return kernel().get(reason, 0) - k0.get(reason, 0)

        natlab.lab.wait_for(lambda: grew("forwarded_nat") >= 7 and grew("forwarded_nat_reply") >= 7,
                            timeout=5, what="the kernel to forward the established requests and answers")
    assert nft_counters(natlab.client, "glbt")["from_private"] == 0


def test_a_real_server_going_down_moves_new_connections(natlab):
    """Last in this module: it stops rs1's web server."""
    natlab.http[(1, 8080)].terminate()
    natlab.http[(1, 8080)].wait(5)
    def state(service: str) -> str:
        svc = next(s for s in natlab.d.status()["services"] if s["name"] == service)
        return next(s["state"] for s in svc["real_servers"] if s["address"] == RS[1])

    natlab.lab.wait_for(lambda: state("web") == "down", timeout=10, what="rs1 down for web")
    natlab.d.wait_plan()
    assert Counter(curl(natlab.client, f"http://{VIP}/") for _ in range(4)) == Counter({"rs2": 4})
    assert state("sticky") == "up"  # the other service, on rs1's other port, is unaffected
