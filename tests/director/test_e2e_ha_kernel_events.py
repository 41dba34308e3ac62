"""A director pair on the kernel data plane with an mh service: kernel-made flows reach the backup at once (root).

The lab of test_e2e_ha.py (two `glb director --id` members, two DR real
servers, 50 long-lived HTTP/1.1 connections from five client addresses),
with the service scheduled by mh, without persistence and with it: the tc program
schedules every new connection (and makes its client's template) and applies its handshake itself, so Python
hears of them only through the program's flow events
(director/dataplane/flowevents.py) or, without them, when its sweep of the
kernel's table gets there. The master's table is padded with 300,000 live
flows of no VIP first, so that sweep needs about 30 s for one pass: the
backup holding all 50 flows within a 10 s wait shows the events carried
them. Then the server most of them are on is drained on both members and
the master killed -9: a flow the backup did not hold would be picked up
mid-stream by mh's fallback walk (the drained server takes nothing new),
land on the other server and break; every one survives. With persistence
the backup also holds each client's template, in its own kernel's table
too, naming the server the client's connections are on.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from director.dataplane import kernelmaps as km
from director.control.health import ServerKey
from director.dataplane.conntable import ESTABLISHED
from director.dataplane.libbpf import read_pinned
from tests.director.director_lab import running_lab
from tests.director.test_e2e_ha import CLIENTS, CONNECTIONS, RS, Clients, HALab, new_connections_served
from tests.waiting import until

pytestmark = pytest.mark.netns

MAX_ENTRIES = 1 << 19
PADDING = 300_000
"""Live flows of no VIP in the master's ``conns``: ~290 sweep batches of 1024, one per 0.1 s."""
DRAINED = RS[2]
"""Where mh sends four of the five clients (tests/director/test_e2e_kernel_mh.py holds the kernel to
scheduler.py's Maglev)."""


class KernelMhLab(HALab):
    """test_e2e_ha's pair with an mh service, the kernel data plane and its maps pinned on a lab bpffs
    (``ip netns exec`` hides the host's /sys/fs/bpf), so the test can reach the master's table."""

    persistence = False

    def __init__(self, lab, tmp: Path, redis_port: int, dataplane: str) -> None:
        self.pins = tmp / "bpf"
        self.pins.mkdir()
        subprocess.run(["mount", "-t", "bpf", "bpf", str(self.pins)], check=True)
        self.weights = {a: 1 for a in RS.values()}
        try:
            super().__init__(lab, tmp, redis_port, dataplane)
        except BaseException:
            subprocess.run(["umount", str(self.pins)], check=False)
            raise

    def config_text(self, preempt: bool) -> str:
        text = super().config_text(preempt)
        for old, new in (
            ("scheduler: wlc\n        persistence: {timeout: 300}\n",
             "scheduler: mh\n" + ("        persistence: {timeout: 300}\n" if self.persistence else "")),
            ("packet: {workers: 1, dataplane: kernel}",
             f"connection_table: {{max_entries: {MAX_ENTRIES}}}\n"
             f"      packet: {{workers: 1, dataplane: kernel, bpf_pin_root: \"{self.pins}\"}}"),
            *((f"{{address: \"{a}\", weight: 1}}", f"{{address: \"{a}\", weight: {w}}}")
              for a, w in self.weights.items()),
        ):
            assert old in text, old
            text = text.replace(old, new)
        return text

    def drain(self, address: str) -> None:
        self.weights[address] = 0
        for d in self.d.values():
            d.reload(self.config_text(preempt=True))
        until(lambda: all(d.servers()[address]["weight"] == 0 for d in self.d.values()), f"{address} drained", 10)
        for d in self.d.values():
            d.wait_plan()

    def close(self) -> None:
        try:
            super().close()
        finally:
            subprocess.run(["umount", str(self.pins)], check=False)


def pad(conns: Path, n: int) -> None:
    """``n`` live, established flows of a VIP id no VIP has, written into a pinned ``conns`` map."""
    from director.dataplane.libbpf import _BatchOpts, _libbpf

    lib = _libbpf()
    fd = lib.bpf_obj_get(str(conns).encode())
    assert fd >= 0, f"cannot open {conns}"
    try:
        value = km.FLOW_VALUE.pack(0, ESTABLISHED, 0, km.ticks(time.monotonic() + 3600))
        step = 50_000
        for start in range(0, n, step):
            keys = b"".join(km.FLOW_KEY.pack(6, 4, 0xFFFF, (i & 0xFFFF).to_bytes(2, "big"), b"\0\x50",
                                             (i >> 16).to_bytes(4, "big") + bytes(12))
                            for i in range(start, min(n, start + step)))
            count = ctypes.c_uint32(len(keys) // km.FLOW_KEY.size)
            opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
            rc = lib.bpf_map_update_batch(fd, keys, value * count.value, ctypes.byref(count), ctypes.byref(opts))
            assert rc == 0, f"padding {conns} failed: {rc}"
    finally:
        os.close(fd)


class KernelMhPersistentLab(KernelMhLab):
    persistence = True


@pytest.fixture(scope="module", params=[KernelMhLab, KernelMhPersistentLab], ids=["mh", "mh-persistence"])
def ha(request, tmp_path_factory, redis_server):
    name = "hakev" if request.param is KernelMhLab else "hakevp"
    with running_lab(name, request.param, tmp_path_factory.mktemp(name), redis_server, "kernel") as t:
        t.start("dc1-a", preempt=True)
        t.start("dc1-b", preempt=True)
        until(lambda: t.role("dc1-a") == "master" and t.role("dc1-b") == "backup", "dc1-a master, dc1-b backup", 20)
        yield t


def _events(ha: KernelMhLab, member: str) -> dict[str, int]:
    return (ha.d[member].status() or {}).get("packet_path", {}).get("flow_events", {})


def test_kernel_made_flows_reach_the_backup_at_once_and_survive_a_takeover(ha):
    (conns,) = ha.pins.glob("*dc1-a/conns")
    pad(conns, PADDING)
    clients = Clients(ha)
    try:
        until(lambda: sum(ha.established("dc1-b").values()) >= CONNECTIONS,
              f"dc1-b holds the {CONNECTIONS} flows from sync, established", 10)

        def told() -> bool:  # 50 SYNs and 50 handshake ACKs, each the kernel's and told (reported twice a second)
            pp = ha.d["dc1-a"].status()["packet_path"]
            return (pp["flow_events"].get("received", 0) >= 2 * CONNECTIONS
                    and pp["kernel"].get("new_flow", 0) >= CONNECTIONS
                    and pp["kernel"].get("state_tracked", 0) >= CONNECTIONS)
        until(told, "the master's kernel made the flows and told them", 10)
        assert _events(ha, "dc1-a")["lost"] == 0
        assert 'glb_director_kernel_flow_events_total{outcome="received"}' in ha.d["dc1-a"].metrics()
        on_drained = sum(1 for who, _ in clients.first if who == "rs2")
        assert on_drained >= CONNECTIONS // 2
        ha.drain(DRAINED)
        clients.check_survived()  # a drain keeps established flows
        until(lambda: ha.standby_ready("dc1-a", "dc1-b"), "dc1-a hears dc1-b present and healthy", 10)
        ha.d["dc1-a"].proc.send_signal(signal.SIGKILL)
        until(lambda: ha.role("dc1-b") == "master", "dc1-b takes over", 10)
        clients.check_survived()
        if ha.persistence:  # each client's template, made by dc1-a's kernel, synced, now in dc1-b's kernel
            (templates,) = ha.pins.glob("*dc1-b/templates")
            per = CONNECTIONS // len(CLIENTS)

            def held() -> bool:
                for i, c in enumerate(CLIENTS):
                    server = RS[int(clients.first[i * per][0][2:])]
                    key = km.template_key(km.persist_id("web"), (4, int(ipaddress.ip_address(c))))
                    value = read_pinned(templates, key, km.TPL.size)
                    if value is None or km.TPL.unpack(value)[0] != km.server_id(ServerKey("web", server, 0)):
                        return False
                return True
            until(held, "dc1-b's kernel holds each client's template", 5)
        new_connections_served(ha)
    finally:
        clients.close()
