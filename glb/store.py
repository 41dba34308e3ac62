"""The Redis adapter: the only module in GLB that imports ``redis``.

``RedisStore`` moves the documents of ``glb.state`` in and out of Redis; every
write is one Lua script (INCR the global version, write, PUBLISH a change
message) so readers never see a write without its announcement or half a
snapshot. ``StateFollower`` keeps a ``DeploymentState`` current for a reader
(dnsfront, directors, the HTTP API): full load, then pub/sub, periodic resync,
and reconnect with backoff, keeping the last good state during an outage.

Every redis-py exception is translated here into ``StoreUnavailable`` (cannot
reach Redis) or ``StoreError`` (anything else), with one line that names the
server but never its password. The key layout is in ``docs/state.md``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from glb.aio import cancel_and_wait
from glb.config import RedisConfig
from glb.errors import StateError, StoreError, StoreUnavailable
from glb.state import (
    DeploymentState,
    Keys,
    Override,
    Change,
    SiteSnapshot,
    answer_digest,
    decode_override,
    decode_snapshot,
    encode_override,
    encode_snapshot,
    parse_change,
    parse_target,
    valid_name,
)

log = logging.getLogger("glb.store")

# RESP2, pinned rather than left to the client's default. redis-py 8 defaults
# to RESP3, where PING on a subscribed connection answers a plain "PONG" that
# redis-py (with decode_responses) misreads as a message of type "P": the
# keepalive never clears and every follower reconnects every few seconds. GLB
# uses nothing RESP3 adds, and RESP2 also keeps Redis < 6 (no HELLO) working.
PROTOCOL = 2

# Lua. Each script runs atomically on the server: no reader can observe the
# version bumped without the data, or the data without its PUBLISH. Every key
# a script touches carries the same hash tag, so they are legal in Cluster too.
# redis.replicate_commands() lets scripts call TIME before writing on Redis < 5
# (on newer servers it is a no-op).

_PUBLISH = """
if redis.replicate_commands then redis.replicate_commands() end
local v = redis.call('INCR', KEYS[1])
local t = redis.call('TIME')
local at = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
redis.call('HSET', KEYS[2], 'version', string.format('%d', v), 'published_at', at, 'data', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('PUBLISH', ARGV[3], 'site ' .. ARGV[1] .. ' ' .. string.format('%d', v) .. ' ' .. at .. ' ' .. ARGV[4])
return {v, at}
"""
# KEYS: version, site hash, sites set.  ARGV: site name, snapshot JSON, channel,
# answer digest. The message carries published_at (only known in here) and the
# digest, so a reader holding a document of the same digest needs no fetch.

_REMOVE_SITE = """
local v = redis.call('INCR', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('PUBLISH', ARGV[2], 'site ' .. ARGV[1] .. ' ' .. string.format('%d', v))
return v
"""
# KEYS: version, site hash, sites set.  ARGV: site name, channel.

_SET_OVERRIDE = """
local v = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], 'override ' .. ARGV[1] .. ' ' .. string.format('%d', v))
return v
"""
# KEYS: version, overrides hash.  ARGV: target, override JSON, channel.

_CLEAR_OVERRIDE = """
local v = redis.call('INCR', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[2], 'override ' .. ARGV[1] .. ' ' .. string.format('%d', v))
return v
"""
# KEYS: version, overrides hash.  ARGV: target, channel.

_SWAP_OVERRIDE = """
local held = redis.call('HGET', KEYS[2], ARGV[1])
if (held or '') ~= ARGV[2] then
  return {0, 0}
end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end
local v = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[4], 'override ' .. ARGV[1] .. ' ' .. string.format('%d', v))
return {1, v}
"""
# KEYS: version, overrides hash.  ARGV: target, the document the caller read
# ('' = none), the new document ('' = clear), channel. Compare-and-set: the
# write happens only if the override is still what the caller based it on.

_LOAD = """
local t = redis.call('TIME')
local sites = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local h = redis.call('HMGET', ARGV[1] .. name, 'version', 'published_at', 'data')
  sites[#sites + 1] = {name, h[1], h[2], h[3]}
end
return {t[1], t[2], redis.call('GET', KEYS[3]), redis.call('HGETALL', KEYS[2]), sites}
"""
# KEYS: sites set, overrides hash, version.  ARGV: site key prefix ("{glb}:site:").
# The site hashes are named from ARGV rather than KEYS because their names are
# only known inside the script; they share the hash tag, so in Cluster they are
# in the same slot as the declared keys.


UPDATE_ATTEMPTS = 20
"""Compare-and-set rounds of ``update_override`` before giving up (each lost
round means another writer's change went in: progress, not a livelock)."""


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port:
            host = f"{host}:{parts.port}"
        user = parts.username or ""
        if parts.password:
            user = f"{user}:***"
        netloc = f"{user}@{host}" if user else host
        return parts._replace(netloc=netloc, query="").geturl()
    except ValueError:
        return "<unparseable redis url>"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class RedisStore:
    """Reads and writes GLB state in one Redis (a URL, or a Sentinel-managed master).

    Cheap to construct (connects lazily); one instance per process is enough,
    it holds a connection pool. Every method raises only ``StoreError`` /
    ``StoreUnavailable`` (and ``StateError`` from ``load_site`` /
    ``load_override`` for a malformed document).
    """

    def __init__(self, config: RedisConfig):
        self.config = config
        self.keys = Keys(config.prefix)
        self._sentinel: Sentinel | None = None
        self._password = ""
        # (site, version) pairs already reported as malformed, so a periodic
        # resync does not repeat the same warning every few seconds.
        self._reported: set[tuple[str, str]] = set()
        if config.sentinel is None:
            self.where = _redact(config.url)
        else:
            addrs = ",".join(f"{h}:{p}" for h, p in config.sentinel.addresses)
            self.where = f"sentinel {addrs} master {config.sentinel.service!r}"
        try:
            self._client = self._make_client()
        except (ValueError, TypeError, rexc.RedisError) as e:
            raise StoreError(f"redis at {self.where}: bad configuration: {_one_line(e)}") from None
        self._publish = self._client.register_script(_PUBLISH)
        self._remove_site = self._client.register_script(_REMOVE_SITE)
        self._set_override = self._client.register_script(_SET_OVERRIDE)
        self._clear_override = self._client.register_script(_CLEAR_OVERRIDE)
        self._swap_override = self._client.register_script(_SWAP_OVERRIDE)
        self._load = self._client.register_script(_LOAD)

    def _make_client(self) -> aioredis.Redis:
        cfg = self.config
        common: dict[str, Any] = {
            "socket_timeout": cfg.timeout,
            "socket_connect_timeout": cfg.timeout,
            # No silent retries: a caller (the follower, the director's publish
            # loop) must see every failure, and a pub/sub connection that
            # reconnected by itself would hide the messages lost meanwhile.
            "retry": Retry(NoBackoff(), 0),
            "decode_responses": True,
            "client_name": "glb",
            "protocol": PROTOCOL,
        }
        url_kwargs = parse_url(cfg.url)
        if int(url_kwargs.get("protocol", PROTOCOL)) != PROTOCOL:
            raise ValueError(f"protocol={url_kwargs['protocol']} in the URL: GLB speaks RESP2 only (see docs/state.md)")
        self._password = str(url_kwargs.get("password") or "")
        if cfg.sentinel is None:
            return aioredis.Redis.from_url(cfg.url, **common)
        auth = {k: url_kwargs[k] for k in ("db", "username", "password") if k in url_kwargs}
        if urlsplit(cfg.url).scheme == "rediss":
            auth["ssl"] = True
        self._sentinel = Sentinel(
            list(cfg.sentinel.addresses),
            sentinel_kwargs={
                "socket_timeout": cfg.timeout,
                "socket_connect_timeout": cfg.timeout,
                "retry": Retry(NoBackoff(), 0),
                "protocol": PROTOCOL,
            },
            **common,
            **auth,
        )
        return self._sentinel.master_for(cfg.sentinel.service)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate redis-py and socket failures into GLB errors."""
        try:
            yield
        except (StateError, StoreError):
            raise
        except (rexc.AuthenticationError, rexc.AuthorizationError, rexc.NoPermissionError) as e:
            raise StoreError(self._message(what, "authentication/permission refused", e)) from None
        except (
            rexc.ConnectionError,  # includes MasterNotFoundError, BusyLoadingError
            rexc.TimeoutError,
            rexc.ReadOnlyError,  # talking to a replica mid-failover
            OSError,  # includes builtin TimeoutError
            asyncio.TimeoutError,
        ) as e:
            raise StoreUnavailable(self._message(what, "unavailable", e)) from None
        except rexc.RedisError as e:
            raise StoreError(self._message(what, "failed", e)) from None

    def _message(self, what: str, kind: str, exc: BaseException) -> str:
        reason = _one_line(exc)
        if self._password:
            reason = reason.replace(self._password, "***")
        return f"redis at {self.where}: {what} {kind}: {reason}"

    # -- writes

    async def publish(self, snapshot: SiteSnapshot) -> SiteSnapshot:
        """Store ``snapshot`` as its site's current state and announce it.

        Returns the snapshot stamped with its new version and ``published_at``
        (Redis time). Atomic: readers see the old or the new snapshot, never a mix.
        """
        k = self.keys
        data = encode_snapshot(snapshot, stamp=False)
        with self._errors(f"publish site {snapshot.site!r}"):
            v, at = await self._publish(
                keys=[k.version, k.site(snapshot.site), k.sites],
                args=[snapshot.site, data, k.channel, answer_digest(snapshot)],
            )
        return replace(snapshot, version=int(v), published_at=float(at))

    async def remove_site(self, name: str) -> int:
        """Forget a site entirely (operator cleanup of a decommissioned site).

        A site whose director still runs will reappear at its next publish.
        Returns the new version.
        """
        if not valid_name(name):
            raise StateError(f"bad site name {name!r}")
        k = self.keys
        with self._errors(f"remove site {name!r}"):
            v = await self._remove_site(keys=[k.version, k.site(name), k.sites], args=[name, k.channel])
        return int(v)

    async def set_override(self, override: Override) -> int:
        """Set (or replace) the override for ``override.target``; returns the new version.

        ``when`` is filled in with Redis time when the caller left it at 0.
        """
        if override.when == 0.0:
            override = replace(override, when=await self.time())
        k = self.keys
        with self._errors(f"set override {override.target!r}"):
            v = await self._set_override(
                keys=[k.version, k.overrides],
                args=[override.target, encode_override(override), k.channel],
            )
        return int(v)

    async def clear_override(self, target: str) -> int:
        """Remove the override for ``target`` (no error if there is none); returns the new version."""
        target = str(parse_target(target))
        k = self.keys
        with self._errors(f"clear override {target!r}"):
            v = await self._clear_override(keys=[k.version, k.overrides], args=[target, k.channel])
        return int(v)

    async def update_override(self, target: str, change: Callable[[Override | None], Override | None], *,
                              attempts: int = UPDATE_ATTEMPTS) -> tuple[Override | None, int]:
        """Read-modify-write one target's override without losing a concurrent write.

        ``change`` gets the override held now (None: none, or a malformed
        document, which this write replaces) and returns the one to store
        (None: clear it). The write is a compare-and-set on the document read:
        if another writer changed it in between (an operator draining the
        server while another sets its weight), ``change`` runs again on the
        new document. Returns (what was stored, with ``when`` stamped by
        Redis time; the new version). StoreError if the target kept changing
        for ``attempts`` rounds.
        """
        target = str(parse_target(target))
        k = self.keys
        for _ in range(attempts):
            with self._errors(f"load override {target!r}"):
                raw = await self._client.hget(k.overrides, target)
            try:
                held = None if raw is None else decode_override(raw)
            except StateError:
                held = None
            new = change(held)
            if new is not None and new.when == 0.0:
                new = replace(new, when=await self.time())
            with self._errors(f"update override {target!r}"):
                done, v = await self._swap_override(
                    keys=[k.version, k.overrides],
                    args=[target, raw or "", "" if new is None else encode_override(new), k.channel],
                )
            if int(done):
                return new, int(v)
        raise StoreError(f"redis at {self.where}: override {target!r} changed under {attempts} attempts "
                         "to update it; try again")

    # -- reads

    async def load(self, *, sites: bool = True) -> DeploymentState:
        """Everything, read atomically by one script, plus the Redis clock.

        A site or override whose document does not decode is skipped and
        logged (a bad writer must not take every reader down with it).
        ``sites=False`` leaves the sites out (not decoded): a reader of
        overrides only (the director) need not decode every site's servers.
        """
        k = self.keys
        with_sites = sites
        before = time.time()
        with self._errors("load state"):
            secs, usecs, version, flat_overrides, raw_sites = await self._load(
                keys=[k.sites, k.overrides, k.version], args=[k.site("")]
            )
        after = time.time()
        redis_now = int(secs) + int(usecs) / 1e6
        # Redis read its clock somewhere within the round trip; the midpoint
        # bounds the error by half the round-trip time.
        clock_offset = redis_now - (before + after) / 2

        sites: list[SiteSnapshot] = []
        for name, s_version, s_at, data in raw_sites if with_sites else ():
            if data is None:
                continue  # name in the set but no hash: removed between writes by hand
            try:
                sites.append(self._decode_site(name, s_version, s_at, data))
            except StateError as e:
                self._report(name, str(s_version), f"skipping site {name!r} version {s_version}: {e}")
        overrides: list[Override] = []
        for target, doc in zip(flat_overrides[::2], flat_overrides[1::2]):
            try:
                overrides.append(decode_override(doc))
            except StateError as e:
                self._report(f"override {target}", doc, f"skipping override {target!r}: {e}")
        return DeploymentState.build(sites, overrides, int(version or 0), clock_offset)

    async def load_site(self, name: str) -> SiteSnapshot | None:
        """One site's current snapshot, or None if it has none.

        Raises StateError if the stored document is malformed.
        """
        with self._errors(f"load site {name!r}"):
            s_version, s_at, data = await self._client.hmget(
                self.keys.site(name), ["version", "published_at", "data"]
            )
        if data is None:
            return None
        return self._decode_site(name, s_version, s_at, data)

    async def load_override(self, target: str) -> Override | None:
        """The override for ``target``, or None. StateError if malformed."""
        with self._errors(f"load override {target!r}"):
            doc = await self._client.hget(self.keys.overrides, target)
        return None if doc is None else decode_override(doc)

    def _decode_site(self, name: str, s_version: Any, s_at: Any, data: str) -> SiteSnapshot:
        snap = decode_snapshot(data)
        if snap.site != name:
            raise StateError(f"snapshot under key for site {name!r} names site {snap.site!r}")
        try:
            return replace(snap, version=int(s_version), published_at=float(s_at))
        except (TypeError, ValueError):
            raise StateError(f"site {name!r}: bad version/published_at fields") from None

    def _report(self, what: str, version: str, message: str) -> None:
        key = (what, version)
        if key in self._reported:
            log.debug("%s", message)
        else:
            if len(self._reported) > 10000:
                self._reported.clear()
            self._reported.add(key)
            log.warning("%s", message)

    async def ping(self) -> None:
        with self._errors("ping"):
            await self._client.ping()

    async def time(self) -> float:
        """The Redis server's clock (TIME), seconds since the epoch."""
        with self._errors("time"):
            secs, usecs = await self._client.time()
        return secs + usecs / 1e6

    async def subscribe(self, keepalive: float = 1.0, on_pong: Callable[[], None] | None = None) -> Subscription:
        """Subscribe to the changes channel; returns once Redis confirmed it.

        ``on_pong`` is called for every keepalive PING the server answered.
        """
        sub = Subscription(self, self._client.pubsub(), keepalive, on_pong)
        try:
            await sub._start()
        except BaseException:
            await sub.close()
            raise
        return sub

    async def close(self) -> None:
        """Close every connection. Never raises."""
        with suppress(Exception):
            await self._client.aclose(close_connection_pool=True)
        if self._sentinel is not None:
            for s in self._sentinel.sentinels:
                with suppress(Exception):
                    await s.aclose()

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Subscription:
    """The changes channel, with a keepalive: a connection that stopped
    answering PING within the store's timeout raises StoreUnavailable instead
    of waiting silently forever (a half-open TCP connection never errors)."""

    def __init__(self, store: RedisStore, pubsub: Any, keepalive: float,
                 on_pong: Callable[[], None] | None = None):
        self._store = store
        self._pubsub = pubsub
        self._keepalive = keepalive
        self._on_pong = on_pong
        self._ping_sent: float | None = None
        self._last_rx = time.monotonic()
        self.last_contact = time.time()
        """Local wall-clock time anything was last heard on this connection."""

    async def _start(self) -> None:
        channel = self._store.keys.channel
        deadline = time.monotonic() + max(self._store.config.timeout, 0.1)
        with self._store._errors("subscribe"):
            await self._pubsub.subscribe(channel)
            # Wait for the confirmation so the caller's following full load
            # cannot miss a change published in between.
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailable(f"redis at {self._store.where}: subscribe unavailable: no confirmation")
                msg = await self._pubsub.get_message(timeout=left)
                if msg is not None and msg.get("type") == "subscribe":
                    self._heard()
                    return

    def _heard(self) -> None:
        self._last_rx = time.monotonic()
        self.last_contact = time.time()

    async def get(self, timeout: float) -> str | None:
        """The next change message (raw text), or None after ``timeout`` seconds."""
        end = time.monotonic() + max(timeout, 0.0)
        with self._store._errors("receive changes"):
            while True:
                now = time.monotonic()
                if self._ping_sent is not None and now - self._ping_sent > self._store.config.timeout:
                    raise StoreUnavailable(
                        f"redis at {self._store.where}: receive changes unavailable: "
                        f"no reply to keepalive PING within {self._store.config.timeout:g}s"
                    )
                if self._ping_sent is None and now - self._last_rx >= self._keepalive:
                    await self._pubsub.ping()
                    self._ping_sent = now
                if now >= end:
                    return None
                if self._ping_sent is not None:
                    wake = self._ping_sent + self._store.config.timeout
                else:
                    wake = self._last_rx + self._keepalive
                wait = max(0.0, min(end, wake) - now) + 0.001
                msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
                if msg is None:
                    continue
                self._heard()
                kind = msg.get("type")
                if kind == "pong":
                    self._ping_sent = None
                    if self._on_pong is not None:
                        self._on_pong()
                elif kind == "message":
                    return str(msg.get("data"))

    async def close(self) -> None:
        with suppress(Exception):
            await self._pubsub.aclose()


def describe_ages(state: DeploymentState, now: float) -> str:
    """One line for the debug log: the outage bookkeeping and each site's
    version, publish time (local clock) and age as of ``now``: what a reader
    judged staleness from, to tell after the fact why a site went stale."""
    sites = " ".join(
        f"{name}(v{s.version} at {s.published_at - state.clock_offset:.3f} age {state.site_age(name, now):.3f})"
        for name, s in sorted(state.sites.items())
    )
    return (f"now {now:.3f} version {state.version} offset {state.clock_offset:+.4f} "
            f"frozen_at {state.frozen_at} paused {state.paused} sites {sites or '-'}")


OnChange = Callable[[DeploymentState], "Awaitable[None] | None"]

BACKOFF_MIN = 0.1
# Low on purpose: with Sentinel a follower must find the promoted replica
# within the failover time plus one attempt (issue 15 C: at 5 s dnsfront
# reloaded up to 3 s after the promotion). Jittered, a thousand followers
# are at most ~2,000 connection attempts a second against a Redis that is
# down, which neither Redis nor Sentinel notice.
BACKOFF_MAX = 1.0


class StateFollower:
    """Keeps ``state`` equal to what is in Redis, for a reader.

    Start: subscribe, then a full load (subscribing first means no change can
    slip between the two). Then each change message loads just the item it
    names, and a full resync every ``resync_interval`` repairs anything a lost
    message missed. On any failure the last good state is kept (frozen: see
    ``DeploymentState.frozen_at``), ``connected`` turns False, the outage is
    logged once, and the follower reconnects with jittered exponential
    backoff, starting over with a full load.

    ``on_change`` is called (and awaited if it returns an awaitable) with every
    new state; its exceptions are logged, never propagated.
    """

    def __init__(
        self,
        config: RedisConfig,
        on_change: OnChange | None = None,
        *,
        store_factory: Callable[[], RedisStore] | None = None,
        resync_interval: float | None = None,
        keepalive: float = 1.0,
        answers_only: bool = False,
        overrides_only: bool = False,
        only_sites: frozenset[str] | None = None,
    ):
        self.config = config
        self._on_change = on_change
        self._factory = store_factory or (lambda: RedisStore(config))
        self.resync_interval = config.resync_interval if resync_interval is None else resync_interval
        self.keepalive = keepalive
        self.answers_only = answers_only
        """The reader needs only what answers depend on (dnsfront): a site message
        whose digest equals the held document's advances its stamps without a
        fetch, so the held counters, rates and real servers may be older than
        the version says (until the next answer-relevant change or resync)."""
        self.overrides_only = overrides_only
        """The reader needs only overrides (the director): site messages are
        ignored and full loads leave sites out, so ``state.sites`` stays empty.
        Without it a director fetched and decoded its own snapshot after each
        of its publications."""
        self.only_sites = only_sites
        """With ``overrides_only`` off: follow only these sites' snapshots (a
        director that spills follows its spill targets, never itself); None = all."""
        self.state = DeploymentState()
        """Empty until the first load: dnsfront then answers from configured weights."""
        self.connected = False
        self.last_sync: float | None = None
        """Local time of the last successful full load."""
        self.last_error: str | None = None
        """The most recent failure (kept after recovery, for /status)."""
        self.full_loads = 0
        self.changes_applied = 0
        self.fetches_skipped = 0
        """Site changes applied from the message alone (``answers_only``)."""
        self._digests: dict[str, tuple[SiteSnapshot, str]] = {}
        """Per site: the held snapshot object and its ``answer_digest``."""
        self.keepalives_answered = 0
        """Keepalive PINGs Redis answered on the changes channel (a quiet, healthy
        connection counts up here while ``full_loads`` stays put)."""
        self._task: asyncio.Task[None] | None = None
        self._outage_since: float | None = None
        self._outage_logged = False
        self._last_contact: float | None = None
        self._synced = asyncio.Event()

    # -- lifecycle

    async def start(self) -> None:
        """Start following in a background task (returns at once)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="glb-state-follower")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait([task])
        self.connected = False

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until a full load has succeeded; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def __aenter__(self) -> StateFollower:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the loop

    async def _run(self) -> None:
        delay = BACKOFF_MIN
        while True:
            loads_before = self.full_loads
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except StoreError as e:
                await self._failed(str(e))
            except Exception as e:  # a bug must not stop the follower for good
                log.exception("state follower: unexpected error")
                await self._failed(f"unexpected error: {_one_line(e)}")
            if self.full_loads != loads_before:
                delay = BACKOFF_MIN  # the session worked for a while: start backoff over
            # Jitter spreads the reconnects of many followers after an outage.
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _session(self) -> None:
        store = self._factory()
        sub: Subscription | None = None
        try:
            sub = await store.subscribe(self.keepalive, self._pong)
            await self._full_load(store)
            next_resync = time.monotonic() + self.resync_interval
            while True:
                text = await sub.get(max(0.0, next_resync - time.monotonic()))
                self._last_contact = max(self._last_contact or 0.0, sub.last_contact)
                if text is not None:
                    await self._apply(store, text)
                if time.monotonic() >= next_resync:
                    await self._full_load(store)
                    next_resync = time.monotonic() + self.resync_interval
        finally:
            if sub is not None:
                await sub.close()
            await store.close()

    def _pong(self) -> None:
        self.keepalives_answered += 1

    async def _full_load(self, store: RedisStore) -> None:
        # Replace wholesale, never merge: after a Redis restart or failover
        # versions may start over, and a merge would keep ghosts. Only the
        # outage is carried over, so it does not age what was published before it.
        loaded = await store.load(sites=not self.overrides_only)
        now = time.time()  # after the load: the outage lasted until the state was in hand
        state = loaded.resumed(self.state, now)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("state follower: full load from %s: %s", store.where, describe_ages(state, now))
        await self._set_state(state)
        self.last_sync = self._last_contact = time.time()
        self.full_loads += 1
        if not self.connected:
            self.connected = True
            if self._outage_since is not None:
                log.info(
                    "state follower: reconnected to redis at %s after %.1fs; %d sites",
                    store.where, time.time() - self._outage_since, len(state.sites),
                )
            self._outage_since = None
            self._outage_logged = False
        self._synced.set()

    async def _apply(self, store: RedisStore, text: str) -> None:
        try:
            change = parse_change(text)
        except StateError as e:
            log.warning("state follower: ignoring %s", e)
            return
        state = self.state
        try:
            if change.kind == "site":
                if self.overrides_only or (self.only_sites is not None and change.name not in self.only_sites):
                    return
                held = state.sites.get(change.name)
                if held is not None and held.version >= change.version:
                    return  # already have it (or newer) from a full load
                snap = self._restamped(held, change)
                if snap is None:
                    snap = await store.load_site(change.name)
                else:
                    self.fetches_skipped += 1
                if snap is None:
                    self._digests.pop(change.name, None)
                    new = state.without_site(change.name, change.version)
                else:
                    new = state.with_site(snap)
            else:
                ov = await store.load_override(change.name)
                if ov is None:
                    new = state.without_override(change.name, change.version)
                else:
                    new = state.with_override(ov, change.version)
        except StateError as e:
            # Keep the previous good document; a stale site goes down on its own.
            log.warning("state follower: keeping previous %s %r: %s", change.kind, change.name, e)
            return
        self.changes_applied += 1
        await self._set_state(new)

    def _restamped(self, held: SiteSnapshot | None, change: Change) -> SiteSnapshot | None:
        """``held`` with the change's stamps, if an answers-only reader may skip
        the fetch (same digest); None when the document must be loaded."""
        if not self.answers_only or held is None or change.digest is None or change.published_at is None:
            return None
        cached = self._digests.get(held.site)
        digest = cached[1] if cached is not None and cached[0] is held else answer_digest(held)
        if digest != change.digest:
            return None
        snap = replace(held, version=change.version, published_at=change.published_at)
        self._digests[held.site] = (snap, digest)
        return snap

    async def _set_state(self, new: DeploymentState) -> None:
        if new is self.state:
            return
        self.state = new
        if self._on_change is None:
            return
        try:
            # Awaited in line, so callbacks see states in order; a callback
            # should therefore be quick (swap a reference, recompute answers).
            result = self._on_change(new)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("state follower: on_change callback failed")

    async def _failed(self, message: str) -> None:
        self.last_error = message
        if self._outage_since is None:
            self._outage_since = time.time()
        if not self._outage_logged:
            log.warning(
                "state follower: %s; keeping last good state (%d sites), retrying",
                message, len(self.state.sites),
            )
            self._outage_logged = True
        else:
            log.debug("state follower: still failing: %s", message)
        if self.connected:
            self.connected = False
            frozen = self.state.frozen(self._last_contact or time.time())
            if log.isEnabledFor(logging.DEBUG):
                log.debug("state follower: lost redis, ages frozen: %s", describe_ages(frozen, time.time()))
            await self._set_state(frozen)
