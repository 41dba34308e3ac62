"""The director's lifecycle around the packet path, as its own process in a namespace (root).

What start, reload and stop do to the machine, and what is seen on the
wire: startup refusals as one line; the nftables guard installed, re-made
when a reload changes the VIP set and removed on stop; gratuitous ARP and
unsolicited neighbour advertisements at start and the solicited-node groups
joined; packet workers gone when the director is killed with SIGKILL.

The lab: the director's namespace joined to a peer's by one veth pair (the
peer captures what the director sends), the session's redis-server reached
through :class:`RedisBridge`. The real servers need not exist: nothing here
forwards to them.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import time
from pathlib import Path

import pytest
from scapy.layers.inet6 import ICMPv6ND_NA, IPv6
from scapy.layers.l2 import ARP, Ether

from tests.director.director_lab import PY, ROOT, DirectorProcess, RedisBridge, config_yaml, running_lab, service_yaml
from tests.environment import binary_unavailable, require
from tests.netns import Lab

pytestmark = pytest.mark.netns

VIP, VIP6, VIP_ADDED = "10.0.0.100", "fd00::100", "10.0.0.101"
RS, RS6 = "10.0.0.11", "fd00::11"
GUARD = "glb_director"

# Prints every ARP and ICMPv6 frame arriving on eth0, in hex, one a line.
CAPTURE = r"""
import socket
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("eth0", 0))
print("ready", flush=True)
while True:
    frame, addr = s.recvfrom(65535)
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    if frame[12:14] == b"\x08\x06" or (frame[12:14] == b"\x86\xdd" and frame[20] == 58):
        print(frame.hex(), flush=True)
"""


def services(vips4: tuple[str, ...]) -> str:
    return (service_yaml("web", [f"{v}:80/tcp" for v in vips4], [(RS, 1)])
            + service_yaml("web6", [f"[{VIP6}]:80/tcp"], [(RS6, 1)]))


class Box:
    """The director's namespace and a peer on one link; starts `glb director` with a given config."""

    def __init__(self, lab: Lab, tmp: Path, redis_port: int) -> None:
        self.lab, self.tmp = lab, tmp
        self.director, self.peer = lab.netns("director"), lab.netns("peer")
        lab.veth(self.director, self.peer, ["10.0.0.2/24", "fd00::2/64"], ["10.0.0.10/24", "fd00::10/64"],
                 a_name="eth0", b_name="eth0")
        self.bridge = RedisBridge(self.director.name, redis_port)
        self.config = tmp / "glb.yaml"
        self.runs: list[DirectorProcess] = []

    def yaml(self, vips4: tuple[str, ...] = (VIP,), workers: int = 1, interface: str = "eth0") -> str:
        return config_yaml(redis_port=6379, services=services(vips4), workers=workers).replace(
            "interface: eth0", f"interface: {interface}")

    def start(self, text: str | None = None, **kw) -> DirectorProcess:
        """`glb director` with this config text (default: :meth:`yaml`); ``kw`` for DirectorProcess."""
        self.config.write_text(text or self.yaml())
        d = DirectorProcess(self.director, self.config, self.tmp / f"director{len(self.runs)}.log", **kw)
        self.runs.append(d)
        return d

    def refused(self, text: str | None = None, **kw) -> list[str]:
        """Start a director that must refuse: its exit code is 1; returns its output lines."""
        d = self.start(text, **kw)
        assert d.proc.wait(30) == 1, d.log.read_text()
        d.stop()
        return d.log.read_text().splitlines()

    def guard(self) -> str | None:
        """The guard's netdev table as `nft` lists it, or None if it is not there."""
        res = self.director.run(["nft", "list", "table", "netdev", GUARD], check=False)
        return res.stdout if res.returncode == 0 else None

    def close(self) -> None:
        for d in self.runs:
            d.stop()
        self.bridge.close()


@pytest.fixture
def box(tmp_path, redis_server):
    with running_lab("life", Box, tmp_path, redis_server) as b:
        yield b


def error_line(lines: list[str]) -> str:
    """The refusal: exactly one `glb: error:` line and no traceback around it."""
    errors = [line for line in lines if line.startswith("glb: ")]
    assert len(errors) == 1, lines
    assert not any("Traceback" in line for line in lines), lines
    return errors[0]


def test_a_vip_configured_on_the_kernel_is_refused(box):
    box.director.ip("addr", "add", f"{VIP}/32", "dev", "lo")
    line = error_line(box.refused())
    assert line == ("glb: error: VIPs must not be configured on the director's interfaces "
                    f"(the kernel would answer for them): {VIP} on lo")
    assert box.guard() is None


def test_a_missing_interface_is_refused(box):
    line = error_line(box.refused(box.yaml(interface="eth9")))
    assert line == "glb: error: director.interface 'eth9': no such interface"


def test_a_guard_that_cannot_be_installed_is_refused(box, tmp_path):
    # nft refusing the ruleset (as a kernel without nf_tables' netdev family does): a stand-in first on PATH.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nft").write_text("#!/bin/sh\necho 'Error: Could not process rule: No such file or directory' >&2\nexit 1\n")
    (fake / "nft").chmod(0o755)
    line = error_line(box.refused(env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}))
    assert line == ("glb: error: cannot keep the kernel off VIP traffic: "
                    "nft: Error: Could not process rule: No such file or directory")


def test_a_packet_engine_that_cannot_start_is_refused_and_the_guard_removed(box):
    require(binary_unavailable("setpriv", "util-linux"))
    # Without CAP_NET_RAW (a unit that forgot it): nftables works, the AF_PACKET socket does not.
    noraw = ["setpriv", "--bounding-set", "-net_raw", "--inh-caps", "-net_raw"]
    line = error_line(box.refused(prefix=noraw))
    assert line == "glb: error: packet engine on eth0: cannot open eth0: Operation not permitted"
    assert box.guard() is None  # installed before the engine, removed when it failed


def captured(proc: subprocess.Popen, want, timeout: float = 10.0) -> list[bytes]:
    """Frames from a CAPTURE process until ``want(frames)`` holds."""
    frames: list[bytes] = []
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while not want(frames):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"not captured within {timeout}s; got {[Ether(f).summary() for f in frames]}")
        if sel.select(left):
            frames.append(bytes.fromhex(proc.stdout.readline().strip()))
    return frames


def announcements(frames: list[bytes], mac: str) -> tuple[list[str], list[str]]:
    """(IPv4 VIPs announced by gratuitous ARP, IPv6 VIPs by unsolicited NA), one entry per frame, from ``mac``."""
    arp, na = [], []
    for f in frames:
        e = Ether(f)
        if e.src != mac:
            continue
        if ARP in e and e[ARP].op == 1 and e[ARP].psrc == e[ARP].pdst and e.dst == "ff:ff:ff:ff:ff:ff":
            assert e[ARP].hwsrc == mac
            arp.append(e[ARP].psrc)
        elif ICMPv6ND_NA in e and e[ICMPv6ND_NA].S == 0:
            assert e[ICMPv6ND_NA].O == 1 and e[IPv6].dst == "ff02::1" and e[IPv6].hlim == 255
            na.append(e[ICMPv6ND_NA].tgt)
    return arp, na


def mac_of(ns, ifname: str = "eth0") -> str:
    return json.loads(ns.ip("-j", "link", "show", ifname).stdout)[0]["address"]


def groups(ns) -> set[str]:
    """IPv6 multicast groups joined on eth0."""
    text = ns.ip("-6", "maddr", "show", "dev", "eth0").stdout
    return {w for line in text.splitlines() for w in line.split() if w.startswith("ff02:")}


def test_start_announces_the_vips_joins_their_groups_and_guards_them_until_stop(box):
    cap = box.peer.popen([PY, "-u", "-c", CAPTURE], stdout=subprocess.PIPE, text=True)
    assert cap.stdout.readline().strip() == "ready"
    mac = mac_of(box.director)
    d = box.start()
    # Announced on the wire: three times each (at 0, 1 and 2 s), from the director's MAC.
    frames = captured(cap, lambda fs: announcements(fs, mac) == ([VIP] * 3, [VIP6] * 3))
    assert announcements(frames, mac) == ([VIP] * 3, [VIP6] * 3)
    assert "ff02::1:ff00:100" in groups(box.director)  # VIP6's solicited-node group
    guard = box.guard()
    assert guard is not None and VIP in guard and VIP6 in guard

    # A reload that adds a VIP: the guard is re-made with it, and it is announced.
    d.reload(box.yaml((VIP, VIP_ADDED)))
    box.lab.wait_for(lambda: VIP_ADDED in (box.guard() or ""), what="the guard to cover the added VIP")
    assert VIP in box.guard()
    captured(cap, lambda fs: announcements(fs, mac)[0].count(VIP_ADDED) == 3)
    # ... and one that removes it: out of the guard again.
    d.reload(box.yaml((VIP,)))
    box.lab.wait_for(lambda: VIP_ADDED not in (box.guard() or ""), what="the guard to drop the removed VIP")
    assert VIP in box.guard()

    assert d.stop() == 0
    assert box.guard() is None
    assert box.director.run(["nft", "list", "table", "inet", GUARD], check=False).returncode != 0
    assert "ff02::1:ff00:100" not in groups(box.director)


def test_packet_workers_exit_when_the_director_is_killed(box):
    d = box.start(box.yaml(workers=2))
    workers = box.lab.wait_for(lambda: [w["pid"] for w in ((d.status() or {}).get("packet_path") or {}).get("workers", [])],
                               what="the packet workers in /status")
    assert len(workers) == 2 and all(Path(f"/proc/{pid}").exists() for pid in workers)
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait(10)
    # No orphan keeps the interface open and forwarding: every process in the namespace is gone.
    box.lab.wait_for(lambda: box.director.pids() == [], timeout=10, what=f"workers {workers} to exit")
