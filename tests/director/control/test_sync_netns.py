"""Connection sync across namespaces on a bridge: UDPChannel by multicast (IPVS's group) and by unicast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.environment import require
from tests.netns import Lab, netns_unavailable

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[3]
PEER = [sys.executable, "-m", "tests.director.control.sync_peer"]


@pytest.mark.parametrize("dst", ["224.0.0.81", "10.9.0.3"], ids=["multicast", "unicast"])
def test_a_thousand_flows_reach_the_backup(dst):
    require(netns_unavailable())
    with Lab("sync") as lab:
        switch = lab.netns("sw")
        lab.bridge(switch)
        master, backup = lab.netns("master"), lab.netns("backup")
        lab.port(switch, "br0", master, "10.9.0.2/24")
        lab.port(switch, "br0", backup, "10.9.0.3/24")
        group = dst if dst.startswith("224.") else "-"
        rx = backup.popen([*PEER, "receive", "10.9.0.3", group, "1000"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert rx.stdout.readline().strip() == "ready"
        sent = json.loads(master.run([*PEER, "send", "10.9.0.2", dst, "1000"], cwd=ROOT).stdout)
        got = json.loads(rx.communicate(timeout=60)[0])
        assert sent["records"] == 1000 and sent["datagrams"] >= 1000 // 54
        assert got["flows"] == 1000 and got["conns"] == 1000 and got.get("lost", 0) == 0
