"""Run the director's packet engine alone (no health checks, no Redis) for benchmarks.

    python benchmarks/director_engine.py PLAN_JSON

PLAN_JSON: {"interface", "mode": "dr"|"tun", "vip", "ports": [[port, proto]], "servers": [[addr, mac]],
"source": outer source for tun, "max_entries", "dataplane": "userspace"|"kernel"|"auto"}. Prints "ready", then one JSON line of
engine stats per line read on stdin; exits on EOF.
"""

from __future__ import annotations

import ipaddress
import json
import sys

from director.dataplane.engine import Engine, EngineConfig
from director.dataplane.forwarder import Plan, ServerPlan, ServicePlan, VipPlan
from director.control.health import ServerKey
from glb.config import ConnectionTableConfig


def main() -> None:
    a = json.loads(sys.argv[1])
    P = lambda s: ipaddress.ip_address(s).packed  # noqa: E731
    servers = tuple(ServerPlan(ServerKey("bench", addr, 0), P(addr), 1, True, False, bytes.fromhex(mac.replace(":", "")))
                    for addr, mac in a["servers"])
    vips = tuple(VipPlan(P(a["vip"]), port, proto, f"{a['vip']}:{port}/{proto}") for port, proto in a["ports"])
    svc = ServicePlan("bench", a["mode"], a.get("scheduler", "mh"), vips, servers, mh_table_size=65537)
    src = P(a["source"]) if a.get("source") else None
    plan = Plan(b"", (svc,), src if src and len(src) == 4 else None, src if src and len(src) == 16 else None)
    engine = Engine(EngineConfig(a["interface"], workers=a.get("workers", 1), busy_poll=a.get("busy_poll", False),
                                 dataplane=a.get("dataplane", "userspace"),
                                 conntable=ConnectionTableConfig(max_entries=a.get("max_entries", 1_000_000))))
    engine.start(plan)
    print("ready", json.dumps({"pids": engine.pids, "dataplane": engine.dataplane}), flush=True)
    for _ in sys.stdin:
        s = engine.stats()
        f = s.forwarder
        doc = {"cpu": s.cpu, "rx_frames": s.rx_frames, "ring_drops": s.ring_drops, "tx_frames": s.tx_frames,
               "tx_errors": s.tx_errors, "dataplane": s.dataplane, "kernel": s.kernel, "forwarder": {"connections": f.connections, "drops": f.drops,
                                                       "forwarded": f.forwarded}}
        print(json.dumps(doc), flush=True)
    engine.stop()


if __name__ == "__main__":
    main()
