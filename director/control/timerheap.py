"""Many timers behind one event-loop timer.

asyncio keeps its timers in a heap of ``TimerHandle`` objects compared in
Python; a director with thousands of real servers had two per server (the
next check and the running probe's deadline), most of them cancelled before
they fired (a probe ends long before its timeout), and the heap's Python-level
comparisons and the cancelled handles' clean-up were a visible share of its
CPU. Here the entries are plain lists in a ``heapq`` (compared in C), a
cancelled entry is just marked and skipped when it comes up, and one loop
timer is armed for the earliest entry.

Entries fire from that loop timer, so like any asyncio timer they run after
the I/O callbacks of the same loop iteration: a reply that arrived while the
loop was busy is seen before the deadline that would have failed it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("glb.director.timers")

Entry = list  # [when, seq, callback or None, arg]


class TimerHeap:
    """``call_at(when, callback, arg)`` for many callbacks of one loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._heap: list[Entry] = []
        self._seq = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = float("inf")

    def __len__(self) -> int:
        return len(self._heap)

    def call_at(self, when: float, callback: Callable[[Any], None], arg: Any) -> Entry:
        entry = [when, next(self._seq), callback, arg]
        heapq.heappush(self._heap, entry)
        if when < self._armed_for:
            self._arm(when)
        return entry

    @staticmethod
    def cancel(entry: Entry) -> None:
        entry[2] = None
        entry[3] = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._heap.clear()
        self._armed_for = float("inf")

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_for = when
        self._handle = self._loop.call_at(when, self._run)

    def _run(self) -> None:
        self._handle = None
        self._armed_for = float("inf")
        heap = self._heap
        now = self._loop.time()
        limit = next(self._seq)
        # Only entries due by now and older than this run: one that a callback
        # adds for now runs on the next turn of the loop, never in this one.
        while heap and heap[0][0] <= now and heap[0][1] < limit:
            _, _, callback, arg = heapq.heappop(heap)
            if callback is not None:
                try:
                    callback(arg)
                except Exception:  # one bad callback must not strand every timer behind it
                    log.exception("timer callback failed")
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
        if heap and heap[0][0] < self._armed_for:
            self._arm(heap[0][0])
