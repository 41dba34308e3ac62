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
* Cross-site spill (director/control/spill.py decides it): while a
  service's plan has a ``spill``, its new flows are scheduled onto that
  site's real servers only, by the service's scheduler and their published
  weights (persistence templates are not consulted: they name local
  servers), and tunnelled to them (the ``tun`` mode, whatever the
  service's own). A spilled flow keeps its remote server until it ends:
  a remote Dest is never made unavailable or rescheduled, so neither the
  spill ending nor the local servers returning moves it; it just takes no
  new flows (weight 0) once its site stops being the target.
* A standby spill target (``SpillPlan.active`` False) is ready to take new
  flows: its Dests and schedulers are built as for an active one. New flows
  go there once the service's spill flag is armed
  (director/dataplane/spillflags.py: the control plane's decision, written
  to shared memory before the plan that says so is even built), so the
  first connection after the last local server is marked down does not
  wait for that plan. Those flows are counted (``spilled_ahead``).
* While a service spills, a SYN on a local flow that never got established
  is a new connection and spills too (the client reused the port of an
  attempt a dead server refused, before the plan said it was down).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from director.dataplane import codec, nat
from director.dataplane.codec import (
    ARP_REQUEST,
    FIRST_FRAGMENT,
    FLOW,
    ICMP_ERROR,
    LATER_FRAGMENT,
    NEIGHBOR_SOLICIT,
    REPLY,
    Drop,
)
from director.control.health import PER_SERVICE, ServerKey, ServiceHealth
from director.dataplane.actions import MacRewrite
from director.dataplane.conntable import ESTABLISHED, UDP, Conn, ConnTable, FragmentTable
from director.dataplane.counters import CountTable
from director.dataplane.kernelmaps import kernel_schedules
from director.dataplane.scheduler import Dest, Persistence, Scheduler, Template, make_scheduler
from director.control.spill import spill_service
from director.dataplane.spillflags import NOT_ARMED, spills
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
    parked_vips: tuple[VipPlan, ...] = ()
    """VIPs the director does not own now (a standby, packetpath.without_vips): never answered
    or forwarded, but connection sync places a flow's service by them."""
    spill: SpillPlan | None = None
    """Set while the service spills: every new flow goes to these servers."""

    def all_servers(self) -> tuple[ServerPlan, ...]:
        """Every server the plan may send to: its own, the sorry server, the spill target's."""
        sorry = (self.sorry,) if self.sorry is not None else ()
        return self.servers + sorry + (self.spill.servers if self.spill is not None else ())


@dataclass(frozen=True, slots=True)
class SpillPlan:
    """Where a spilling service's new flows go: another site's real servers, by IP-in-IP."""

    site: str
    servers: tuple[ServerPlan, ...]
    """Keyed ``ServerKey(spill_service(service, site), address, port)``, so their
    counters never mix with a local server's."""
    active: bool = True
    """False: a standby target, in the plan so that its next hops are resolved and its schedulers built
    ahead; new flows go there only once the service's spill flag is armed (director/dataplane/spillflags.py)."""
    flag: int = -1
    """The service's cell in the workers' spill flags (set by the engine); -1: none, the plan alone decides."""


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything the packet path needs; the engine applies a new one whole."""

    mac: bytes
    """The director's MAC on its interface (source of every frame it sends)."""
    services: tuple[ServicePlan, ...] = ()
    source4: bytes | None = None
    """TUN outer source, IPv4 (director.address)."""
    source6: bytes | None = None
    lan_mac: bytes | None = None
    """NAT: the director's MAC on the real servers' side (None: ``mac``, one interface for both)."""
    local: frozenset[bytes] = frozenset()
    """The director's own addresses: a NAT real server's packet to one is the kernel's (a probe's answer)."""

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
    spills: Any = None,
) -> Plan:
    """The plan for ``site`` (glb.config.Site) given the health table's verdicts.

    ``health`` is ``HealthTable.services()``; ``neighbours`` maps a real
    server's packed address to the MAC to send to (DR: its own; TUN: the
    next hop's), None when unresolved; ``spills`` maps a service name to its
    ``director.control.spill.Spill`` (absent or None: not spilling). Pure.
    """
    neighbours = neighbours or {}
    spills = spills or {}
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
            spill=_spill_plan(svc.name, spills.get(svc.name), neighbours, mtu),
        ))
    d = site.director
    local = {a.packed for a in (d.address, d.address6) if a is not None}
    if d.lan is not None:
        local.update(a.ip.packed for a in (d.lan.address, d.lan.address6) if a is not None)
    return Plan(mac, tuple(services),
                d.address.packed if d.address is not None else None,
                d.address6.packed if d.address6 is not None else None,
                local=frozenset(local))


def _spill_plan(service: str, spill: Any, neighbours: dict[bytes, bytes | None], mtu: int) -> SpillPlan | None:
    if spill is None:
        return None
    label = spill_service(service, spill.site)
    servers = []
    for rs in spill.servers:
        addr = _packed(rs.address)
        servers.append(ServerPlan(ServerKey(label, rs.address, rs.port), addr, rs.weight, True, False,
                                  neighbours.get(addr), mtu))
    return SpillPlan(spill.site, tuple(servers), spill.active)


SPILL_MODE = MODES["tun"]
"""How spilled flows reach the other site's servers, whatever the service's own mode."""


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

    __slots__ = ("server", "vip", "packets", "bytes", "conns", "live", "out_packets", "out_bytes")

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
        self.out_packets = 0
        """The real server's packets sent back to clients (NAT; ipvsadm's OutPkts)."""
        self.out_bytes = 0


class _Service:
    """One service at run time: its schedulers (one per address family), persistence, dests."""

    __slots__ = ("plan", "dests", "sched4", "sched6", "persistence", "sorry", "stateless",
                 "remote", "target", "spill4", "spill6", "kernel_made")

    def __init__(self, plan: ServicePlan) -> None:
        self.plan = plan
        self.dests: dict[ServerKey, ServerDest] = {}
        self.sched4: Scheduler | None = None
        self.sched6: Scheduler | None = None
        self.remote: dict[ServerKey, ServerDest] = {}
        """Every other site's server this service ever spilled to (their flows stay until they end)."""
        self.target: dict[ServerKey, ServerDest] = {}
        """The spill target's servers, active or standby (a standby's join ``remote`` with their first flow)."""
        self.spill4: Scheduler | None = None
        self.spill6: Scheduler | None = None
        """The schedulers over the target's servers: new flows go there only while the service spills."""
        self.persistence: Persistence | None = None
        self.sorry: ServerDest | None = None
        self.stateless = plan.scheduler in STATELESS_SCHEDULERS and plan.persistence is None
        self.kernel_made = kernel_schedules(plan)
        """The kernel data plane, if there is one, may have made this service's flows itself."""


@dataclass
class ForwarderStats:
    """A picklable copy of the counters (the engine sends it to the control plane)."""

    servers: dict[ServerKey, tuple[int, int, int, int, int]] = field(default_factory=dict)
    """key -> (active, inactive, packets, bytes, new connections)."""
    vips: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    """``addr:port/proto`` -> (packets, bytes, new connections)."""
    drops: dict[str, int] = field(default_factory=dict)
    """Drop reason (the metrics label) -> packets."""
    outbound: dict[ServerKey, tuple[int, int]] = field(default_factory=dict)
    """key -> (packets, bytes) of its replies sent back to clients (NAT's second direction)."""
    forwarded: int = 0
    replies: int = 0
    """ARP/NDP answers and ICMP errors sent."""
    connections: int = 0
    """Entries in the connection table now."""
    evicted: int = 0
    expired: int = 0
    spilled_ahead: int = 0
    """New flows spilled to a standby target on the spill flag, before the plan made it active."""

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
        for k in set(self.outbound) | set(other.outbound):
            a, b = self.outbound.get(k, (0, 0)), other.outbound.get(k, (0, 0))
            out.outbound[k] = (a[0] + b[0], a[1] + b[1])
        for name in ("forwarded", "replies", "connections", "evicted", "expired", "spilled_ahead"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out


def reply_key(key: bytes, dest: ServerDest) -> bytes | None:
    """The key of a flow's packets from its real server when the director sees them (NAT), else None."""
    if not MODES[dest.forwarding].two_way:
        return None
    proto, client, _vip, sport, dport = codec.split_key(key)
    return codec.flow_key(proto, dest.addr, client, dest.key.port or dport, sport)


class Forwarder:
    """Decides, for each frame, where it goes. One per engine worker."""

    def __init__(self, table: ConnTable | None = None, frags: FragmentTable | None = None,
                 counts: CountTable | None = None, spill_flags: Any = None) -> None:
        """``counts``: the packet workers' shared count table (None = this forwarder counts alone);
        ``spill_flags``: the spill flags' cells (director/dataplane/spillflags.py; None = plans alone)."""
        # "is None", not "or": an empty table is falsy (it has a length).
        self.table = ConnTable() if table is None else table
        self.counts = counts
        self.frags = FragmentTable() if frags is None else frags
        self.plan = Plan(b"\x00" * 6)
        self.vips: frozenset[bytes] = frozenset()
        self.drops: Counter[Drop] = Counter()
        self.replies = 0
        self.spill_flags = spill_flags
        self.spilled_ahead = 0
        self._services: dict[str, _Service] = {}
        # (VIP address, port, protocol) -> (service, the VIP's label)
        self._by_vip: dict[tuple[bytes, int, int], tuple[_Service, str]] = {}
        self._by_any_vip: dict[tuple[bytes, int, int], tuple[_Service, str]] = {}
        """As ``_by_vip``, parked VIPs too: where a synced flow belongs."""
        self._routes: dict[tuple[ServerKey, str], Route] = {}
        self._refresh = self.table.refresh
        self.ident = 0
        """The last outer IPv4 id a mode used (tunnels), per worker."""
        self.conn: Conn | None = None
        """The flow of the packet a mode's ``slow`` is deciding (NAT learns where replies go)."""
        self._sources: frozenset[bytes] = frozenset()
        """Addresses of the real servers whose packets come back through the director (NAT)."""
        self.kernel: Any = None
        """The kernel data plane's sync (director/dataplane/kernel.py KernelSync), or None:
        told of every flow :meth:`forward` decides, so the kernel takes the flow's next packets."""

    # -- control --------------------------------------------------------------

    def apply(self, plan: Plan) -> None:
        """Adopt a new plan. Servers that stay keep their Dest (flows, counters)."""
        services: dict[str, _Service] = {}
        by_vip: dict[tuple[bytes, int, int], tuple[_Service, str]] = {}
        by_any_vip: dict[tuple[bytes, int, int], tuple[_Service, str]] = {}
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
            self._schedulers(svc, old if same else None, ("sched4", "sched6"), dests)
            if sp.persistence is not None:
                keep = old is not None and old.persistence is not None and old.plan.persistence == sp.persistence
                svc.persistence = old.persistence if keep else Persistence(*sp.persistence)
            if sp.sorry is not None:
                d = old.sorry if old is not None and old.sorry is not None and old.sorry.key == sp.sorry.key else None
                svc.sorry = d or self._dest(sp.sorry, sp.forwarding)
                self._configure(svc.sorry, sp.sorry, plan, sp)
                svc.sorry.weight = 1 if sp.sorry_active else 0
            self._apply_spill(svc, old, plan)
            for v in sp.vips:
                by_vip[(v.address, v.port, v.proto)] = (svc, v.label)
            for v in sp.parked_vips:
                by_any_vip[(v.address, v.port, v.proto)] = (svc, v.label)
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
        sources = frozenset(s.address for sp in plan.services if MODES[sp.forwarding].two_way
                            for s in (*sp.servers, *((sp.sorry,) if sp.sorry is not None else ())))
        # Swap whole objects: a packet sees the old plan or the new one.
        self._services, self._by_vip, self.plan = services, by_vip, plan
        self._by_any_vip = {**by_any_vip, **by_vip}
        self.vips = plan.vips
        self._sources = sources

    def _apply_spill(self, svc: _Service, old: _Service | None, plan: Plan) -> None:
        """Carry the remote Dests over; schedulers over the target's servers, standby or active
        (a standby's are ready for the spill flag)."""
        sp = svc.plan
        if old is not None:
            svc.remote = old.remote
        for d in svc.remote.values():
            d.weight = 0  # no new flows unless the current target lists it; established ones stay
        if sp.spill is None:
            return
        dests = []
        for s in sp.spill.servers:
            d = svc.remote.get(s.key) or (old.target.get(s.key) if old is not None else None)
            if d is None:
                d = self._dest(s, SPILL_MODE.name)
            if sp.spill.active:
                svc.remote[s.key] = d
            tx = SPILL_MODE.transmit(s, plan)
            d.tx = tx
            d.available = True  # never unavailable: that would move or drop its spilled flows
            d.reschedule = False
            d.weight = s.weight if tx is not None else 0
            svc.target[s.key] = d
            dests.append(d)
        was = old.plan.spill if old is not None else None
        same = was is not None and was.site == sp.spill.site \
            and (old.plan.scheduler, old.plan.mh_table_size) == (sp.scheduler, sp.mh_table_size)
        self._schedulers(svc, old if same else None, ("spill4", "spill6"), dests)

    @staticmethod
    def _schedulers(svc: _Service, old: _Service | None, attrs: tuple[str, str], dests: list[ServerDest]) -> None:
        """Set ``svc``'s IPv4 and IPv6 schedulers ``attrs`` over ``dests``, updating ``old``'s when given."""
        sp = svc.plan
        families = {4 if len(v.address) == 4 else 6 for v in sp.vips}
        for fam, attr in zip((4, 6), attrs):
            if fam not in families:
                continue  # a v4-only service needs no v6 table (an mh table costs ~40 ms)
            sched = getattr(old, attr) if old is not None else None
            if sched is None:
                sched = make_scheduler(sp.scheduler, dests, family=fam, table_size=sp.mh_table_size)
            else:
                sched.update(dests)
            setattr(svc, attr, sched)

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
            if p is Drop.NOT_VIP and self._sources:
                return self._reply(frame, now, vnet)
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
                if c is None or (not c.confirmed and p.flags & TCP_SYN and p.proto == 6
                                 and self._respill(c, p, now)):
                    c = self._new_flow(p, now)
                    if c is None:
                        return None
                if frag == FIRST_FRAGMENT:
                    self.frags.add((p.proto, p.src, p.dst, p.frag_id), c, now)
            if self.kernel is not None and c.confirmed:  # only confirmed flows go into the kernel
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
        self.conn = c
        return tx.slow(self, frame, p, vnet, c.tag)

    @property
    def nat_sources(self) -> frozenset[bytes]:
        """The NAT real servers' addresses (packed), whose packets come back through the director."""
        return self._sources

    def _reply(self, frame, now: float, vnet):
        """A frame not to a VIP, maybe a NAT real server's (two-way modes: ``Mode.two_way``)."""
        p = nat.parse_reply(frame, self._sources)
        if p.__class__ is Drop:
            self.drops[p] += 1
            return None
        if p.dst in self.plan.local:
            return None  # to the director itself (a health probe's answer): the kernel's, not a flow's
        if p.kind == REPLY:
            if p.frag == LATER_FRAGMENT:
                c = self.frags.get((p.proto, p.src, p.dst, p.frag_id), now)
            else:
                c = self.table.reply(p.key, p.flags, now)
                if c is None and self.kernel is not None:
                    c = self._adopt_reply(p, now)
                if c is not None and p.frag == FIRST_FRAGMENT:
                    self.frags.add((p.proto, p.src, p.dst, p.frag_id), c, now)
        else:
            c = self.table.peek_reply(p.key, now)
        if c is None:
            self.drops[Drop.REPLY_NO_CONNECTION] += 1
            return None
        if self.kernel is not None and p.kind == REPLY:
            self.kernel.flow(c)  # its state may have moved (or a UDP answer confirmed it): the kernel's too
        tx = c.dest.tx
        if tx is None:
            self.drops[Drop.NO_NEIGHBOUR] += 1
            return None
        return tx.reply(self, frame, p, vnet, c)

    def _new_flow(self, p, now: float) -> Conn | None:
        """Schedule a flow the table does not know; None if it must be dropped (counted)."""
        hit = self._by_vip.get((p.dst, p.dport, p.proto))
        if hit is None:
            self.drops[Drop.NO_SERVICE] += 1
            return None
        svc, label = hit
        if svc.kernel_made and self.kernel is not None and not (p.proto == 6 and p.flags & TCP_SYN):
            # The kernel may have scheduled it (glb_tc.bpf.c new_flow). Not for a SYN: one the kernel
            # left opens a connection (or reuses a closing one's ports), scheduled afresh either way.
            c = self._adopt(p, now)
            if c is not None:
                return c
        if p.proto == 6 and not p.flags & TCP_SYN and not svc.stateless:
            c = self._adopt(p, now) if self.kernel is not None else None
            if c is None:
                self.drops[Drop.NO_CONNECTION] += 1  # IPVS: only a SYN opens a TCP connection
            return c
        tpl = None
        if self._spilling(svc, now):  # every new flow goes to the target site
            spill = svc.spill4 if len(p.src) == 4 else svc.spill6
            dest = spill.schedule(p.src, p.sport, p.dst, p.dport, now) if spill is not None else None
            if dest is None:
                self.drops[Drop.NO_DESTINATION] += 1
                return None
            if not svc.plan.spill.active:  # on the flag, ahead of the plan
                self.spilled_ahead += 1
                svc.remote.setdefault(dest.key, dest)
            return self._add(p, dest, label, now, None)
        sched = svc.sched4 if len(p.src) == 4 else svc.sched6
        if sched is None:
            self.drops[Drop.NO_SERVICE] += 1
            return None
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
        return self._add(p, dest, label, now, tpl)

    def _spilling(self, svc: _Service, now: float) -> bool:
        """Whether ``svc``'s new flows go to its spill target now (spillflags.spills, with its flag)."""
        spill = svc.plan.spill
        if spill is None:
            return False
        flags = self.spill_flags
        armed = flags[spill.flag] if flags is not None and spill.flag >= 0 else NOT_ARMED
        return spills(spill, armed, now)

    def _respill(self, c: Conn, p, now: float) -> bool:
        """A SYN on a flow that never got established (``c``), to a local server of a service that
        spills now: forget it (True), so it is scheduled afresh, to the target. The client reused
        the port of an attempt a dead server refused, before the plan said that server was down."""
        hit = self._by_vip.get((p.dst, p.dport, p.proto))
        if hit is None:
            return False
        svc = hit[0]
        if svc.remote.get(c.dest.key) is c.dest or not self._spilling(svc, now):
            return False
        self.table.remove(p.key)
        return True

    def _add(self, p, dest: ServerDest, label: str, now: float, tpl) -> Conn:
        route = self.route(dest.key, label)
        route.conns += 1
        return self.table.add(p.key, dest, p.flags, now, template=tpl, tag=route, rkey=reply_key(p.key, dest))

    # -- connection sync (director/dataplane/connsync.py) ---------------------------

    def service_of(self, vip: bytes, port: int, proto: int) -> tuple[_Service, str] | None:
        """The service behind a VIP (owned or parked) and the VIP's label."""
        return self._by_any_vip.get((vip, port, proto))

    def service(self, name: str) -> _Service | None:
        return self._services.get(name)


    def _adopt_reply(self, p, now: float) -> Conn | None:
        """:meth:`_adopt` for a NAT flow's reply (a previous director's flow whose server speaks first:
        its FIN, say), with the MACs the kernel's reply entry holds."""
        got = self.kernel.adopt_reply(p.key, now)
        if got is None:
            return None
        key, route, dest, state, expires, peer = got
        c = self.table.install(key, dest, state, expires, now, tag=route, rkey=p.key)
        c.peer = peer
        return self.table.reply(p.key, p.flags, now)

    def _adopt(self, p, now: float) -> Conn | None:
        """A flow the kernel holds and this table does not (a previous director's, over pinned maps):
        taken over with its server, state and expiry, then this packet applied to it."""
        got = self.kernel.adopt(p.key, now)
        if got is None:
            return None
        route, dest, state, expires = got
        self.table.install(p.key, dest, state, expires, now, self._kernel_template(p.key, dest, now), tag=route,
                           rkey=reply_key(p.key, dest))
        return self.table.lookup(p.key, p.flags, now)

    def _kernel_template(self, key: bytes, dest: ServerDest, now: float) -> Template | None:
        """The template a flow the kernel holds and Python did not know counts on, when its service has
        persistence: the kernel made or refreshed its own copy with the flow (glb_tc.bpf.c new_flow), or
        a predecessor's template sent it there; Python's follows, as connection sync's install does."""
        proto, src, vip, _, port = codec.split_key(key)
        hit = self._by_any_vip.get((vip, port, proto))
        if hit is None or hit[0].persistence is None:
            return None
        p = hit[0].persistence
        return p.adopt(src, dest, now + p.timeout)

    def take(self, key: bytes, route: Route, dest: ServerDest, state: int, expires: float, now: float) -> None:
        """Track a flow the kernel scheduled or moved to another state (KernelSync.sweep found it), so it
        counts on its server in its state and reaches a backup: a new one confirmed once ESTABLISHED (or
        UDP: its packets never come here), a known one following the kernel's state."""
        known = self.table.get(key)
        if known is not None:
            if known.dest is dest:
                self.table.follow(known, state, expires)
            return
        confirmed = state in (ESTABLISHED, UDP)
        c = self.table.install(key, dest, state, expires, now, self._kernel_template(key, dest, now),
                               confirmed=confirmed, tag=route)
        if confirmed and self.table.changed is not None:
            self.table.changed(c)

    def vip_schedulers(self) -> Iterable[tuple[ServicePlan, VipPlan, Scheduler | None]]:
        """(service, owned VIP, the scheduler of the VIP's family) for every VIP of the plan."""
        for svc in self._services.values():
            for v in svc.plan.vips:
                yield svc.plan, v, svc.sched4 if len(v.address) == 4 else svc.sched6

    def route(self, server: ServerKey, label: str) -> Route:
        """The Route of a server and a VIP label, made the first time."""
        route = self._routes.get((server, label))
        if route is None:
            self._routes[(server, label)] = route = Route(server, label)
        return route

    def plan_routes(self) -> Iterable[tuple[ServerKey, str, ServerDest]]:
        """(server, VIP label, Dest) for every server (sorry servers included) of every VIP of the plan."""
        for svc in self._services.values():
            # Spilled flows' remote servers too: a restart must not move them either.
            dests = [*svc.dests.values(), *([svc.sorry] if svc.sorry is not None else []), *svc.remote.values()]
            for v in svc.plan.vips:
                for d in dests:
                    yield d.key, v.label, d

    # -- reporting ----------------------------------------------------------------

    def dests(self) -> Iterable[ServerDest]:
        for svc in self._services.values():
            yield from svc.dests.values()
            yield from svc.remote.values()

    def stats(self) -> ForwarderStats:
        out = ForwarderStats()
        by_server: dict[ServerKey, list[int]] = {}
        by_vip: dict[str, list[int]] = {}
        for r in self._routes.values():
            if r.out_packets:
                o = out.outbound.get(r.server, (0, 0))
                out.outbound[r.server] = (o[0] + r.out_packets, o[1] + r.out_bytes)
            for acc in (by_server.setdefault(r.server, [0, 0, 0]), by_vip.setdefault(r.vip, [0, 0, 0])):
                acc[0] += r.packets
                acc[1] += r.bytes
                acc[2] += r.conns
            out.forwarded += r.packets
        for svc in self._services.values():
            for key, d in (*svc.dests.items(), *svc.remote.items()):
                # This worker's own connections: merging the workers' reports sums them.
                out.servers[key] = (*d.counts.own(), *by_server.get(key, (0, 0, 0)))
            for v in svc.plan.vips:
                out.vips[v.label] = tuple(by_vip.get(v.label, (0, 0, 0)))
        out.drops = {str(reason): n for reason, n in self.drops.items()}
        out.replies = self.replies
        out.connections = len(self.table)
        out.evicted = self.table.evicted
        out.expired = self.table.expired
        out.spilled_ahead = self.spilled_ahead
        return out
