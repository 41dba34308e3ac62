"""Connection counts per real server, as the least-connection schedulers read them.

IPVS keeps one active/inactive pair per destination for the whole host, so
lc/wlc/sed/nq/lblc/lblcr see every connection whichever CPU tracks it. The
director's packet workers are processes, each with its own connection
table; if each counted alone, every worker would schedule on a fraction of
the load (two workers under wlc could both send their next connection to
the same server). So the counts live in one shared table of cells:

    cell(slot, worker, kind) = cells[(slot * workers + worker) * 2 + kind]

``slot`` is the real server's row (the control plane numbers the servers of
the plan, :class:`SlotAllocator`), ``kind`` 0 = active, 1 = inactive. Each
worker writes only its own cells (its connection table's counts), so no
lock is needed: a 64-bit aligned store is atomic, and a reader sums the
row. A worker that dies takes its connections with it; its replacement
zeroes its cells before it forwards (:meth:`CountTable.reset`).

Pure: no I/O. The table's memory is any buffer of signed 64-bit integers
(the engine hands a ``multiprocessing`` shared array; tests a plain one).
Destinations read their counts through a :class:`Counts` object, so the
schedulers (director/dataplane/scheduler.py) stay unaware of workers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

ACTIVE, INACTIVE = 0, 1
DEFAULT_SLOTS = 16384
"""Rows in the engine's table: (service, real server) pairs that can be counted together."""


class Counts:
    """One destination's counts kept by this process alone (one worker, tests)."""

    __slots__ = ("active", "inactive")

    def __init__(self) -> None:
        self.active = 0
        self.inactive = 0

    def add(self, active: int, inactive: int) -> None:
        self.active += active
        self.inactive += inactive

    def own(self) -> tuple[int, int]:
        """(active, inactive) of this worker's connections."""
        return self.active, self.inactive


class SharedCounts:
    """One destination's row of a :class:`CountTable`: reads sum every worker, writes go to this one's cells."""

    __slots__ = ("cells", "mine", "row", "end")

    def __init__(self, cells: Any, slot: int, workers: int, worker: int) -> None:
        self.cells = cells
        self.row = slot * workers * 2
        self.end = self.row + workers * 2
        self.mine = self.row + worker * 2

    @property
    def active(self) -> int:
        return sum(self.cells[self.row:self.end:2])

    @property
    def inactive(self) -> int:
        return sum(self.cells[self.row + 1:self.end:2])

    def add(self, active: int, inactive: int) -> None:
        cells, mine = self.cells, self.mine
        if active:
            cells[mine] += active
        if inactive:
            cells[mine + 1] += inactive

    def own(self) -> tuple[int, int]:
        return self.cells[self.mine], self.cells[self.mine + 1]


class CountTable:
    """A worker's handle on the shared cells: a :class:`SharedCounts` per slot."""

    def __init__(self, cells: Any, workers: int, worker: int) -> None:
        # Read through a memoryview of int64: slices of it sum without copying.
        cells = memoryview(cells).cast("B").cast("q")
        if len(cells) % (2 * workers):
            raise ValueError("the count table's length is not a multiple of 2 x workers")
        self.cells = cells
        self.workers = workers
        self.worker = worker
        self.slots = len(cells) // (2 * workers)

    @staticmethod
    def size(slots: int, workers: int) -> int:
        """Cells a table of ``slots`` rows for ``workers`` workers needs."""
        return slots * workers * 2

    def counts(self, slot: int) -> SharedCounts:
        if not 0 <= slot < self.slots:
            raise IndexError(f"count slot {slot} outside 0..{self.slots - 1}")
        return SharedCounts(self.cells, slot, self.workers, self.worker)

    def reset(self) -> None:
        """Zero this worker's cells: a new worker starts with an empty connection table."""
        cells, step = self.cells, 2 * self.workers
        for i in range(2 * self.worker, len(cells), step):
            cells[i] = 0
            cells[i + 1] = 0

    def in_use(self, slot: int) -> bool:
        """Whether any worker still counts a connection in ``slot``."""
        row = slot * self.workers * 2
        return any(self.cells[row:row + 2 * self.workers])


class SlotAllocator:
    """Numbers the real servers of successive plans (a row each), stably.

    A server keeps its slot for as long as the allocator lives, so its
    connections are counted in one place whichever plan they were scheduled
    by. When every slot is taken, slots of servers no longer in the plan
    whose connections are all gone are reused; if none is free a server gets
    -1 and each worker counts it alone (logged by the caller).
    """

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        self.slots = slots
        self._by_key: dict[Any, int] = {}
        self._fresh = 0  # slots below this were handed out at least once

    def assign(self, plan: Any, in_use: Callable[[int], bool]) -> tuple[Any, list[Any]]:
        """``plan`` (a forwarder Plan) with every ServerPlan's ``slot`` set, and the keys left without one."""
        wanted = [s.key for sp in plan.services for s in (*sp.servers, *((sp.sorry,) if sp.sorry else ()))]
        current = set(wanted)
        free: list[int] | None = None
        unplaced = []
        for key in wanted:
            if key in self._by_key:
                continue
            if self._fresh < self.slots:
                self._by_key[key] = self._fresh
                self._fresh += 1
                continue
            if free is None:  # full: look once for rows whose servers left and hold nothing
                free = [slot for k, slot in self._by_key.items() if k not in current and not in_use(slot)]
                for k in [k for k, slot in self._by_key.items() if k not in current and slot in free]:
                    del self._by_key[k]
            if free:
                self._by_key[key] = free.pop()
            else:
                unplaced.append(key)

        def placed(s):
            return dataclasses.replace(s, slot=self._by_key.get(s.key, -1))

        services = tuple(
            dataclasses.replace(sp, servers=tuple(placed(s) for s in sp.servers),
                                sorry=placed(sp.sorry) if sp.sorry is not None else None)
            for sp in plan.services
        )
        return dataclasses.replace(plan, services=services), unplaced
