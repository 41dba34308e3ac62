"""Builds of the tc program against nftables fwd, alternated in one lab: 64-byte UDP delivered, or TCP.

``python benchmarks/director_ab.py [--tcp] MODE ROUNDS A.o [B.o ...]`` (root; MODE dr or tun; the objects
built as scripts/setup builds director/dataplane/tc/glb_tc.bpf.o). Each round measures nftables
``fwd`` and then the kernel data plane with each object in turn, in the lab director_bench.py
builds (SECONDS_PER_RUN, default 5), so a change of a few percent shows through the machine's
drift, which separate director_pps.sh runs do not (docs/benchmarks.md). Prints each round, then
per object the ratio to the same round's nftables figure: min, max, mean. The installed object is
put back at the end. ``--tcp``: one TCP stream each instead (offloads on, as director_bench.py's TCP
row), whose figure is bimodal on this machine (docs/benchmarks.md): many alternated rounds tell more
than one run.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import director_bench as db  # noqa: E402


def main() -> None:
    args = sys.argv[1:]
    tcp = args[:1] == ["--tcp"]
    args = args[1:] if tcp else args
    if len(args) < 3 or args[0] not in ("dr", "tun") or not args[1].isdigit():
        sys.exit("usage: director_ab.py [--tcp] dr|tun ROUNDS A.o [B.o ...]")
    mode, rounds, objs = args[0], int(args[1]), args[2:]
    for o in objs:
        if not Path(o).is_file():
            sys.exit(f"director_ab: no such object {o}")
    target = db.ROOT / "director" / "dataplane" / "tc" / "glb_tc.bpf.o"
    installed = target.read_bytes()
    res: dict[str, list[float]] = {"nft": [], **{o: [] for o in objs}}
    try:
        with tempfile.TemporaryDirectory() as tmp, db.Lab(f"ab-{mode}") as lab:
            b = db.Bench(lab, mode, Path(tmp))
            b.offloads(tcp)

            def measure(engine: bool) -> float:
                return b.tcp()["gbit"] if tcp else b.pps(engine)["delivered_pps"] / 1000

            for r in range(rounds):
                b.start_nft()
                res["nft"].append(measure(False))
                b.stop_nft()
                for o in objs:
                    shutil.copy(o, target)
                    b.start_engine(dataplane="kernel")
                    res[o].append(measure(True))
                    b.stop_engine()
                print(r, {k: f"{v[-1]:.1f}{' Gbit/s' if tcp else 'k pps'}" for k, v in res.items()}, flush=True)
    finally:
        target.write_bytes(installed)
    for o in objs:
        ratios = [a / n for a, n in zip(res[o], res["nft"])]
        print(f"{o}: / nftables min {min(ratios):.3f} max {max(ratios):.3f} mean {sum(ratios) / len(ratios):.3f}")


if __name__ == "__main__":
    main()
