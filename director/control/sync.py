"""Connection sync between the members of a pair (the IPVS sync daemon's role): wire format, sender, receiver.

Pure: bytes, records and ``now`` in; bytes, table changes and counters out.
The master's :class:`SyncSender` coalesces connection-table changes and
turns them into UDP payloads no larger than the LAN's MTU allows, at most
``max_rate`` records a second; a backup's :class:`SyncReceiver` applies
them to its own :class:`~director.dataplane.conntable.ConnTable` (same bound,
timeouts running), so the flows keep their real server when it takes over.
The UDP adapter is :mod:`director.control.sync_socket`.

Wire format, version 1 (all integers big-endian; docs/ha.md has the table)::

    header   version u8 = 1 | sync id u8 (the VRID) | record count u16 | sequence u32
    record   type u8 | length u8 (of the whole record) | body

    type 1, connection:
             state u8 (conntable state) | flags u8 | timeout ms u32 | dest port u16
             | dest address (4 or 16) | flow key (13 or 37: proto, client, VIP, ports)
             flags: 1 key is IPv6, 2 dest is IPv6, 4 confirmed, 8 made through a template
    type 3, member hello (a backup tells the master it is there; docs/ha.md):
             state u8 (0 init, 1 backup, 2 master) | flags u8 (1 healthy) | interval ms u32
             | id length u8 | id (UTF-8)
    type 2, persistence template:
             flags u8 | 0 u8 | timeout ms u32 | dest port u16 | dest address (4 or 16)
             | client network address (4 or 16) | service name length u8 | service name (UTF-8)
             flags: 1 client is IPv6, 2 dest is IPv6

Every record says its length, so a receiver skips a type it does not know
(a newer sender) and counts it; a datagram of another version is ignored
whole and counted. Nothing a sender puts on the wire can make a receiver
raise.
"""

from __future__ import annotations

import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from director.dataplane.conntable import STATE_NAMES, UDP, Conn, ConnTable
from director.dataplane.scheduler import Dest, Persistence

VERSION = 1
HEADER = struct.Struct("!BBHI")
CONN, TEMPLATE, MEMBER = 1, 2, 3
_CONN = struct.Struct("!BBBBIH")
_TEMPLATE = struct.Struct("!BBBxIH")
_MEMBER = struct.Struct("!BBBBIB")
MEMBER_STATES = ("init", "backup", "master")
F_HEALTHY = 1
_KEY4, _KEY6 = 13, 37
F_KEY6, F_DEST6, F_CONFIRMED, F_TEMPLATED = 1, 2, 4, 8
F_CLIENT6 = 1
_MAX_MS = 0xFFFFFFFF
_EPS = 1e-9  # token arithmetic in floats: 0.01 s at 100/s must make a whole token
UDP_HEADER, IP_HEADER = 8, {4: 20, 6: 40}


@dataclass(frozen=True)
class ConnRecord:
    """One connection as the master has it now."""

    key: bytes
    """The flow key (director.dataplane.codec.flow_key)."""
    state: int
    timeout: float
    """Seconds until it expires on the master."""
    dest_addr: bytes
    dest_port: int
    confirmed: bool = True
    templated: bool = False
    """Created through a persistence template: the backup links it to its copy of the template."""

    @classmethod
    def from_conn(cls, c: Conn, now: float) -> ConnRecord:
        return cls(c.key, c.state, max(0.0, c.expires - now), c.dest.addr, c.dest.port, c.confirmed,
                   c.template is not None)

    @property
    def ident(self) -> Any:
        return (CONN, self.key)


@dataclass(frozen=True)
class TemplateRecord:
    """One persistence template: clients of ``client``'s network stick to the destination."""

    service: str
    client: bytes
    """The client network's (masked) address."""
    dest_addr: bytes
    dest_port: int
    timeout: float

    @property
    def ident(self) -> Any:
        return (TEMPLATE, self.service, self.client)


@dataclass(frozen=True)
class MemberRecord:
    """A pair member's hello: who it is, its VRRP state, whether it could take over now.

    VRRP backups are silent, so without this the master could not tell an
    operator whether its standby is there (the snapshot's ``pair``).
    """

    member: str
    state: str
    """One of MEMBER_STATES."""
    healthy: bool
    interval: float
    """Seconds until the next hello: the master counts the member gone after three missed."""

    @property
    def ident(self) -> Any:
        return (MEMBER, self.member)


Record = ConnRecord | TemplateRecord | MemberRecord


def _ms(seconds: float) -> int:
    return min(_MAX_MS, max(0, round(seconds * 1000)))


def _encode_conn(r: ConnRecord) -> bytes:
    flags = ((F_KEY6 if len(r.key) == _KEY6 else 0) | (F_DEST6 if len(r.dest_addr) == 16 else 0)
             | (F_CONFIRMED if r.confirmed else 0) | (F_TEMPLATED if r.templated else 0))
    size = _CONN.size + len(r.dest_addr) + len(r.key)
    return _CONN.pack(CONN, size, r.state, flags, _ms(r.timeout), r.dest_port) + r.dest_addr + r.key


def _decode_conn(data: bytes) -> ConnRecord:
    _, size, state, flags, ms, port = _CONN.unpack_from(data)
    alen, klen = 16 if flags & F_DEST6 else 4, _KEY6 if flags & F_KEY6 else _KEY4
    if size != _CONN.size + alen + klen or state >= len(STATE_NAMES):
        raise ValueError("connection record")
    key = data[_CONN.size + alen:size]
    if (state == UDP) != (key[0] != 6):
        raise ValueError("connection state for its protocol")
    return ConnRecord(key, state, ms / 1000, data[_CONN.size:_CONN.size + alen], port,
                      bool(flags & F_CONFIRMED), bool(flags & F_TEMPLATED))


def _encode_template(r: TemplateRecord) -> bytes:
    name = r.service.encode()
    flags = (F_CLIENT6 if len(r.client) == 16 else 0) | (F_DEST6 if len(r.dest_addr) == 16 else 0)
    size = _TEMPLATE.size + len(r.dest_addr) + len(r.client) + 1 + len(name)
    if size > 255:
        raise ValueError("service name too long for a template record")
    return (_TEMPLATE.pack(TEMPLATE, size, flags, _ms(r.timeout), r.dest_port) + r.dest_addr + r.client
            + bytes([len(name)]) + name)


def _decode_template(data: bytes) -> TemplateRecord:
    _, size, flags, ms, port = _TEMPLATE.unpack_from(data)
    alen, clen = 16 if flags & F_DEST6 else 4, 16 if flags & F_CLIENT6 else 4
    at = _TEMPLATE.size + alen + clen
    if size < at + 1 or size != at + 1 + data[at]:
        raise ValueError("template record")
    return TemplateRecord(data[at + 1:size].decode(), data[at - clen:at], data[_TEMPLATE.size:_TEMPLATE.size + alen],
                          port, ms / 1000)


def _encode_member(r: MemberRecord) -> bytes:
    name = r.member.encode()
    size = _MEMBER.size + len(name)
    if size > 255:
        raise ValueError("member id too long for a hello record")
    return _MEMBER.pack(MEMBER, size, MEMBER_STATES.index(r.state), F_HEALTHY if r.healthy else 0,
                        _ms(r.interval), len(name)) + name


def _decode_member(data: bytes) -> MemberRecord:
    _, size, state, flags, ms, n = _MEMBER.unpack_from(data)
    if size != _MEMBER.size + n or state >= len(MEMBER_STATES):
        raise ValueError("member record")
    return MemberRecord(data[_MEMBER.size:size].decode(), MEMBER_STATES[state], bool(flags & F_HEALTHY), ms / 1000)


def is_hello(data: bytes) -> bool:
    """Whether a datagram carries member hellos (they are sent alone): the control plane's, not the tables'."""
    return len(data) > HEADER.size and data[HEADER.size] == MEMBER


_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    ConnRecord: _encode_conn, TemplateRecord: _encode_template, MemberRecord: _encode_member}
_DECODERS: dict[int, tuple[int, Callable[[bytes], Record]]] = {
    CONN: (_CONN.size, _decode_conn),
    TEMPLATE: (_TEMPLATE.size, _decode_template),
    MEMBER: (_MEMBER.size, _decode_member),
}
"""Record type -> (fixed part's size, decoder). A new record type is one entry in each table."""


def encode_record(r: Record) -> bytes:
    return _ENCODERS[type(r)](r)


def encode(records: list[Record] | list[bytes], sync_id: int, seq: int) -> bytes:
    """One datagram: the header, then the records (or records already encoded)."""
    body = [r if isinstance(r, bytes) else encode_record(r) for r in records]
    return HEADER.pack(VERSION, sync_id, len(body), seq & 0xFFFFFFFF) + b"".join(body)


@dataclass
class Batch:
    """What :func:`decode` made of a datagram."""

    sync_id: int = -1
    seq: int = -1
    records: list[Record] = field(default_factory=list)
    problems: Counter = field(default_factory=Counter)
    """What was ignored, by reason: short, version, truncated, unknown_type, bad_record, count."""


def decode(data: bytes) -> Batch:
    """Parse a datagram; never raises. What cannot be parsed is skipped and counted in ``problems``."""
    batch = Batch()
    if len(data) < HEADER.size:
        batch.problems["short"] += 1
        return batch
    version, sync_id, count, seq = HEADER.unpack_from(data)
    if version != VERSION:  # another layout altogether: not even its sync id is trusted
        batch.problems["version"] += 1
        return batch
    batch.sync_id, batch.seq = sync_id, seq
    pos, seen = HEADER.size, 0
    while pos < len(data):
        if len(data) - pos < 2 or data[pos + 1] < 2 or pos + data[pos + 1] > len(data):
            batch.problems["truncated"] += 1
            break
        kind, size = data[pos], data[pos + 1]
        seen += 1
        entry = _DECODERS.get(kind)
        if entry is None:
            batch.problems["unknown_type"] += 1
        elif size < entry[0]:
            batch.problems["bad_record"] += 1
        else:
            try:
                batch.records.append(entry[1](data[pos:pos + size]))
            except (ValueError, UnicodeDecodeError):
                batch.problems["bad_record"] += 1
        pos += size
    if seen != count:
        batch.problems["count"] += 1
    return batch


def should_sync(packets: int, state_changed: bool, threshold: int = 3, period: int = 50) -> bool:
    """IPVS's sync_threshold rule: send a connection at its ``threshold``-th packet, every ``period`` after, and on each state change.

    A connection that never gets ``threshold`` packets (a scan, a lone SYN)
    costs the LAN nothing.
    """
    return state_changed or packets == threshold or (
        period > 0 and packets > threshold and (packets - threshold) % period == 0)


class SyncSender:
    """The master's side: coalesce changes, then datagrams at a bounded rate.

    :meth:`change` queues a record; a newer record for the same connection
    or template replaces the queued one in place (it keeps its turn), so a
    burst of changes to one flow costs one record. :meth:`poll` returns the
    datagrams the rate allows now, each at most the MTU's worth; call it
    again at :meth:`next_due`.
    """

    def __init__(self, sync_id: int, *, mtu: int = 1500, family: int = 4, max_rate: int = 20_000,
                 burst: float = 0.05, max_pending: int = 1_000_000) -> None:
        self.sync_id = sync_id
        self.room = mtu - IP_HEADER[family] - UDP_HEADER
        """Bytes a datagram may carry: one UDP payload that is never fragmented."""
        if self.room < HEADER.size + 255:
            raise ValueError("mtu too small for a sync datagram")
        self.rate = float(max_rate)
        self.capacity = max(1.0, max_rate * burst)
        """Token bucket depth: records that may leave at once after a quiet spell."""
        self.tokens = self.capacity
        self.max_pending = max_pending
        self._pending: OrderedDict[Any, bytes] = OrderedDict()
        self._last: float | None = None
        self.seq = 0
        self.counters: Counter = Counter()
        """records, datagrams, bytes sent; overflow: changes dropped because max_pending were waiting."""

    def __len__(self) -> int:
        return len(self._pending)

    def change(self, record: Record, now: float) -> None:
        ident = record.ident
        if ident not in self._pending and len(self._pending) >= self.max_pending:
            self._pending.popitem(last=False)
            self.counters["overflow"] += 1
        self._pending[ident] = encode_record(record)

    def _refill(self, now: float) -> None:
        if self._last is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate)
        self._last = now

    def poll(self, now: float) -> list[bytes]:
        self._refill(now)
        out = []
        while self._pending and self.tokens >= 1 - _EPS:
            records, size = [], HEADER.size
            while self._pending and self.tokens >= 1 - _EPS:
                ident, rec = next(iter(self._pending.items()))
                if size + len(rec) > self.room:
                    break
                del self._pending[ident]
                records.append(rec)
                size += len(rec)
                self.tokens -= 1
            self.seq = (self.seq + 1) & 0xFFFFFFFF
            out.append(encode(records, self.sync_id, self.seq))
            self.counters["records"] += len(records)
            self.counters["datagrams"] += 1
            self.counters["bytes"] += size
        return out

    def next_due(self, now: float) -> float | None:
        """When :meth:`poll` has something to send (None: nothing is waiting)."""
        if not self._pending:
            return None
        self._refill(now)
        return now if self.tokens >= 1 - _EPS else now + (1 - self.tokens) / self.rate


class SyncTarget(Protocol):
    """How a backup finds its own objects for what the master names (its config is the same)."""

    def conn_dest(self, key: bytes, addr: bytes, port: int) -> tuple[Dest, Persistence | None] | None:
        """The destination of the flow's service at ``addr``:``port``, and the service's persistence, if any."""

    def template_dest(self, service: str, addr: bytes, port: int) -> tuple[Dest, Persistence] | None:
        """The destination of ``service`` at ``addr``:``port`` and its persistence table."""


class SyncReceiver:
    """A backup's side: apply datagrams to its own connection table and persistence templates."""

    def __init__(self, table: ConnTable, target: SyncTarget, sync_id: int, *,
                 owns: Callable[[Record], bool] | None = None,
                 tag: Callable[[bytes, Dest], Any] | None = None,
                 reply_key: Callable[[bytes, Dest], Any] | None = None) -> None:
        """``owns(record)``: whether this table gets the packets of the record's client (packet
        workers split clients among them: each applies only its own; None = every client)."""
        self.table = table
        self.target = target
        self.sync_id = sync_id
        self.owns = owns
        self.tag = tag
        """``tag(flow key, dest)``: the entry's tag (the forwarder's Route), as a flow scheduled here gets."""
        self.reply_key = reply_key
        """``reply_key(flow key, dest)``: the key of the real server's packets of the flow (NAT), or None."""
        self.counters: Counter = Counter()
        """conns and templates applied; unknown_dest (not in our config); other_sync_id; lost (sequence
        gaps); not_ours (another packet worker's client); members (hellos, not the table's business);
        and every decode problem by its reason."""
        self._seq: dict[Any, int] = {}

    def apply(self, data: bytes, now: float, sender: Any = None) -> None:
        batch = decode(data)
        self.counters.update(batch.problems)
        if batch.sync_id != self.sync_id:
            if batch.sync_id >= 0:
                self.counters["other_sync_id"] += 1
            return
        last = self._seq.get(sender)
        if last is not None:
            gap = (batch.seq - last - 1) & 0xFFFFFFFF
            if gap < 1 << 31:
                self.counters["lost"] += gap
            else:  # behind the last one: reordered, or the sender restarted
                self.counters["out_of_order"] += 1
        self._seq[sender] = batch.seq
        for rec in batch.records:
            _APPLY[type(rec)](self, rec, now)

    def _conn(self, r: ConnRecord, now: float) -> None:
        if self.owns is not None and not self.owns(r):
            self.counters["not_ours"] += 1
            return
        found = self.target.conn_dest(r.key, r.dest_addr, r.dest_port)
        if found is None:
            self.counters["unknown_dest"] += 1
            return
        dest, persistence = found
        if r.timeout <= 0:
            self.table.remove(r.key)
            return
        template = None
        if r.templated and persistence is not None:
            client = r.key[1:5] if len(r.key) == _KEY4 else r.key[1:17]
            t = persistence.get(client, now)
            template = t if t is not None and t.dest is dest else None
        tag = self.tag(r.key, dest) if self.tag is not None else None
        rkey = self.reply_key(r.key, dest) if self.reply_key is not None else None
        self.table.install(r.key, dest, r.state, now + r.timeout, now, template, confirmed=r.confirmed, tag=tag,
                           rkey=rkey)
        self.counters["conns"] += 1

    def _template(self, r: TemplateRecord, now: float) -> None:
        if self.owns is not None and not self.owns(r):
            self.counters["not_ours"] += 1
            return
        found = self.target.template_dest(r.service, r.dest_addr, r.dest_port)
        if found is None:
            self.counters["unknown_dest"] += 1
            return
        dest, persistence = found
        persistence.install(r.client, dest, now + r.timeout)
        self.counters["templates"] += 1


    def _member(self, r: MemberRecord, now: float) -> None:
        self.counters["members"] += 1


_APPLY: dict[type, Callable[[SyncReceiver, Any, float], None]] = {
    ConnRecord: SyncReceiver._conn,
    TemplateRecord: SyncReceiver._template,
    MemberRecord: SyncReceiver._member,
}
