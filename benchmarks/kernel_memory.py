"""Bytes per connection entry of the kernel data plane's ``conns`` map (issue 12: <= 100 at 1M).

    python benchmarks/kernel_memory.py [ENTRIES] [OBJECT]

Loads the tc program (default: the one scripts/setup built) with ``conns``
sized to ENTRIES (default 1,000,000) and prints what the kernel charges for
the map (its fdinfo ``memlock``: the preallocated elements with the LRU
hash's element header, the buckets, the LRU lists) divided by ENTRIES, and
the key and value sizes. An LRU hash is always preallocated, so this is the
figure at any fill. Needs root (or CAP_BPF).
"""

from __future__ import annotations

import sys
from pathlib import Path

from director.dataplane.kernelmaps import MAPS
from director.dataplane.libbpf import OBJECT, LibBpf


def main() -> None:
    entries = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    obj = Path(sys.argv[2]) if len(sys.argv) > 2 else OBJECT
    bpf = LibBpf(obj, max_entries={"conns": entries})
    try:
        ks, vs = MAPS["conns"]
        total = bpf.memlock("conns")
        print(f"conns: {entries} entries, key {ks} + value {vs} bytes, memlock {total} bytes, "
              f"{total / entries:.1f} bytes per entry")
    finally:
        bpf.close()


if __name__ == "__main__":
    main()
