"""Where the director's processes run: the control plane off the packet path's CPUs.

The control plane (health probes, snapshot publication, status, VRRP) is the
director's main process, one asyncio loop. The userspace packet path is its
worker processes (``director.dataplane.engine``, run by ``glb.supervisor``).
The kernel data plane runs in the kernel's receive path (softirq), on the CPUs
that take the NIC's receive interrupts: that is the IRQ affinity's business
(``/proc/irq/*/smp_affinity``), which the director does not change.

At thousands of checks a second the probes are a steady load on one core;
sharing it with a packet worker delays packets and starves probes (a late
loop). ``place`` decides, from the CPUs this process may use and
``director.probe_cpus``, which CPUs each side gets; ``apply_control`` pins the
calling thread (the director pins its main thread before it starts anything,
so every thread it starts inherits it), and each packet worker pins itself
to ``Placement.packet`` when it starts (``EngineConfig.cpus``), restarts
included.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from glb.errors import DirectorError


@dataclass(frozen=True, slots=True)
class Placement:
    control: tuple[int, ...]
    """CPUs of the control plane; () = leave it where it is."""
    packet: tuple[int, ...]
    """CPUs of the packet workers; () = where they start."""
    why: str
    """One line for the log."""


def place(available: frozenset[int] | set[int], setting: tuple[int, ...] | None, packet_path: bool) -> Placement:
    """Pure: the placement for ``director.probe_cpus`` = ``setting`` (None = auto)."""
    cpus = tuple(sorted(available))
    if setting == ():
        return Placement((), (), "probe_cpus: all: control plane and packet path share every CPU")
    if setting is None:
        if not packet_path:
            return Placement((), (), "no packet path: the control plane runs on every CPU")
        if len(cpus) < 2:
            return Placement((), (), "one CPU: control plane and packet path share it")
        return Placement(cpus[-1:], cpus[:-1], f"control plane on CPU {cpus[-1]}, packet workers on "
                                               f"{_span(cpus[:-1])} (probe_cpus: auto)")
    missing = [c for c in setting if c not in available]
    if missing:
        raise DirectorError(f"director.probe_cpus: CPU {', '.join(map(str, missing))} not available to this process "
                            f"(it may run on {_span(cpus)})")
    rest = tuple(c for c in cpus if c not in setting)
    if not packet_path or not rest:
        return Placement(setting, (), f"control plane on CPU {_span(setting)}"
                                      + ("" if not packet_path else ", packet workers share them (no CPU left)"))
    return Placement(setting, rest, f"control plane on CPU {_span(setting)}, packet workers on {_span(rest)}")


def _span(cpus: tuple[int, ...]) -> str:
    return ",".join(map(str, cpus))


def available() -> frozenset[int]:
    return frozenset(os.sched_getaffinity(0))


def apply_control(p: Placement) -> frozenset[int] | None:
    """Pin the calling thread (and the threads and processes it starts from
    now on); returns the CPUs it had, for ``restore``, or None if unchanged."""
    if not p.control:
        return None
    before = available()
    os.sched_setaffinity(0, p.control)
    return before


def restore(before: frozenset[int] | None) -> None:
    """Undo ``apply_control`` (a director stopped inside a longer-lived process: tests, tools)."""
    if before is not None:
        os.sched_setaffinity(0, before)
