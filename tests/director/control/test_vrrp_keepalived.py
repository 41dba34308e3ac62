"""Interop: GLB's VRRPv3 speaker and keepalived on one namespace LAN elect one master and take over from each other.

Three namespaces on a bridge: keepalived (10.9.0.2), GLB's standalone speaker
(``python -m director.control.vrrp_speaker``, 10.9.0.3) and a host that
crafts bad packets (10.9.0.9). keepalived's view is read from its log and
from ``ip addr`` (the master holds the VIP); GLB's from its status file.
Every process is killed by PID and every namespace removed by the Lab.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.environment import binary_unavailable, require
from tests.netns import Lab, netns_unavailable

ROOT = Path(__file__).resolve().parents[3]
VRID, VIP, VIP6 = 51, "10.9.0.100", "fd00:9::100"
KA_ADDR, GLB_ADDR, EVIL_ADDR = "10.9.0.2", "10.9.0.3", "10.9.0.9"
GLB_ADDR6 = "fe80::3"  # VRRP over IPv6 speaks from link-local addresses (keepalived: its own EUI-64 one)

KEEPALIVED_CONF = """\
global_defs {{
  router_id glbtest
  vrrp_version 3
  vrrp_garp_master_repeat 1
  vrrp_garp_master_delay 0
}}
vrrp_instance VI_1 {{
  state BACKUP
  interface eth0
  virtual_router_id {vrid}
  priority {priority}
  advert_int {interval}
  virtual_ipaddress {{
    {vip}
  }}
{unicast}}}
"""
KEEPALIVED_UNICAST = """\
  unicast_src_ip {src}
  unicast_peer {{
    {peer}
  }}
"""

pytestmark = pytest.mark.netns


class Pair:
    """The LAN, keepalived and GLB's speaker; started and stopped by the test."""

    def __init__(self, lab: Lab, tmp: Path, family: int = 4):
        self.lab, self.tmp = lab, tmp
        self.family = family
        self.vip, self.prefix = (VIP, 24) if family == 4 else (VIP6, 64)
        self.glb_addr = GLB_ADDR if family == 4 else GLB_ADDR6
        switch = lab.netns("sw")
        lab.bridge(switch)
        self.ka, self.glb, self.evil = lab.netns("ka"), lab.netns("glb"), lab.netns("evil")
        for ns, addr in ((self.ka, KA_ADDR), (self.glb, GLB_ADDR), (self.evil, EVIL_ADDR)):
            lab.port(switch, "br0", ns, [f"{addr}/24", *([f"{GLB_ADDR6}/64"] if ns is self.glb else [])])
        self.ka_proc = self.glb_proc = None
        self.ka_runs = 0
        self.status_file = tmp / "glb-status.json"

    # ---- keepalived ------------------------------------------------------------

    def start_keepalived(self, priority: int, interval: float = 0.1, *, unicast: bool = False) -> None:
        self.ka_runs += 1
        conf = self.tmp / "keepalived.conf"
        peers = KEEPALIVED_UNICAST.format(src=KA_ADDR, peer=GLB_ADDR) if unicast else ""
        conf.write_text(KEEPALIVED_CONF.format(vrid=VRID, priority=priority, interval=interval,
                                                vip=f"{self.vip}/{self.prefix}", unicast=peers))
        self.ka_log = self.tmp / f"keepalived-{self.ka_runs}.log"
        self.ka_pid, self.ka_vrrp_pid = self.tmp / f"ka-{self.ka_runs}.pid", self.tmp / f"ka-vrrp-{self.ka_runs}.pid"
        self.ka_proc = self.ka.popen(
            ["keepalived", "--dont-fork", "--use-file", conf, "--vrrp", "--log-console", "--log-detail",
             "--pid", self.ka_pid, "--vrrp_pid", self.ka_vrrp_pid],
            stdout=open(self.ka_log, "w"), stderr=subprocess.STDOUT)

    def ka_log_text(self) -> str:
        """keepalived's log (its console output, on stderr)."""
        return self.ka_log.read_text()

    def stop_keepalived(self) -> str:
        """SIGTERM (a clean stop: keepalived sends priority 0) and return its log."""
        self.ka_proc.terminate()
        self.ka_proc.wait(timeout=10)
        return self.ka_log_text()

    def ka_holds_vip(self) -> bool:
        return f" {self.vip}/" in self.ka.ip(f"-{self.family}", "addr", "show", "eth0").stdout

    def kill_keepalived(self) -> None:
        """kill -9, and no last word: freeze the VRRP child first so its parent's death cannot make it say goodbye."""
        child = int(self.ka_vrrp_pid.read_text())
        os.kill(child, signal.SIGSTOP)
        os.kill(self.ka_proc.pid, signal.SIGKILL)
        os.kill(child, signal.SIGKILL)
        self.ka_proc.wait(timeout=10)
        self.lab.wait_for(lambda: not Path(f"/proc/{child}").exists() or _zombie(child), what="keepalived's child gone")
        # A dead host's addresses die with it; keepalived killed -9 leaves its VIP configured.
        self.ka.ip("addr", "del", f"{self.vip}/{self.prefix}", "dev", "eth0", check=False)

    # ---- GLB's speaker ---------------------------------------------------------

    def start_glb(self, priority: int, *extra: str) -> None:
        self.status_file.unlink(missing_ok=True)
        self.glb_log = self.tmp / "glb-speaker.log"
        self.glb_proc = self.glb.popen(
            [sys.executable, "-m", "director.control.vrrp_speaker", "--interface", "eth0", "--address",
             self.glb_addr, "--vrid", VRID, "--priority", priority, "--vip", self.vip, "--interval", "0.1",
             "--status-file", self.status_file, *extra],
            cwd=ROOT, stdout=open(self.glb_log, "a"), stderr=subprocess.STDOUT)

    def glb_status(self) -> dict:
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}

    def glb_state(self) -> str | None:
        return self.glb_status().get("state")

    def wait(self, predicate, what: str, timeout: float = 20.0):
        return self.lab.wait_for(predicate, timeout=timeout, what=what)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2:][:1] == "Z"


@pytest.fixture(params=[4])
def pair(request, tmp_path):
    require(netns_unavailable(), binary_unavailable("keepalived"))
    with Lab("vrrp") as lab:
        yield Pair(lab, tmp_path, request.param)


def test_keepalived_master_glb_backup_then_each_takes_over(pair):
    pair.start_keepalived(priority=150)
    pair.start_glb(priority=100)
    pair.wait(lambda: pair.ka_holds_vip() and pair.glb_status().get("master") == KA_ADDR,
              "keepalived master (VIP held), GLB following it")
    assert pair.glb_state() == "backup"

    # keepalived dies without a word: GLB takes over after the master-down interval.
    pair.kill_keepalived()
    pair.wait(lambda: pair.glb_state() == "master", "GLB takes over from a dead keepalived")

    # keepalived comes back with the higher priority: it preempts, GLB yields.
    pair.start_keepalived(priority=150)
    pair.wait(lambda: pair.glb_state() == "backup" and pair.ka_holds_vip(), "keepalived preempts GLB")
    assert pair.glb_status()["master"] == KA_ADDR

    # keepalived stops cleanly (SIGTERM): it sends priority 0 and GLB takes over.
    log = pair.stop_keepalived()
    assert "Entering MASTER STATE" in log and "sent 0 priority" in log
    pair.wait(lambda: pair.glb_state() == "master", "GLB takes over after keepalived's priority 0")


@pytest.mark.parametrize("pair", [4, 6], indirect=True, ids=["ipv4", "ipv6"])
def test_glb_master_keepalived_backup_and_a_clean_glb_stop_hands_over_at_once(pair):
    pair.start_glb(priority=200)
    pair.wait(lambda: pair.glb_state() == "master", "GLB master")
    # keepalived is configured with a 1 s interval: as VRRPv3 says, it follows
    # the 0.1 s that GLB, the master, advertises.
    pair.start_keepalived(priority=100, interval=1)
    time.sleep(2)  # keepalived up, following GLB's advertisements
    assert not pair.ka_holds_vip()

    stopped = time.monotonic()
    pair.glb_proc.send_signal(signal.SIGTERM)
    assert pair.glb_proc.wait(timeout=10) == 0
    pair.wait(pair.ka_holds_vip, "keepalived takes over")
    took = time.monotonic() - stopped
    assert pair.glb_status()["state"] == "initialize"

    # GLB again, now with the lower priority: it follows keepalived.
    pair.start_glb(priority=50)
    pair.wait(lambda: pair.glb_state() == "backup" and pair.glb_status().get("master") not in (None, pair.glb_addr),
              "GLB following keepalived")
    assert pair.ka_holds_vip()
    log = pair.stop_keepalived()
    assert "Entering BACKUP STATE" in log and "Backup received priority 0 advertisement" in log
    assert log.count("Entering MASTER STATE") == 1  # only after GLB's priority 0
    print(f"IPv{pair.family}: keepalived took over {took:.2f} s after GLB's clean stop")


def test_unicast_peers_interoperate(pair):
    """keepalived's unicast_peer and GLB's --peer: no multicast on the LAN at all."""
    capture = pair.tmp / "bystander.pcap"  # a bystander on the bridge sees any multicast VRRP (224.0.0.x is flooded)
    tcpdump = pair.evil.popen(["tcpdump", "-i", "eth0", "-n", "-U", "-w", capture, "ip proto 112"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pair.wait(capture.exists, "tcpdump listening")
    pair.start_keepalived(priority=150, unicast=True)
    pair.start_glb(100, "--peer", KA_ADDR)
    pair.wait(lambda: pair.ka_holds_vip() and pair.glb_status().get("master") == KA_ADDR, "GLB follows keepalived")
    pair.kill_keepalived()
    pair.wait(lambda: pair.glb_state() == "master", "GLB takes over from a dead keepalived")
    pair.start_keepalived(priority=50, unicast=True)  # now the lower one: it must follow GLB
    time.sleep(2)
    assert not pair.ka_holds_vip() and pair.glb_state() == "master"
    pair.glb_proc.send_signal(signal.SIGTERM)
    assert pair.glb_proc.wait(timeout=10) == 0
    pair.wait(pair.ka_holds_vip, "keepalived takes over")
    log = pair.stop_keepalived()
    assert "Backup received priority 0 advertisement" in log
    tcpdump.terminate()
    tcpdump.wait(timeout=10)
    seen = pair.evil.run(["tcpdump", "-n", "-r", capture], check=False).stdout
    assert seen.strip() == "", seen


CRAFT = r"""
import sys
from scapy.all import Ether, IP, Raw, sendp
from scapy.layers.vrrp import VRRPv3
vrid, vip, group = int(sys.argv[1]), sys.argv[2], "224.0.0.18"
def v3(**kw):
    return IP(src="{evil}", dst=group, ttl=kw.pop("ttl", 255), proto=112) / VRRPv3(**kw)
good = dict(vrid=vrid, priority=250, adv=10, addrlist=[vip])
pkts = [
    v3(ttl=64, **good),                                   # ttl
    v3(**{{**good, "vrid": vrid + 1}}),                     # vrid
    v3(chksum=0x1234, **good),                            # checksum
    v3(**{{**good, "adv": 0}}),                             # interval_zero
    IP(src="{evil}", dst=group, ttl=255, proto=112) / Raw(bytes(v3(**good))[20:-2]),  # length
    IP(bytes(v3(version=2, **good))),                     # version
]
for p in pkts:
    sendp(Ether(dst="01:00:5e:00:00:12") / p, iface="eth0", verbose=False)
""".format(evil=EVIL_ADDR)


def test_bad_packets_are_dropped_counted_and_never_crash_the_speaker(pair):
    pair.start_glb(priority=100)
    pair.wait(lambda: pair.glb_state() == "master", "GLB master (alone on the LAN)")
    script = pair.tmp / "craft.py"
    script.write_text(CRAFT)
    for _ in range(3):  # each a priority-250 advertisement but for one bad field: GLB must not yield
        pair.evil.run([sys.executable, script, VRID, VIP], cwd=ROOT)
    want = {"ttl": 3, "vrid": 3, "checksum": 3, "interval_zero": 3, "length": 3, "version": 3}
    pair.wait(lambda: all(pair.glb_status().get("counters", {}).get(k, 0) >= n for k, n in want.items()),
              "every bad packet counted")
    status = pair.glb_status()
    assert pair.glb_proc.poll() is None
    assert status["state"] == "master" and status["master"] == GLB_ADDR
    assert status["counters"].get("rx", 0) == 0  # none of them was taken for an advertisement
    log = Path(pair.glb_log).read_text()
    for reason in want:  # each reason logged once, however many packets
        assert len(re.findall(rf"counted in '{reason}'", log)) == 1, (reason, log)
