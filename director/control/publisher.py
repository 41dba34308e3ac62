"""Publishes the site's snapshot to Redis: every heartbeat and at once on change.

The loop builds a fresh snapshot (through a callback, so it always reflects the
health table at that instant) and hands it to the store. ``poke()`` wakes it
immediately: a state change decided by the health table is in Redis within
one round trip, well inside 100 ms. Pokes that arrive while a publication is
in flight coalesce into one more publication right after it, so a burst of
changes costs at most two writes and the last one always carries the newest
state.

Redis being down never stops the director: the failure is logged once per
outage (and again when Redis returns), the loop retries every
``retry_interval``, and the first success republishes the current state. On
``stop()`` the site is published once more as withdrawn, so the DNS tier moves
clients away at once instead of waiting for the snapshot to go stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from glb.errors import StoreError
from glb.state import SiteSnapshot

log = logging.getLogger("glb.director.publisher")


class SnapshotStore(Protocol):
    """The part of ``glb.store.RedisStore`` the publisher needs."""

    async def publish(self, snapshot: SiteSnapshot) -> SiteSnapshot: ...


Build = Callable[[bool], SiteSnapshot]
"""Builds the current snapshot; the argument is ``withdrawn``."""


class Publisher:
    def __init__(
        self,
        store: SnapshotStore,
        build: Build,
        heartbeat: float,
        *,
        retry_interval: float | None = None,
        withdraw_timeout: float = 2.0,
        clock: Callable[[], float] = time.time,
    ):
        self._store = store
        self._build = build
        self.heartbeat = heartbeat
        self.retry_interval = min(heartbeat, 1.0) if retry_interval is None else retry_interval
        self.withdraw_timeout = withdraw_timeout
        self._clock = clock
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # Observable state, for /status and /metrics.
        self.connected: bool | None = None
        """None before the first attempt, then whether the last one succeeded."""
        self.last: SiteSnapshot | None = None
        """The last snapshot Redis accepted (stamped with version and published_at)."""
        self.last_error: str | None = None
        self.outage_since: float | None = None
        self.published = 0
        self.failed = 0
        self.enabled = True
        """False: publish nothing (a pair's backup: only the master speaks for the site)."""

    # -- lifecycle

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="glb-publisher")

    def enable(self, on: bool) -> None:
        """Start (True, publishing at once) or stop (False) publishing, without withdrawing."""
        self.enabled = on
        self._wake.set()

    def poke(self) -> None:
        """Something changed: publish now (coalesced with any pending poke)."""
        self._wake.set()

    async def stop(self, withdraw: bool = True) -> bool:
        """Stop the loop, then publish the site as withdrawn.

        The loop finishes the publication it is in (so no stale write can
        land after the withdrawal). Returns whether the withdrawal reached
        Redis (True when ``withdraw`` is False).
        """
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(task, self.withdraw_timeout)
            except asyncio.TimeoutError:
                pass  # wait_for cancelled it
            except asyncio.CancelledError:
                pass
        if not withdraw:
            return True
        try:
            snap = await asyncio.wait_for(self._publish_once(withdrawn=True), self.withdraw_timeout)
        except asyncio.TimeoutError:
            snap = None
            self.last_error = "withdrawal timed out"
        if snap is None:
            log.warning(
                "could not publish the withdrawal (%s); the site goes down when its snapshot goes stale",
                self.last_error,
            )
            return False
        log.info("site %s withdrawn (version %d)", snap.site, snap.version)
        return True

    # -- the loop

    async def _run(self) -> None:
        while not self._stopping:
            # Clear before building: a poke that arrives while we publish
            # must cause one more publication, not be swallowed.
            self._wake.clear()
            if not self.enabled:
                await self._wake.wait()
                continue
            ok = await self._publish_once(withdrawn=False) is not None
            if self._stopping:
                return
            if ok:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.heartbeat)
            else:
                # During an outage pokes do not shorten the wait: the next
                # success publishes the newest state anyway, and hammering a
                # recovering Redis helps no one.
                await asyncio.sleep(self.retry_interval)

    async def _publish_once(self, *, withdrawn: bool) -> SiteSnapshot | None:
        try:
            snapshot = self._build(withdrawn)
        except Exception:  # a bug building the snapshot must not kill publication
            log.exception("building the site snapshot failed")
            self.failed += 1
            return None
        try:
            stamped = await self._store.publish(snapshot)
        except StoreError as e:
            self.failed += 1
            self.last_error = str(e)
            if self.connected is not False:
                # Once per outage: the director keeps forwarding meanwhile.
                self.outage_since = self._clock()
                log.warning("cannot publish site %s: %s; still serving, will republish when redis returns",
                            snapshot.site, e)
            self.connected = False
            return None
        if self.connected is False and self.outage_since is not None:
            log.info("redis is back after %.1fs: site %s republished (version %d)",
                     self._clock() - self.outage_since, snapshot.site, stamped.version)
        self.connected = True
        self.outage_since = None
        self.last = stamped
        self.published += 1
        return stamped
