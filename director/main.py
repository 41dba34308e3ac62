"""The director process: health checker + publisher + status server for one site.

``run(config_path, site, log_level)`` is what ``glb director --config FILE
--site NAME`` calls. It wires the pieces together and handles signals:

* SIGTERM / SIGINT: stop probing, publish the site as withdrawn (so DNS moves
  clients away at once), close everything, return 0.
* SIGHUP: re-read the config. Real servers added, removed or reweighted take
  effect; servers that stay keep their health state, counters, overrides and
  probe cadence, so a reload never flaps the pool (keepalived #1228, #187). A
  config that does not load is logged and the running one kept.

Data flow: ``Checker`` -> probe results -> ``HealthTable`` (pure) ->
transitions -> log + metrics + ``Publisher.poke()``; the publisher builds
snapshots with ``director.site.build_snapshot``. Operator overrides (drain,
weight) are followed from Redis with ``glb.store.StateFollower`` and applied
to the table, so they survive director restarts.

The packet path plugs in later through ``Director.counters`` /
``Director.vip_counters`` (traffic it reports) and ``Director.table`` (the
decisions it schedules by).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Callable, Mapping

from glb import config as glbconfig
from glb.config import Config, Site
from glb.errors import ConfigError, DirectorError, GLBError
from glb.state import DeploymentState, SiteSnapshot
from glb.store import RedisStore, StateFollower
from director.checker import Checker, Target, targets
from director.health import ADMIN_DRAIN, ADMIN_NONE, HealthTable, ServerKey, Transition
from director.probes import Probe, ProbeResult, Prober
from director.publisher import Publisher
from director.site import ServerCounters, VipCounters, build_snapshot
from director.status import DirectorMetrics, bound_port, make_app, serve

log = logging.getLogger("glb.director")


def find_site(config: Config, name: str) -> Site:
    site = config.site(name)
    if site is None:
        known = ", ".join(s.name for s in config.sites) or "none"
        raise DirectorError(f"{config.source}: no site {name!r} (sites: {known})")
    return site


class Director:
    """One site's control plane. ``start()``, then ``reload()`` as needed, then ``stop()``."""

    def __init__(
        self,
        config: Config,
        site_name: str,
        *,
        config_path: str | None = None,
        probe: Probe | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.config = config
        self.site_name = site_name
        self.config_path = config_path or config.source
        site = find_site(config, site_name)
        self._clock = clock
        self.director_id = site.director.id or socket.gethostname()
        self.started_at = clock()
        self.table = HealthTable(site, self.started_at)
        self._prober = Prober() if probe is None else None
        self.checker = Checker(probe or self._prober, self._on_result, site.director.max_probes)
        self.store = RedisStore(config.redis)
        self.publisher = Publisher(self.store, self._build, site.director.heartbeat)
        self.follower = StateFollower(config.redis, self._on_state)
        self.metrics = DirectorMetrics(self)
        self.status_port: int | None = None
        self._runner = None
        self._overrides = DeploymentState()
        self._reload_lock = asyncio.Lock()
        self._started = False

    # -- what the packet path will provide (zeros until it exists)

    def counters(self) -> Mapping[ServerKey, ServerCounters]:
        return {}

    def vip_counters(self) -> Mapping[str, VipCounters]:
        return {}

    def site_drained(self) -> bool:
        return self._overrides.is_drained(self.site_name)

    # -- lifecycle

    async def start(self) -> None:
        site = self.table.site
        # Bind first: a port clash is the one startup error worth failing on;
        # Redis being down is not (we keep serving and publish when it returns).
        app = make_app(self, self.metrics, admin_token=self.config.admin.token, store=self.store)
        self._runner = await serve(app, site.director.status_listen)
        self.status_port = bound_port(self._runner)
        self._started = True
        self.publisher.start()
        self.checker.update(targets(site))
        await self.follower.start()
        log.info(
            "director %s for site %s: %d services, %d real servers, status on %s:%d",
            self.director_id, site.name, len(site.services), len(self.table),
            site.director.status_listen.host, self.status_port,
        )

    async def stop(self) -> None:
        """Stop probing, withdraw the site, close everything.

        A director that never started does not withdraw: its start most
        likely failed because another director for the site is running.
        """
        await self.checker.stop()
        await self.follower.stop()
        await self.publisher.stop(withdraw=self._started)
        self._started = False
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._prober is not None:
            await self._prober.close()
        await self.store.close()

    async def reload(self) -> bool:
        """Re-read the config file (SIGHUP); keep running on any error."""
        async with self._reload_lock:
            try:
                config = glbconfig.load(self.config_path)
                site = find_site(config, self.site_name)
            except ConfigError as e:
                log.error("reload failed, keeping the running config: %s", "; ".join(e.problems))
                return False
            except GLBError as e:
                log.error("reload failed, keeping the running config: %s", e)
                return False
            old = self.table.site.director
            new = site.director
            for field in ("status_listen", "max_probes", "interface", "address", "address6"):
                if getattr(old, field) != getattr(new, field):
                    log.warning("reload: director.%s changed; it takes effect on restart", field)
            if config.redis != self.config.redis:
                log.warning("reload: redis settings changed; they take effect on restart")
            self.config = config
            self.publisher.heartbeat = new.heartbeat
            self.director_id = new.id or socket.gethostname()
            now = self._clock()
            self._changed(self.table.reconfigure(site, now))
            self._apply_overrides(now)  # servers added by the reload may have overrides
            self.checker.update(targets(site))
            self.publisher.poke()  # weights may have changed without any state change
            log.info("reloaded %s: %d real servers", self.config_path, len(self.table))
            return True

    # -- callbacks

    def _build(self, withdrawn: bool) -> SiteSnapshot:
        return build_snapshot(self.table, self.director_id, self._clock(), self.counters(), withdrawn=withdrawn)

    def _on_result(self, target: Target, result: ProbeResult) -> None:
        self.metrics.observe_check(target, result)
        self._changed(self.table.record(target.key, result.ok, result.detail, self._clock(), result.latency))

    def _on_state(self, state: DeploymentState) -> None:
        # The follower reports every change in Redis, including each of our
        # own publications: react to overrides only, or every publish would
        # trigger the next one.
        previous, self._overrides = self._overrides, state
        if state.overrides == previous.overrides:
            return
        if self._apply_overrides(self._clock()):
            self.publisher.poke()

    def _apply_overrides(self, now: float) -> bool:
        """Bring every server's admin mode and weight override in line with
        Redis; True if anything changed (a weight alone changes the snapshot)."""
        changed = False
        for key in self.table.keys():
            ov = self._overrides.server_override(self.site_name, key.service, key.address, key.port)
            admin = ADMIN_DRAIN if ov is not None and ov.drain else ADMIN_NONE
            weight = ov.weight if ov is not None else None
            current = self.table.server(key)
            if (current.admin, current.weight_override) != (admin, weight):
                changed = True
                who = f"override by {ov.who or 'unknown'}: {ov.why}" if ov is not None else "override cleared"
                self._changed(self.table.set_override(key, admin, weight, now, reason=who))
        return changed

    def _changed(self, transitions: list[Transition]) -> None:
        if not transitions:
            return
        for t in transitions:
            self.metrics.observe_transition(t)
            level = logging.WARNING if t.new in ("down", "removed") else logging.INFO
            log.log(level, "%s", t)
        self.publisher.poke()


async def serve_director(config_path: str, site_name: str, *, ready: Callable[[Director], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads. Returns the exit status."""
    config = glbconfig.load(config_path)
    director = Director(config, site_name, config_path=config_path)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        task = loop.create_task(director.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    try:
        await director.start()
    except BaseException:
        await director.stop()
        raise
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        if ready is not None:
            ready(director)
        await stop.wait()
        log.info("stopping: withdrawing site %s", site_name)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for task in list(reloads):
            task.cancel()
        await director.stop()
    return 0


def run(config_path: str, site: str, log_level: str = "info") -> int:
    """Entry point for ``glb director``. Raises GLBError subclasses with one-line messages."""
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise DirectorError(f"unknown log level {log_level!r}")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("glb").setLevel(level)
    return asyncio.run(serve_director(config_path, site))
