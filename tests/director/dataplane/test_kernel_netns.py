"""The kernel data plane on a real link: attached at tc ingress in a namespace, it forwards installed flows.

client, director and real server on a bridge (as the benchmark). The
director's namespace runs benchmarks/director_kernel.py: the program loaded
with libbpf, attached with pyroute2, one flow installed as the forwarder
would. The client's datagrams of that flow reach the real server rewritten
(DR: the director's source MAC) or tunnelled (TUN: IP-in-IP from the
director); another flow's are left to the (absent) userspace engine; the
kernel's counters say so; a program left attached by a killed process is
replaced, and detaching removes it.
Needs root, namespaces and BPF (fails under CI=true when missing).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.environment import bpf_unavailable, needs
from tests.netns import Lab, lab_unavailable

ROOT = Path(__file__).resolve().parents[3]
HELPER = str(ROOT / "benchmarks" / "director_kernel.py")
VIP, CLIENT, DIRECTOR, RS = "10.0.0.100", "10.0.0.10", "10.0.0.2", "10.0.0.11"
SENDS = 20


pytestmark = [pytest.mark.netns, needs(lab_unavailable()), needs(bpf_unavailable())]


def mac(ns) -> str:
    return ns.run(["cat", "/sys/class/net/eth0/address"]).stdout.strip()


def nft_count(ns) -> int:
    text = ns.run(["nft", "list", "table", "netdev", "t"]).stdout
    return int(text.split("counter packets ")[1].split()[0])


def send(ns, sport: int) -> None:
    code = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"s.bind(('{CLIENT}', {sport}))\nfor i in range({SENDS}): s.sendto(b'x' * 32, ('{VIP}', 9))")
    ns.run([sys.executable, "-c", code])


@pytest.mark.parametrize("attach", ["tcx", "clsact"])
@pytest.mark.parametrize("mode", ["dr", "tun"])
def test_installed_flows_are_forwarded_by_the_kernel(mode, attach):
    """``attach``: tcx (kernel 6.6+, what the director uses where it can) or the clsact filter (its
    fallback on older kernels), forced here."""
    with Lab(f"kern-{mode}-{attach[0]}") as lab:
        sw = lab.netns("sw")
        br = lab.bridge(sw)
        client, director, rs = lab.netns("client"), lab.netns("director"), lab.netns("rs")
        lab.port(sw, br, client, f"{CLIENT}/24")
        lab.port(sw, br, director, f"{DIRECTOR}/24")
        lab.port(sw, br, rs, f"{RS}/24")
        dmac, rmac = mac(director), mac(rs)
        client.ip("neigh", "replace", VIP, "lladdr", dmac, "dev", "eth0")
        # The real server counts what reaches it as the mode sends it, at ingress, and drops it.
        match = (f"ether saddr {dmac} ip saddr {CLIENT} ip daddr {VIP} udp dport 9" if mode == "dr"
                 else f"ether saddr {dmac} ip saddr {DIRECTOR} ip daddr {RS} ip protocol 4 @th,72,8 17")
        rs.run(["nft", "-f", "-"], input=(
            'table netdev t { chain in { type filter hook ingress device "eth0" priority 0;\n'
            f"  {match} counter drop\n }}\n}}\n"))
        plan = {"interface": "eth0", "mode": mode, "servers": [[RS, rmac]], "source": DIRECTOR,
                "flows": [[17, CLIENT, 5000, VIP, 9]], "tcx": attach == "tcx"}
        # A director killed outright leaves its program attached: the next one replaces it.
        killed = director.popen([sys.executable, HELPER, json.dumps({**plan, "flows": []})], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert killed.stdout.readline().startswith("ready")
        killed.kill()
        killed.wait(10)
        helper = director.popen([sys.executable, HELPER, json.dumps(plan)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert helper.stdout.readline().startswith("ready")
        # One program: the new one replaced the old (which would forward by maps nobody updates).
        assert director.ingress_programs() == ["glb_ingress"]
        if attach == "clsact":
            assert "glb_ingress" in director.run(["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout

        send(client, 5000)  # the installed flow
        lab.wait_for(lambda: nft_count(rs) == SENDS, what="the installed flow at the real server")
        send(client, 5001)  # not installed: left to userspace, which is not running here

        helper.stdin.write("\n")
        helper.stdin.flush()
        stats = json.loads(helper.stdout.readline())
        assert stats["packets"] == SENDS and stats["bytes"] == SENDS * (20 + 8 + 32)
        assert stats["reasons"][f"forwarded_{mode}"] == SENDS
        assert stats["reasons"]["pass_no_flow"] >= SENDS
        assert nft_count(rs) == SENDS

        helper.stdin.close()
        assert helper.wait(10) == 0
        assert director.ingress_programs() == []


RAW_SEND = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for i in range(int(sys.argv[2])):
    s.send(bytes.fromhex(sys.argv[1]))
"""


def test_headers_outside_the_linear_part_are_pulled_in_and_forwarded():
    """A frame of a page or more from a packet socket has only its Ethernet header in the skb's linear part
    (af_packet puts the rest in page fragments, and veth and the bridge keep it so): the program reads headers
    in place, so it must pull them in (linear()) and then forward the frame as any other."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    payload = 6000
    with Lab("kern-pull") as lab:
        sw = lab.netns("sw")
        br = lab.bridge(sw)
        client, director, rs = lab.netns("client"), lab.netns("director"), lab.netns("rs")
        for ns, addr in ((client, CLIENT), (director, DIRECTOR), (rs, RS)):
            lab.port(sw, br, ns, f"{addr}/24", mtu=9000)
        dmac, rmac = mac(director), mac(rs)
        rs.run(["nft", "-f", "-"], input=(
            'table netdev t { chain in { type filter hook ingress device "eth0" priority 0;\n'
            f"  ether daddr {rmac} ether saddr {dmac} ip saddr {CLIENT} udp dport 9 counter drop\n }}\n}}\n"))
        plan = {"interface": "eth0", "mode": "dr", "servers": [[RS, rmac]], "source": DIRECTOR,
                "flows": [[17, CLIENT, 5000, VIP, 9]]}
        helper = director.popen([sys.executable, HELPER, json.dumps(plan)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert helper.stdout.readline().startswith("ready")
        frame = Ether(dst=dmac, src=mac(client)) / IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=9) / (b"j" * payload)
        client.run([sys.executable, "-c", RAW_SEND, bytes(frame).hex(), str(SENDS)])
        lab.wait_for(lambda: nft_count(rs) == SENDS, what="the large frames at the real server")

        helper.stdin.write("\n")
        helper.stdin.flush()
        stats = json.loads(helper.stdout.readline())
        assert stats["reasons"]["forwarded_dr"] == SENDS
        assert stats["packets"] == SENDS and stats["bytes"] == SENDS * (20 + 8 + payload)
        helper.stdin.close()
        assert helper.wait(10) == 0
