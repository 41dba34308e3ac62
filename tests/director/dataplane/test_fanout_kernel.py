"""The fanout program in the kernel: real frames over a veth in a namespace land where the interpreter says.

The unit tests (test_fanout.py) hold the program to a classic BPF interpreter;
this holds the interpreter to the kernel (SKF_NET_OFF loads, the ICMP
paths, ``ret % members``) and fanout.Members to the kernel's array of the
group's sockets when one leaves and another joins.
"""

from __future__ import annotations

import ipaddress
import json
import random
import sys
from pathlib import Path

import pytest
from scapy.all import conf

conf.verb = 0
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment  # noqa: E402
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6, IPv6ExtHdrFragment  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from director.dataplane import fanout  # noqa: E402
from tests.director.dataplane import cbpf  # noqa: E402
from tests.environment import require  # noqa: E402
from tests.netns import Lab, netns_unavailable  # noqa: E402

pytestmark = pytest.mark.netns
ROOT = Path(__file__).resolve().parents[3]

VIP4, VIP6, STICKY4, STICKY6 = "192.0.2.10", "2001:db8::10", "192.0.2.20", "2001:db8::20"
MASKS = {ipaddress.ip_address(STICKY4).packed: 24, ipaddress.ip_address(STICKY6).packed: 64}

# Inside the namespace: members of one CBPF fanout group on vb; frames sent on va one by one;
# prints, per step, which member (by name) received each frame.
SCRIPT = r"""
import ctypes, json, select, socket, struct, sys
from director.dataplane import fanout
from director.dataplane.bpf import bpf_bytes
SOL_PACKET, PACKET_FANOUT, PACKET_IGNORE_OUTGOING = 263, 18, 23
steps = json.load(sys.stdin)
members = {}
def join(name):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind(("vb", 0))
    s.setsockopt(SOL_PACKET, PACKET_FANOUT, 4242 | fanout.PACKET_FANOUT_CBPF << 16)
    members[name] = s
def program(prog):
    code = ctypes.create_string_buffer(bpf_bytes([tuple(i) for i in prog]))
    fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(code))
    next(iter(members.values())).setsockopt(SOL_PACKET, fanout.PACKET_FANOUT_DATA, fprog)
tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
tx.bind(("va", 0))
out = []
for step in steps:
    for name in step.get("leave", []):
        members.pop(name).close()
    for name in step.get("join", []):
        join(name)
    program(step["program"])
    got = []
    for frame in map(bytes.fromhex, step["frames"]):
        tx.send(frame)
        who = None
        for _ in range(50):  # skip anything else on the link (IPv6 router solicitations ...)
            ready, _, _ = select.select(list(members.values()), [], [], 1.0)
            if not ready:
                break
            s = ready[0]
            if s.recv(65536) == frame:
                who = next(n for n, m in members.items() if m is s)
                break
        got.append(who)
    out.append(got)
print(json.dumps(out))
"""


def frames() -> list[bytes]:
    rnd = random.Random(7)
    out = []
    for _ in range(12):
        c4 = str(ipaddress.IPv4Address(rnd.getrandbits(32)))
        c6 = str(ipaddress.IPv6Address(rnd.getrandbits(128)))
        for vip in (VIP4, STICKY4):
            out.append(IP(src=c4, dst=vip) / TCP(sport=rnd.randrange(1024, 65535), dport=80, flags="S"))
            quoted = IP(src=vip, dst=c4) / TCP(sport=80, dport=40000, flags="SA")
            out.append(IP(src="203.0.113.1", dst=vip) / ICMP(type=3, code=4) / bytes(quoted)[:28])
        out.extend(fragment(IP(src=c4, dst=VIP4, id=9) / UDP(sport=5, dport=53) / Raw(b"z" * 1200), 600))
        for vip in (VIP6, STICKY6):
            out.append(IPv6(src=c6, dst=vip) / UDP(sport=rnd.randrange(1024, 65535), dport=53))
            quoted = IPv6(src=vip, dst=c6) / TCP(sport=80, dport=40000, flags="SA")
            out.append(IPv6(src="2001:db8:ffff::1", dst=vip) / ICMPv6PacketTooBig(mtu=1280) / bytes(quoted)[:48])
        out.append(IPv6(src=c6, dst=VIP6) / IPv6ExtHdrFragment(offset=10, id=3) / Raw(b"q" * 40))
    return [bytes(Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02") / f) for f in out]


def test_the_kernel_places_frames_where_the_interpreter_and_members_say():
    require(netns_unavailable())
    fs = frames()
    # Workers 0 and 1 are the sockets w0 and w1; w0b is worker 0 started again.
    members = fanout.Members(2)
    members.join(0)
    members.join(1)
    steps = [{"join": ["w0", "w1"], "program": fanout.program(2, MASKS, members.table())}]
    arrays = [["w0", "w1"]]  # the kernel's array of the group, as af_packet.c keeps it
    owners = [{0: "w0", 1: "w1"}]
    members.leave(0)
    steps.append({"leave": ["w0"], "program": fanout.program(2, MASKS, members.table())})
    arrays.append(["w1"])  # the last socket took the leaver's place
    owners.append({0: "w1", 1: "w1"})  # worker 0's clients go to a live worker meanwhile
    members.join(0)
    steps.append({"join": ["w0b"], "program": fanout.program(2, MASKS, members.table())})
    arrays.append(["w1", "w0b"])
    owners.append({0: "w0b", 1: "w1"})  # each client is back on its worker
    for step in steps:
        step["frames"] = [f.hex() for f in fs]
    with Lab("fanout") as lab:
        ns = lab.netns("fanout")
        ns.ip("link", "add", "va", "type", "veth", "peer", "name", "vb")
        for dev in ("va", "vb"):
            ns.ip("link", "set", dev, "up")
        res = ns.run([sys.executable, "-c", SCRIPT], input=json.dumps(steps), timeout=120,
                     cwd=str(ROOT))
    got = json.loads(res.stdout)
    identity = fanout.program(2, MASKS)
    for step, arr, owner, received in zip(steps, arrays, owners, got):
        # The kernel does what the interpreter says: arr[ret % members] ...
        assert received == [arr[cbpf.run(step["program"], f) % len(arr)] for f in fs]
        # ... and that is each client's own worker (its bucket).
        assert received == [owner[cbpf.run(identity, f)] for f in fs]
    assert set(got[0]) == {"w0", "w1"} and set(got[2]) == {"w0b", "w1"}
