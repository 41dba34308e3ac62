"""Live state -> precomputed answers: the glue between Redis and the engine.

``glb.store.StateFollower`` keeps a ``DeploymentState`` in step with Redis
(full load, pub/sub, resync, reconnect with backoff, last good state kept).
``AnswerUpdater`` hands each new state to the engine:

* at once, in the follower's callback: ``Engine.apply`` compares each site's
  answer-relevant condition and drops only the names of the sites that
  changed, which costs a comparison per site when nothing did (a heartbeat);
  the next query of a dropped name is answered from the new state;
* the dropped names are then rebuilt into the fast-path table by a
  background task, ``BATCH_SECONDS`` of work at a time, with queries and
  further changes served between batches;
* time alone changes answers too (a site whose heartbeat stops goes stale
  with no message at all): a timer fires at the engine's next deadline;
* before the first successful load the engine gets ``None``: "no state",
  answered from the configured weights (policy.py says so in every reason).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable

from glb.config import RedisConfig
from glb.histogram import Histogram
from glb.state import DeploymentState

from dnsfront.answers import Engine

log = logging.getLogger("glb.dnsfront")

BATCH_SECONDS = 0.002
"""Rebuilding gives the loop back after this long (a few names), then rests as
long: queries and, above all, the follower's next changes must not wait
behind a rebuild (a change takes several loop turns: message, fetch, reply),
or heartbeats are seen late, sites look overdue, and that is more to rebuild."""
LATE = 0.001
"""How long after a deadline the timer fires: a threshold is crossed strictly after it."""
HOLD = 1.0
"""How far the engine's clock may stay behind the local clock when the change
stream is behind (see ``_engine_now``): the most a silent deployment's
staleness is judged late."""
GRACE = 0.05
"""How far past the newest publish processed the engine's clock may run."""
RETRY = 0.02
"""The soonest a deadline is looked at again while the engine's clock is held back."""
NAMES_BOUNDS = (1, 10, 100, 1000, 10_000, 100_000)
SECONDS_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _budget() -> Callable[[], bool]:
    end = time.perf_counter() + BATCH_SECONDS
    return lambda: time.perf_counter() >= end


async def build_all(engine: Engine) -> None:
    """Rebuild every queued name of ``engine``, letting queries through between batches."""
    while engine.pending:
        engine.build_pending(until=_budget())
        await asyncio.sleep(0)


class AnswerUpdater:
    """Follows Redis and keeps ``engine()``'s answers current."""

    def __init__(
        self,
        redis: RedisConfig,
        engine: Callable[[], Engine],
        *,
        follower_factory: Callable[..., object] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.redis = redis
        self.engine = engine
        """The current engine (a reload may replace it)."""
        self.clock = clock
        if follower_factory is None:
            from glb.store import StateFollower  # the only Redis-aware import here

            # dnsfront reads only what answers depend on: a heartbeat whose
            # answer digest is unchanged is applied without fetching it.
            follower_factory = functools.partial(StateFollower, answers_only=True)
        self.follower = follower_factory(redis, on_change=self._changed)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._builder: asyncio.Task[None] | None = None
        self.rebuilds = 0
        """State changes (or deadlines) that put at least one name out of date."""
        self.last_rebuild: float | None = None
        self.last_change: float | None = None
        self.names_rebuilt = Histogram(NAMES_BOUNDS)
        """Per state change (or deadline) that changed something: names put out of date."""
        self.rebuild_seconds = Histogram(SECONDS_BOUNDS)
        """Per change: from applying it to the last of its names rebuilt."""
        self.change_to_answer = Histogram(SECONDS_BOUNDS)
        """Per site whose new snapshot changed answers: from its publish (Redis
        time) to its names leaving the table (the next query answers anew)."""
        self._rebuild_started: float | None = None
        self._followed: DeploymentState | None = None
        """The last state the follower handed over (it counts its first load
        only after the callback, so ``follower.full_loads`` is 0 then)."""

    @property
    def state(self) -> DeploymentState | None:
        """The followed state, or None before the first successful load."""
        if self._followed is not None:
            return self._followed
        f = self.follower
        return f.state if getattr(f, "full_loads", 0) else None

    async def start(self) -> None:
        self.apply()
        await build_all(self.engine())  # nothing is served yet: build it all now
        await self.follower.start()

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        task, self._builder = self._builder, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self.follower.stop()

    def report(self) -> dict[str, object]:
        """The rebuild metrics, as plain data (for /status and /metrics)."""
        return {
            "rebuilds": self.rebuilds,
            "pending": len(self.engine().pending),
            "names": self.names_rebuilt.as_dict(),
            "seconds": self.rebuild_seconds.as_dict(),
            "change_to_answer": self.change_to_answer.as_dict(),
        }

    def _changed(self, state: DeploymentState) -> None:
        self._followed = state
        self.last_change = self.clock()
        self.apply()

    def _engine_now(self, state: DeploymentState | None, now: float) -> float:
        """The time the engine judges ages at: not past the newest publish
        processed (+ GRACE), unless that is more than HOLD ago.

        A dnsfront behind its change stream (busy, or short of CPU) would
        otherwise judge sites by its own clock, see their heartbeats late,
        turn them overdue and back, and queue their names again, which keeps
        it behind. The newest publish is evidence of how far Redis time has
        got in what was processed; with everything silent (every director
        dead), the local clock takes over HOLD later.
        """
        if state is None or not state.sites:
            return now
        newest = max(s.published_at for s in state.sites.values()) - state.clock_offset
        return min(now, max(newest + GRACE, now - HOLD))

    def apply(self) -> None:
        """Give the engine the followed state as of now (also after a reload)."""
        engine = self.engine()
        state = self.state
        local = self.clock()
        now = self._engine_now(state, local)
        started = time.perf_counter()
        try:
            dropped = engine.apply(state, now)
        except Exception:  # noqa: BLE001 - keep serving the previous table
            log.exception("applying a state change failed; still serving the previous answers")
            return
        if dropped:
            self.rebuilds += 1
            self.last_rebuild = local
            self.names_rebuilt.observe(dropped)
            if self._rebuild_started is None:
                self._rebuild_started = started
            if state is not None:
                done = self.clock()
                for site in engine.watch.published:
                    # published_at is Redis's clock; clock_offset = Redis - local.
                    at = state.sites[site].published_at - state.clock_offset
                    self.change_to_answer.observe(max(0.0, done - at))
        if engine.pending and (self._builder is None or self._builder.done()):
            self._builder = asyncio.get_running_loop().create_task(self._build(), name="dnsfront-rebuild")
        self._arm(engine.next_deadline(), now, local)

    def _arm(self, at: float, now: float, local: float) -> None:
        """Have ``apply`` run just after the engine's clock (``now``) passes
        ``at``; it runs no faster than the local clock, and while held back
        (``now < local``) it may not move at all until the next publish."""
        if at >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        delay = max(0.0, at - now) + LATE
        if now < local:
            delay = max(delay, RETRY)
        self._timer = asyncio.get_running_loop().call_later(delay, self._deadline)

    def _deadline(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self.apply()

    async def _build(self) -> None:
        try:
            # The engine is asked again each batch: a reload may swap it.
            while (engine := self.engine()).pending:
                engine.build_pending(until=_budget())
                await asyncio.sleep(BATCH_SECONDS)
            if self._rebuild_started is not None:
                self.rebuild_seconds.observe(time.perf_counter() - self._rebuild_started)
                self._rebuild_started = None
        except Exception:  # noqa: BLE001 - the slow path still answers those names
            log.exception("rebuilding answers failed; their queries take the slow path")
