"""The VRRPv3 state machine (RFC 5798 section 6.4): Initialize, Backup, Master.

Pure, in the manner of h11 and aioquic: a :class:`Router` takes three kinds
of input, each with ``now`` (seconds, any monotonic origin), and returns a
list of actions for its driver to carry out:

* packets: :meth:`Router.receive` (the bytes and IP fields the socket saw);
* the timer: :meth:`Router.on_timer` when the last :class:`SetTimer`'s time
  has come (early or repeated calls change nothing);
* admin events: :meth:`Router.startup`, :meth:`Router.shutdown`.

There is one timer: in Master it is the Adver_Timer, in Backup the
Master_Down_Timer, in Initialize none. Actions:

* :class:`Transmit` bytes to a destination (the group, or each unicast peer);
* :class:`StateChange` to Master, Backup or Initialize: the driver switches
  VIP ownership (gratuitous ARP and unsolicited NA at
  takeover are the ownership object's, not this module's);
* :class:`SetTimer` (absolute time) / :class:`CancelTimer`;
* :class:`LogDrop`: the first packet dropped (or tolerated) for each reason,
  so a flood of bad packets logs one line per reason; every one is counted in
  :attr:`Router.counters`.

Beyond the RFC, as keepalived: ``preempt_delay`` (a backup that would preempt
a lower-priority master waits this long after first hearing it, so a
restarted primary finishes its health checks before taking the VIPs back),
unicast peers for LANs without multicast, and a master that hears a
lower-priority master (its master-down timer ran out while this one's
advertisements were late: a stalled event loop) advertises at once and
asks for the VIPs to be announced again (:class:`Reclaim`, keepalived's
``garp_lower_prio_repeat``): the other took them for a moment and the
LAN's ARP/ND caches may still point at it.

Each (state, input) pair is one method, found through :data:`_ADVERT` and
:data:`_TIMER`, so a transition of section 6.4 reads as one short function.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from director.control import vrrp_packet as wire
from director.control.vrrp_packet import Address, Advertisement, Received
from glb.errors import HAError

# Drop reasons of the router (beside the codec's) and tolerated oddities.
BAD_VRID, OWNER, BAD_FAMILY = "vrid", "owner", "family"
INTERVAL_MISMATCH, ADDRESS_MISMATCH = "interval_mismatch", "address_mismatch"
TOLERATED = (INTERVAL_MISMATCH, ADDRESS_MISMATCH)
"""Counted and logged once, but the packet is processed: RFC 5798 drops the
v2 interval check (a backup learns the master's interval, 6.4.2) and makes
the address check a MAY that only logs (7.1)."""


class State(enum.Enum):
    INITIALIZE = "initialize"
    BACKUP = "backup"
    MASTER = "master"


@dataclass(frozen=True)
class RouterConfig:
    """One virtual router as this director runs it."""

    vrid: int
    """Virtual Router ID, 1..255, the same on every member."""
    priority: int
    """1..255; 255 means address owner (master at once, never listens)."""
    address: Address
    """This director's primary address on the LAN: the advertisements' source and the tie-breaker."""
    addresses: tuple[Address, ...]
    """The virtual addresses (the site's VIPs of this family) carried in advertisements."""
    advert_interval: int = 100
    """Advertisement_Interval in centiseconds (RFC default 100; GLB's default 10)."""
    preempt: bool = True
    """A higher-priority backup takes over from a lower-priority master."""
    preempt_delay: float = 0.0
    """Seconds a backup waits, after first hearing a lower-priority master, before it may preempt."""
    peers: tuple[Address, ...] = ()
    """Unicast destinations instead of the multicast group (empty: multicast)."""

    def __post_init__(self) -> None:
        if not 1 <= self.vrid <= 255:
            raise ValueError("vrid must be 1..255")
        if not 1 <= self.priority <= 255:
            raise ValueError("priority must be 1..255 (0 is reserved for release)")
        if not 1 <= self.advert_interval <= wire.MAX_INTERVAL_CS:
            raise ValueError("advert_interval must be 1..4095 centiseconds")
        if any(a.version != self.address.version for a in (*self.addresses, *self.peers)):
            raise ValueError("address, virtual addresses and peers must be of one family")

    @classmethod
    def from_pair(cls, pair: Any, member_id: str, vips: Iterable[Address]) -> RouterConfig:
        """The virtual router of ``member_id`` in a ``glb.config.PairConfig``, advertising the site's ``vips`` of its family."""
        me = pair.member(member_id)
        if me is None:
            raise HAError("member", f"{member_id!r} is not a member of the pair ({', '.join(m.id for m in pair.members)})")
        return cls(
            vrid=pair.virtual_router_id,
            priority=me.priority,
            address=me.address,
            addresses=tuple(dict.fromkeys(v for v in vips if v.version == me.address.version)),
            advert_interval=round(pair.advert_interval * 100),
            preempt=pair.preempt,
            preempt_delay=pair.preempt_delay,
            peers=tuple(m.address for m in pair.peers(member_id)) if pair.unicast else (),
        )

    @property
    def group(self) -> Address:
        return wire.GROUP_V4 if self.address.version == 4 else wire.GROUP_V6


@dataclass(frozen=True)
class Transmit:
    dst: Address
    payload: bytes
    priority: int
    """The advertised priority (0 = this router is releasing mastership)."""


@dataclass(frozen=True)
class StateChange:
    """The router entered ``state``: the driver switches VIP ownership on (MASTER) or off."""

    state: State
    reason: str


@dataclass(frozen=True)
class SetTimer:
    at: float


@dataclass(frozen=True)
class CancelTimer:
    pass


@dataclass(frozen=True)
class LogDrop:
    reason: str
    src: Address | None
    detail: str
    dropped: bool
    """False for a tolerated oddity (the packet was still processed)."""


@dataclass(frozen=True)
class Reclaim:
    """Announce the VIPs again: ``src`` advertised ``priority`` as master, lower than ours, so it
    may have taken them, and the LAN's caches may point at it although it has let them go."""

    src: Address
    priority: int


Action = Transmit | StateChange | SetTimer | CancelTimer | LogDrop | Reclaim

RECLAIM_EVERY = 1.0
"""Seconds between two :class:`Reclaim` of a master (a member that keeps advertising, one that cannot
hear us, would otherwise make every advertisement a burst of announcements)."""


def skew_time(priority: int, interval_cs: int) -> float:
    """Skew_Time in seconds: ((256 - Priority) * Master_Adver_Interval) / 256 centiseconds."""
    return (256 - priority) * interval_cs / 256 / 100


def master_down_interval(priority: int, interval_cs: int) -> float:
    """Master_Down_Interval in seconds: 3 * Master_Adver_Interval + Skew_Time."""
    return 3 * interval_cs / 100 + skew_time(priority, interval_cs)


@dataclass
class Router:
    """One VRRPv3 virtual router (one VRID, one address family) on one interface."""

    config: RouterConfig
    state: State = State.INITIALIZE
    timer: float | None = None
    """When :meth:`on_timer` next has work (the Adver_Timer or the Master_Down_Timer)."""
    master_adver_int: int = 0
    """Centiseconds: the interval the current master advertises (6.1)."""
    master: Address | None = None
    """Who this router last accepted as master (itself when master)."""
    counters: Counter = field(default_factory=Counter)
    """Drops and tolerated oddities by reason, plus ``rx``/``tx`` advertisements."""
    _preempt_from: float | None = None
    _released: bool = False
    """The master's last word was priority 0: the takeover is a handover (its log says so)."""
    _reclaimed_at: float | None = None

    # ---- admin events --------------------------------------------------------

    def startup(self, now: float) -> list[Action]:
        """The Startup event (6.4.1)."""
        if self.state is not State.INITIALIZE:
            return []
        self.master_adver_int = self.config.advert_interval
        if self.config.priority == 255:
            return self._to_master(now, "address owner (priority 255)")
        return self._to_backup(now, "startup")

    def shutdown(self, now: float) -> list[Action]:
        """The Shutdown event: a master sends priority 0 so a backup takes over after Skew_Time, not Master_Down_Interval."""
        if self.state is State.INITIALIZE:
            return []
        actions: list[Action] = self._advertise(0) if self.state is State.MASTER else []
        self.state, self.timer, self.master = State.INITIALIZE, None, None
        return [*actions, CancelTimer(), StateChange(State.INITIALIZE, "shutdown")]

    # ---- timer ---------------------------------------------------------------

    def on_timer(self, now: float) -> list[Action]:
        if self.timer is None or now < self.timer:
            return []
        return _TIMER[self.state](self, now)

    def _master_down(self, now: float) -> list[Action]:
        if self._released:
            return self._to_master(now, f"{self.master or 'the master'} released (priority 0): took over after Skew_Time")
        return self._to_master(now, f"no advertisement from {self.master or 'a master'} for the master-down interval")

    def _adver_timer(self, now: float) -> list[Action]:
        return [*self._advertise(self.config.priority), *self._set_timer(now + self.config.advert_interval / 100)]

    # ---- packets -------------------------------------------------------------

    def receive(self, pkt: Received, now: float, ready: bool = True) -> list[Action]:
        """A packet from the socket: validated (7.1), counted, then the current state's ADVERTISEMENT rule.

        ``ready``: whether this router could serve now (a director: its packet path runs and every
        service has a server up). A backup that is not ready does not preempt a lower master, as
        keepalived's failing track script lowers its priority: a restarted primary whose checks
        have not passed yet would take the VIPs only to drop their packets. The preempt delay
        counts from when it is ready. It still takes over a master that goes silent."""
        cfg = self.config
        try:
            if pkt.src.version != cfg.address.version:
                raise HAError(BAD_FAMILY, f"IPv{pkt.src.version} packet for an IPv{cfg.address.version} router")
            adv = wire.decode(pkt)
            if adv.vrid != cfg.vrid:
                raise HAError(BAD_VRID, f"VRID {adv.vrid}, ours is {cfg.vrid}")
            if cfg.priority == 255:
                raise HAError(OWNER, "we are the address owner (priority 255)")
        except HAError as e:
            return self._count(e.reason, pkt.src, str(e), dropped=True)
        self.counters["rx"] += 1
        notes: list[Action] = []
        if adv.max_adver_int != cfg.advert_interval:
            notes += self._count(INTERVAL_MISMATCH, pkt.src,
                                 f"advertises {adv.max_adver_int} cs, ours is {cfg.advert_interval} cs", dropped=False)
        if set(adv.addresses) != set(cfg.addresses):
            notes += self._count(ADDRESS_MISMATCH, pkt.src, "virtual addresses differ from ours", dropped=False)
        handler = _ADVERT.get(self.state)
        return notes + (handler(self, pkt.src, adv, now, ready) if handler else [])

    def _backup_advert(self, src: Address, adv: Advertisement, now: float, ready: bool) -> list[Action]:
        """6.4.2: priority 0 means the master left (wait only Skew_Time); else accept it unless we preempt it."""
        cfg = self.config
        if adv.priority == 0:
            self._released = True
            return self._set_timer(now + skew_time(cfg.priority, self.master_adver_int))
        self._released = False
        lower = adv.priority < cfg.priority
        if lower and cfg.preempt and ready:
            if self._preempt_from is None:
                self._preempt_from = now
            if now >= self._preempt_from + cfg.preempt_delay:
                return []  # discarded: the master-down timer runs out and we take over
        else:
            self._preempt_from = None
        self.master = src
        self.master_adver_int = adv.max_adver_int
        return self._set_timer(now + master_down_interval(cfg.priority, self.master_adver_int))

    def _master_advert(self, src: Address, adv: Advertisement, now: float, ready: bool) -> list[Action]:
        """6.4.3: priority 0 asks for an advertisement at once; a better router makes us backup."""
        cfg = self.config
        if adv.priority == 0:
            return self._adver_timer(now)
        better = adv.priority > cfg.priority or (
            adv.priority == cfg.priority and int(src) > int(cfg.address))
        if not better:  # another master, below us: it yields at our advertisement; the VIPs' caches come back
            if self._reclaimed_at is not None and now - self._reclaimed_at < RECLAIM_EVERY:
                return []
            self._reclaimed_at = now
            return [*self._advertise(cfg.priority), Reclaim(src, adv.priority)]
        self.master_adver_int = adv.max_adver_int
        self.master = src
        return self._to_backup(now, f"{src} advertises priority {adv.priority} > ours {cfg.priority}"
                               if adv.priority > cfg.priority else f"{src} wins the tie on address")

    # ---- transitions and helpers -----------------------------------------------

    def _to_master(self, now: float, reason: str) -> list[Action]:
        self.state, self.master, self._preempt_from, self._released = State.MASTER, self.config.address, None, False
        return [*self._advertise(self.config.priority), StateChange(State.MASTER, reason),
                *self._set_timer(now + self.config.advert_interval / 100)]

    def _to_backup(self, now: float, reason: str) -> list[Action]:
        self.state, self._preempt_from = State.BACKUP, None
        down = now + master_down_interval(self.config.priority, self.master_adver_int)
        return [StateChange(State.BACKUP, reason), *self._set_timer(down)]

    def _set_timer(self, at: float) -> list[Action]:
        self.timer = at
        return [SetTimer(at)]

    def _advertise(self, priority: int) -> list[Action]:
        cfg = self.config
        adv = Advertisement(cfg.vrid, priority, cfg.advert_interval, cfg.addresses)
        self.counters["tx"] += 1
        return [Transmit(dst, wire.encode(adv, cfg.address, dst), priority) for dst in cfg.peers or (cfg.group,)]

    def _count(self, reason: str, src: Address | None, detail: str, *, dropped: bool) -> list[Action]:
        self.counters[reason] += 1
        return [LogDrop(reason, src, detail, dropped)] if self.counters[reason] == 1 else []


_ADVERT = {State.BACKUP: Router._backup_advert, State.MASTER: Router._master_advert}
"""The ADVERTISEMENT rule of each state (none in Initialize: the packet is counted, nothing changes)."""
_TIMER = {State.BACKUP: Router._master_down, State.MASTER: Router._adver_timer}
"""What the single timer means in each state."""
