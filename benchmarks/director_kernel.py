"""Run the kernel data plane alone for benchmarks and namespace tests: flows installed up front.

    python benchmarks/director_kernel.py PLAN_JSON

PLAN_JSON: {"interface", "mode": "dr"|"tun", "servers": [[addr, mac]] (the first takes every flow),
"source": outer source for tun, "flows": [[proto, client, client_port, vip, vip_port]]}.
Loads director/dataplane/tc/glb_tc.bpf.o, attaches it at the interface's tc ingress, installs
each flow as the userspace forwarder would once it is established (ESTABLISHED / UDP, an hour to
live), prints "ready", then one JSON line per line read on stdin: the kernel's counters by reason
and the route's packets and bytes. Exits on EOF, detaching the program.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
import time

from director.control.health import ServerKey
from director.dataplane import codec
from director.dataplane.conntable import ESTABLISHED, UDP, ConnTable
from director.dataplane.forwarder import Plan, ServerPlan
from director.dataplane.kernel import KernelDataplane
from director.modes import MODES


def main() -> None:
    a = json.loads(sys.argv[1])
    P = lambda s: ipaddress.ip_address(s).packed  # noqa: E731
    addr, mac = a["servers"][0]
    server = ServerPlan(ServerKey("bench", addr, 0), P(addr), 1, True, False, bytes.fromhex(mac.replace(":", "")))
    my_mac = bytes.fromhex(open(f"/sys/class/net/{a['interface']}/address").read().strip().replace(":", ""))
    src = P(a["source"]) if a.get("source") else None
    plan = Plan(my_mac, (), src if src and len(src) == 4 else None, src if src and len(src) == 16 else None)
    tx = MODES[a["mode"]].transmit(server, plan)
    kd = KernelDataplane(a["interface"], a.get("max_entries", 65536), ConnTable().timeouts, slowpath=False,
                         tcx=a.get("tcx", True))
    try:
        t = kd.tables
        t.set_route(0, tx, True, socket.if_nametoindex(a["interface"]))
        until = time.monotonic() + 3600
        t.set_vips({P(f[3]) for f in a.get("flows", [])})
        for proto, client, sport, vip, dport in a.get("flows", []):
            t.install(codec.flow_key(proto, P(client), P(vip), sport, dport), 0, ESTABLISHED if proto == 6 else UDP,
                      until)
        print("ready", flush=True)
        for _ in sys.stdin:
            packets, nbytes = t.route_counters(0)
            print(json.dumps({"reasons": t.reasons(), "packets": packets, "bytes": nbytes}), flush=True)
    finally:
        kd.close()


if __name__ == "__main__":
    main()
