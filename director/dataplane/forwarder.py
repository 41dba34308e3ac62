"""The per-packet recipe: codec + connection table + scheduler + persistence.

Pure: no sockets, no clock, no threads. The engine (director/dataplane/engine.py) hands
each received frame to :meth:`Forwarder.forward` with ``now`` and performs
the action it returns; the control plane hands it a :class:`Plan` (what the
health table decided, plus MAC addresses) with :meth:`Forwarder.apply`.
Everything here is exercised by tests/director/dataplane/test_forwarder.py with scapy
frames and made-up times.

Actions returned by ``forward`` and ``fast`` are the types of
director/dataplane/actions.py (None: dropped, the reason counted in
``drops``). Everything a forwarding mode does differently is its module's
in director/modes/: the forwarder holds each real server's transmit object
(``Mode.transmit``) and asks it per packet, except that a
:data:`~director.dataplane.actions.MacRewrite` is the action itself.

Decisions and why:

* Only a SYN opens a TCP connection (IPVS), except for services whose
  answer is stateless (``mh`` without persistence): a flow picked up
  mid-stream (a standby that took over, a restarted director) hashes to the
  server it had, so it is forwarded and tracked (state CLOSE, as IPVS's
  sloppy mode does).
* A down, disabled or removed server takes no new flow; its established
  flows stay (``on_server_down: keep``) or are rescheduled on their next
  packet (``reschedule``). A draining server (weight 0) always keeps them.
  A server whose MAC (DR) or next hop (TUN) is unknown cannot be reached:
  it is treated as down until the neighbour table knows it.
* Dest objects survive a new plan when the server stays (same service,
  address and port), so established flows keep their server, counters
  carry on and schedulers keep their position.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from director.dataplane import codec
from director.dataplane.codec import (
    ARP_REQUEST,
    FIRST_FRAGMENT,
    FLOW,
    ICMP_ERROR,
    LATER_FRAGMENT,
    NEIGHBOR_SOLICIT,
    Drop,
)
from director.control.health import PER_SERVICE, ServerKey, ServiceHealth
from director.dataplane.actions import MacRewrite
from director.dataplane.conntable import Conn, ConnTable, FragmentTable
from director.dataplane.counters import CountTable
from director.dataplane.scheduler import Dest, Persistence, Scheduler, make_scheduler
from director.modes import MODES

PROTOCOLS = {"tcp": 6, "udp": 17}
TCP_SYN = 0x02
STATELESS_SCHEDULERS = frozenset({"mh"})
"""Schedulers whose choice depends only on the packet: safe to pick up flows mid-stream."""


# --------------------------------------------------------------------------
# The plan: what the control plane tells the packet path (picklable)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerPlan:
    """One real server of one service as the packet path must treat it now."""

    key: ServerKey
    address: bytes
    """Packed address (4 or 16 bytes)."""
    weight: int
    """Effective weight: 0 = no new flows (drained, down, disabled)."""
    available: bool
    """False = down or disabled: no new flows, established per ``reschedule``."""
    reschedule: bool = False
    """Established flows leave this server on their next packet while it is not available."""
    mac: bytes | None = None
    """DR: the real server's MAC; TUN: the next hop's. None = not resolved (yet)."""
    mtu: int = 1500
    """TUN: MTU of the link towards the next hop."""
    slot: int = -1
    """Row of its connection counts in the workers' shared count table
    (director/dataplane/counters.py; set by the engine); -1 = counted by each
    worker alone."""


@dataclass(frozen=True, slots=True)
class VipPlan:
    address: bytes
    port: int
    proto: int
    label: str
    """``addr:port/proto`` as in the snapshot (glb.config.VIP's str)."""


@dataclass(frozen=True, slots=True)
class ServicePlan:
    name: str
    forwarding: str
    """A mode's name (director.modes.MODES)."""
    scheduler: str
    vips: tuple[VipPlan, ...]
    servers: tuple[ServerPlan, ...]
    mh_table_size: int = 65537
    persistence: tuple[float, int, int] | None = None
    """(timeout, netmask, netmask6) or None."""
    on_server_down: str = "keep"
    sorry: ServerPlan | None = None
    """Takes new flows while ``sorry_active``."""
    sorry_active: bool = False


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything the packet path needs; the engine applies a new one whole."""

    mac: bytes
    """The director's MAC on its interface (source of every frame it sends)."""
    services: tuple[ServicePlan, ...] = ()
    source4: bytes | None = None
    """TUN outer source, IPv4 (director.address)."""
    source6: bytes | None = None

    @property
    def vips(self) -> frozenset[bytes]:
        return frozenset(v.address for s in self.services for v in s.vips)


def _packed(addr: Any) -> bytes:
    return ipaddress.ip_address(str(addr)).packed


def build_plan(
    site: Any,
    health: Iterable[ServiceHealth],
    mac: bytes,
    neighbours: dict[bytes, bytes | None] | None = None,
    mtu: int = 1500,
) -> Plan:
    """The plan for ``site`` (glb.config.Site) given the health table's verdicts.

    ``health`` is ``HealthTable.services()``; ``neighbours`` maps a real
    server's packed address to the MAC to send to (DR: its own; TUN: the
    next hop's), None when unresolved. Pure.
    """
    neighbours = neighbours or {}
    by_name = {sh.name: sh for sh in health}
    services = []
    for svc in site.services:
        sh = by_name.get(svc.name)
        status = {s.key: s for s in sh.servers} if sh else {}
        servers = []
        for rs in svc.real_servers:
            key = ServerKey(svc.name, str(rs.address), rs.port or 0)
            st = status.get(key)
            addr = rs.address.packed
            if st is None:  # not in the health table yet: nothing proven
                servers.append(ServerPlan(key, addr, 0, False, False, neighbours.get(addr), mtu))
                continue
            rule = st.rule
            available = rule.new_flows or st.state == "draining"
            reschedule = rule.established == PER_SERVICE and svc.on_server_down == "reschedule"
            servers.append(ServerPlan(key, addr, st.weight, available, reschedule, neighbours.get(addr), mtu))
        sorry = None
        if svc.sorry_server is not None:
            addr = svc.sorry_server.packed
            sorry = ServerPlan(ServerKey(svc.name, str(svc.sorry_server), 0), addr, 1, True, False,
                               neighbours.get(addr), mtu)
        persistence = None
        if svc.persistence is not None:
            persistence = (svc.persistence.timeout, svc.persistence.netmask, svc.persistence.netmask6)
        vips = tuple(VipPlan(v.address.packed, v.port, PROTOCOLS[v.protocol], str(v)) for v in svc.vips)
        services.append(ServicePlan(
            svc.name, svc.forwarding, svc.scheduler, vips, tuple(servers), svc.mh_table_size,
            persistence, svc.on_server_down, sorry, bool(sh and sh.sorry_active),
        ))
    d = site.director
    return Plan(mac, tuple(services),
                d.address.packed if d.address is not None else None,
                d.address6.packed if d.address6 is not None else None)


# --------------------------------------------------------------------------
# Runtime state
# --------------------------------------------------------------------------


class ServerDest(Dest):
    """A Dest as the packet path knows it: its key and how it is reached."""

    __slots__ = ("key", "forwarding")

    def __init__(self, key: ServerKey, addr: bytes, forwarding: str, counts: Any = None) -> None:
        super().__init__(addr, 0, available=False, counts=counts)
        self.key = key
        self.forwarding = forwarding


class Route:
    """One (real server, VIP) pair: what the packet path counts.

    Each flow holds its route (``Conn.tag``), so a packet costs two
    increments; per-server and per-VIP figures are sums over routes, made
    when stats are read. Routes outlive plans, so counters never go back.
    """

    __slots__ = ("server", "vip", "packets", "bytes", "conns", "live")

    def __init__(self, server: ServerKey, vip: str) -> None:
        self.server = server
        self.vip = vip
        """The VIP's label, ``addr:port/proto``."""
        self.packets = 0
        self.bytes = 0
        self.conns = 0
        """New connections scheduled along it."""
        self.live = True
        """False while the VIP is not in the plan (its flows take the full path, which drops them)."""


class _Service:
    """One service at run time: its schedulers (one per address family), persistence, dests."""

    __slots__ = ("plan", "dests", "sched4", "sched6", "persistence", "sorry", "stateless")

    def __init__(self, plan: ServicePlan) -> None:
        self.plan = plan
        self.dests: dict[ServerKey, ServerDest] = {}
        self.sched4: Scheduler | None = None
        self.sched6: Scheduler | None = None
        self.persistence: Persistence | None = None
        self.sorry: ServerDest | None = None
        self.stateless = plan.scheduler in STATELESS_SCHEDULERS and plan.persistence is None


@dataclass
class ForwarderStats:
    """A picklable copy of the counters (the engine sends it to the control plane)."""

    servers: dict[ServerKey, tuple[int, int, int, int, int]] = field(default_factory=dict)
    """key -> (active, inactive, packets, bytes, new connections)."""
    vips: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    """``addr:port/proto`` -> (packets, bytes, new connections)."""
    drops: dict[str, int] = field(default_factory=dict)
    """Drop reason (the metrics label) -> packets."""
    forwarded: int = 0
    replies: int = 0
    """ARP/NDP answers and ICMP errors sent."""
    connections: int = 0
    """Entries in the connection table now."""
    evicted: int = 0
    expired: int = 0

    def merge(self, other: ForwarderStats) -> ForwarderStats:
        """Sum of two workers' counters."""
        out = ForwarderStats()
        for k in set(self.servers) | set(other.servers):
            a, b = self.servers.get(k, (0,) * 5), other.servers.get(k, (0,) * 5)
            out.servers[k] = tuple(x + y for x, y in zip(a, b))  # type: ignore[assignment]
        for k in set(self.vips) | set(other.vips):
            a, b = self.vips.get(k, (0,) * 3), other.vips.get(k, (0,) * 3)
            out.vips[k] = tuple(x + y for x, y in zip(a, b))  # type: ignore[assignment]
        out.drops = dict(Counter(self.drops) + Counter(other.drops))
        for name in ("forwarded", "replies", "connections", "evicted", "expired"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out


class Forwarder:
    """Decides, for each frame, where it goes. One per engine worker."""

    def __init__(self, table: ConnTable | None = None, frags: FragmentTable | None = None,
                 counts: CountTable | None = None) -> None:
        """``counts``: the packet workers' shared count table (None = this forwarder counts alone)."""
        # "is None", not "or": an empty table is falsy (it has a length).
        self.table = ConnTable() if table is None else table
        self.counts = counts
        self.frags = FragmentTable() if frags is None else frags
        self.plan = Plan(b"\x00" * 6)
        self.vips: frozenset[bytes] = frozenset()
        self.drops: Counter[Drop] = Counter()
        self.replies = 0
        self._services: dict[str, _Service] = {}
        # (VIP address, port, protocol) -> (service, the VIP's label)
        self._by_vip: dict[tuple[bytes, int, int], tuple[_Service, str]] = {}
        self._routes: dict[tuple[ServerKey, str], Route] = {}
        self._refresh = self.table.refresh
        self.ident = 0
        """The last outer IPv4 id a mode used (tunnels), per worker."""
        self.kernel: Any = None
        """The kernel data plane's sync (director/dataplane/kernel.py KernelSync), or None:
        told of every flow :meth:`forward` decides, so the kernel takes the flow's next packets."""

    # -- control --------------------------------------------------------------

    def apply(self, plan: Plan) -> None:
        """Adopt a new plan. Servers that stay keep their Dest (flows, counters)."""
        services: dict[str, _Service] = {}
        by_vip: dict[tuple[bytes, int, int], tuple[_Service, str]] = {}
        for sp in plan.services:
            old = self._services.get(sp.name)
            svc = _Service(sp)
            for s in sp.servers:
                d = old.dests.get(s.key) if old else None
                if d is None or d.forwarding != sp.forwarding:
                    d = self._dest(s, sp.forwarding)
                self._configure(d, s, plan, sp)
                svc.dests[s.key] = d
            if old is not None:
                # Removed servers: no new flows; their established flows follow on_server_down.
                for key, d in old.dests.items():
                    if key not in svc.dests:
                        d.available = False
                        d.weight = 0
                        d.reschedule = sp.on_server_down == "reschedule"
            dests = list(svc.dests.values())
            same = old is not None and (old.plan.scheduler, old.plan.mh_table_size) == (sp.scheduler, sp.mh_table_size)
            families = {4 if len(v.address) == 4 else 6 for v in sp.vips}
            for fam, attr in ((4, "sched4"), (6, "sched6")):
                if fam not in families:
                    continue  # a v4-only service needs no v6 table (an mh table costs ~40 ms)
                sched = getattr(old, attr) if same else None
                if sched is None:
                    sched = make_scheduler(sp.scheduler, dests, family=fam, table_size=sp.mh_table_size)
                else:
                    sched.update(dests)
                setattr(svc, attr, sched)
            if sp.persistence is not None:
                keep = old is not None and old.persistence is not None and old.plan.persistence == sp.persistence
                svc.persistence = old.persistence if keep else Persistence(*sp.persistence)
            if sp.sorry is not None:
                d = old.sorry if old is not None and old.sorry is not None and old.sorry.key == sp.sorry.key else None
                svc.sorry = d or self._dest(sp.sorry, sp.forwarding)
                self._configure(svc.sorry, sp.sorry, plan, sp)
                svc.sorry.weight = 1 if sp.sorry_active else 0
            for v in sp.vips:
                by_vip[(v.address, v.port, v.proto)] = (svc, v.label)
            services[sp.name] = svc
        for name, old in self._services.items():
            if name not in services:  # a removed service: its flows follow its on_server_down
                for d in old.dests.values():
                    d.available = False
                    d.weight = 0
                    d.reschedule = old.plan.on_server_down == "reschedule"
        labels = {label for _, label in by_vip.values()}
        for r in self._routes.values():
            r.live = r.vip in labels
        # Swap whole objects: a packet sees the old plan or the new one.
        self._services, self._by_vip, self.plan = services, by_vip, plan
        self.vips = plan.vips

    def _dest(self, s: ServerPlan, forwarding: str) -> ServerDest:
        """A new Dest, counted in the shared table's row for it when there is one."""
        counts = self.counts.counts(s.slot) if self.counts is not None and s.slot >= 0 else None
        return ServerDest(s.key, s.address, forwarding, counts)

    @staticmethod
    def _configure(d: ServerDest, s: ServerPlan, plan: Plan, sp: ServicePlan) -> None:
        tx = MODES[sp.forwarding].transmit(s, plan)
        d.tx = tx
        # No way to reach it = down for the packet path (and its flows follow reschedule).
        d.available = s.available and tx is not None
        d.weight = s.weight if tx is not None else 0
        d.reschedule = s.reschedule

    def sweep(self, now: float, budget: int = 20000) -> int:
        """Expire connections and persistence templates (call every ~100 ms)."""
        removed = self.table.sweep(now, budget)
        for svc in self._services.values():
            if svc.persistence is not None:
                svc.persistence.sweep(now, budget)
        return removed

    # -- the packet path ----------------------------------------------------------

    def fast(self, buf, start: int, length: int, now: float):
        """The common packet, or None: then call :meth:`forward`.

        ``buf[start:start + length]`` is the frame and ``buf[start - 10:start]``
        its virtio_net_hdr, as in the engine's ring; ``buf`` must slice to
        ``bytes`` (an mmap'd ring, bytes). Handles a TCP/UDP packet (IPv4
        without options, IPv6 without extension headers, not a fragment) of
        a confirmed flow that changes nothing but the flow's expiry: what
        nearly every packet of an established connection is, when its
        server's mode takes it (DR always; TUN when the packet fits the
        tunnel and its checksum is complete). It
        reads the connection-table key straight off the wire (codec.flow_key's
        layout) instead of parsing, and returns the same action
        :meth:`forward` would. Anything else, including every frame parse
        would drop, returns None with no effect beyond a refreshed expiry,
        which forward repeats harmlessly.
        """
        if length < 42:
            return None
        h = buf[start + 12:start + 48]  # IPv4: ethertype .. TCP flags
        if h[2] == 0x45 and h[0] == 8 and not h[1] and not h[8] & 0x3F and not h[9]:
            total = h[4] << 8 | h[5]  # IPv4 without options, not a fragment
            if total + 14 > length:
                return None
            if h[11] == 6:
                if total < 34:
                    return None
                flags = h[35]
            elif total < 28:
                return None
            else:
                flags = 0
            key = h[11:12] + h[14:26]
            family = 4
        elif h[0] == 0x86 and h[1] == 0xDD and length >= 62:
            h = buf[start + 14:start + 68]  # IPv6 header .. TCP flags
            if h[0] >> 4 != 6:
                return None
            total = 40 + (h[4] << 8 | h[5])
            if total + 14 > length:
                return None
            if h[6] == 6:
                if total < 54:
                    return None
                flags = h[53]
            elif h[6] == 17 and total >= 48:
                flags = 0
            else:
                return None  # extension headers, ICMPv6, too short
            key = h[6:7] + h[8:44]
            family = 6
        else:
            return None
        c = self._refresh(key, flags, now)
        if c is None:
            return None
        tx = c.dest.tx
        r = c.tag
        if not r.live:
            return None
        if tx.__class__ is MacRewrite:  # the same action for every packet to this server (DR)
            r.packets += 1
            r.bytes += total
            return tx
        if tx is None:
            return None  # unreachable: forward knows what to do
        return tx.fast(self, buf, start, total, family, r)

    def forward(self, frame, now: float, vnet=None):
        """What to do with one frame (see the module docstring for the actions).

        ``vnet`` is the frame's 10-byte virtio_net_hdr (TUN needs it), or None.
        """
        p = codec.parse(frame, self.vips)
        if p.__class__ is Drop:
            self.drops[p] += 1
            return None
        kind = p.kind
        if kind == FLOW:
            frag = p.frag
            if frag == LATER_FRAGMENT:
                c = self.frags.get((p.proto, p.src, p.dst, p.frag_id), now)
                if c is None:
                    self.drops[Drop.FRAGMENT_UNKNOWN] += 1
                    return None
            else:
                c = self.table.lookup(p.key, p.flags, now)
                if c is None:
                    c = self._new_flow(p, now)
                    if c is None:
                        return None
                if frag == FIRST_FRAGMENT:
                    self.frags.add((p.proto, p.src, p.dst, p.frag_id), c, now)
            if self.kernel is not None:
                self.kernel.flow(c)
        elif kind == ICMP_ERROR:
            # About a packet the real server sent: its owner gets it. Never creates state.
            c = self.table.peek(p.key, now)
            if c is None:
                self.drops[Drop.NO_CONNECTION] += 1
                return None
        elif kind == ARP_REQUEST:
            self.replies += 1
            return [codec.arp_reply(frame, p, self.plan.mac)]
        elif kind == NEIGHBOR_SOLICIT:
            self.replies += 1
            return [codec.neighbor_advert(frame, p, self.plan.mac)]
        else:  # pragma: no cover - parse returns no other kind
            return None
        tx = c.dest.tx
        if tx is None:
            self.drops[Drop.NO_NEIGHBOUR] += 1
            return None
        if tx.__class__ is MacRewrite:
            r = c.tag
            r.packets += 1
            r.bytes += p.length
            return tx
        return tx.slow(self, frame, p, vnet, c.tag)

    def _new_flow(self, p, now: float) -> Conn | None:
        """Schedule a flow the table does not know; None if it must be dropped (counted)."""
        hit = self._by_vip.get((p.dst, p.dport, p.proto))
        if hit is None:
            self.drops[Drop.NO_SERVICE] += 1
            return None
        svc, label = hit
        if p.proto == 6 and not p.flags & TCP_SYN and not svc.stateless:
            c = self._adopt(p, now) if self.kernel is not None else None
            if c is None:
                self.drops[Drop.NO_CONNECTION] += 1  # IPVS: only a SYN opens a TCP connection
            return c
        sched = svc.sched4 if len(p.src) == 4 else svc.sched6
        if sched is None:
            self.drops[Drop.NO_SERVICE] += 1
            return None
        tpl = None
        if svc.persistence is not None:
            tpl = svc.persistence.schedule(sched, p.src, p.sport, p.dst, p.dport, now)
            dest = tpl.dest if tpl is not None else None
        else:
            dest = sched.schedule(p.src, p.sport, p.dst, p.dport, now)
        if dest is None:
            sorry = svc.sorry
            if sorry is not None and svc.plan.sorry_active and sorry.tx is not None:
                dest = sorry
            else:
                self.drops[Drop.NO_DESTINATION] += 1
                return None
        route = self.route(dest.key, label)
        route.conns += 1
        return self.table.add(p.key, dest, p.flags, now, template=tpl, tag=route)

    def _adopt(self, p, now: float) -> Conn | None:
        """A flow the kernel holds and this table does not (a previous director's, over pinned maps):
        taken over with its server, state and expiry, then this packet applied to it."""
        got = self.kernel.adopt(p.key, now)
        if got is None:
            return None
        route, dest, state, expires = got
        self.table.install(p.key, dest, state, expires, now, tag=route)
        return self.table.lookup(p.key, p.flags, now)

    def route(self, server: ServerKey, label: str) -> Route:
        """The Route of a server and a VIP label, made the first time."""
        route = self._routes.get((server, label))
        if route is None:
            self._routes[(server, label)] = route = Route(server, label)
        return route

    def plan_routes(self) -> Iterable[tuple[ServerKey, str, ServerDest]]:
        """(server, VIP label, Dest) for every server (sorry servers included) of every VIP of the plan."""
        for svc in self._services.values():
            dests = list(svc.dests.values()) + ([svc.sorry] if svc.sorry is not None else [])
            for v in svc.plan.vips:
                for d in dests:
                    yield d.key, v.label, d

    # -- reporting ----------------------------------------------------------------

    def dests(self) -> Iterable[ServerDest]:
        for svc in self._services.values():
            yield from svc.dests.values()

    def stats(self) -> ForwarderStats:
        out = ForwarderStats()
        by_server: dict[ServerKey, list[int]] = {}
        by_vip: dict[str, list[int]] = {}
        for r in self._routes.values():
            for acc in (by_server.setdefault(r.server, [0, 0, 0]), by_vip.setdefault(r.vip, [0, 0, 0])):
                acc[0] += r.packets
                acc[1] += r.bytes
                acc[2] += r.conns
            out.forwarded += r.packets
        for svc in self._services.values():
            for key, d in svc.dests.items():
                # This worker's own connections: merging the workers' reports sums them.
                out.servers[key] = (*d.counts.own(), *by_server.get(key, (0, 0, 0)))
            for v in svc.plan.vips:
                out.vips[v.label] = tuple(by_vip.get(v.label, (0, 0, 0)))
        out.drops = {str(reason): n for reason, n in self.drops.items()}
        out.replies = self.replies
        out.connections = len(self.table)
        out.evicted = self.table.evicted
        out.expired = self.table.expired
        return out
