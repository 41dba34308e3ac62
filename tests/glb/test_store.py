"""The Redis adapter and the follower, against a real redis-server (see conftest.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from glb.config import RedisConfig, SentinelConfig
from glb.errors import StateError, StoreError, StoreUnavailable
from glb.state import (
    DeploymentState,
    Keys,
    Override,
    RealServerState,
    ServiceState,
    SiteSnapshot,
    decode_snapshot,
    server_target,
    answer_digest,
    site_target,
)
from glb.store import RedisStore, StateFollower
from tests.environment import binary_unavailable, require
from tests.ports import free_port


def snapshot(site: str = "ams", director: str = "dir-1", n_servers: int = 3, **kw) -> SiteSnapshot:
    servers = tuple(
        RealServerState(f"10.0.0.{i + 1}", 80, "up", 100, active_conns=i, last_check=time.time(), last_result="ok")
        for i in range(n_servers)
    )
    svc = ServiceState("web", ("192.0.2.10:80/tcp", "[2001:db8::10]:80/tcp"), 1.0, True, servers,
                       active_conns=3, new_conns_per_s=2.5)
    return SiteSnapshot(site, director, time.time(), (svc,), **kw)


@pytest.fixture
async def store(redis_url: str):
    s = RedisStore(RedisConfig(url=redis_url))
    yield s
    await s.close()


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Wait until ``predicate()`` holds; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


# -- store


async def test_publish_read_round_trip(store: RedisStore) -> None:
    s = snapshot()
    published = await store.publish(s)
    redis_now = await store.time()
    assert published.version == 1
    assert abs(published.published_at - redis_now) < 1.0
    assert published == SiteSnapshot(**{**_fields(s), "version": 1, "published_at": published.published_at})

    assert await store.load_site("ams") == published
    assert await store.load_site("nowhere") is None
    state = await store.load()
    assert state.sites == {"ams": published}
    assert state.version == 1
    assert abs(state.clock_offset) < 1.0  # same host: the clocks agree
    assert state.site_is_up("ams", time.time(), stale_after=3.0)


def _fields(s: SiteSnapshot) -> dict:
    return {f: getattr(s, f) for f in s.__slots__}  # type: ignore[attr-defined]


async def test_exact_redis_layout(store: RedisStore, redis_url: str) -> None:
    """docs/state.md promises these exact keys and fields."""
    published = await store.publish(snapshot())
    client = store._client
    k = Keys()
    assert await client.smembers(k.sites) == {"ams"}
    h = await client.hgetall(k.site("ams"))
    assert set(h) == {"version", "published_at", "data"}
    assert int(h["version"]) == published.version == int(await client.get(k.version))
    assert float(h["published_at"]) == published.published_at
    assert decode_snapshot(h["data"]).services == published.services
    await store.set_override(Override(site_target("ams"), drain=True, who="t"))
    assert list(await client.hkeys(k.overrides)) == ["site:ams"]


async def test_versions_strictly_increase(store: RedisStore) -> None:
    versions = []
    for i in range(5):
        versions.append((await store.publish(snapshot("ams"))).version)
        versions.append((await store.publish(snapshot("fra"))).version)
        versions.append(await store.set_override(Override(site_target("ams"), weight=i)))
    assert versions == sorted(set(versions))
    assert (await store.load()).version == versions[-1]


async def test_concurrent_writers(redis_url: str) -> None:
    # 20 clients in one event loop, each encoding 200-server documents: on a loaded machine a reply
    # can wait longer than the default 1 s call timeout for the loop, and atomicity is what this tests.
    stores = [RedisStore(RedisConfig(url=redis_url, timeout=10.0)) for _ in range(20)]
    try:
        # Half the writers share one site, the others each own one; big snapshots
        # so a torn write would show as an undecodable or mixed document.
        async def write(i: int) -> list[SiteSnapshot]:
            site = "shared" if i % 2 else f"site{i}"
            out = []
            for _ in range(10):
                out.append(await stores[i].publish(snapshot(site, director=f"dir-{i}", n_servers=200)))
            return out

        results = [p for batch in await asyncio.gather(*(write(i) for i in range(20))) for p in batch]
        versions = [p.version for p in results]
        assert len(set(versions)) == len(versions) == 200
        assert sorted(versions) == list(range(1, 201))

        state = await stores[0].load()
        assert set(state.sites) == {"shared"} | {f"site{i}" for i in range(0, 20, 2)}
        last: dict[str, SiteSnapshot] = {}
        for p in results:
            if p.site not in last or p.version > last[p.site].version:
                last[p.site] = p
        for name, snap in state.sites.items():
            assert snap == last[name]  # the last writer wins, whole
            assert len(snap.services[0].real_servers) == 200
        assert state.version == 200
    finally:
        for s in stores:
            await s.close()


async def test_overrides_set_and_clear(store: RedisStore) -> None:
    target = server_target("ams", "web", "10.0.0.1", 80)
    v1 = await store.set_override(Override(target, weight=0, who="alice", why="disk"))
    ov = await store.load_override(target)
    assert ov is not None and ov.who == "alice" and ov.weight == 0
    assert abs(ov.when - await store.time()) < 5  # stamped with Redis time
    assert (await store.load()).overrides == {target: ov}
    v2 = await store.clear_override(target)
    assert v2 > v1
    assert await store.load_override(target) is None
    assert (await store.load()).overrides == {}


async def test_update_override_is_a_compare_and_set(store: RedisStore, redis_url: str) -> None:
    """Another writer changing the override between our read and our write: our
    change is made again on its document, and both take effect."""
    from glb.state import merge_override

    target = server_target("ams", "web", "10.0.0.1", 80)
    other = RedisStore(RedisConfig(url=redis_url))
    seen: list[Override | None] = []

    def drain(held: Override | None) -> Override | None:
        seen.append(held)
        return merge_override(held, target, drain=True, who="alice", why="disk")

    try:
        first = True

        async def racing_time() -> float:
            # Stamping ``when`` runs between our read and our write: the other
            # operator's weight lands there, the first time.
            nonlocal first
            if first:
                first = False
                await other.update_override(target, lambda h: merge_override(h, target, weight=7, who="bob", why="big"))
            return await RedisStore.time(store)

        store.time = racing_time  # type: ignore[method-assign]
        stored, version = await store.update_override(target, drain)
        assert seen[0] is None and seen[1] is not None and seen[1].weight == 7
        assert (stored.drain, stored.weight, stored.who) == (True, 7, "alice")
        assert await store.load_override(target) == stored and stored.when > 0
        assert version == int(await store._client.get(Keys().version))
        # Clearing through the same path; a malformed document is replaced.
        assert await store.update_override(target, lambda held: None) == (None, version + 1)
        await store._client.hset(Keys().overrides, target, "{not json")
        stored, _ = await store.update_override(target, lambda held: merge_override(held, target, drain=True,
                                                                                     who="c", why=""))
        assert (await store.load_override(target)).drain is True
    finally:
        del store.time
        await other.close()


async def test_update_override_gives_up_on_a_target_that_never_settles(store: RedisStore) -> None:
    target = site_target("ams")
    n = 0

    def change(held: Override | None) -> Override:
        nonlocal n
        n += 1
        return Override(target, drain=True, who=f"w{n}")

    async def meddling_time() -> float:  # someone else writes between every read and write
        await store._client.hset(Keys().overrides, target, f"other {n}")
        return 1.0

    store.time = meddling_time  # type: ignore[method-assign]
    try:
        with pytest.raises(StoreError, match=r"override 'site:ams' changed under 3 attempts to update it"):
            await store.update_override(target, change, attempts=3)
    finally:
        del store.time
    assert n == 3


async def test_remove_site(store: RedisStore) -> None:
    await store.publish(snapshot("ams"))
    await store.publish(snapshot("fra"))
    await store.remove_site("ams")
    assert set((await store.load()).sites) == {"fra"}
    assert await store.load_site("ams") is None


async def test_malformed_document_is_skipped_by_load(store: RedisStore, caplog: pytest.LogCaptureFixture) -> None:
    good = await store.publish(snapshot("ams"))
    k = Keys()
    c = store._client
    await c.sadd(k.sites, "bad", "future", "ghost")
    await c.hset(k.site("bad"), mapping={"version": 99, "published_at": 1.0, "data": "{not json"})
    await c.hset(k.site("future"), mapping={"version": 100, "published_at": 1.0,
                                            "data": '{"schema": 2, "site": "future"}'})
    await c.hset(k.overrides, "site:x", "garbage")
    with caplog.at_level(logging.WARNING, logger="glb.store"):
        state = await store.load()
    assert state.sites == {"ams": good}
    assert state.overrides == {}
    text = caplog.text
    assert "'bad'" in text and "'future'" in text and "site:x" in text
    with pytest.raises(StateError):
        await store.load_site("bad")
    # Reported once per document, not at every resync.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="glb.store"):
        await store.load()
    assert caplog.text == ""


async def test_closed_port_raises_store_unavailable() -> None:
    port = free_port()
    s = RedisStore(RedisConfig(url=f"redis://user:s3cret@127.0.0.1:{port}/0", timeout=0.5))
    try:
        for call in (s.ping(), s.load(), s.publish(snapshot())):
            with pytest.raises(StoreUnavailable) as info:
                await call
            msg = str(info.value)
            assert "\n" not in msg
            assert f"127.0.0.1:{port}" in msg
            assert "s3cret" not in msg and "***" in msg
    finally:
        await s.close()


async def test_bad_url_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="bad configuration"):
        RedisStore(RedisConfig(url="http://127.0.0.1:1/"))


async def test_redis_error_is_translated(store: RedisStore) -> None:
    await store._client.set(Keys().version, "not a number")
    with pytest.raises(StoreError, match="publish site 'ams' failed") as info:
        await store.publish(snapshot())
    assert not isinstance(info.value, StoreUnavailable)


# -- follower


def follower_for(url: str, **kw) -> tuple[StateFollower, list[DeploymentState]]:
    seen: list[DeploymentState] = []
    cfg = RedisConfig(url=url, timeout=0.5)
    return StateFollower(cfg, seen.append, **kw), seen


async def test_follower_sees_publish_through_pubsub(store: RedisStore, redis_url: str) -> None:
    await store.publish(snapshot("ams"))
    follower, seen = follower_for(redis_url, resync_interval=3600)
    async with follower:
        assert await follower.wait_synced(5)
        assert set(follower.state.sites) == {"ams"} and follower.connected
        p = await store.publish(snapshot("fra"))
        took = await eventually(lambda: "fra" in follower.state.sites, timeout=1.0)
        assert follower.state.sites["fra"] == p
        assert follower.full_loads == 1 and follower.changes_applied == 1  # pub/sub, not a resync
        assert seen[-1] is follower.state
        assert took < 1.0
        # An update to a known site, too.
        p2 = await store.publish(snapshot("ams", director="dir-2"))
        await eventually(lambda: follower.state.sites["ams"].version == p2.version, timeout=1.0)
        assert follower.full_loads == 1


async def test_change_message_carries_stamps_and_answer_digest(store: RedisStore, redis_url: str) -> None:
    """docs/state.md promises this exact message: site <name> <version> <published_at> <digest>."""
    sub = store._client.pubsub()
    try:
        await sub.subscribe(Keys().channel)
        assert (await sub.get_message(timeout=2))["type"] == "subscribe"
        s = snapshot("ams")
        p = await store.publish(s)
        msg = await sub.get_message(timeout=2)
        name, version, at, digest = msg["data"].split(" ")[1:]
        assert (name, int(version), float(at), digest) == ("ams", p.version, p.published_at, answer_digest(s))
        assert at == (await store._client.hget(Keys().site("ams"), "published_at"))
    finally:
        await sub.aclose()


def _counting_store(redis_url: str, fetched: list[str]) -> Callable[[], RedisStore]:
    """A store factory whose stores note every site they fetch in ``fetched``."""
    def factory() -> RedisStore:
        s = RedisStore(RedisConfig(url=redis_url, timeout=0.5))
        load_site = s.load_site

        async def counted(name: str) -> SiteSnapshot | None:
            fetched.append(name)
            return await load_site(name)

        s.load_site = counted  # type: ignore[method-assign]
        return s

    return factory


async def test_answers_only_follower_skips_the_fetch_of_a_heartbeat(store: RedisStore, redis_url: str) -> None:
    fetched: list[str] = []

    counting_store = _counting_store(redis_url, fetched)
    first = await store.publish(snapshot("ams"))
    follower, _ = follower_for(redis_url, resync_interval=3600, answers_only=True, store_factory=counting_store)
    async with follower:
        assert await follower.wait_synced(5)
        # A heartbeat: new counters and stamps, same answer digest: no fetch.
        beat = await store.publish(replace(snapshot("ams", n_servers=2), heartbeat=first.heartbeat + 1))
        await eventually(lambda: follower.state.sites["ams"].version == beat.version, timeout=1.0)
        held = follower.state.sites["ams"]
        assert (held.published_at, fetched, follower.fetches_skipped) == (beat.published_at, [], 1)
        assert held.services == first.services  # the telemetry is the last fetched one
        # A change an answer sees: fetched.
        half = snapshot("ams")
        half = replace(half, services=(replace(half.services[0], healthy_fraction=0.5),))
        p = await store.publish(half)
        await eventually(lambda: follower.state.sites["ams"].version == p.version, timeout=1.0)
        assert follower.state.sites["ams"] == p and fetched == ["ams"] and follower.fetches_skipped == 1
        # A second heartbeat after it is compared with the fetched document.
        again = await store.publish(half)
        await eventually(lambda: follower.state.sites["ams"].version == again.version, timeout=1.0)
        assert fetched == ["ams"] and follower.fetches_skipped == 2
        # A message in the older format (no digest) is fetched as before.
        await store._client.publish(Keys().channel, f"site ams {again.version + 1}")
        await eventually(lambda: fetched == ["ams", "ams"], timeout=1.0)


async def test_follower_fetches_every_change_unless_answers_only(store: RedisStore, redis_url: str) -> None:
    await store.publish(snapshot("ams"))
    follower, _ = follower_for(redis_url, resync_interval=3600)
    async with follower:
        assert await follower.wait_synced(5)
        beat = await store.publish(snapshot("ams", n_servers=2))
        await eventually(lambda: follower.state.sites["ams"] == beat, timeout=1.0)
        assert follower.fetches_skipped == 0


async def test_overrides_only_follower_never_fetches_sites(store: RedisStore, redis_url: str) -> None:
    fetched: list[str] = []

    counting_store = _counting_store(redis_url, fetched)
    await store.publish(snapshot("ams"))
    follower, _ = follower_for(redis_url, resync_interval=3600, overrides_only=True, store_factory=counting_store)
    async with follower:
        assert await follower.wait_synced(5)
        await store.publish(snapshot("ams", n_servers=2))
        await store.set_override(Override(site_target("ams"), drain=True, who="ops", why="test"))
        await eventually(lambda: follower.state.is_drained("ams"), timeout=1.0)
        # The site message before the override was ignored, and the full load left sites out.
        assert (fetched, dict(follower.state.sites)) == ([], {})


async def test_follower_sees_overrides_and_removal(store: RedisStore, redis_url: str) -> None:
    await store.publish(snapshot("ams"))
    follower, _ = follower_for(redis_url, resync_interval=3600)
    async with follower:
        assert await follower.wait_synced(5)
        now = time.time()
        assert follower.state.site_is_up("ams", now, 3.0)
        await store.set_override(Override(site_target("ams"), drain=True, who="ops", why="test"))
        await eventually(lambda: follower.state.is_drained("ams"), timeout=1.0)
        assert not follower.state.site_is_up("ams", time.time(), 3.0)
        await store.clear_override("site:ams")
        await eventually(lambda: not follower.state.overrides, timeout=1.0)
        assert follower.state.site_is_up("ams", time.time(), 3.0)
        await store.remove_site("ams")
        await eventually(lambda: not follower.state.sites, timeout=1.0)
        assert follower.full_loads == 1


async def test_follower_periodic_resync_repairs_missed_changes(store: RedisStore, redis_url: str) -> None:
    follower, _ = follower_for(redis_url, resync_interval=0.2)
    async with follower:
        assert await follower.wait_synced(5)
        # Written behind the follower's back: no change message.
        await store._client.hset(Keys().site("sneaky"), mapping={
            "version": 50, "published_at": await store.time(),
            "data": (await _encode_unstamped(snapshot("sneaky")))})
        await store._client.sadd(Keys().sites, "sneaky")
        await eventually(lambda: "sneaky" in follower.state.sites, timeout=3.0)
        assert follower.full_loads >= 2


async def _encode_unstamped(s: SiteSnapshot) -> str:
    from glb.state import encode_snapshot
    return encode_snapshot(s, stamp=False)


async def test_staleness(store: RedisStore, redis_url: str) -> None:
    follower, _ = follower_for(redis_url, resync_interval=3600)
    async with follower:
        assert await follower.wait_synced(5)
        await store.publish(snapshot("ams"))
        await eventually(lambda: "ams" in follower.state.sites, timeout=1.0)
        assert follower.state.site_is_up("ams", time.time(), stale_after=0.5)
        # A director that keeps publishing stays up...
        for _ in range(3):
            await asyncio.sleep(0.2)
            await store.publish(snapshot("ams"))
        await asyncio.sleep(0.05)
        assert follower.state.site_is_up("ams", time.time(), stale_after=0.5)
        # ...one that stops goes down after stale_after, with Redis still fine.
        await asyncio.sleep(0.6)
        assert follower.connected
        assert not follower.state.site_is_up("ams", time.time(), stale_after=0.5)
        # A clean stop withdraws the site at once.
        await store.publish(snapshot("ams", withdrawn=True))
        await eventually(lambda: follower.state.sites["ams"].withdrawn, timeout=1.0)
        assert not follower.state.site_is_up("ams", time.time(), stale_after=60)


async def test_redis_restart_while_follower_follows(
    redis_server: Any, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = RedisConfig(url=redis_url, timeout=0.5)
    writer = RedisStore(cfg)
    follower, _ = follower_for(redis_url, resync_interval=3600)
    try:
        first = await writer.publish(snapshot("ams"))
        with caplog.at_level(logging.INFO, logger="glb.store"):
            async with follower:
                assert await follower.wait_synced(5)
                assert follower.state.sites["ams"] == first

                redis_server.stop()
                await eventually(lambda: not follower.connected, timeout=5.0)
                assert follower.last_error and "unavailable" in follower.last_error
                # Last good state kept, and frozen: still up long after stale_after.
                assert follower.state.sites["ams"] == first
                assert follower.state.frozen_at is not None
                await asyncio.sleep(1.0)  # several reconnect attempts fail meanwhile
                assert follower.state.site_is_up("ams", time.time() + 60, stale_after=3.0)
                with pytest.raises(StoreUnavailable):
                    await writer.publish(snapshot("ams"))

                redis_server.start()  # same port, empty (no persistence)
                second = await writer.publish(snapshot("fra", director="dir-9"))
                assert second.version == 1  # the counter started over
                await eventually(lambda: follower.connected and "fra" in follower.state.sites, timeout=10.0)
                # A full reload replaced the state: the pre-restart site is gone.
                assert follower.state.sites == {"fra": second}
                assert follower.state.frozen_at is None
                assert follower.last_sync is not None
                third = await writer.publish(snapshot("fra", director="dir-10"))
                await eventually(lambda: follower.state.sites["fra"] == third, timeout=1.0)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "follower" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once per outage
        assert any("reconnected" in r.getMessage() for r in caplog.records)
    finally:
        redis_server.start()
        await writer.close()


async def test_follower_detects_a_hung_server(redis_server: Any, redis_url: str) -> None:
    """A server that stops answering without closing the connection (a partition,
    a frozen host) is caught by the pub/sub keepalive, not waited on forever."""
    writer = RedisStore(RedisConfig(url=redis_url))
    follower = StateFollower(RedisConfig(url=redis_url, timeout=0.3), resync_interval=3600, keepalive=0.2)
    pid = redis_server.proc.pid
    try:
        first = await writer.publish(snapshot("ams"))
        async with follower:
            assert await follower.wait_synced(5)
            # Healthy first: keepalives are answered and the connection stays.
            # (Without this, a follower that reconnected on every keepalive
            # would pass the check below with the server never stopped.)
            await eventually(lambda: follower.keepalives_answered >= 5, timeout=5.0)
            assert follower.connected and follower.full_loads == 1 and follower.last_error is None
            os.kill(pid, signal.SIGSTOP)
            try:
                took = await eventually(lambda: not follower.connected, timeout=5.0)
                assert took < 2.0
                assert "keepalive" in (follower.last_error or "") or "unavailable" in (follower.last_error or "")
                assert follower.state.sites["ams"] == first
            finally:
                os.kill(pid, signal.SIGCONT)
            second = await writer.publish(snapshot("ams", director="dir-2"))
            await eventually(lambda: follower.connected and follower.state.sites["ams"] == second, timeout=10.0)
    finally:
        await writer.close()


async def test_idle_follower_keeps_one_connection(
    store: RedisStore, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """30 s of a quiet, healthy Redis: one subscribed connection throughout, one
    full load, every keepalive answered, nothing logged at warning level."""
    await store.publish(snapshot("ams"))
    follower = StateFollower(RedisConfig(url=redis_url), resync_interval=3600)  # default keepalive, 1 s

    async def pubsub_client_ids() -> list[str]:
        listing = await store._client.execute_command("CLIENT", "LIST", "TYPE", "pubsub")
        text = listing if isinstance(listing, str) else " ".join(str(x) for x in listing)
        return [f.split("=", 1)[1] for f in text.split() if f.startswith("id=")]

    with caplog.at_level(logging.WARNING, logger="glb.store"):
        async with follower:
            assert await follower.wait_synced(5)
            first = await pubsub_client_ids()
            assert len(first) == 1
            start = time.monotonic()
            await eventually(lambda: follower.keepalives_answered >= 30, timeout=45.0)
            assert time.monotonic() - start >= 25.0  # the keepalive really is 1 s apart
            assert await pubsub_client_ids() == first
            assert follower.connected and follower.full_loads == 1 and follower.last_error is None
    assert caplog.records == []


async def test_malformed_change_message_keeps_previous_document(
    store: RedisStore, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = await store.publish(snapshot("ams"))
    follower, _ = follower_for(redis_url, resync_interval=3600)
    k = Keys()
    async with follower:
        assert await follower.wait_synced(5)
        with caplog.at_level(logging.WARNING, logger="glb.store"):
            # Messages that do not parse.
            for text in ("site ams notanumber", "site", "frobnicate ams 9", ""):
                await store._client.publish(k.channel, text)
            # A well-formed message announcing a document that does not decode.
            await store._client.hset(k.site("ams"), mapping={"version": good.version + 10, "data": "{not json"})
            await store._client.publish(k.channel, f"site ams {good.version + 10}")
            # A sentinel change behind them: once it arrives, every message above was handled.
            fra = await store.publish(snapshot("fra"))
            await eventually(lambda: "fra" in follower.state.sites, timeout=2.0)
        assert follower.state.sites["ams"] == good
        assert follower.state.sites["fra"] == fra
        assert follower.connected and follower.full_loads == 1
        assert "notanumber" in caplog.text and "keeping previous site 'ams'" in caplog.text


@pytest.fixture
def redis_with_password(tmp_path):
    from tests.conftest import RedisServer

    server = RedisServer(tmp_path, password="s3cret-pw")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("auth", ["wrong-pw@", "", "nobody:s3cret-pw@"])
async def test_authentication_failure_is_one_line_without_password(redis_with_password: Any, auth: str) -> None:
    port = redis_with_password.port
    url = f"redis://{':' + auth if auth and ':' not in auth else auth}127.0.0.1:{port}/0"
    s = RedisStore(RedisConfig(url=url, timeout=1.0))
    try:
        with pytest.raises(StoreError) as info:
            await s.load()
    finally:
        await s.close()
    msg = str(info.value)
    assert not isinstance(info.value, StoreUnavailable), msg  # the server is there; retrying will not help
    assert "\n" not in msg and f"127.0.0.1:{port}" in msg and "authentication" in msg
    assert "s3cret-pw" not in msg and "wrong-pw" not in msg
    # The right password works against the same server.
    ok = RedisStore(RedisConfig(url=redis_with_password.url))
    try:
        assert (await ok.load()).sites == {}
    finally:
        await ok.close()


async def test_url_asking_for_resp3_is_refused() -> None:
    with pytest.raises(StoreError, match="RESP2"):
        RedisStore(RedisConfig(url="redis://127.0.0.1:1/0?protocol=3"))


async def test_follower_starts_while_redis_is_down() -> None:
    port = free_port()
    follower, seen = follower_for(f"redis://127.0.0.1:{port}/0")
    async with follower:
        assert not await follower.wait_synced(0.5)
        assert not follower.connected
        assert follower.state == DeploymentState()
        assert follower.last_error and f"127.0.0.1:{port}" in follower.last_error
        assert seen == []


async def test_follower_survives_callback_errors_and_bad_messages(store: RedisStore, redis_url: str) -> None:
    calls = []

    async def bad_callback(state: DeploymentState) -> None:
        calls.append(state)
        raise RuntimeError("boom")

    follower = StateFollower(RedisConfig(url=redis_url), bad_callback, resync_interval=3600)
    async with follower:
        assert await follower.wait_synced(5)
        await store._client.publish(Keys().channel, "nonsense message")
        await store.publish(snapshot("ams"))
        await eventually(lambda: "ams" in follower.state.sites, timeout=1.0)
        assert follower.connected and len(calls) >= 2


# -- Sentinel


@pytest.fixture
def sentinel(redis_server: Any, redis_url: str, tmp_path):
    require(binary_unavailable("redis-server"))
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor glbmaster 127.0.0.1 {redis_server.port} 1\n"
    )
    proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def test_sentinel_round_trip(sentinel: int, redis_url: str) -> None:
    cfg = RedisConfig(url="redis:///0", sentinel=SentinelConfig("glbmaster", (("127.0.0.1", sentinel),)))
    s = RedisStore(cfg)
    try:
        deadline = time.monotonic() + 5
        while True:  # the sentinel needs a moment to come up
            try:
                await s.ping()
                break
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        p = await s.publish(snapshot("ams"))
        assert (await s.load()).sites == {"ams": p}
    finally:
        await s.close()
    bad = RedisStore(RedisConfig(sentinel=SentinelConfig("nosuch", (("127.0.0.1", sentinel),))))
    try:
        with pytest.raises(StoreUnavailable, match="sentinel 127.0.0.1"):
            await bad.ping()
    finally:
        await bad.close()
