"""AnswerUpdater with an in-memory follower: debounced rebuilds, time-driven staleness."""

from __future__ import annotations

import asyncio
import time

from glb.config import RedisConfig
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
        assert "no Redis state" in engine.plans[("fo.example.net.", 4)].reason
        now = time.time()
        upd.follower.push(st.state(st.snapshot("dc2", at=now)))
        await async_until(lambda: engine.state is upd.follower.state, "the pushed state to be built")
        assert engine.plans[("fo.example.net.", 4)].choices[0].sites == ("dc2",)
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
        assert engine.plans[("fo.example.net.", 4)].choices[0].sites == ("dc1",)
        # No message comes: only time makes dc1's snapshot older than stale_after (0.3 s).
        await async_until(lambda: engine.plans[("fo.example.net.", 4)].choices[0].sites == ("dc2",), "dc1 to go stale")
        assert time.time() - now >= 0.3  # not before it is stale
        assert "stale" in engine.plans[("fo.example.net.", 4)].reason
    finally:
        await upd.stop()
