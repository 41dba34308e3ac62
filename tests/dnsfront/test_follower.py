"""AnswerUpdater with an in-memory follower: debounced rebuilds, time-driven staleness."""

from __future__ import annotations

import asyncio
import time

import pytest

from glb.config import RedisConfig
from glb.state import DeploymentState
from tests.waiting import async_until

from dnsfront.answers import Engine
from dnsfront.follower import AnswerUpdater


class FakeFollower:
    """Stands in for glb.store.StateFollower (same attributes the updater reads)."""

    def __init__(self, config, on_change):
        self.on_change = on_change
        self.state = None
        self.full_loads = 0
        self.connected = False

    async def start(self):
        pass

    async def stop(self):
        pass

    def push(self, state):
        self.state, self.full_loads, self.connected = state, self.full_loads + 1, True
        self.on_change(state)


async def test_no_state_until_first_load_then_rebuild_on_change(config, st):
    engine = Engine(config)
    upd = AnswerUpdater(RedisConfig(stale_after=3.0), lambda: engine, follower_factory=FakeFollower)
    await upd.start()
    try:
        assert upd.state is None
        assert "no Redis state" in engine.plan("fo.example.net.", 4).reason
        now = time.time()
        upd.follower.push(st.state(st.snapshot("dc2", at=now)))
        await async_until(lambda: engine.state is upd.follower.state, "the pushed state to be built")
        assert engine.plan("fo.example.net.", 4).choices[0].sites == ("dc2",)
    finally:
        await upd.stop()


async def test_site_going_stale_rebuilds_without_any_message(text_config, st):
    from glb import config as configmod

    cfg = configmod.loads(text_config(stale_after=0.3))
    engine = Engine(cfg)
    upd = AnswerUpdater(cfg.redis, lambda: engine, follower_factory=FakeFollower)
    await upd.start()
    try:
        now = time.time()
        upd.follower.push(st.state(st.snapshot("dc1", at=now), st.snapshot("dc2", at=now + 60)))
        await async_until(lambda: engine.state is upd.follower.state, "the pushed state to be built")
        assert engine.plan("fo.example.net.", 4).choices[0].sites == ("dc1",)
        # No message comes: only time makes dc1's snapshot older than stale_after (0.3 s).
        await async_until(lambda: engine.plan("fo.example.net.", 4).choices[0].sites == ("dc2",), "dc1 to go stale")
        assert time.time() - now >= 0.3  # not before it is stale
        assert "stale" in engine.plan("fo.example.net.", 4).reason
    finally:
        await upd.stop()


async def test_rebuild_metrics_count_changes_not_heartbeats(config, st):
    engine = Engine(config)
    upd = AnswerUpdater(config.redis, lambda: engine, follower_factory=FakeFollower)
    await upd.start()
    try:
        now = time.time()
        upd.follower.push(st.all_up(at=now))
        first = upd.report()
        assert first["rebuilds"] == 2  # the start (no state) and the first load
        assert first["change_to_answer"]["count"] == 0  # a first load is no publish
        for i in range(5):  # heartbeats: nothing to rebuild
            upd.follower.push(st.all_up(at=time.time()))
        assert upd.report()["rebuilds"] == 2

        async def drained():
            deadline = time.monotonic() + 5
            while (upd.report()["pending"] or upd._builder and not upd._builder.done()) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return upd.report()["seconds"]["count"]

        before = await drained()
        # dc3 published 0.2 s ago (Redis time) with its service down: its three names.
        down = st.state(st.snapshot("dc1", at=now), st.snapshot("dc2", at=now),
                        st.snapshot("dc3", at=time.time() - 0.2, up=False, version=2))
        upd.follower.push(down)
        r = upd.report()
        assert r["rebuilds"] == 3 and r["names"]["count"] == 3
        assert r["names"]["sum"] == 2 * len(engine.names) + 3
        assert r["change_to_answer"]["count"] == 1 and 0.2 <= r["change_to_answer"]["sum"] < 5
        assert await drained() == before + 1 and upd.report()["pending"] == 0
    finally:
        await upd.stop()


async def test_a_follower_behind_its_change_stream_does_not_turn_sites_overdue(config, st):
    engine = Engine(config)
    t = 2_000_000.0
    upd = AnswerUpdater(config.redis, lambda: engine, follower_factory=FakeFollower, clock=lambda: t)
    await upd.start()
    try:
        # The newest publish processed is 0.6 s old: we are that far behind.
        # dc1's last one is 2.5 s old by the local clock (overdue after 2 s),
        # 1.95 s old as of what we have processed: not overdue yet.
        upd.follower.push(st.state(st.snapshot("dc1", at=t - 2.5), st.snapshot("dc2", at=t - 0.6),
                                   st.snapshot("dc3", at=t - 0.6)))
        assert upd._engine_now(upd.state, t) == pytest.approx(t - 0.55)
        assert "overdue" not in engine.plan("app.example.net.", 4).reason
        # Everything silent for longer than HOLD: the local clock takes over (HOLD late).
        silent = st.state(st.snapshot("dc1", at=t - 5), st.snapshot("dc2", at=t - 5))
        assert upd._engine_now(silent, t) == t - 1.0
        fresh = st.state(st.snapshot("dc1", at=t - 0.01))
        assert upd._engine_now(fresh, t) == t
    finally:
        await upd.stop()


@pytest.mark.parametrize("held_at, replica_at, offset_error", [
    # dc1 published 3 ms after the last message heard; that message died with the master.
    (-0.497, 0.003, 0.0),
    # dc1's message was the last heard (2 ms after its publish); the new load's
    # clock offset (Redis - local, from a round trip's midpoint) is 5 ms off.
    (-0.002, -0.002, 0.005),
])
async def test_a_failover_does_not_age_the_last_snapshots_before_it(config, st, held_at, replica_at, offset_error):
    """The Sentinel failover flake (issue 15 C), replayed with explicit times.

    dnsfront last hears from the master at ``t`` (the outage's start: the frozen
    state's ``frozen_at``); the master dies; dnsfront reloads from the promoted
    replica 4.2 s later, when dc2's director has republished there and dc1's
    has not yet: dc1's snapshot is still the one the master replicated. That
    snapshot was stamped a few milliseconds after ``t`` (on the new load's
    clock offset): it must not age by the whole outage and go stale (3 s), or
    dc1 leaves the answer until its director republishes (the flap)."""
    engine = Engine(config)
    t = 2_000_000.0
    now = [t]
    upd = AnswerUpdater(config.redis, lambda: engine, follower_factory=FakeFollower, clock=lambda: now[0])
    await upd.start()
    try:
        held = st.state(st.snapshot("dc1", at=t + held_at), st.snapshot("dc2", at=t - 0.2))
        upd.follower.push(held)
        now[0] = t + 0.5  # the keepalive finds the master gone
        frozen = held.frozen(t)
        upd.follower.push(frozen)
        now[0] = t + 4.2
        dc1 = st.snapshot("dc1", at=t + replica_at, version=2)  # replicated before the kill
        dc2 = st.snapshot("dc2", at=t + 4.15, version=3)  # republished to the new master
        loaded = DeploymentState.build([dc1, dc2], (), 3, clock_offset=-offset_error).resumed(frozen, now[0])
        upd.follower.push(loaded)
        plan = engine.plan("multi.example.net.", 4)
        assert [set(c.sites) for c in plan.choices] == [{"dc1", "dc2"}] * 2, plan.reason
        # dc1's director died with the master: stale stale_after after the reload, not before.
        now[0] = t + 4.2 + 2.9
        upd.follower.push(loaded.with_site(st.snapshot("dc2", at=now[0] - offset_error, version=4)))
        assert [set(c.sites) for c in engine.plan("multi.example.net.", 4).choices] == [{"dc1", "dc2"}] * 2
        now[0] = t + 4.2 + 3.1
        upd.follower.push(upd.state.with_site(st.snapshot("dc2", at=now[0] - offset_error, version=5)))
        assert [c.sites for c in engine.plan("multi.example.net.", 4).choices] == [("dc2",)]
    finally:
        await upd.stop()
