"""The director process: health checker + publisher + status server for one site.

``run(config_path, site, log_level)`` is what ``glb director --config FILE
--site NAME`` calls. It wires the pieces together and handles signals:

* SIGTERM / SIGINT: stop probing, publish the site as withdrawn (so DNS moves
  clients away at once), close everything, return 0. A member of a director
  pair hands over instead (priority 0) while a healthy standby is there.
* SIGHUP: re-read the config. Real servers added, removed or reweighted take
  effect; servers that stay keep their health state, counters, overrides and
  probe cadence, so a reload never flaps the pool (keepalived #1228, #187). A
  config that does not load is logged and the running one kept.

Data flow: ``Checker`` -> probe results -> ``HealthTable`` (pure) ->
transitions -> log + metrics + ``Publisher.poke()``; the publisher builds
snapshots with ``director.control.site.build_snapshot``. Operator overrides (drain,
weight) are followed from Redis with ``glb.store.StateFollower`` and applied
to the table, so they survive director restarts.

Cross-site spill (``director.control.spill``, docs/director.md): the same
follower's state carries the other sites' snapshots; ``SpillBook`` decides,
after each transition, each state change and on a short tick (hysteresis
and staleness move with time alone), which services spill where, and a
changed decision is a new plan and a publication.

The packet path (``director.dataplane.packetpath.PacketPath``: neighbours,
VIP ownership, the engine's worker processes) follows the health table:
every decision (a transition, an override, a reload) calls
``PacketPath.apply``, which rebuilds a ``forwarder.Plan`` (coalesced) and
hands the whole plan to the engine; a real server's MAC learnt or lost does
the same from inside. The engine reports its counters back twice a second;
``Director.counters`` / ``Director.vip_counters`` / ``Director.packet_stats``
serve them to the snapshot, /status and /metrics. A director on ``lo`` runs
the control plane only: loopback carries no client traffic.

A site with ``director.pair`` runs this director as one member
(``glb director --id``, director/control/pair.py, docs/ha.md): the packet
path starts without the VIPs, VRRP decides who owns them, only the master
publishes, and connection sync runs between the members' packet workers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from glb import config as glbconfig
from glb.aio import cancel_and_wait
from glb.http import Served, serve
from glb.config import Config, Site
from glb.errors import DirectorError, GLBError
from glb.state import DeploymentState, PairMemberState, SiteSnapshot
from glb.store import RedisStore, StateFollower
from director.control.checker import Checker, Target, targets
from director.dataplane.forwarder import Plan, build_plan
from director.dataplane.packetpath import PacketPath
from director.control.health import ADMIN_DRAIN, ADMIN_NONE, HealthTable, ServerKey, Transition
from director.control.pair import YIELD_GRACE, PairMember
from director.control.probes import Probe, ProbeResult, Prober
from director.control.placement import Placement, apply_control, available, place, restore
from director.control.publisher import Publisher
from director.control.site import ServerCounters, SnapshotCache, VipCounters, build_snapshot
from director.control.spill import Spill, SpillBook, spill_document, spilling
from director.control.status import DirectorMetrics, make_app

if TYPE_CHECKING:
    from director.control.admin_api import AdminAPI

log = logging.getLogger("glb.director")

SPILL_TICK = 0.25
"""Seconds between spill re-evaluations with nothing else happening (a target going stale)."""
HANDOVER_FLUSH = 1.0
"""Seconds a master stopping cleanly waits, in each of its two steps, for its flows to go to its standby."""


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
        packet_path: bool | None = None,
        member: str | None = None,
        pair_channels: Mapping[str, Callable] | None = None,
    ):
        """``member``: which member of the site's director pair this is (``glb director --id``);
        ``pair_channels``: the pair's channel factories (tests: a MemoryLAN's), see director.control.pair."""
        self.config = config
        self.site_name = site_name
        self.config_path = config_path or config.source
        site = find_site(config, site_name)
        self._clock = clock
        self.member = pair_member_id(site, member)
        self.director_id = self.member or site.director.id or socket.gethostname()
        self._pair_channels = dict(pair_channels or {})
        self.pair: PairMember | None = None
        """This director's membership of the site's pair (None: one director)."""
        self.started_at = clock()
        self.table = HealthTable(site, self.started_at)
        self._snapshots = SnapshotCache()
        self._prober = Prober() if probe is None else None
        self.checker = Checker(probe or self._prober, self._on_results, site.director.max_probes)
        self.store = RedisStore(config.redis)
        self.publisher = Publisher(self.store, self._build, site.director.heartbeat)
        self.follower = StateFollower(config.redis, self._on_state)
        self._follow(site)
        self.metrics = DirectorMetrics(self)
        self.status_port: int | None = None
        self._served: Served | None = None
        self.admin_api: AdminAPI | None = None
        self._overrides = DeploymentState()
        self._reload_lock = asyncio.Lock()
        self._started = False
        # The packet path (None = control plane only, until start decides).
        self._packet_path_wanted = packet_path
        self.packet_path: PacketPath | None = None
        self.placement = Placement((), (), "not started")
        self._affinity_before: frozenset[int] | None = None
        self.spills = SpillBook()
        self.spilling: dict[str, Spill | None] = {}
        """Service -> where its new connections spill now, or the standby target (``active`` False), or None."""
        self._spill_tick: asyncio.Task | None = None
        self._yielding: asyncio.Future | None = None
        self._stopping = False
        """A master that left Master sending its last flows (:meth:`_yield_flows`)."""

    # -- what the packet path reports (StatusSource)

    def counters(self) -> Mapping[ServerKey, ServerCounters]:
        return self.packet_path.counters() if self.packet_path is not None else {}

    def vip_counters(self) -> Mapping[str, VipCounters]:
        return self.packet_path.vip_counters() if self.packet_path is not None else {}

    def packet_stats(self):
        """The engine's merged EngineStats, or None without a packet path."""
        return self.packet_path.stats() if self.packet_path is not None else None

    def packet_loop(self) -> str | None:
        """'c' or 'python': what forwards established DR flows; None without a packet path."""
        if self.packet_path is None:
            return None
        from director.dataplane.engine import LOOP
        return LOOP

    def packet_workers(self) -> list:
        """(pid or None while it restarts, EngineStats, restarts) of each packet worker; empty without a packet path."""
        return self.packet_path.worker_stats() if self.packet_path is not None else []

    def packet_plan(self) -> tuple[int, int, dict[str, bytes | None]]:
        """(plan generation sent, generation every worker applied, address -> next-hop MAC)."""
        return self.packet_path.plan_state() if self.packet_path is not None else (0, 0, {})

    def pair_status(self) -> dict | None:
        """The pair as this member sees it, with what its packet workers applied from sync (/status)."""
        if self.pair is None:
            return None
        doc = self.pair.status()
        stats = self.packet_stats()
        doc["counters"]["sync_received"] = dict(stats.sync) if stats is not None else {}
        return doc

    def site_drained(self) -> bool:
        return self._overrides.is_drained(self.site_name)

    def spill_status(self, service: str) -> dict | None:
        """The service's spill for /status (None: it has none configured)."""
        svc = self.table.site.service(service)
        if svc is None or svc.spill is None:
            return None
        return spill_document(svc, self.spilling.get(service), self.spills.triggered(service), self.counters())

    # -- lifecycle

    async def start(self) -> None:
        site = self.table.site
        # Admin credentials first: a bad tokens file or certificate binds nothing.
        self.admin_api = self._make_admin_api()
        # Bind first: a port clash is the one startup error worth failing on;
        # Redis being down is not (we keep serving and publish when it returns).
        app = make_app(self, self.metrics)
        self._served = await serve(app, site.director.status_listen, what="/status", error=DirectorError)
        self.status_port = self._served.port
        if self.admin_api is not None and site.director.admin_listen is not None:
            await self.admin_api.start(site.director.admin_listen)
        # Placement before anything that starts threads or processes (they inherit it).
        self.placement = place(available(), site.director.probe_cpus, self._wants_packet_path())
        self._affinity_before = apply_control(self.placement)
        log.info("placement: %s", self.placement.why)
        # Then the packet path: a missing interface or privilege is a startup error too.
        await self._start_packet_path()
        if self.member is not None:
            await self._start_pair()
        self._started = True
        self._stopping = False
        self.publisher.start()
        self.checker.update(targets(site))
        await self.follower.start()
        self._spill_tick = asyncio.create_task(self._spill_ticker())
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
        self._stopping = True
        await self.checker.stop()
        if self._yielding is not None:
            await cancel_and_wait([self._yielding])
            self._yielding = None
        if self._spill_tick is not None:
            await cancel_and_wait([self._spill_tick])
            self._spill_tick = None
        await self.follower.stop()
        withdraw = self._started
        if self.pair is not None:
            # A master whose standby is there hands over (priority 0): withdrawing would take
            # the site out of DNS for nothing. A backup never speaks for the site.
            handover = self.pair.master and self.pair.standby_present()
            withdraw = withdraw and self.pair.master and not handover
            if handover:
                log.info("stopping: handing site %s over to the standby", self.site_name)
                await self._hand_over_flows()
            await self.pair.stop()
            self.pair = None
        await self._stop_packet_path()
        restore(self._affinity_before)
        self._affinity_before = None
        if withdraw:
            log.info("stopping: withdrawing site %s", self.site_name)
        await self.publisher.stop(withdraw=withdraw)
        self._started = False
        if self._served is not None:
            await self._served.close()
            self._served = None
        if self.admin_api is not None:
            await self.admin_api.stop()
            self.admin_api = None
        if self._prober is not None:
            await self._prober.close()
        await self.store.close()

    async def reload(self) -> bool:
        """Re-read the config file (SIGHUP); keep running on any error."""
        async with self._reload_lock:
            try:
                config = glbconfig.load(self.config_path)
                site = find_site(config, self.site_name)
            except GLBError as e:  # ConfigError included: its problems, one line
                log.error("reload failed, keeping the running config: %s", "; ".join(str(e).splitlines()))
                return False
            old = self.table.site.director
            new = site.director
            for field in ("status_listen", "admin_listen", "max_probes", "probe_cpus", "interface", "address",
                          "address6", "connection_table", "packet", "pair", "lan"):
                if getattr(old, field) != getattr(new, field):
                    log.warning("reload: director.%s changed; it takes effect on restart", field)
            if config.redis != self.config.redis:
                log.warning("reload: redis settings changed; they take effect on restart")
            self.config = config
            if self.admin_api is not None:
                self.admin_api.reload(config.admin)
            self.publisher.heartbeat = new.heartbeat
            self.director_id = self.member or new.id or socket.gethostname()
            now = self._clock()
            self._follow(site)  # a reload may add or drop spill targets (their snapshots come at the next resync)
            self._changed(self.table.reconfigure(site, now))
            self._apply_overrides(now)  # servers added by the reload may have overrides
            self.checker.update(targets(site))
            self._update_spill()
            self.publisher.poke()  # weights may have changed without any state change
            self._plan_dirty()
            log.info("reloaded %s: %d real servers", self.config_path, len(self.table))
            return True

    def _make_admin_api(self) -> AdminAPI | None:
        """The admin API (its tokens and certificate loaded), when the site's director has a listener for it."""
        if self.table.site.director.admin_listen is None:
            return None
        from director.control.admin_api import AdminAPI  # only directors that serve one pay its import

        return AdminAPI.create(self, self.store, self.config.admin)

    # -- callbacks

    def _build(self, withdrawn: bool) -> SiteSnapshot:
        return build_snapshot(self.table, self.director_id, self._clock(), self.counters(), withdrawn=withdrawn,
                              pair=self._pair_state(), cache=self._snapshots, spills=self.spilling)

    def _on_results(self, batch: list[tuple[Target, ProbeResult]]) -> None:
        """A loop turn's probe results (``Checker``): one clock read, one table call."""
        self.metrics.observe_checks(batch)
        transitions = self.table.record_many(((t.key, r.ok, r.detail, r.latency) for t, r in batch), self._clock())
        self._changed(transitions)
        if transitions:  # only a state change can change what the packet path does
            self._update_spill()
            self._plan_dirty()

    def _on_state(self, state: DeploymentState) -> None:
        # The follower reports every change in Redis, including each of our
        # own publications: react to overrides only, or every publish would
        # trigger the next one.
        previous, self._overrides = self._overrides, state
        self._update_spill()  # the spill targets' snapshots are in it
        if state.overrides == previous.overrides:
            return
        if self._apply_overrides(self._clock()):
            self.publisher.poke()
            self._plan_dirty()

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


    # -- the pair (director/control/pair.py, docs/ha.md)

    async def _start_pair(self) -> None:
        site = self.table.site
        pair = site.director.pair
        vips = [v.address for svc in site.services for v in svc.vips]
        self.pair = PairMember(pair, self.member, vips, site.director.interface, on_role=self._on_role,
                               apply=self._sync_apply, healthy=self._can_take_over, on_joined=self._sync_all,
                               on_reclaim=self._reclaim,
                               **self._pair_channels)
        self.publisher.enable(False)  # until elected: a backup does not publish
        if self.packet_path is not None and self.packet_path.engine is not None:
            self.packet_path.engine.on_sync = self.pair.changes
        try:
            await self.pair.start()
        except GLBError as e:
            raise DirectorError(f"director pair: {e}") from None

    def _on_role(self, master: bool) -> None:
        if self.packet_path is not None:
            self.packet_path.set_owned(master)
            if self.packet_path.engine is not None and self.table.site.director.pair.sync.enabled:
                if master:
                    self.packet_path.engine.sync_send(True)
                elif self._stopping or self.pair is None:  # a clean stop handed its flows over already
                    self.packet_path.engine.sync_send(False)
                elif self._yielding is None or self._yielding.done():
                    self._yielding = asyncio.ensure_future(self._yield_flows())
        self.publisher.enable(master)
        self.metrics.observe_role(master)

    async def _yield_flows(self) -> None:
        """A master that left Master (a preempting member's advertisement, a split brain resolved)
        sends the flows its workers filed before it stops sending: the new master applies them for
        pair.YIELD_GRACE (else it knows none of the connections confirmed in the last sync tick, ~20 ms,
        and drops their next packets as unknown mid-stream ones). The VIPs went first (set_owned), so
        nothing more is confirmed here; what was on its way is not lost."""
        pp, pair = self.packet_path, self.pair
        try:
            deadline = time.monotonic() + YIELD_GRACE / 2
            mark = pp.engine.sync_flush()
            while not pp.engine.sync_flushed(mark) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            if not await pair.flush(max(0.0, deadline - time.monotonic())):
                log.warning("left master: connection sync did not reach the new master within %.1fs; "
                            "flows not sent are lost", YIELD_GRACE / 2)
        finally:
            if not pair.master and pp.engine is not None:  # not master again meanwhile
                pp.engine.sync_send(False)

    async def _hand_over_flows(self) -> None:
        """A master stopping cleanly: every flow it confirmed reaches its standby before the priority 0.

        The workers file a confirmed flow and send it up at their next tick; the sync link sends
        it as the rate allows. Stopping the link at once lost what was on the way: the flows
        made in the last moments, which the standby, once master, drops as unknown mid-stream
        packets. So: everything filed goes now, while still forwarding; then the VIPs are
        released (nothing more is confirmed) and what the last moments filed goes too. The
        standby applies it before the priority 0 makes it master (the same pipe to its workers)."""
        pp = self.packet_path
        if pp is None or pp.engine is None or not self.table.site.director.pair.sync.enabled:
            return
        for release in (False, True):
            if release:
                pp.set_owned(False)
            deadline = time.monotonic() + HANDOVER_FLUSH
            mark = pp.engine.sync_flush()
            while not pp.engine.sync_flushed(mark) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            if not await self.pair.flush(max(0.0, deadline - time.monotonic())):
                log.warning("stopping: connection sync did not reach the standby within %.1fs; "
                            "flows not sent are lost at the handover", HANDOVER_FLUSH)
                return

    def _reclaim(self) -> None:
        """VRRP heard a lower-priority master (it took the VIPs for a moment): announce them again."""
        if self.packet_path is not None:
            self.packet_path.announce_again()

    def _sync_apply(self, datagram: bytes, sender) -> None:
        if self.packet_path is not None and self.packet_path.engine is not None:
            self.packet_path.engine.sync_apply(datagram, sender)

    def _sync_all(self, member: str) -> None:
        if self.packet_path is not None and self.packet_path.engine is not None:
            log.info("pair member %s joined: sending it the whole connection table", member)
            self.packet_path.engine.sync_all()

    def _can_take_over(self) -> bool:
        """What a hello says: the packet path runs (or none is wanted) and every service has a server up."""
        if self.packet_path is not None and (self.packet_path.engine is None or self.packet_path.engine.failed):
            return False
        return all(s.up for s in self.table.services())

    def _pair_state(self) -> tuple[PairMemberState, ...]:
        if self.pair is None:
            return ()
        return tuple(PairMemberState(m["id"], m["role"], m["present"], m["healthy"], m["last_heard"])
                     for m in self.pair.members())

    # -- cross-site spill

    def _update_spill(self) -> None:
        """Decide spill again; a changed decision is a new plan and a publication."""
        site = self.table.site
        if not any(svc.spill is not None for svc in site.services) and not self.spilling:
            return
        health = {sh.name: sh for sh in self.table.services()}
        decided = self.spills.decide(site.services, health, self._overrides, self._clock(),
                                     self.config.redis.stale_after)
        self._arm_spill()
        if decided == self.spilling:
            return
        for name, decision in decided.items():
            spill, was = spilling(decision), spilling(self.spilling.get(name))
            if spill == was:
                continue
            if spill is None and self.spills.triggered(name):
                log.warning("service %s: no site of %s can take spilled connections now (%s stale, withdrawn, "
                            "drained, spilling or without an up server): new connections are dropped",
                            name, list(site.service(name).spill.to), was.site if was else "-")
            elif spill is None:
                log.warning("service %s: new connections stay at %s again (no longer spilling to %s)",
                            name, self.site_name, was.site if was else "-")
            elif was is None or was.site != spill.site:
                log.warning("service %s: spilling new connections to site %s (%d real servers)",
                            name, spill.site, len(spill.servers))
        self.spilling = decided
        self.publisher.poke()
        self._plan_dirty()

    def _arm_spill(self) -> None:
        """Tell the packet workers when each service spills (``SpillBook.armed_at``) through their
        spill flags: shared memory they read with each new connection, so the switch to a standby
        target does not wait for the plan built and sent after this (docs/director.md)."""
        if self.packet_path is None:
            return
        now, mono = self._clock(), time.monotonic()
        for svc in self.table.site.services:
            if svc.spill is not None:
                at = self.spills.armed_at(svc)
                self.packet_path.arm_spill(svc.name, None if at is None else mono + (at - now))

    async def _spill_ticker(self) -> None:
        """Time alone ends a hysteresis hold or makes a spill target stale: look again, often enough."""
        while True:
            delay = SPILL_TICK
            due = self.spills.next_change(self.table.site.services)
            if due is not None:
                delay = min(delay, max(0.0, due - self._clock()))
            await asyncio.sleep(delay)
            self._update_spill()

    # -- the packet path

    def _wants_packet_path(self) -> bool:
        if self._packet_path_wanted is not None:
            return self._packet_path_wanted
        return self.table.site.director.interface != "lo"

    def _build_plan(self, mac: bytes, neighbours: Mapping[bytes, bytes | None], mtu: int) -> Plan:
        return build_plan(self._forwarding_site(), self.table.services(), mac, dict(neighbours), mtu, self.spilling)

    def _follow(self, site: Site) -> None:
        """Which snapshots the state follower fetches: only the spill targets' (a director needs
        overrides, and other sites' snapshots only to spill to them; never its own)."""
        targets = frozenset(t for svc in site.services if svc.spill is not None for t in svc.spill.to)
        self.follower.overrides_only = not targets
        self.follower.only_sites = targets or None

    def _forwarding_site(self) -> Site:
        """The site as this director forwards for it: a pair member without ``director.address``
        tunnels (TUN, spill) from its own address on the LAN (glb.config checks each member has one)."""
        site = self.table.site
        d = site.director
        if self.member is None or d.address is not None or d.pair is None:
            return site
        own = d.pair.member(self.member)
        if own is None or own.address.version != 4:
            return site
        return dataclasses.replace(site, director=dataclasses.replace(d, address=own.address))

    async def _start_packet_path(self) -> None:
        from director.dataplane.engine import LOOP, EngineConfig

        site = self.table.site
        iface = site.director.interface
        if not self._wants_packet_path():
            log.info("interface %s: packet path off (control plane only)", iface)
            return
        pp = site.director.packet
        pair = site.director.pair
        extra = {}
        if pair is not None:  # a pair member starts as a standby; VRRP decides
            extra = dict(sync_id=pair.virtual_router_id if pair.sync.enabled else 0, announce=announce_offsets(pair))
        path = PacketPath(iface, EngineConfig(iface, frames=pp.ring_frames, workers=pp.workers, busy_poll=pp.busy_poll,
                                              dataplane=pp.dataplane, cpus=self.placement.packet, pin_dir=self._pin_dir(),
                                              lan_interface=site.director.lan_interface,
                                              conntable=site.director.connection_table, **extra), self._build_plan,
                          owned=pair is None)
        try:
            await path.start()
        except BaseException:
            await path.stop()
            raise
        self.packet_path = path
        if LOOP != "c":
            log.warning("director.dataplane._fastpath is not built (no compiler when GLB was installed?): established "
                        "flows take the Python loop, about 0.8x the packets per second")

    def _pin_dir(self) -> str:
        """Where the kernel data plane pins its maps: one directory per site and director."""
        root = self.table.site.director.packet.bpf_pin_root
        return f"{root.rstrip('/')}/{self.site_name}-{self.director_id}" if root else ""

    async def _stop_packet_path(self) -> None:
        if self.packet_path is not None:
            await self.packet_path.stop()
            self.packet_path = None

    def _plan_dirty(self) -> None:
        if self.packet_path is not None:
            self.packet_path.apply()


def pair_member_id(site: Site, member: str | None) -> str | None:
    """Which member of ``site``'s pair this director is (None: the site has no pair); DirectorError if unclear."""
    pair = site.director.pair
    if pair is None:
        if member is not None:
            raise DirectorError(f"site {site.name} has one director (no director.pair): --id {member} names no member")
        return None
    names = ", ".join(m.id for m in pair.members)
    member = member or site.director.id
    if member is None:
        raise DirectorError(f"site {site.name} has a director pair ({names}): say which member this is with --id")
    if pair.member(member) is None:
        raise DirectorError(f"site {site.name}: --id {member} is not a member of its director pair ({names})")
    return member


def announce_offsets(pair) -> tuple[float, ...]:
    """When a pair member announces the VIPs after taking them: a burst at once and
    again after ``garp_master_delay`` (keepalived's garp_master_delay / garp_master_repeat)."""
    return (0.0,) * pair.garp_master_repeat + (pair.garp_master_delay,) * pair.garp_master_repeat


async def serve_director(config_path: str, site_name: str, *, ready: Callable[[Director], None] | None = None,
                         member: str | None = None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads. Returns the exit status."""
    config = glbconfig.load(config_path)
    director = Director(config, site_name, config_path=config_path, member=member)
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
        log.info("stopping: site %s", site_name)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for task in list(reloads):
            task.cancel()
        await director.stop()
    return 0


def run(config_path: str, site: str, log_level: str = "info", member: str | None = None) -> int:
    """Entry point for ``glb director``. Raises GLBError subclasses with one-line messages."""
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise DirectorError(f"unknown log level {log_level!r}")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("glb").setLevel(level)
    return asyncio.run(serve_director(config_path, site, member=member))
