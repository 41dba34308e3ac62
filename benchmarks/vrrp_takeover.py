"""VRRP takeover time: GLB's speaker pair next to a keepalived pair, in namespaces (needs root and keepalived).

    .venv/bin/python benchmarks/vrrp_takeover.py [-n TRIALS]

Per trial: two namespaces on a bridge, a master (priority 200) and a backup
(priority 100) with VRID 51; once the master is settled, it is either
killed (SIGKILL: the backup waits out the master-down interval) or stopped
cleanly (SIGTERM: it sends priority 0, the backup waits Skew_Time only).
Measured: seconds from the signal until the backup says it is master (GLB:
its status file; keepalived: the VIP on its interface, polled with ``ip``,
which costs a few milliseconds a poll). Only the election is measured, not
VIP ownership or forwarding (the speaker is not wired into the director yet).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.netns import Lab  # noqa: E402

VIP = "10.9.0.100"
ADDRS = ("10.9.0.2", "10.9.0.3")
KEEPALIVED = """\
global_defs {{
  vrrp_version 3
}}
vrrp_instance VI_1 {{
  state BACKUP
  interface eth0
  virtual_router_id 51
  priority {priority}
  advert_int {interval}
  virtual_ipaddress {{
    {vip}/24
  }}
}}
"""


def glb(ns, tmp: Path, name: str, addr: str, priority: int, interval: float):
    status = tmp / f"{name}.json"
    proc = ns.popen([sys.executable, "-m", "director.control.vrrp_speaker", "--interface", "eth0", "--address", addr,
                     "--vrid", "51", "--priority", priority, "--vip", VIP, "--interval", interval,
                     "--status-file", status], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def is_master() -> bool:
        try:
            return json.loads(status.read_text())["state"] == "master"
        except (OSError, ValueError, KeyError):
            return False
    return proc, is_master


def keepalived(ns, tmp: Path, name: str, addr: str, priority: int, interval: float):
    conf = tmp / f"{name}.conf"
    conf.write_text(KEEPALIVED.format(priority=priority, interval=interval, vip=VIP))
    proc = ns.popen(["keepalived", "--dont-fork", "--use-file", conf, "--vrrp", "--pid", tmp / f"{name}.pid",
                     "--vrrp_pid", tmp / f"{name}-vrrp.pid"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    vrrp_pid = tmp / f"{name}-vrrp.pid"

    def is_master() -> bool:
        return f" {VIP}/" in ns.ip("-4", "addr", "show", "eth0").stdout
    proc.vrrp_pid = vrrp_pid
    return proc, is_master


def kill(proc, how: str) -> None:
    vrrp_pid = getattr(proc, "vrrp_pid", None)
    if how == "stop":
        proc.send_signal(signal.SIGTERM)
        return
    if vrrp_pid is not None:  # keepalived: freeze its VRRP child first so it cannot say goodbye
        child = int(vrrp_pid.read_text())
        os.kill(child, signal.SIGSTOP)
        os.kill(proc.pid, signal.SIGKILL)
        os.kill(child, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL)


def trial(start, how: str, interval: float) -> float:
    with Lab("bench") as lab, tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        switch = lab.netns("sw")
        lab.bridge(switch)
        a, b = lab.netns("a"), lab.netns("b")
        for ns, addr in zip((a, b), ADDRS):
            lab.port(switch, "br0", ns, f"{addr}/24")
        master, master_up = start(a, tmp, "a", ADDRS[0], 200, interval)
        _, backup_up = start(b, tmp, "b", ADDRS[1], 100, interval)
        lab.wait_for(master_up, 30, what="master")
        time.sleep(max(1.0, 5 * interval))  # the backup follows the settled master
        assert not backup_up(), "two masters before the fault"
        t0 = time.monotonic()
        kill(master, how)
        lab.wait_for(backup_up, 30, interval=0.002, what="takeover")
        return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5, help="trials per case (default 5)")
    n = ap.parse_args().n
    cases = [
        ("GLB, 0.1 s, master killed", glb, "kill", 0.1),
        ("GLB, 0.1 s, master stopped", glb, "stop", 0.1),
        ("keepalived, 0.1 s, master killed", keepalived, "kill", 0.1),
        ("keepalived, 0.1 s, master stopped", keepalived, "stop", 0.1),
        ("keepalived, 1 s (its default), master killed", keepalived, "kill", 1),
    ]
    print(f"| case ({n} trials) | min | median | max |\n| --- | ---: | ---: | ---: |")
    for name, start, how, interval in cases:
        runs = [trial(start, how, interval) for _ in range(n)]
        print(f"| {name} | {min(runs):.3f} | {statistics.median(runs):.3f} | {max(runs):.3f} |", flush=True)


if __name__ == "__main__":
    main()
