"""Two builds of the tc program against nftables fwd, alternated in one lab: 64-byte UDP delivered.

``python benchmarks/director_ab.py MODE ROUNDS A.o [B.o ...]`` (root; MODE dr or tun; the objects
built as scripts/setup builds director/dataplane/tc/glb_tc.bpf.o). Each round measures nftables
``fwd`` and then the kernel data plane with each object in turn, in the lab director_bench.py
builds (SECONDS_PER_RUN, default 5), so a change of a few percent shows through the machine's
drift, which separate director_pps.sh runs do not (docs/benchmarks.md). Prints each round, then
per object the ratio to the same round's nftables figure: min, max, mean. The installed object is
put back at the end.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import director_bench as db  # noqa: E402


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[1] not in ("dr", "tun") or not sys.argv[2].isdigit():
        sys.exit("usage: director_ab.py dr|tun ROUNDS A.o [B.o ...]")
    mode, rounds, objs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    for o in objs:
        if not Path(o).is_file():
            sys.exit(f"director_ab: no such object {o}")
    target = db.ROOT / "director" / "dataplane" / "tc" / "glb_tc.bpf.o"
    installed = target.read_bytes()
    res: dict[str, list[float]] = {"nft": [], **{o: [] for o in objs}}
    try:
        with tempfile.TemporaryDirectory() as tmp, db.Lab(f"ab-{mode}") as lab:
            b = db.Bench(lab, mode, Path(tmp))
            for r in range(rounds):
                b.start_nft()
                res["nft"].append(b.pps(False)["delivered_pps"])
                b.stop_nft()
                for o in objs:
                    shutil.copy(o, target)
                    b.start_engine(dataplane="kernel")
                    res[o].append(b.pps(True)["delivered_pps"])
                    b.stop_engine()
                print(r, {k: f"{v[-1] / 1000:.1f}k" for k, v in res.items()}, flush=True)
    finally:
        target.write_bytes(installed)
    for o in objs:
        ratios = [a / n for a, n in zip(res[o], res["nft"])]
        print(f"{o}: / nftables min {min(ratios):.3f} max {max(ratios):.3f} mean {sum(ratios) / len(ratios):.3f}")


if __name__ == "__main__":
    main()
