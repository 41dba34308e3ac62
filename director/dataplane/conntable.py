"""The connection table: which real server owns each flow, with LVS-like timeouts.

Pure: no I/O, no clock; every call takes ``now`` (seconds, any monotonic origin).

Key: any hashable whose first item is the IP protocol number; the director
uses the codec's ``flow_key`` bytes (``proto | client | VIP | ports``). Value:
a :class:`Conn` holding the :class:`~director.dataplane.scheduler.Dest`, the TCP state,
the expiry and an opaque ``tag`` for the caller (the forwarder keeps the
flow's counters there).

Hot path. :meth:`ConnTable.refresh` is the whole cost of an established
flow's packet: one dict ``get``, an expiry compare, one tuple index for the
state transition, one attribute store and an ``OrderedDict.move_to_end``
(the LRU). Everything else (new flows, state changes, expiry, eviction) is
:meth:`ConnTable.lookup`'s slower path.

TCP state follows IPVS's INPUT-ONLY table (ip_vs_proto_tcp.c), the one IPVS
uses for DR and TUN where the director sees only client -> server packets;
a NAT flow (added with ``rkey``, the real server's key of it) follows the
two-way INPUT/OUTPUT tables, its replies through :meth:`ConnTable.reply`.
Each entry carries its table (``Conn.fsm``), so the hot path is the same.
Counters follow IPVS too: a new connection counts as *inactive*; it becomes
*active* while in ESTABLISHED. UDP flows are always inactive.

Bounded memory. Entries live in two LRU segments:

* ``unconfirmed``: TCP flows that never reached ESTABLISHED and UDP flows
  that have seen one packet. A SYN flood (or a spoofed UDP flood) only
  ever fills this segment;
* ``confirmed``: everything that proved two-way life.

When the table is full the oldest *unconfirmed* entry is evicted first, so a
flood churns its own entries and established connections keep their server;
only when no unconfirmed entry is left does the least recently used
confirmed one go.

Expiry is lazy on lookup, plus :meth:`ConnTable.sweep` which the engine calls
every ~100 ms: a calendar of one-second buckets where each entry is filed
under the second it may expire. Refreshing an entry on each packet does not
touch the calendar (an entry found alive in its bucket is re-filed), so the
counters lc/wlc read stay right without per-packet cost.

A down (not ``available``) destination's flows: if ``dest.reschedule`` (the
service's ``on_server_down: reschedule``) the next packet drops the entry and
lookup returns None, so the caller schedules the flow afresh; otherwise
(``keep``, IPVS's default) they keep flowing to it until they time out. A SYN
on an unconfirmed TCP flow of a down destination is rescheduled either way:
that flow never carried anything (a client reusing the port of an attempt the
dead server refused must not be sent back to it).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterator

from director.dataplane.scheduler import Dest, Template

# IPVS TCP states (include/uapi/linux/ip_vs.h order) plus one for UDP.
NONE, ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT, TIME_WAIT, CLOSE, CLOSE_WAIT, LAST_ACK, LISTEN, SYNACK, UDP = range(12)
STATE_NAMES = (
    "NONE", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT", "TIME_WAIT",
    "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "SYNACK", "UDP",
)
RESCHEDULE = -1
"""Pseudo next-state: a SYN reusing a closing flow's ports starts a new connection."""

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10

# IPVS INPUT-ONLY transitions, rows by event, columns by current state:
#          sNO  sES  sSS  sSR  sFW  sTW  sCL  sCW  sLA  sLI  sSA
_sNO, _sES, _sSS, _sSR, _sFW, _sTW, _sCL, _sCW, _sLA, _sLI, _sSA = range(11)
_INPUT_ONLY = {
    "syn": (_sSR, _sES, _sES, _sSR, _sSR, _sSR, _sSR, _sSR, _sSR, _sSR, _sSR),
    "fin": (_sCL, _sFW, _sSS, _sTW, _sFW, _sTW, _sCL, _sCW, _sLA, _sLI, _sTW),
    "ack": (_sCL, _sES, _sSS, _sES, _sFW, _sTW, _sCL, _sCW, _sCL, _sLI, _sES),
    "rst": (_sCL, _sCL, _sCL, _sSR, _sCL, _sCL, _sCL, _sCL, _sLA, _sLI, _sCL),
}
# IPVS conn_reuse_mode 1, plus bit 2 for DR/TUN: a SYN on a flow that is
# closing (the client reused its port) is a new connection, scheduled afresh,
# so a quiesced or down server does not inherit it.
_REUSE_ON_SYN = (FIN_WAIT, TIME_WAIT, CLOSE)


def _event(flags: int) -> str | None:
    """IPVS tcp_state_idx: RST beats SYN beats FIN beats ACK."""
    if flags & TCP_RST:
        return "rst"
    if flags & TCP_SYN:
        return "syn"
    if flags & TCP_FIN:
        return "fin"
    if flags & TCP_ACK:
        return "ack"
    return None


# IPVS's two-way table (tcp_states[] INPUT and OUTPUT), for NAT, where the
# director sees the client's packets (input) and the real server's (output).
_INPUT = {
    "syn": (_sSR, _sES, _sES, _sSR, _sSR, _sSR, _sSR, _sSR, _sSR, _sSR, _sSR),
    "fin": (_sCL, _sCW, _sSS, _sTW, _sTW, _sTW, _sCL, _sCW, _sLA, _sLI, _sTW),
    "ack": (_sES, _sES, _sSS, _sES, _sFW, _sTW, _sCL, _sCW, _sCL, _sLI, _sES),
    "rst": (_sCL, _sCL, _sCL, _sSR, _sCL, _sCL, _sCL, _sCL, _sLA, _sLI, _sSR),
}
_OUTPUT = {
    "syn": (_sSS, _sES, _sSS, _sSR, _sSS, _sSS, _sSS, _sSS, _sSS, _sLI, _sSR),
    "fin": (_sTW, _sFW, _sSS, _sTW, _sFW, _sTW, _sCL, _sTW, _sLA, _sLI, _sTW),
    "ack": (_sES, _sES, _sSS, _sES, _sFW, _sTW, _sCL, _sCW, _sLA, _sES, _sES),
    "rst": (_sCL, _sCL, _sSS, _sCL, _sCL, _sTW, _sCL, _sCL, _sCL, _sCL, _sCL),
}


def _build_next(rows: dict[str, tuple[int, ...]] = _INPUT_ONLY, reuse: bool = True) -> tuple[tuple[int, ...], ...]:
    """next[state][flags byte] -> next state; one double index per packet.

    ``reuse``: a SYN on a closing flow reschedules it (client packets only;
    a real server's SYN-ACK never does)."""
    table = []
    for state in range(12):
        row = []
        for flags in range(256):
            if state == UDP:
                row.append(UDP)
                continue
            ev = _event(flags)
            if ev is None:
                row.append(state)  # no flag IPVS cares about: no change
            elif reuse and ev == "syn" and state in _REUSE_ON_SYN:
                row.append(RESCHEDULE)
            else:
                row.append(rows[ev][state])
        table.append(tuple(row))
    return tuple(table)


NEXT = _build_next()
"""Client packets of a flow the director sees one way (DR, TUN): IPVS's INPUT-ONLY table."""
NEXT_IN = _build_next(_INPUT)
"""Client packets of a flow the director sees both ways (NAT): IPVS's INPUT table."""
NEXT_OUT = _build_next(_OUTPUT, reuse=False)
"""The real server's packets of a two-way flow (NAT): IPVS's OUTPUT table."""


def table_bytes(table: tuple[tuple[int, ...], ...]) -> bytes:
    """A transition table as 12 x 256 bytes (RESCHEDULE as 255), as C code reads it."""
    return bytes(255 if ns == RESCHEDULE else ns for row in table for ns in row)


NEXT_BYTES = table_bytes(NEXT)
"""NEXT as 12 x 256 bytes (RESCHEDULE as 255), for the engine's C loop (director/dataplane/_fastpath.c)."""


class Conn:
    """One tracked flow."""

    __slots__ = ("key", "dest", "state", "expires", "template", "due", "confirmed", "tag", "fsm", "rkey", "peer")

    def __init__(self, key: Any, dest: Dest, state: int, template: Template | None, tag: Any = None,
                 fsm: tuple = NEXT, rkey: Any = None) -> None:
        self.key = key
        self.dest = dest
        self.state = state
        self.expires = 0.0
        self.template = template
        self.due = 0
        """Calendar second it is filed under (0 = none); -1 once removed from the table."""
        self.confirmed = False
        self.tag = tag
        """The caller's, never read by the table."""
        self.fsm = fsm
        """The state table its key's packets follow: NEXT (one way), NEXT_IN (NAT)."""
        self.rkey = rkey
        """A two-way flow's key as the real server's packets carry it (NAT), else None."""
        self.peer = None
        """The caller's, never read by the table (NAT: the MACs the client's packets came with)."""

    def __repr__(self) -> str:
        return f"Conn({STATE_NAMES[self.state]}, {self.dest!r}, expires={self.expires})"


class ConnTable:
    """Bounded flow -> destination table with TCP state tracking and lazy expiry."""

    def __init__(
        self,
        max_entries: int = 1_000_000,
        *,
        tcp_established: float = 900.0,
        tcp_syn: float = 60.0,
        tcp_fin_wait: float = 120.0,
        tcp_time_wait: float = 120.0,
        tcp_close: float = 10.0,
        tcp_close_wait: float = 60.0,
        tcp_last_ack: float = 30.0,
        tcp_none: float = 2.0,
        udp: float = 300.0,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        # Timeout per state, IPVS defaults (tcp_timeouts[] in ip_vs_proto_tcp.c).
        self.timeouts = (
            tcp_none, tcp_established, 120.0, tcp_syn, tcp_fin_wait, tcp_time_wait,
            tcp_close, tcp_close_wait, tcp_last_ack, 120.0, 120.0, udp,
        )
        self._confirmed: OrderedDict[Any, Conn] = OrderedDict()
        self._unconfirmed: OrderedDict[Any, Conn] = OrderedDict()
        self._touch = self._confirmed.move_to_end  # the LRU step of every established packet
        self._calendar: dict[int, dict[Conn, None]] = {}  # second -> entries (an ordered set)
        self._replies: dict[Any, Conn] = {}  # two-way flows by their real server's key (NAT)
        self._cursor: int | None = None  # last calendar second swept
        self.evicted = 0
        """Entries dropped because the table was full (a counter for /metrics)."""
        self.expired = 0
        """Entries dropped because they timed out."""
        self.outside: Any = None
        """Another forwarder of the confirmed flows (the kernel data plane), or None:
        ``expiry(conn, now)`` is the expiry it gave the flow (it refreshes flows this
        table never sees a packet of, so an entry found expired here lives on
        if that is later), ``forget(conn)`` is told of every confirmed entry the
        table drops (expired, evicted, replaced, rescheduled)."""
        self.changed: Callable[[Conn], None] | None = None
        """Told of each entry whose state changed, that was confirmed, or whose expiry a sweep
        found moved on (connection sync: what a backup must hear). Never on the hot path:
        the packets :meth:`refresh` handles change nothing a backup needs until the sweep."""

    @classmethod
    def from_config(cls, cfg: Any) -> ConnTable:
        """From a glb.config.ConnectionTableConfig; TIME_WAIT follows tcp_fin_wait as in IPVS's defaults."""
        return cls(
            cfg.max_entries,
            tcp_established=cfg.tcp_established,
            tcp_fin_wait=cfg.tcp_fin_wait,
            tcp_time_wait=cfg.tcp_fin_wait,
            tcp_close=cfg.tcp_close,
            udp=cfg.udp,
        )

    def __len__(self) -> int:
        return len(self._confirmed) + len(self._unconfirmed)

    def __contains__(self, key: Any) -> bool:
        return key in self._confirmed or key in self._unconfirmed

    # ---- the packet path ---------------------------------------------------

    def refresh(self, key: Any, flags: int, now: float) -> Conn | None:
        """The hot path: a confirmed, live flow whose packet changes only its expiry.

        Refreshes the expiry and the LRU position and returns the entry; or
        returns None, changing nothing, when anything more is needed
        (unknown or unconfirmed flow, expired, a down destination, a state
        change): then :meth:`lookup` does it. A :meth:`lookup` with the same
        arguments right after a successful refresh changes nothing more, so a
        caller that cannot use the entry may still fall back to it.
        """
        c = self._confirmed.get(key)
        if c is None or c.expires <= now or not c.dest.available:
            return None
        state = c.state
        if c.fsm[state][flags] != state:
            return None
        c.expires = now + self.timeouts[state]
        self._touch(key)
        return c

    @property
    def confirmed_flows(self) -> OrderedDict[Any, Conn]:
        """The confirmed segment, in LRU order. Only for the engine's C loop,
        which applies :meth:`refresh` to it; nothing else may change it."""
        return self._confirmed

    def lookup(self, key: Any, flags: int, now: float) -> Conn | None:
        """The flow's entry after applying this packet (TCP flags; 0 for UDP), or None.

        None means: unknown, expired, a SYN reusing a closing flow, or a down
        destination whose service reschedules. The caller then schedules the
        flow and calls :meth:`add`.
        """
        c = self.refresh(key, flags, now)
        if c is not None:
            return c
        c = self._confirmed.get(key)
        if c is None:
            return self._lookup_unconfirmed(key, flags, now)
        if (c.expires <= now or not c.dest.available) and self._drop_stale(c, now):
            return None
        ns = c.fsm[c.state][flags]
        if ns != c.state:
            if not self._transition(c, ns, now):
                return None
        else:
            c.expires = now + self.timeouts[ns]
        self._confirmed.move_to_end(key)
        return c

    def _lookup_unconfirmed(self, key: Any, flags: int, now: float) -> Conn | None:
        c = self._unconfirmed.get(key)
        if c is None:
            return None
        if not c.dest.available and c.state != UDP and _event(flags) == "syn":
            # A SYN for a flow that never got established, whose server is down: the client
            # reused the port of an attempt that server refused (or retransmits to it). Nothing
            # was ever served on it, so it is a new connection: schedule it afresh.
            self._remove(c)
            return None
        if (c.expires <= now or not c.dest.available) and self._drop_stale(c, now):
            return None
        ns = c.fsm[c.state][flags]
        if ns != c.state:
            if not self._transition(c, ns, now):
                return None
        else:
            c.expires = now + self.timeouts[ns]
        if c.state == ESTABLISHED or c.state == UDP:
            self._confirm(c)
        return c

    def _confirm(self, c: Conn) -> None:
        """Two-way life proven (TCP handshake done, or a second UDP packet): to the confirmed segment."""
        del self._unconfirmed[c.key]
        c.confirmed = True
        self._confirmed[c.key] = c
        if self.changed is not None:
            self.changed(c)

    def reply(self, rkey: Any, flags: int, now: float) -> Conn | None:
        """The two-way flow a real server's packet belongs to (NAT), after applying it; or None.

        IPVS's OUTPUT table moves the state. Never creates an entry: a
        reply without one is not the director's to forward.
        """
        c = self._replies.get(rkey)
        if c is None:
            return None
        if c.expires <= now and self._drop_stale(c, now):
            return None
        ns = NEXT_OUT[c.state][flags]
        if ns != c.state:
            if not self._transition(c, ns, now):
                return None
        else:
            c.expires = now + self.timeouts[ns]
        if c.confirmed:
            self._confirmed.move_to_end(c.key)
        elif c.state == ESTABLISHED or c.state == UDP:
            self._confirm(c)  # UDP: an answer is two-way life
        return c

    def peek_reply(self, rkey: Any, now: float) -> Conn | None:
        """:meth:`peek` by a real server's key (ICMP errors from its side)."""
        c = self._replies.get(rkey)
        if c is None or c.expires <= now:
            return None
        return c

    def _outlived(self, c: Conn, now: float) -> bool:
        """True if another forwarder of this flow (``outside``) kept it alive past ``now``: adopt its expiry."""
        later = self.outside.expiry(c, now) if self.outside is not None else 0.0
        if later > now:
            c.expires = later
            return True
        return False

    def _drop_stale(self, c: Conn, now: float) -> bool:
        """An entry found expired or pointing at a down server: True if it was removed."""
        if c.expires <= now:
            if not self._outlived(c, now):
                self._remove(c)
                self.expired += 1
                return True
            if c.dest.available:
                return False
        if c.dest.reschedule:  # down, and the service says its flows move
            self._remove(c)
            return True
        return False  # down, 'keep': forward to it until the flow times out (IPVS)

    def _transition(self, c: Conn, ns: int, now: float) -> bool:
        """Apply a state change; False if the flow must be rescheduled instead."""
        if ns == RESCHEDULE:
            self._remove(c)
            return False
        if ns == ESTABLISHED:
            c.dest.counts.add(1, -1)
        elif c.state == ESTABLISHED:
            c.dest.counts.add(-1, 1)
        c.state = ns
        c.expires = now + self.timeouts[ns]
        if int(c.expires) + 1 < c.due:
            self._file(c)  # an earlier expiry must be seen by sweep in time
        if self.changed is not None and c.confirmed:
            self.changed(c)  # an unconfirmed flow is told when it is confirmed
        return True

    def follow(self, c: Conn, state: int, expires: float) -> None:
        """Take a state change another forwarder of the flow applied (the kernel data plane, for the
        services it schedules): counts, confirmation and connection sync as :meth:`_transition`'s."""
        if state == c.state or state == RESCHEDULE:
            return
        if state == ESTABLISHED:
            c.dest.counts.add(1, -1)
        elif c.state == ESTABLISHED:
            c.dest.counts.add(-1, 1)
        c.state = state
        c.expires = expires
        self._file(c)
        if not c.confirmed and state == ESTABLISHED:
            self._confirm(c)
        elif self.changed is not None and c.confirmed:
            self.changed(c)

    def peek(self, key: Any, now: float) -> Conn | None:
        """The live entry without touching state, expiry or LRU order (for ICMP errors)."""
        c = self._confirmed.get(key) or self._unconfirmed.get(key)
        if c is None or c.expires <= now:
            return None
        return c

    def add(self, key: Any, dest: Dest, flags: int, now: float, template: Template | None = None,
            tag: Any = None, rkey: Any = None) -> Conn:
        """Track a new flow to ``dest``; ``flags`` are the first packet's TCP flags.

        Replaces any entry under the same key. Evicts when full (oldest
        unconfirmed first). Counts the flow on ``dest`` (and ``template``).
        ``rkey``: the real server's packets' key when the director sees them
        too (NAT): the flow then follows IPVS's two-way state table.
        """
        # From NONE a first packet leads to SYN_RECV (SYN) or CLOSE (a flow
        # picked up mid-stream, IPVS's sloppy case): never ESTABLISHED, so the
        # connection starts inactive as in IPVS.
        fsm = NEXT if rkey is None else NEXT_IN
        state = fsm[NONE][flags] if key[0] == 6 else UDP
        c = Conn(key, dest, state, template, tag, fsm, rkey)
        if state == RESCHEDULE:  # pragma: no cover - NONE never reuses
            raise AssertionError(state)
        return self._insert(c, now + self.timeouts[state], now, confirmed=False)

    def install(self, key: Any, dest: Dest, state: int, expires: float, now: float,
                template: Template | None = None, *, confirmed: bool = True, tag: Any = None,
                rkey: Any = None) -> Conn:
        """Track a flow another director scheduled (connection sync), with the state and expiry it sent.

        Like :meth:`add` otherwise: replaces an entry under the same key,
        evicts when full, counts the flow on ``dest`` (active if ESTABLISHED)
        and ``template``. The entry then lives and times out as any other.
        """
        if not 0 <= state < len(STATE_NAMES) or (state == UDP) != (key[0] != 6):
            raise ValueError(f"state {state} does not fit a protocol {key[0]} flow")
        fsm = NEXT if rkey is None else NEXT_IN
        return self._insert(Conn(key, dest, state, template, tag, fsm, rkey), expires, now, confirmed)

    def _insert(self, c: Conn, expires: float, now: float, confirmed: bool) -> Conn:
        old = self._confirmed.get(c.key) or self._unconfirmed.get(c.key)
        if old is not None:
            self._remove(old)
        if c.rkey is not None:
            old = self._replies.get(c.rkey)
            if old is not None:
                self._remove(old)
        while len(self._confirmed) + len(self._unconfirmed) >= self.max_entries:
            self._evict()
        if c.state == ESTABLISHED:
            c.dest.counts.add(1, 0)
        else:
            c.dest.counts.add(0, 1)
        if c.template is not None:
            c.template.controlled += 1
        c.expires = expires
        c.confirmed = confirmed
        (self._confirmed if confirmed else self._unconfirmed)[c.key] = c
        if c.rkey is not None:
            self._replies[c.rkey] = c
        if self._cursor is None:
            self._cursor = int(now)
        self._file(c)
        return c

    # ---- removal -------------------------------------------------------------

    def _file(self, c: Conn) -> None:
        """(Re)file an entry in the calendar under the second after its expiry."""
        cal = self._calendar
        if c.due > 0:
            bucket = cal.get(c.due)
            if bucket is not None:
                bucket.pop(c, None)
        due = int(c.expires) + 1
        c.due = due
        bucket = cal.get(due)
        if bucket is None:
            cal[due] = bucket = {}
        bucket[c] = None

    def _release(self, c: Conn) -> None:
        """Give back what an entry holds: its calendar slot, counters and template."""
        bucket = self._calendar.get(c.due)
        if bucket is not None:
            bucket.pop(c, None)
        c.due = -1
        if c.rkey is not None and self._replies.get(c.rkey) is c:
            del self._replies[c.rkey]
        if c.confirmed and self.outside is not None:
            self.outside.forget(c)
        if c.state == ESTABLISHED:
            c.dest.counts.add(-1, 0)
        else:
            c.dest.counts.add(0, -1)
        if c.template is not None:
            c.template.controlled -= 1

    def _remove(self, c: Conn) -> None:
        if c.due < 0:
            return
        (self._confirmed if c.confirmed else self._unconfirmed).pop(c.key, None)
        self._release(c)

    def _evict(self) -> None:
        seg = self._unconfirmed if self._unconfirmed else self._confirmed
        _, c = seg.popitem(last=False)
        self._release(c)
        self.evicted += 1

    def remove(self, key: Any) -> bool:
        """Forget a flow (e.g. an operator flush)."""
        c = self._confirmed.get(key) or self._unconfirmed.get(key)
        if c is None:
            return False
        self._remove(c)
        return True

    def flush(self, match: Callable[[Conn], bool]) -> int:
        """Remove every entry ``match`` accepts (e.g. a removed service's); O(n), off the hot path."""
        doomed = [c for c in self if match(c)]
        for c in doomed:
            self._remove(c)
        return len(doomed)

    def sweep(self, now: float, budget: int = 20000) -> int:
        """Expire entries whose calendar second has passed; returns how many were removed.

        Examines at most ``budget`` entries so one call stays short; call it
        again (every ~100 ms) to catch up.
        """
        if self._cursor is None:
            return 0
        removed = 0
        examined = 0
        target = int(now)
        cal = self._calendar
        if target - self._cursor > 4 * len(cal) + 64:
            seconds = sorted(s for s in cal if s <= target)  # a long jump: visit only what exists
        else:
            seconds = range(self._cursor + 1, target + 1)
        for s in seconds:
            bucket = cal.pop(s, None)
            if bucket:
                entries = list(bucket)
                for i, c in enumerate(entries):
                    if examined >= budget:
                        cal[s] = dict.fromkeys(entries[i:])  # resume here next time
                        return removed
                    examined += 1
                    c.due = 0  # taken out of this bucket
                    if c.expires <= now and not self._outlived(c, now):
                        self._remove_unfiled(c)
                        self.expired += 1
                        removed += 1
                    else:
                        self._file(c)  # refreshed since it was filed
                        if self.changed is not None and c.confirmed:
                            self.changed(c)  # a backup's copy would expire at the old time
            self._cursor = s
        self._cursor = max(self._cursor, target)
        return removed

    def _remove_unfiled(self, c: Conn) -> None:
        (self._confirmed if c.confirmed else self._unconfirmed).pop(c.key, None)
        self._release(c)

    # ---- inspection ----------------------------------------------------------

    def get(self, key: Any) -> Conn | None:
        """The entry under ``key`` whatever its expiry (tests, /status)."""
        return self._confirmed.get(key) or self._unconfirmed.get(key)

    def __iter__(self) -> Iterator[Conn]:
        yield from list(self._unconfirmed.values())
        yield from list(self._confirmed.values())

    @property
    def unconfirmed(self) -> int:
        return len(self._unconfirmed)

    @property
    def confirmed(self) -> int:
        return len(self._confirmed)


class FragmentTable:
    """Where the fragments of one IP datagram go: its first fragment decides.

    Later fragments carry no ports, so the connection table cannot place
    them. The first fragment (which has the ports) records its flow's entry
    (or any value: the forwarder stores the :class:`Conn`) under
    ``(protocol, src, dst, fragment id)``; later fragments look it up.
    A later fragment that arrives before its first is dropped (counted) and
    the sender's retransmission recovers; bounded FIFO like the reassembly
    queues of a kernel (timeout 30 s as ipfrag_time).
    """

    def __init__(self, max_entries: int = 65536, timeout: float = 30.0) -> None:
        self.max_entries = max_entries
        self.timeout = timeout
        self._table: OrderedDict[tuple, tuple[Any, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def add(self, key: tuple, dest: Any, now: float) -> None:
        table = self._table
        table[key] = (dest, now + self.timeout)
        table.move_to_end(key)
        while len(table) > self.max_entries:
            table.popitem(last=False)

    def get(self, key: tuple, now: float) -> Any:
        hit = self._table.get(key)
        if hit is None:
            return None
        if hit[1] <= now:
            del self._table[key]
            return None
        return hit[0]
