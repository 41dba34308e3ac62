"""Live state -> precomputed answers: the glue between Redis and the engine.

``glb.store.StateFollower`` keeps a ``DeploymentState`` in step with Redis
(full load, pub/sub, resync, reconnect with backoff, last good state kept).
``AnswerUpdater`` turns each new state into a rebuilt answer table:

* a change marks the table dirty and a rebuild runs ``DEBOUNCE`` later, so a
  burst of heartbeats from many directors costs one rebuild, well inside the
  100 ms the issue allows;
* time alone changes answers too (a site whose heartbeat stops goes stale
  with no message at all), so a rebuild also runs when the next live site
  would cross ``stale_after``, and at least every ``MAX_INTERVAL``;
* before the first successful load the engine gets ``None``: "no state",
  answered from the configured weights (policy.py says so in every reason).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from glb.config import RedisConfig
from glb.state import DeploymentState

from dnsfront.answers import Engine

log = logging.getLogger("glb.dnsfront")

DEBOUNCE = 0.01
MAX_INTERVAL = 1.0


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
        """Called at each rebuild: the current engine (a reload may replace it)."""
        self.clock = clock
        if follower_factory is None:
            from glb.store import StateFollower  # the only Redis-aware import here

            follower_factory = StateFollower
        self.follower = follower_factory(redis, on_change=self._changed)
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.rebuilds = 0
        self.last_rebuild: float | None = None
        self.last_change: float | None = None

    @property
    def state(self) -> DeploymentState | None:
        """The followed state, or None before the first successful load."""
        f = self.follower
        return f.state if getattr(f, "full_loads", 0) else None

    async def start(self) -> None:
        self.rebuild()
        await self.follower.start()
        self._task = asyncio.create_task(self._loop(), name="dnsfront-rebuild")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self.follower.stop()

    def _changed(self, state: DeploymentState) -> None:
        self.last_change = self.clock()
        self._dirty.set()

    def rebuild(self) -> None:
        """Recompute the engine's plans and answers now (also after a reload)."""
        now = self.clock()
        self.engine().update(self.state, now)
        self.rebuilds += 1
        self.last_rebuild = now

    def _next_deadline(self, now: float) -> float:
        """When the next live site would go stale (local time), capped at MAX_INTERVAL."""
        deadline = now + MAX_INTERVAL
        state = self.state
        if state is not None and state.frozen_at is None:
            for snap in state.sites.values():
                # published_at is on Redis's clock; clock_offset = redis - local.
                stale_at = snap.published_at - state.clock_offset + self.redis.stale_after
                if now < stale_at < deadline:
                    deadline = stale_at + 0.001
        return deadline

    async def _loop(self) -> None:
        while True:
            timeout = max(0.0, self._next_deadline(self.clock()) - self.clock())
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout)
                await asyncio.sleep(DEBOUNCE)  # let a burst of changes land first
            except asyncio.TimeoutError:
                pass
            self._dirty.clear()
            try:
                self.rebuild()
            except Exception:  # noqa: BLE001 - keep serving the previous table
                log.exception("rebuilding answers failed; still serving the previous ones")
