"""The tc program's own time per packet (BPF_PROG_TEST_RUN's duration): DR, TUN and NAT.

Root and BPF. ``python benchmarks/kernel_nat_ns.py [OBJECT ...] [--runs N]``: for each
compiled program (default: the one scripts/setup built), an established flow is installed as
the golden tests install it (tests/director/dataplane/test_kernel_golden.py, test_kernel_nat_golden.py)
and one 64-byte IPv4 UDP frame is run N times each: a DR packet, the same through a TUN route
(IPv4 in IPv4), a NAT client packet (DNAT, VIP:80 -> RIP:8080, so the port changes too) and a
NAT reply (SNAT). Each run rebuilds the skb from the frame, so every run takes the forwarding
path; the kernel times the program alone. ``dr x1000``: N/1000 samples of one DR skb run 1000
times over (REPEAT). Printed: the median and the 10th-90th percentiles in ns per packet.
Compare objects in the same invocation (the machine's load moves all of them alike).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scapy.layers.inet import IP, UDP  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from director.dataplane import kernelmaps as km  # noqa: E402
from director.dataplane.libbpf import OBJECT, LibBpf  # noqa: E402
from tests.director.dataplane.test_codec import CLIENT4, VIP4, frame  # noqa: E402
from tests.director.dataplane.test_kernel_golden import Case, for_this_host  # noqa: E402
from tests.director.dataplane.test_kernel_nat_golden import NatCase  # noqa: E402
from tests.director.dataplane.test_nat import FAMILIES, client, server  # noqa: E402

PAYLOAD = b"x" * 22
"""64-byte frames: 14 Ethernet + 20 IPv4 + 8 UDP + 22."""
REPEAT = 1000
"""``dr xREPEAT``: each sample is the kernel's average over REPEAT runs on one skb, without the test run's
own cost per run and far steadier under load (only DR can repeat: its rewrite leaves the decision as it was)."""


def timed(bpf: LibBpf, data: bytes, runs: int, want: int, repeat: int = 1) -> list[int]:
    out = []
    for _ in range(runs):
        rc, _frame = bpf.test_run(for_this_host(data), repeat=repeat)
        if rc != want:
            raise SystemExit(f"the program returned {rc}, not {want}: the flow is not forwarded")
        out.append(bpf.last_duration)
    return out


def measure(path: Path, runs: int) -> dict[str, list[int]]:
    bpf = LibBpf(path, max_entries=km.sized(4096), sizes=km.MAPS)
    try:
        res = {}
        dr = IP(src=CLIENT4, dst=VIP4) / UDP(sport=5353, dport=53) / Raw(PAYLOAD)
        Case(bpf, "dr", dr)
        res["dr"] = timed(bpf, frame(dr), runs, km.TC_ACT_REDIRECT)
        res[f"dr x{REPEAT}"] = timed(bpf, frame(dr), max(1, runs // REPEAT), km.TC_ACT_REDIRECT, REPEAT)
        Case(bpf, "tun", dr)
        res["tun"] = timed(bpf, frame(dr), runs, km.TC_ACT_REDIRECT)
        c, v, r = FAMILIES[0]
        nat = NatCase(bpf, 17)
        nat.open(17, c, v, r)
        res["nat in"] = timed(bpf, client(UDP(sport=5353, dport=80) / Raw(PAYLOAD), c, v), runs, km.TC_ACT_REDIRECT)
        res["nat out"] = timed(bpf, server(UDP(sport=8080, dport=5353) / Raw(PAYLOAD), r, c), runs,
                               km.TC_ACT_REDIRECT)
        return res
    finally:
        bpf.close()


def main() -> None:
    args = sys.argv[1:]
    runs = 20000
    if "--runs" in args:
        i = args.index("--runs")
        runs = int(args[i + 1])
        del args[i:i + 2]
    for path in [Path(a) for a in args] or [OBJECT]:
        res = measure(path, runs)
        cells = []
        for name, ns in res.items():
            q = statistics.quantiles(ns, n=10)
            cells.append(f"{name} {statistics.median(ns):.0f} ns ({q[0]:.0f}-{q[-1]:.0f})")
        print(f"{path}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
