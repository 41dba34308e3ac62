"""The health checker: runs every real server's probe on its own schedule.

Each real server has a slot: an entry on the checker's ``TimerHeap`` (one
loop timer for all of them), not a task. Slots start at a random offset in the check's ``start_jitter`` (so a
restart does not fire every probe in the same millisecond) and then fire every
``interval`` on a fixed cadence; missed ticks are skipped rather than fired in
a burst. ``max_probes`` bounds the probes in flight, so a site with thousands
of servers cannot exhaust sockets or file descriptors; a slot that finds no
room waits in a queue and runs as soon as a probe ends.

TCP and plain HTTP checks run as callback probes (``Prober.start``, see
``director.control.fastprobe``): one socket and one timer each, no task. The
other types run their coroutine in a task. A probe that misbehaves (raises,
or ignores its own timeout) is reported as a failure; it never stops its slot.

A late event loop must not turn into a false down. Every slot measures its own
lateness (fire time - due time) into ``lag``. A tick late by more than the
check's timeout is not counted as a check of that tick: it is
``skipped_for_lag`` and the check is run afresh, at once. A probe whose
timeout fired while the loop was stalled reports ``stalled``; its result is
not fed to ``on_results`` (also ``skipped_for_lag``) and the check is retried
at once. So only a probe that had its whole timeout of a running loop can
fail a server.

Results go to a callback in batches: ``on_results`` gets, once per turn of
the event loop, every result that arrived in that turn (one epoll wakeup
ends many probes; one timer run times out many). The director feeds each
batch to the pure ``director.control.health.HealthTable`` in one call, so
its bookkeeping (clock, metrics, service evaluation, spill, plan) is paid
per batch, not per check. The checker knows nothing about states: it only
schedules, bounds, measures and reports.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from director.control.health import ServerKey, server_keys
from director.control.probes import Probe, ProbeResult
from glb.aio import cancel_and_wait
from glb.config import HealthCheck, Site
from director.control.timerheap import Entry, TimerHeap
from glb.histogram import Histogram

log = logging.getLogger("glb.director.checker")

BACKSTOP = 1.0
"""Seconds past a check's timeout after which the checker abandons a probe
that did not enforce its own timeout (a bug, never a server's doing)."""

LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Seconds a probe started after it was due (/metrics ``glb_director_probe_lag_seconds``)."""

RATE_WINDOW = 10
"""Seconds over which ``probes_per_second`` averages."""


@dataclass(frozen=True, slots=True)
class Target:
    """What to probe for one real server."""

    key: ServerKey
    address: str
    port: int
    """Port probed: the check's port, else the real server's, else the first VIP's."""
    check: HealthCheck


def targets(site: Site) -> list[Target]:
    """Every real server of ``site`` with the address, port and check to probe."""
    out = []
    for svc in site.services:
        vip_port = svc.vips[0].port if svc.vips else 0
        for rs, key in zip(svc.real_servers, server_keys(svc)):
            port = svc.health_check.port or rs.port or vip_port
            out.append(Target(key, str(rs.address), port, svc.health_check))
    return out


Batch = list[tuple[Target, ProbeResult]]
OnResults = Callable[[Batch], None]


class _Slot:
    """One target's schedule and its probe in flight, if any."""

    __slots__ = ("target", "due", "timer", "cancel", "task", "live", "probing")

    def __init__(self, target: Target, due: float):
        self.target = target
        self.due = due
        """Loop time this check is due."""
        self.timer: Entry | None = None
        """The next check's entry on the checker's ``TimerHeap``."""
        self.cancel: Callable[[], None] | None = None
        """Cancels the callback probe in flight."""
        self.task: asyncio.Task[None] | None = None
        """The coroutine probe in flight."""
        self.live = True
        self.probing = False
        """A probe is in flight (counted in ``Checker.in_flight``)."""

    def stop(self) -> None:
        self.live = False
        if self.timer is not None:
            TimerHeap.cancel(self.timer)
            self.timer = None
        if self.cancel is not None:
            self.cancel()
            self.cancel = None
        if self.task is not None:
            self.task.cancel()


class Checker:
    """Schedules probes for a changing set of targets. Use from one event loop."""

    def __init__(
        self,
        probe: Probe,
        on_results: OnResults,
        max_probes: int,
        *,
        rng: Callable[[], float] = random.random,
    ):
        self._probe = probe
        # Probes that can run without a task offer start() (Prober does; test fakes need not).
        self._start = getattr(probe, "start", None)
        self._on_results = on_results
        self._batch: Batch = []
        self._probe_done = self._done  # one bound method for every callback probe, not one per check
        self._max_probes = max_probes
        self._rng = rng
        self._slots: dict[ServerKey, _Slot] = {}
        self._timers: TimerHeap | None = None
        self._waiting: collections.deque[_Slot] = collections.deque()
        self.in_flight = 0
        self.probes_run = 0
        self.skipped_for_lag = 0
        """Ticks started later than their timeout, and results whose timeout fired
        during a stalled loop: neither counted as a check (both run again at once)."""
        self.lag = Histogram(LAG_BUCKETS)
        self._rate = [0] * RATE_WINDOW
        self._rate_second = 0

    @property
    def max_probes(self) -> int:
        return self._max_probes

    def targets(self) -> list[Target]:
        return [slot.target for slot in self._slots.values()]

    def probes_per_second(self, now: float | None = None) -> float:
        """Probes finished per second over the last ``RATE_WINDOW`` whole seconds."""
        second = math.floor(asyncio.get_running_loop().time() if now is None else now)
        self._roll(second)
        return sum(self._rate[(second - i) % RATE_WINDOW] for i in range(1, RATE_WINDOW + 1)) / RATE_WINDOW

    def update(self, new: Iterable[Target]) -> None:
        """Probe exactly ``new`` from now on.

        Targets whose check did not change keep their slot and cadence (a
        reload must not reset timing or burst probes); changed ones restart
        with a fresh start jitter; removed ones are cancelled.
        """
        loop = asyncio.get_running_loop()
        if self._timers is None:
            self._timers = TimerHeap(loop)
        wanted = {t.key: t for t in new}
        for key in list(self._slots):
            slot = self._slots[key]
            if wanted.get(key) != slot.target:
                self._drop(slot)
                del self._slots[key]
        for key, target in wanted.items():
            if key not in self._slots:
                slot = _Slot(target, loop.time() + self._rng() * target.check.start_jitter)
                slot.timer = self._timers.call_at(slot.due, self._fire, slot)
                self._slots[key] = slot

    async def stop(self) -> None:
        slots = list(self._slots.values())
        self._slots.clear()
        self._waiting.clear()
        self._batch = []  # results of servers no longer probed: nobody to tell
        tasks = [slot.task for slot in slots if slot.task is not None]
        for slot in slots:
            self._drop(slot)
        if self._timers is not None:
            self._timers.close()
            self._timers = None
        await cancel_and_wait(tasks)

    # -- the schedule

    def _fire(self, slot: _Slot) -> None:
        slot.timer = None
        if not slot.live:
            return
        now = asyncio.get_running_loop().time()
        late = now - slot.due
        self.lag.observe(late)
        if late > slot.target.check.timeout:
            # The loop was busy past this tick's whole timeout: this tick is
            # lost; the check runs now, as a fresh one.
            self.skipped_for_lag += 1
            slot.due = now
        if self.in_flight >= self._max_probes:
            self._waiting.append(slot)
        else:
            self._begin(slot)

    def _begin(self, slot: _Slot) -> None:
        self.in_flight += 1
        slot.probing = True
        t = slot.target
        if self._start is not None:
            cancel = self._start(t.check, t.address, t.port, self._probe_done, slot)
            if cancel is not None:
                if slot.probing:  # done() runs inside start() for an immediate refusal
                    slot.cancel = cancel
                return
        slot.task = asyncio.create_task(self._run_coroutine(slot), name=f"probe {t.key}")

    async def _run_coroutine(self, slot: _Slot) -> None:
        t = slot.target
        try:
            result = await asyncio.wait_for(self._probe(t.check, t.address, t.port), t.check.timeout + BACKSTOP)
        except asyncio.TimeoutError:
            result = ProbeResult(False, f"probe overran its timeout ({t.check.timeout:g}s)", t.check.timeout)
        except asyncio.CancelledError:
            self._release(slot)
            raise
        except Exception as e:  # noqa: BLE001 - a probe bug is a failed check, not a dead slot
            log.exception("probe for %s raised", t.key)
            result = ProbeResult(False, f"probe error: {type(e).__name__}", 0.0)
        slot.task = None
        self._done(slot, result)

    def _release(self, slot: _Slot) -> None:
        """The slot's probe is over (finished or cancelled): free its place."""
        if slot.probing:
            slot.probing = False
            slot.cancel = None
            self.in_flight -= 1

    def _drop(self, slot: _Slot) -> None:
        slot.stop()
        if slot.task is None:  # a cancelled task releases its own place
            self._release(slot)

    def _done(self, slot: _Slot, result: ProbeResult) -> None:
        self._release(slot)
        self.probes_run += 1
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._count(now)
        if slot.live:
            if result.stalled:
                self.skipped_for_lag += 1
                slot.due = now  # retried at once, on a loop that runs again
            else:
                if not self._batch:
                    loop.call_soon(self._flush)
                self._batch.append((slot.target, result))
                slot.due += slot.target.check.interval
                if slot.due < now:
                    slot.due = now  # late (slow probe or full queue): skip, do not burst
            assert self._timers is not None
            slot.timer = self._timers.call_at(slot.due, self._fire, slot)
        while self._waiting and self.in_flight < self._max_probes:
            waiting = self._waiting.popleft()
            if waiting.live:
                self._begin(waiting)

    def _flush(self) -> None:
        """Hand every result of the last loop turn to ``on_results``, in one call."""
        batch, self._batch = self._batch, []
        if not batch:
            return
        try:
            self._on_results(batch)
        except Exception:  # a consumer bug must not silence the checks
            log.exception("health result handler failed for a batch of %d", len(batch))

    def _count(self, now: float) -> None:
        second = math.floor(now)
        if second != self._rate_second:
            self._roll(second)
        self._rate[second % RATE_WINDOW] += 1

    def _roll(self, second: int) -> None:
        """Zero the buckets of the seconds that passed since the last count."""
        for s in range(max(self._rate_second + 1, second - RATE_WINDOW + 1), second + 1):
            self._rate[s % RATE_WINDOW] = 0
        self._rate_second = max(self._rate_second, second)
