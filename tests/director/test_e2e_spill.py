"""Cross-site spill end to end (issue 16), root: dc1's real servers all stop; new connections to
dc1's VIP are served by dc2's servers, tunnelled by dc1's director, replies straight to the client.

client (10.0.1.2) -- router -- dc1 LAN 10.0.2.0/24 (bridge): director .2 (DR, owns VIP 192.0.2.10:
the router routes it there), rs .11
                      router -- dc2 servers 10.0.3.0/24 (bridge): rs .11 .12 (TUN; they hold dc2's
VIP 192.0.2.140 and dc1's VIP: `glb realserver setup --vip ... --vip ...`)
                      router -- dc2's director 10.0.4.2 (control plane only: health checks and
its snapshot in Redis, which dc1's director follows)

Every process is the real one (`glb director`, `glb realserver setup`, the session's redis-server).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter

import pytest

from tests.director.director_lab import (
    GLB,
    ROOT,
    DirectorLab,
    RedisBridge,
    config_yaml,
    counting_table,
    curl,
    forward,
    nft_counters,
    real_server,
    running_lab,
    start_http,
    uplink,
)
from tests.director.test_e2e_dr import _keepalive
from tests.netns import Lab

pytestmark = pytest.mark.netns

VIP1, VIP2 = "192.0.2.10", "192.0.2.140"
DIRECTOR1, DIRECTOR2 = "10.0.2.2", "10.0.4.2"
RS1 = "10.0.2.11"
RS2 = {1: "10.0.3.11", 2: "10.0.3.12"}
CHECK = "{type: http, port: 80, interval: 0.2, timeout: 0.2, rise: 1, fall: 2, start_jitter: 0.05}"


def config(dataplane: str) -> str:
    """director_lab's dc1 (web by DR, spilling to dc2), and dc2 (web by TUN, its director on lo)."""
    web1 = (f'      - {{name: web, vips: ["{VIP1}:80/tcp"], scheduler: rr, real_servers: [{RS1}], health_check: {CHECK},'
            f' spill: {{to: [dc2], when: all_down, recover_after: 0.5}}}}\n')
    return config_yaml(redis_port=6379, services=web1, address=DIRECTOR1, dataplane=dataplane) + f"""
  dc2:
    director: {{interface: lo, address: {DIRECTOR2}, heartbeat: 0.5}}
    services:
      - {{name: web, vips: ["{VIP2}:80/tcp"], forwarding: tun, scheduler: rr, real_servers: [{RS2[1]}, {RS2[2]}],
          health_check: {CHECK}}}
"""


class SpillLab(DirectorLab):
    def __init__(self, lab: Lab, tmp, redis_port: int, dataplane: str) -> None:
        self.lab = lab
        r = lab.netns("router")
        self.client, self.dc2d = lab.netns("client"), lab.netns("dc2d")
        for ns, net, name in ((self.client, 1, "rc"), (self.dc2d, 4, "rd2")):
            uplink(lab, ns, r, net, name)
        forward(r)
        sw1, sw2 = lab.netns("sw1"), lab.netns("sw2")
        br1, br2 = lab.bridge(sw1), lab.bridge(sw2)
        lab.port(sw1, br1, r, "10.0.2.1/24", host_name="lan1")
        lab.port(sw2, br2, r, "10.0.3.1/24", host_name="lan2")
        r.ip("route", "add", f"{VIP1}/32", "via", DIRECTOR1)
        self.director = lab.netns("dc1d")
        lab.port(sw1, br1, self.director, f"{DIRECTOR1}/24")
        self.director.ip("route", "add", "default", "via", "10.0.2.1")
        self.rs1 = real_server(lab, sw1, br1, tmp, "dc1rs", [f"{RS1}/24"], [VIP1], "dr", via=["10.0.2.1"])
        self.http1 = start_http(self.rs1, "dc1-rs")
        for i, addr in RS2.items():  # dc1 spills to them
            ns = real_server(lab, sw2, br2, tmp, f"dc2rs{i}", [f"{addr}/24"], [VIP2, VIP1], "tun", via=["10.0.3.1"])
            start_http(ns, f"dc2-rs{i}")
        counting_table(self.director, {"from_vip": f"ip saddr {VIP1}"})
        self.start_director(tmp, redis_port, config(dataplane), log="dc1.log")
        self.bridge2 = RedisBridge(self.dc2d.name, redis_port)
        self._log2 = open(tmp / "dc2.log", "w")
        self.d2 = self.dc2d.popen([GLB, "director", "--config", str(self.config), "--site", "dc2"], stdout=self._log2,
                                  stderr=subprocess.STDOUT, cwd=ROOT)

    def spill(self) -> dict:
        return ((self.d.status() or {}).get("services") or [{}])[0].get("spill") or {}

    def keepalive(self):
        return _keepalive(self.client, VIP1)

    def count_syns(self, dataplane: str) -> None:
        """Count the SYNs to dc1's VIP where the packet worker reads them: eth0, or with the kernel
        data plane the slow-path veth the tc program hands them to (tcattach.SlowPathVeth). An
        ingress hook runs after the packet sockets' taps: once counted, a SYN is in the worker's ring."""
        dev = "eth0"
        if dataplane == "kernel":
            dev = f"glb{self.director.run(['cat', '/sys/class/net/eth0/ifindex']).stdout.strip()}r"
        self.director.run(["nft", "-f", "-"], input=(
            f'table netdev glbsyn {{\n chain in {{ type filter hook ingress device "{dev}" priority 0;\n'
            f'  ip daddr {VIP1} tcp dport 80 tcp flags & (syn | ack) == syn counter comment "syn"\n }}\n}}\n'))

    def syns(self) -> int:
        return nft_counters(self.director, "glbsyn")["syn"]

    def path(self) -> dict:
        return (self.d.status() or {}).get("packet_path") or {}

    def close(self) -> None:
        super().close()
        if self.d2.poll() is None:
            self.d2.terminate()
            self.d2.wait(15)
        self._log2.close()
        self.bridge2.close()


def stopped_in_poll(pid: int) -> None:
    """SIGSTOP a packet worker where it waits for frames or plans (poll(2): the syscall it is in
    when idle, as /proc says), not in the middle of its loop. Tries again until it is."""
    def syscall() -> str:
        return open(f"/proc/{pid}/syscall").read().split()[0]

    seen = Counter(syscall() for _ in range(200))
    # The syscall it waits in most ("running": on a CPU; "-1": in userspace, not in a syscall).
    idle = max((n for n in seen if n not in ("running", "-1")), key=seen.__getitem__)
    for _ in range(200):
        os.kill(pid, signal.SIGSTOP)
        while open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
            pass
        if syscall() == idle:
            return
        os.kill(pid, signal.SIGCONT)
    raise AssertionError(f"packet worker {pid} never stopped in its idle syscall {idle}")


@pytest.mark.parametrize("dataplane", ["userspace", "kernel"])
def test_dc1_down_spills_new_connections_to_dc2_and_back(dataplane, tmp_path, redis_server):
    redis_server.start()
    redis_server.flushall()
    with running_lab("spill", SpillLab, tmp_path, redis_server, dataplane, [RS1]) as t:
        lab, clients = t.lab, []
        try:
            # At start dc1's server is not proven yet: it may spill until its server has been up recover_after.
            lab.wait_for(lambda: t.spill().get("spilling_to", "x") is None, timeout=10, what="no spill")
            t.d.wait_plan()
            assert curl(t.client, f"http://{VIP1}/") == "dc1-rs"
            local, ask_local = t.keepalive()
            clients.append(local)
            assert ask_local() == "dc1-rs"
            lab.wait_for(lambda: all((t.d.status()["packet_path"]["next_hops"].get(a)) for a in RS2.values()),
                         timeout=10, what="the next hop towards dc2's (standby) servers")
            t.d.wait_plan()

            # The first new connection after dc1's last server is marked down goes to dc2 on the
            # spill flag, before the worker has the plan that says so: the worker is stopped
            # while it waits in poll(2), so, continued, it reads its ring (the SYN) before its pipe.
            t.count_syns(dataplane)
            worker = t.path()["workers"][0]["pid"]
            stopped_in_poll(worker)
            try:
                t.http1.kill()  # every dc1 server stops
                t.http1.wait()
                lab.wait_for(lambda: t.spill().get("spilling_to") == "dc2", timeout=15, what="dc1 to spill to dc2")
                path = t.path()
                assert path["plan_applied"] < path["plan_generation"]  # the worker has not got that plan
                syns = t.syns()
                first_conn = t.client.popen(["curl", "-s", "-m", "10", f"http://{VIP1}/"], stdout=subprocess.PIPE,
                                            text=True)
                lab.wait_for(lambda: t.syns() > syns, timeout=5, what="the SYN in the stopped worker's ring")
            finally:
                os.kill(worker, signal.SIGCONT)
            assert first_conn.communicate(timeout=15)[0].strip() in ("dc2-rs1", "dc2-rs2")
            lab.wait_for(lambda: t.path().get("spilled_ahead") == 1, timeout=5,
                         what="the connection counted as spilled ahead of the plan")
            t.d.wait_plan()
            lab.wait_for(lambda: all((t.d.status()["packet_path"]["next_hops"].get(a)) for a in RS2.values()),
                         timeout=10, what="the next hop towards dc2's servers")
            before = nft_counters(t.director, "glbt")["from_vip"]
            assert Counter(curl(t.client, f"http://{VIP1}/") for _ in range(4)) == {"dc2-rs1": 2, "dc2-rs2": 2}
            spilled, ask = t.keepalive()
            clients.append(spilled)
            first = ask()
            assert first in ("dc2-rs1", "dc2-rs2")
            # The replies came from dc2's servers straight to the client: none crossed dc1's director.
            assert nft_counters(t.director, "glbt")["from_vip"] == before == 0
            lab.wait_for(lambda: t.spill().get("conns", 0) >= 1, timeout=5, what="the spilled connection counted")
            if dataplane == "kernel":  # the spilled flow's packets are tunnelled by the tc program
                assert ask() == first
                lab.wait_for(lambda: t.d.status()["packet_path"]["kernel"].get("forwarded_tun", 0) > 0, timeout=5,
                             what="packets tunnelled by the kernel")
            assert "dc1-rs" not in ask_local()  # the local flow's server is gone (on_server_down: keep)

            t.http1 = start_http(t.rs1, "dc1-rs")  # dc1 is back
            t.d.wait_state(RS1, "up")
            lab.wait_for(lambda: t.spill().get("spilling_to", "x") is None, timeout=10, what="spill to end")
            t.d.wait_plan()
            assert ask() == first  # the spilled connection kept its server
            assert curl(t.client, f"http://{VIP1}/") == "dc1-rs"  # new connections stay home again
            assert ask() == first
            assert nft_counters(t.director, "glbt")["from_vip"] == 0
        finally:
            for c in clients:
                c.kill()
                c.wait()
