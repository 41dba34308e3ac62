"""LVS schedulers with IPVS semantics, and persistence templates.

Pure: no I/O, time is passed in. One interface for every algorithm::

    dest = scheduler.schedule(src, sport, dst, dport, now)   # -> Dest | None

``src``/``dst`` are packed addresses (4 or 16 bytes, as the codec returns
them), ports are ints. ``None`` means no destination can take a new flow.

A :class:`Dest` is one real server as the packet path sees it: its weight,
whether it is up, and the active/inactive connection counters that the
connection table maintains and lc/wlc/sed/nq/lblc/lblcr read (through an
injected counts object: with several packet workers, the sum over all of
them, director/dataplane/counters.py). Schedulers hold
a list of Dests; whoever changes a weight, availability or the list calls
``scheduler.update()`` (IPVS's add/del/upd_dest hooks), which rebuilds
whatever table the algorithm keeps.

Semantics follow net/netfilter/ipvs/ip_vs_<name>.c, including tie-breaking
(first in list order wins) so tests can state exact expectations:

* a Dest is *usable* for new flows iff ``available`` (up and configured) and
  ``weight > 0``; weight 0 quiesces a server: established flows stay (the
  connection table keeps them), new flows go elsewhere;
* "overhead" is IPVS's ``active * 256 + inactive``;
* the hash schedulers (dh, sh, mh) keep unusable destinations in their
  tables and, with ``fallback`` (the default here, IPVS's sh-fallback /
  mh-fallback flags), walk on to a usable one; without it they return None,
  exactly as IPVS does. Keeping the slots is what makes a drain or an outage
  move only the affected server's flows.

IPVS's per-destination connection thresholds (the OVERLOAD flag) are not
modelled: GLB's config has no such knob.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Iterable, Sequence

from director.dataplane.counters import Counts
from glb.errors import SchedulerError
from glb.hashing import DEFAULT_TABLE_SIZE, client_hash, is_prime, maglev_table

try:  # the same hash in C (~0.3 us against ~5 in Python): mh hashes every new flow's client
    from director.dataplane._fastpath import client_hash  # noqa: F811
except ImportError:  # pragma: no cover - built by `pip install` wherever a compiler is
    pass

_GOLDEN = 2654435761  # IPVS's multiplicative hash constant (Knuth)
MH_SEED = 16
"""jhash's initval for a client's Maglev slot (the fallback walk uses the next ones); the kernel's too."""


class Dest:
    """One real server of one service, as schedulers and the connection table see it."""

    __slots__ = (
        "addr", "port", "weight", "last_weight", "available", "reschedule",
        "counts", "server", "tx",
    )

    def __init__(
        self,
        addr: bytes,
        weight: int = 1,
        *,
        port: int = 0,
        available: bool = True,
        reschedule: bool = False,
        server: Any = None,
        counts: Any = None,
    ) -> None:
        if len(addr) not in (4, 16):
            raise SchedulerError("a destination address is 4 or 16 packed bytes")
        self.addr = addr
        """Packed address (4 bytes IPv4, 16 bytes IPv6)."""
        self.port = port
        """Real server port (0 = the VIP's); part of the Maglev name as in IPVS."""
        self.weight = weight
        """Current weight; 0 = quiesced (no new flows)."""
        self.last_weight = weight if weight > 0 else 0
        """Last non-zero weight: what mh builds its table from, so a drain does not reshuffle."""
        self.available = available
        """Up and configured. False = down or removed: no new flows."""
        self.reschedule = reschedule
        """Service's on_server_down == 'reschedule': established flows leave when not available."""
        self.counts = Counts() if counts is None else counts
        """Where the connection table counts this server's connections: this
        process alone (:class:`~director.dataplane.counters.Counts`) or every
        packet worker together (``SharedCounts``, as IPVS's counters are global)."""
        self.server = server
        """The config object this stands for (glb.config.RealServer), for the caller."""
        self.tx = None
        """Opaque forwarding data the packet engine attaches (e.g. the precomputed
        Ethernet header or a codec.Tunnel); the pure cores never read it."""

    @property
    def active(self) -> int:
        """Connections in TCP ESTABLISHED (maintained by the connection table)."""
        return self.counts.active

    @active.setter
    def active(self, value: int) -> None:
        self.counts.active = value

    @property
    def inactive(self) -> int:
        """Every other tracked connection, UDP included (as IPVS counts them)."""
        return self.counts.inactive

    @inactive.setter
    def inactive(self, value: int) -> None:
        self.counts.inactive = value

    @property
    def family(self) -> int:
        return 4 if len(self.addr) == 4 else 6

    @property
    def usable(self) -> bool:
        return self.available and self.weight > 0

    @property
    def overhead(self) -> int:
        """IPVS ip_vs_dest_conn_overhead: an active connection costs 256 inactive ones."""
        return (self.active << 8) + self.inactive

    @classmethod
    def from_config(cls, rs: Any, *, reschedule: bool = False, available: bool = True) -> Dest:
        """A Dest for a glb.config.RealServer (``address``, ``port``, ``weight``)."""
        return cls(rs.address.packed, rs.weight, port=rs.port or 0, available=available,
                   reschedule=reschedule, server=rs)

    def __repr__(self) -> str:
        import ipaddress

        return (f"Dest({ipaddress.ip_address(self.addr)}, w={self.weight}, "
                f"{'up' if self.available else 'down'}, a={self.active}, i={self.inactive})")


def _fold(addr: bytes) -> int:
    """IPVS addr_fold: the IPv4 address, or the XOR of an IPv6 address's 32-bit words."""
    if len(addr) == 4:
        return int.from_bytes(addr, "big")
    v = int.from_bytes(addr, "big")
    return (v >> 96 ^ v >> 64 ^ v >> 32 ^ v) & 0xFFFFFFFF


class Scheduler:
    """Base: holds the destination list of one service and one address family."""

    name = ""

    def __init__(self, dests: Iterable[Dest] = (), *, family: int | None = None) -> None:
        self.family = family
        """4 or 6: destinations of the other family are ignored (DR/TUN cannot
        cross families); None = take whatever is given."""
        self.dests: list[Dest] = []
        self.members: set[Dest] = set()
        self.update(dests)

    def update(self, dests: Iterable[Dest] | None = None) -> None:
        """Take a new destination list (or re-read the current one after a weight or
        availability change) and rebuild the algorithm's state."""
        if dests is not None:
            fam = self.family
            self.dests = [d for d in dests if fam is None or d.family == fam]
            self.members = set(self.dests)
        for d in self.dests:
            if d.weight > 0:
                d.last_weight = d.weight
        self._rebuild()

    def _rebuild(self) -> None:
        """Recompute per-algorithm state after update(); default: nothing."""

    def schedule(self, src: bytes, sport: int, dst: bytes, dport: int, now: float) -> Dest | None:
        raise NotImplementedError


# --------------------------------------------------------------------------
# Round robin family
# --------------------------------------------------------------------------


class RoundRobin(Scheduler):
    """rr: the next usable destination after the last one chosen."""

    name = "rr"
    _pos = -1  # index of the last pick; -1 = list head
    _last: Dest | None = None

    def _rebuild(self) -> None:
        # Keep going from the same server when the list changes around it.
        self._pos = self.dests.index(self._last) if self._last in self.members else -1

    def schedule(self, src, sport, dst, dport, now):
        dests = self.dests
        n = len(dests)
        start = self._pos
        for k in range(1, n + 1):
            i = (start + k) % n
            d = dests[i]
            if d.available and d.weight > 0:
                self._pos, self._last = i, d
                return d
        return None


class WeightedRoundRobin(Scheduler):
    """wrr: IPVS's interleaved weighted round robin.

    Passes over the list with a current weight ``cw`` falling from the maximum
    weight in steps of the weights' gcd; each pass picks every destination
    whose weight is >= cw. Weights 4:3:2 give a a b a b c a b c.
    """

    name = "wrr"

    def __init__(self, dests: Iterable[Dest] = (), *, family: int | None = None) -> None:
        self._cl = -1  # index of the last pick; -1 = list head
        self._cw = 0
        self._mw = 0
        self._di = 1
        super().__init__(dests, family=family)

    def _rebuild(self) -> None:
        ws = [d.weight for d in self.dests if d.available and d.weight > 0]
        self._cl = -1
        self._di = math.gcd(*ws) if ws else 1
        self._mw = (max(ws) if ws else 0) - (self._di - 1)
        if self._cw > self._mw or self._cw == 0:
            self._cw = self._mw
        elif self._di > 1:
            self._cw = (self._cw // self._di) * self._di + 1

    def schedule(self, src, sport, dst, dport, now):
        if self._mw <= 0:
            return None
        dests = self.dests
        n = len(dests)
        last = self._cl
        pos = last
        stop = None
        last_pass = restarted = False
        while True:
            i = pos + 1
            while i < n:
                d = dests[i]
                if d.available and d.weight >= self._cw:
                    self._cl = i
                    return d
                if i == stop:
                    self._cl = i
                    return None
                i += 1
            pos = -1
            self._cw -= self._di
            if self._cw <= 0:
                self._cw = self._mw
                if last_pass or last == -1:
                    self._cl = -1
                    return None
                restarted = True
            last_pass = self._cw <= self._di
            if last_pass and restarted and last != -1:
                stop = last


# --------------------------------------------------------------------------
# Least-connection family
# --------------------------------------------------------------------------


class LeastConnection(Scheduler):
    """lc: the smallest overhead (active * 256 + inactive); weights only gate (0 = skip)."""

    name = "lc"

    def schedule(self, src, sport, dst, dport, now):
        least = None
        loh = 0
        for d in self.dests:
            if not d.available or d.weight <= 0:
                continue
            c = d.counts  # straight from the counts object: no Dest property call per read
            doh = (c.active << 8) + c.inactive
            if least is None or doh < loh:
                least, loh = d, doh
        return least


def _wlc(dests: Sequence[Dest]) -> Dest | None:
    """Weighted least-connection: minimal overhead / weight, first in list order on ties."""
    least = None
    loh = 0
    for d in dests:
        if not d.available or d.weight <= 0:
            continue
        c = d.counts
        doh = (c.active << 8) + c.inactive
        # loh / least.weight > doh / d.weight, in integers as IPVS does
        if least is None or loh * d.weight > doh * least.weight:
            least, loh = d, doh
    return least


class WeightedLeastConnection(Scheduler):
    """wlc (IPVS's default): minimal (active * 256 + inactive) / weight."""

    name = "wlc"

    def schedule(self, src, sport, dst, dport, now):
        return _wlc(self.dests)


class ShortestExpectedDelay(Scheduler):
    """sed: minimal (active + 1) / weight; inactive connections do not count."""

    name = "sed"

    def schedule(self, src, sport, dst, dport, now):
        least = None
        loh = 0
        for d in self.dests:
            if not d.available or d.weight <= 0:
                continue
            doh = d.counts.active + 1
            if least is None or loh * d.weight > doh * least.weight:
                least, loh = d, doh
        return least


class NeverQueue(Scheduler):
    """nq: the first idle (no active connection) destination, else as sed."""

    name = "nq"

    def schedule(self, src, sport, dst, dport, now):
        least = None
        loh = 0
        for d in self.dests:
            if not d.available or d.weight <= 0:
                continue
            active = d.counts.active
            if active == 0:
                return d
            doh = active + 1
            if least is None or loh * d.weight > doh * least.weight:
                least, loh = d, doh
        return least


# --------------------------------------------------------------------------
# Static hashing: dh and sh (256 buckets, IPVS's hash)
# --------------------------------------------------------------------------

_HASH_BUCKETS = 256


class _BucketHash(Scheduler):
    """A 256-bucket table as IPVS's dh/sh keep, with the optional fallback walk."""

    def __init__(self, dests: Iterable[Dest] = (), *, family: int | None = None,
                 fallback: bool = True, port: bool = False) -> None:
        self.fallback = fallback
        """On an unusable bucket, walk the table (IPVS sh-fallback); False = return None."""
        self.port = port
        """Mix the client's source port into the hash (IPVS sh-port)."""
        self._buckets: list[Dest | None] = [None] * _HASH_BUCKETS
        super().__init__(dests, family=family)

    def lookup_table(self) -> list[Dest | None]:
        """The 256 buckets, as the kernel data plane reads them (director/dataplane/kernel.py): the same
        list until the table is rebuilt."""
        return self._buckets

    def _lookup(self, addr: bytes, port: int) -> Dest | None:
        base = (port + _fold(addr)) * _GOLDEN
        buckets = self._buckets
        d = buckets[base & 0xFF]
        if d is None:
            return None
        if d.available and d.weight > 0:
            return d
        if not self.fallback:
            return None
        ihash = base & 0xFF
        for offset in range(_HASH_BUCKETS):
            d = buckets[(offset + ihash + base) & 0xFF]
            if d is None:
                break
            if d.available and d.weight > 0:
                return d
        return None


class DestinationHash(_BucketHash):
    """dh: the flow's destination address picks a bucket; buckets go to destinations in turn.

    For a DR/TUN director the destination is the VIP, so every flow of a VIP
    lands on one server: dh is for caches in front of many destinations.
    """

    name = "dh"

    def _rebuild(self) -> None:
        dests = self.dests
        self._buckets = [dests[i % len(dests)] for i in range(_HASH_BUCKETS)] if dests else [None] * _HASH_BUCKETS

    def schedule(self, src, sport, dst, dport, now):
        return self._lookup(dst, 0)


class SourceHash(_BucketHash):
    """sh: the client's address (and port with ``port=True``) picks a bucket.

    Each destination takes ``weight`` consecutive buckets in list order (a
    weight-0 one still takes one, as in IPVS). The hash keeps IPVS's
    multiplicative form, whose low byte only depends on the low byte of the
    address: clients sharing a last octet share a server. Prefer mh.
    """

    name = "sh"

    def _rebuild(self) -> None:
        buckets: list[Dest | None] = [None] * _HASH_BUCKETS
        dests = self.dests
        if dests:
            p = count = 0
            for i in range(_HASH_BUCKETS):
                d = dests[p]
                buckets[i] = d
                count += 1
                if count >= d.weight:
                    p = (p + 1) % len(dests)
                    count = 0
        self._buckets = buckets

    def schedule(self, src, sport, dst, dport, now):
        return self._lookup(src, sport if self.port else 0)


# --------------------------------------------------------------------------
# Maglev: mh
# --------------------------------------------------------------------------


class MaglevHash(Scheduler):
    """mh: Maglev consistent hashing of the client address (and port with ``port=True``).

    The table is built from each destination's *last* non-zero weight, so a
    drain (weight 0) or an outage changes no slot: lookups that land on an
    unusable destination walk on (``fallback``) as IPVS mh-fallback does. A
    changed weight or membership rebuilds the table; Maglev then moves about
    1/N of the flows plus a small fraction of the others.
    """

    name = "mh"

    def __init__(self, dests: Iterable[Dest] = (), *, family: int | None = None,
                 table_size: int = DEFAULT_TABLE_SIZE, fallback: bool = True, port: bool = False) -> None:
        if not is_prime(table_size):
            raise SchedulerError(f"mh table size {table_size} is not prime")
        self.table_size = table_size
        self.fallback = fallback
        self.port = port
        self._slots: list[Dest | None] = [None] * table_size
        self._signature: tuple = ()
        self._any_usable = False
        super().__init__(dests, family=family)

    def _rebuild(self) -> None:
        dests = self.dests
        signature = tuple((d.addr, d.port, d.last_weight) for d in dests)
        if signature != self._signature:
            names = [d.addr + d.port.to_bytes(2, "big") for d in dests]
            table = maglev_table(names, [d.last_weight for d in dests], self.table_size)
            self._slots = [dests[i] if i >= 0 else None for i in table]
            self._signature = signature
        # The fallback walk only runs if someone usable owns slots; otherwise it
        # would hash table_size times for nothing.
        self._any_usable = any(d.available and d.weight > 0 and d.last_weight > 0 for d in dests)

    def lookup_table(self) -> list[Dest | None]:
        """The slots, as the kernel data plane reads them (director/dataplane/kernel.py)."""
        return self._slots

    def schedule(self, src, sport, dst, dport, now):
        # jhash, not BLAKE2b: the kernel data plane computes the same slot (glb_tc.bpf.c mh_slot).
        port = sport if self.port else None
        size = self.table_size
        slots = self._slots
        ihash = client_hash(src, port, MH_SEED) % size
        d = slots[ihash]
        if d is None:
            return None
        if d.available and d.weight > 0:
            return d
        if not self.fallback or not self._any_usable:
            return None
        # IPVS: rehash with an offset that walks from the first slot, so the
        # detour is deterministic per client and spreads over usable servers.
        for offset in range(size):
            roffset = (offset + ihash) % size
            d = slots[client_hash(src, port, MH_SEED + 1 + roffset) % size]
            if d is None:
                break
            if d.available and d.weight > 0:
                return d
        return None


# --------------------------------------------------------------------------
# Locality-based: lblc, lblcr
# --------------------------------------------------------------------------


class _Entry:
    __slots__ = ("dest", "dests", "lastuse", "lastmod")

    def __init__(self, now: float) -> None:
        self.dest: Dest | None = None
        self.dests: list[Dest] = []
        self.lastuse = now
        self.lastmod = now


class _Locality(Scheduler):
    """Shared state of lblc/lblcr: a bounded table destination address -> entry."""

    def __init__(self, dests: Iterable[Dest] = (), *, family: int | None = None,
                 expiration: float = 24 * 3600.0, max_entries: int = 16384) -> None:
        self.expiration = expiration
        """Seconds an unused entry lives (IPVS lblc(r)_expiration, default one day);
        lblcr also shrinks a server set unchanged for this long."""
        self.max_entries = max_entries
        """Bound on the table (IPVS collects beyond 16 x 1024); the least recently used goes first."""
        self._table: OrderedDict[bytes, _Entry] = OrderedDict()
        super().__init__(dests, family=family)

    def _entry(self, dst: bytes, now: float) -> _Entry | None:
        en = self._table.get(dst)
        if en is None:
            return None
        if now - en.lastuse > self.expiration:
            del self._table[dst]
            return None
        en.lastuse = now
        self._table.move_to_end(dst)
        return en

    def _store(self, dst: bytes, en: _Entry) -> None:
        self._table[dst] = en
        while len(self._table) > self.max_entries:
            self._table.popitem(last=False)

    def _overloaded(self, d: Dest) -> bool:
        """IPVS: more active connections than its weight while some usable server is under half."""
        if d.active > d.weight:
            return any(x.available and x.active * 2 < x.weight for x in self.dests)
        return False


class LocalityLeastConnection(_Locality):
    """lblc: a destination address sticks to one server unless it is overloaded; then wlc."""

    name = "lblc"

    def schedule(self, src, sport, dst, dport, now):
        en = self._entry(dst, now)
        if en is not None:
            d = en.dest
            if d in self.members and d.available and d.weight > 0 and not self._overloaded(d):
                return d
        d = _wlc(self.dests)
        if d is None:
            return None
        if en is None:
            en = _Entry(now)
            self._store(dst, en)
        en.dest = d
        return d


class LocalityLeastConnectionReplicated(_Locality):
    """lblcr: a destination address maps to a *set* of servers, grown when all are busy.

    Picks the weighted least-connected member of the set; if there is none or
    it is overloaded, adds the overall wlc choice to the set. A set unchanged
    for ``expiration`` seconds loses its most loaded member.
    """

    name = "lblcr"

    def schedule(self, src, sport, dst, dport, now):
        en = self._entry(dst, now)
        if en is None:
            d = _wlc(self.dests)
            if d is None:
                return None
            en = _Entry(now)
            en.dests = [d]
            self._store(dst, en)
            return d
        members = self.members
        if any(x not in members for x in en.dests):
            en.dests = [x for x in en.dests if x in members]
        d = self._set_min(en.dests)
        if len(en.dests) > 1 and now - en.lastmod > self.expiration:
            m = self._set_max(en.dests)
            if m is not None:
                en.dests.remove(m)
                en.lastmod = now
        if d is not None and not self._overloaded(d):
            return d
        d = _wlc(self.dests)
        if d is None:
            return None
        if d not in en.dests:
            en.dests.insert(0, d)  # IPVS list_add: newest first
            en.lastmod = now
        return d

    @staticmethod
    def _set_min(dests: Sequence[Dest]) -> Dest | None:
        return _wlc(dests)

    @staticmethod
    def _set_max(dests: Sequence[Dest]) -> Dest | None:
        most = None
        moh = 0
        for d in dests:
            if d.weight <= 0:
                continue
            c = d.counts
            doh = (c.active << 8) + c.inactive
            if most is None or moh * d.weight < doh * most.weight:
                most, moh = d, doh
        return most


# --------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------

SCHEDULERS: dict[str, type[Scheduler]] = {  # glb.config.SCHEDULERS is its names, in this order
    cls.name: cls
    for cls in (
        RoundRobin, WeightedRoundRobin, LeastConnection, WeightedLeastConnection,
        ShortestExpectedDelay, NeverQueue, DestinationHash, SourceHash,
        LocalityLeastConnection, LocalityLeastConnectionReplicated, MaglevHash,
    )
}


def make_scheduler(name: str, dests: Iterable[Dest] = (), *, family: int | None = None,
                   table_size: int = DEFAULT_TABLE_SIZE, **options: Any) -> Scheduler:
    """A scheduler by its IPVS name (glb.config.SCHEDULERS); ``options`` go to its constructor."""
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise SchedulerError(f"unknown scheduler {name!r} (known: {', '.join(SCHEDULERS)})") from None
    if cls is MaglevHash:
        options["table_size"] = table_size
    return cls(dests, family=family, **options)


# --------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------


class Template:
    """A persistence template: this client network sticks to ``dest``.

    ``controlled`` counts live connections created through it (the connection
    table increments and decrements it); like IPVS, a template does not expire
    while it controls connections, and otherwise ``timeout`` after its last use.
    """

    __slots__ = ("dest", "expires", "controlled")

    def __init__(self, dest: Dest, expires: float) -> None:
        self.dest = dest
        self.expires = expires
        self.controlled = 0

    def __repr__(self) -> str:
        return f"Template({self.dest!r}, expires={self.expires}, controlled={self.controlled})"


class Persistence:
    """Per-service persistence templates (IPVS ``-p timeout -M netmask``).

    Key: the client address masked to ``netmask`` (IPv4) / ``netmask6``
    (IPv6). One instance per service, so a client sticks to a server across
    the service's VIPs and ports. A template whose server is down, removed or
    quiesced (weight 0) is not honoured: a new flow is scheduled afresh (IPVS
    with expire_quiescent_template=1; weight 0 must mean no new flows).
    """

    def __init__(self, timeout: float = 300.0, netmask: int = 32, netmask6: int = 128,
                 max_entries: int = 1_000_000) -> None:
        if not 0 <= netmask <= 32 or not 0 <= netmask6 <= 128:
            raise SchedulerError("persistence netmask out of range")
        self.timeout = timeout
        self.max_entries = max_entries
        self._mask4 = ((1 << 32) - 1) ^ ((1 << (32 - netmask)) - 1)
        self._mask6 = ((1 << 128) - 1) ^ ((1 << (128 - netmask6)) - 1)
        self._table: OrderedDict[tuple[int, int], Template] = OrderedDict()
        self.watch: Callable[[tuple[int, int], Template], None] | None = None
        """Told of every template made or refreshed here (not of those :meth:`adopt` takes): the kernel
        data plane keeps its copy (director/dataplane/kernel.py KernelSync.template)."""

    @classmethod
    def from_config(cls, p: Any, max_entries: int = 1_000_000) -> Persistence:
        """From a glb.config.Persistence (timeout, netmask, netmask6)."""
        return cls(p.timeout, p.netmask, p.netmask6, max_entries)

    def __len__(self) -> int:
        return len(self._table)

    def key(self, src: bytes) -> tuple[int, int]:
        v = int.from_bytes(src, "big")
        return (4, v & self._mask4) if len(src) == 4 else (6, v & self._mask6)

    def items(self) -> Iterable[tuple[tuple[int, int], Template]]:
        """(key, template) for every template held, least recently used first."""
        return list(self._table.items())

    def alive(self, key: tuple[int, int], now: float) -> bool:
        """Whether the template of the client network ``key`` (:meth:`key`) has not expired: it controls
        connections or its timeout has not run out."""
        t = self._table.get(key)
        return t is not None and (t.controlled > 0 or now < t.expires)

    def get(self, src: bytes, now: float, scheduler: Scheduler | None = None) -> Template | None:
        """The live, honoured template for this client, if any (no side effects)."""
        t = self._table.get(self.key(src))
        if t is None:
            return None
        d = t.dest
        if not (t.controlled > 0 or now < t.expires):
            return None
        if not (d.available and d.weight > 0) or (scheduler is not None and d not in scheduler.members):
            return None
        return t

    def schedule(self, scheduler: Scheduler, src: bytes, sport: int, dst: bytes, dport: int,
                 now: float) -> Template | None:
        """The template for a new flow: the client's existing one, or one made with ``scheduler``.

        Refreshes the template's timeout (IPVS does on every new connection).
        Pass the returned template to ConnTable.add so it counts the connection.
        """
        k = self.key(src)
        t = self.get(src, now, scheduler)
        if t is None:
            d = scheduler.schedule(src, sport, dst, dport, now)
            if d is None:
                return None
            t = Template(d, now + self.timeout)
            self._table[k] = t
            while len(self._table) > self.max_entries:
                self._table.popitem(last=False)
        else:
            t.expires = now + self.timeout
            self._table.move_to_end(k)
        if self.watch is not None:
            self.watch(k, t)
        return t

    def install(self, src: bytes, dest: Dest, expires: float) -> Template:
        """Take over a template another director made (connection sync): ``src`` sticks to ``dest`` until ``expires``.

        An existing template to the same ``dest`` is kept (its connections
        still count on it) and its expiry extended; one to another ``dest``
        is replaced.
        """
        t = self.adopt(src, dest, expires)
        if self.watch is not None:
            self.watch(self.key(src), t)
        return t

    def adopt(self, src: bytes, dest: Dest, expires: float) -> Template:
        """:meth:`install` of a template the kernel data plane made (its flow's event): not told back."""
        k = self.key(src)
        t = self._table.get(k)
        if t is not None and t.dest is dest:
            t.expires = max(t.expires, expires)
        else:
            t = self._table[k] = Template(dest, expires)
        self._table.move_to_end(k)
        while len(self._table) > self.max_entries:
            self._table.popitem(last=False)
        return t

    def sweep(self, now: float, budget: int = 10000) -> int:
        """Drop up to ``budget`` expired templates from the least recently used end."""
        removed = 0
        table = self._table
        for _ in range(min(budget, len(table))):
            k, t = next(iter(table.items()))
            if t.controlled > 0:
                table.move_to_end(k)  # alive while it controls connections
            elif now >= t.expires:
                del table[k]
                removed += 1
            else:
                break  # LRU order is expiry order for uncontrolled templates
        return removed
