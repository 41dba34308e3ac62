"""A director as one member of an active/standby pair: VRRP election, connection sync, member hellos.

:class:`PairMember` wires the pair's existing cores for one director
(docs/ha.md): a :class:`~director.control.vrrp_speaker.Speaker` over the
VRRP channel, and a :class:`~director.control.sync_socket.SyncLink` over
the sync channel. It owns no packet path: the director passes callbacks.

* ``on_role(master)`` on every VRRP transition: True when this member
  became master (take the VIPs, send sync, publish), False when it left
  Master or never was (release the VIPs, apply sync, stop publishing).
* ``apply(datagram, sender)``: a sync datagram from the master, for the
  packet workers' tables (they decode it: the control plane never does
  per-flow work).
* ``healthy()``: whether this member could take over now; said in hellos.
* ``on_joined(member)``: the master heard a member that was absent: the
  workers tell their whole tables again (a fresh backup knows none of the
  flows established before it came, and they tell nothing more until they
  change).

:meth:`PairMember.changes` is what the workers report (records); the
:class:`~director.control.sync.SyncSender` rate-bounds them onto the LAN.

**Hellos.** VRRP backups are silent, so a master cannot know its standby
is there. Each member that is not master sends a
:class:`~director.control.sync.MemberRecord` (id, state, healthy) on the
sync channel every ``HELLO`` seconds, in a datagram of its own; the master
notes who it heard and when. A member not heard for three intervals is
absent. This is what the snapshot's ``pair`` and ``/status`` show.

The channels come from factories so tests run the whole thing on a
:class:`~director.control.datagram.MemoryLAN`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from director.control import sync
from director.control.datagram import Channel
from director.control.sync import MemberRecord, SyncSender
from director.control.sync_socket import SyncLink
from director.control.vrrp import Router, RouterConfig, State
from director.control.vrrp_packet import Address
from director.control.vrrp_speaker import Speaker
from glb.aio import cancel_and_wait

log = logging.getLogger("glb.director.pair")

HELLO = 1.0
"""Seconds between a non-master member's hellos."""
ABSENT_AFTER = 3
"""Hellos missed before a member counts as absent."""

YIELD_GRACE = 1.0
"""Seconds around a change of master for the flows the old one confirmed last: it still sends what its
workers filed (they flush as it yields), and the new master still applies what arrives."""

ROLES = {State.INITIALIZE: "init", State.BACKUP: "backup", State.MASTER: "master"}


@dataclass(frozen=True)
class Heard:
    """The last hello from a member."""

    record: MemberRecord
    at: float
    """Wall clock (what an operator reads)."""
    mono: float


def vrrp_channel(interface: str, address: Address) -> Channel:
    from director.control.vrrp_socket import RawChannel

    return RawChannel(interface, address)


def sync_channel(interface: str, address: Address, port: int, group: Address | None) -> Channel:
    from director.control.sync_socket import UDPChannel

    return UDPChannel(interface, address, port, group)


class _ToWorkers:
    """The SyncLink's receiver on a director: hands datagrams to the packet workers."""

    def __init__(self, apply: Callable[[bytes, Any], None]) -> None:
        self._apply = apply

    def apply(self, data: bytes, now: float, sender: Any = None) -> None:
        self._apply(data, sender)


class PairMember:
    """This director's membership of its site's pair. ``start()``, ``stop()``; read ``role`` and ``status()``."""

    def __init__(self, pair: Any, member_id: str, vips, interface: str, *,
                 on_role: Callable[[bool], None], apply: Callable[[bytes, Any], None],
                 healthy: Callable[[], bool] = lambda: True,
                 on_joined: Callable[[str], None] = lambda member: None,
                 on_reclaim: Callable[[], None] = lambda: None,
                 vrrp_channel: Callable[[str, Address], Channel] = vrrp_channel,
                 sync_channel: Callable[[str, Address, int, Address | None], Channel] = sync_channel,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.pair = pair
        self.id = member_id
        self.me = pair.member(member_id)
        self.interface = interface
        self.router = Router(RouterConfig.from_pair(pair, member_id, vips))
        self._on_role = on_role
        self._healthy = healthy
        self._clock, self._wall = clock, wall
        self._vrrp_channel, self._sync_channel = vrrp_channel, sync_channel
        self._apply = apply
        self._on_joined = on_joined
        self._on_reclaim = on_reclaim
        self.speaker: Speaker | None = None
        self.link: SyncLink | None = None
        self.master = False
        self._left_master = float("-inf")
        """When this member last stopped being master (``clock``): its last flows still go out until
        :data:`YIELD_GRACE` after."""
        self.since = wall()
        """When this member last changed role (wall clock)."""
        self.heard: dict[str, Heard] = {}
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle

    async def start(self) -> None:
        """Open both channels and run (HAError if a socket cannot be opened)."""
        self._loop = asyncio.get_running_loop()
        addr = self.me.address
        vrrp_ch = self._vrrp_channel(self.interface, addr)
        cfg = self.pair.sync
        try:
            if cfg.enabled:
                group = None if self.pair.unicast else cfg.group
                sync_ch = self._sync_channel(self.interface, addr, cfg.port, group)
                dests = tuple(m.address for m in self.pair.peers(self.id)) if self.pair.unicast else (cfg.group,)
                sender = SyncSender(self.pair.virtual_router_id, mtu=cfg.mtu, max_rate=cfg.max_rate)
                self.link = SyncLink(sender, _ToWorkers(self._apply), sync_ch, dests, clock=self._clock)
                self.link.on_hello = self._hello
                self.link.accepting = True
        except BaseException:
            vrrp_ch.close()
            raise
        self.speaker = Speaker(self.router, vrrp_ch, clock=self._clock, on_state=self._state,
                               on_reclaim=self._on_reclaim, ready=self._healthy)
        self._tasks.append(asyncio.create_task(self.speaker.run(), name="glb-vrrp"))
        if self.link is not None:
            self._tasks.append(asyncio.create_task(self.link.run(), name="glb-sync"))
            self._tasks.append(asyncio.create_task(self._hellos(), name="glb-hello"))

    async def stop(self) -> None:
        """Leave the pair: a master sends priority 0 on the way (its backup takes over in Skew_Time)."""
        await cancel_and_wait(self._tasks)
        self._tasks = []
        if self.speaker is not None:
            self.speaker.channel.close()
        if self.link is not None:
            self.link.channel.close()

    # -- VRRP

    def _state(self, state: State, reason: str) -> None:
        master = state is State.MASTER
        if self.link is not None:
            self.link.accepting = not master
            if master and not self.master:  # a preempted master's last flows are on their way
                self.link.accept_until = self._clock() + YIELD_GRACE
        if self.master and not master:
            self._left_master = self._clock()
        if master != self.master:
            self.master = master
            self.since = self._wall()
            log.warning("pair member %s is now %s (%s)", self.id, "MASTER" if master else ROLES[state], reason)
            self._on_role(master)

    @property
    def role(self) -> str:
        return ROLES[self.router.state]

    # -- sync

    def changes(self, records: list) -> None:
        """Records from a packet worker (any thread): queued on the sender, sent as the rate allows."""
        loop = self._loop
        if loop is None or self.link is None:
            return
        loop.call_soon_threadsafe(self._queue, records)

    def _queue(self, records: list) -> None:
        if self.link is None:
            return
        if not self.master and self._clock() - self._left_master > YIELD_GRACE:
            return  # a record that crossed a role change: the new master's table is the truth
        now = self._clock()
        for r in records:
            self.link.sender.change(r, now)
        self.link.poke()

    async def flush(self, timeout: float) -> bool:
        """Until every record handed over so far is on the LAN, at the sync rate, for ``timeout`` seconds
        at most (a master stopping cleanly, before its priority 0): True if they all went."""
        await asyncio.sleep(0)  # records the workers handed over just before (changes) are queued first
        if self.link is None:
            return True
        deadline = self._clock() + timeout
        self.link.poke()
        while len(self.link.sender) and self._clock() < deadline:
            await asyncio.sleep(0.005)
        return not len(self.link.sender)

    # -- hellos

    async def _hellos(self) -> None:
        while True:
            if not self.master and self.link is not None:
                rec = MemberRecord(self.id, self.role, bool(self._healthy()), HELLO)
                datagram = sync.encode([rec], self.pair.virtual_router_id, 0)
                for dst in self.link.destinations:
                    self.link.channel.send(dst, datagram)
            await asyncio.sleep(HELLO)

    def _hello(self, datagram: bytes, src: Address) -> None:
        batch = sync.decode(datagram)
        if batch.sync_id != self.pair.virtual_router_id:
            return
        for rec in batch.records:
            if isinstance(rec, MemberRecord) and rec.member != self.id:
                joined = not self._present(rec.member)
                self.heard[rec.member] = Heard(rec, self._wall(), self._clock())
                if joined:
                    log.info("pair member %s heard from %s (%s)", rec.member, src, rec.state)
                    if self.master:
                        self._on_joined(rec.member)

    # -- what operators see

    def members(self) -> list[dict]:
        """Every member as this one sees it: id, address, priority, role, present, healthy, last_heard."""
        out = []
        now = self._clock()
        master_addr = self.router.master
        for m in self.pair.members:
            if m.id == self.id:
                out.append({"id": m.id, "address": str(m.address), "priority": m.priority, "role": self.role,
                            "present": True, "healthy": bool(self._healthy()), "last_heard": self._wall()})
                continue
            h = self.heard.get(m.id)
            present = self._present(m.id, now)
            if not self.master and master_addr is not None and m.address == master_addr:
                role, present = "master", True  # a backup hears the master's advertisements
            else:
                role = h.record.state if present and h is not None else "absent"
            out.append({"id": m.id, "address": str(m.address), "priority": m.priority, "role": role,
                        "present": present, "healthy": bool(h.record.healthy) if present and h else False,
                        "last_heard": h.at if h is not None else None})
        return out

    def _present(self, member: str, now: float | None = None) -> bool:
        h = self.heard.get(member)
        now = self._clock() if now is None else now
        return h is not None and now - h.mono <= ABSENT_AFTER * max(h.record.interval, 0.1)

    def active(self) -> str | None:
        """The master's member id, as this member knows it (None: no master heard)."""
        if self.master:
            return self.id
        m = self.router.master
        return next((x.id for x in self.pair.members if x.address == m), None) if m is not None else None

    def standby_present(self) -> bool:
        """A healthy member other than this one was heard recently: stopping hands over, no withdrawal."""
        return any(m["present"] and m["healthy"] for m in self.members() if m["id"] != self.id)

    def status(self) -> dict:
        counters: dict[str, Any] = {"vrrp": dict(self.speaker.counters()) if self.speaker else {}}
        if self.link is not None:
            counters["sync_sent"] = dict(self.link.sender.counters)
            counters["sync_link"] = dict(self.link.counters)
        return {"member": self.id, "role": self.role, "since": self.since, "active": self.active(),
                "virtual_router_id": self.pair.virtual_router_id, "preempt": self.pair.preempt,
                "members": self.members(), "counters": counters}
