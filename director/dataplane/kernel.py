"""The kernel data plane's tables as the packet path programs them, over an injected map adapter.

:class:`KernelTables` says what to write (through kernelmaps.py's packing);
a :class:`BpfMaps` does the writing: :class:`~director.dataplane.libbpf.LibBpf`
on a real kernel, :class:`FakeMaps` (dicts) in unit tests, as Katran's
``BpfAdapter``. Nothing here knows ctypes or netlink.
"""

from __future__ import annotations

import functools
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

from director.dataplane import kernelmaps as km
from glb.errors import KernelDataplaneError


_PAD12 = bytes(12)
log = logging.getLogger("glb.director.kernel")


class BpfMaps(Protocol):
    """Byte-level access to the program's maps, by the names of the C file."""

    cpus: int

    def update(self, name: str, key: bytes, value: bytes) -> None: ...

    def lookup(self, name: str, key: bytes) -> bytes | None: ...

    def delete(self, name: str, key: bytes) -> bool: ...

    def keys(self, name: str) -> list[bytes]: ...

    def items(self, name: str) -> list[tuple[bytes, bytes]]: ...

    def items_batch(self, name: str, token: bytes | None, count: int = 4096) -> tuple[list[tuple[bytes, bytes]],
                                                                                      bytes | None]: ...

    def update_batch(self, name: str, items: list[tuple[bytes, bytes]]) -> None: ...

    def delete_batch(self, name: str, keys: list[bytes]) -> int: ...


class FakeMaps:
    """In-memory maps with the kernel's per-CPU value shape (one slot per CPU on lookup)."""

    def __init__(self, cpus: int = 2) -> None:
        self.cpus = cpus
        self.maps: dict[str, dict[bytes, bytes]] = {name: {} for name in km.MAPS}

    def update(self, name: str, key: bytes, value: bytes) -> None:
        ks, vs = km.MAPS[name]
        want = ((vs + 7) & ~7) * self.cpus if name in km.PERCPU_MAPS else vs
        if len(key) != ks or len(value) != want:
            raise ValueError(f"{name}: key {len(key)} / value {len(value)} bytes, want {ks} / {want}")
        self.maps[name][key] = value

    def lookup(self, name: str, key: bytes) -> bytes | None:
        return self.maps[name].get(key)

    def delete(self, name: str, key: bytes) -> bool:
        return self.maps[name].pop(key, None) is not None

    def keys(self, name: str) -> list[bytes]:
        return list(self.maps[name])

    def items(self, name: str) -> list[tuple[bytes, bytes]]:
        return list(self.maps[name].items())

    def items_batch(self, name: str, token: bytes | None, count: int = 4096) -> tuple[list[tuple[bytes, bytes]],
                                                                                      bytes | None]:
        start = int.from_bytes(token, "little") if token else 0
        got = list(self.maps[name].items())[start:start + count]
        end = start + len(got)
        return got, end.to_bytes(8, "little") if end < len(self.maps[name]) else None

    def update_batch(self, name: str, items: list[tuple[bytes, bytes]]) -> None:
        for k, v in items:
            self.update(name, k, v)

    def delete_batch(self, name: str, keys: list[bytes]) -> int:
        return sum(self.delete(name, k) for k in keys)


class KernelTables:
    """What the tc program knows: flows, routes, the state machine; and its counters."""

    def __init__(self, maps: BpfMaps, timeouts: Iterable[float]) -> None:
        self.maps = maps
        self._route_ids: dict[int, int] = {}
        """Route identity (kernelmaps.route_id) -> its index in ``routes``; read back from pinned maps."""
        for k, v in maps.items("route_ids"):
            rid = km.U64.unpack(v)[0]
            if rid:
                self._route_ids[rid] = km.U32.unpack(k)[0]
        self._next_route = 0
        self._heads: dict[bytes, bytes] = {}
        """protocol + VIP address -> the first 4 bytes of its flows' kernel keys (see kernel_key)."""
        self._vips: dict[bytes, int] = {}
        """VIP address -> its id in ``vips`` (flow keys hold it); read back from pinned maps."""
        self._live: set[bytes] = set()
        """The VIPs written live."""
        for k, v in maps.items("vips"):
            vip, flags = km.VIP.unpack(v)
            self._vips[km.vip_address(k)] = vip
            if flags & km.VIP_LIVE:
                self._live.add(km.vip_address(k))
        maps.update("timeouts", km.ZERO, km.timeouts_value(list(timeouts)))
        maps.update("next_state", km.ZERO, km.next_state_value())
        for i, v in enumerate(km.nat_next_state_values()):
            maps.update("nat_next_state", km.U32.pack(i), v)
        self._nat_sources: set[bytes] = {km.vip_address(k) for k in maps.keys("nat_sources")}

    # -- writing ---------------------------------------------------------------

    def set_route(self, index: int, tx, live: bool, ifindex: int = 0) -> None:
        if not 0 <= index < km.MAX_ROUTES:
            raise ValueError(f"route index {index} out of range")
        self.maps.update("routes", km.U32.pack(index), km.route_value(tx, live, ifindex))

    def route_index(self, route) -> int:
        """The kernel's index for a forwarder ``Route`` (one real server x one VIP), allocated once and
        recorded in ``route_ids``, so a director restarted over pinned maps finds the same one."""
        rid = km.route_id(route.server, route.vip)
        i = self._route_ids.get(rid)
        if i is None:
            used = set(self._route_ids.values())
            while self._next_route in used:
                self._next_route += 1
            i = self._next_route
            if i >= km.MAX_ROUTES:
                raise ValueError(f"more than {km.MAX_ROUTES} routes")
            self.maps.update("route_ids", km.U32.pack(i), km.U64.pack(rid))
            self._route_ids[rid] = i
        return i

    def set_slowpath(self, ifindex: int) -> None:
        """Where the frames the program leaves for the engine go (0: to the host, as everything else)."""
        self.maps.update("slowpath", km.ZERO, km.U32.pack(ifindex))

    def set_slowpath_of(self, ifindex: int, veth: int) -> None:
        """Where the frames the program leaves go when they came in on ``ifindex`` (the LAN side's own veth)."""
        self.maps.update("slowpaths", km.U32.pack(ifindex), km.U32.pack(veth))

    def set_nat_sources(self, addrs: Iterable[bytes]) -> None:
        """The NAT real servers' addresses (packed): their frames the program does not forward are the engine's."""
        want = set(addrs)
        for a in want - self._nat_sources:
            self.maps.update("nat_sources", km.vip_key(a), km.U32.pack(1))
        for a in self._nat_sources - want:
            self.maps.delete("nat_sources", km.vip_key(a))
        self._nat_sources = want

    def vip_id(self, addr: bytes) -> int:
        """The VIP's id (allocated, and written not live, the first time): stable while it is in the maps."""
        i = self._vips.get(addr)
        if i is None:
            used = set(self._vips.values())
            i = next(n for n in range(len(used) + 1) if n not in used)
            if i > 0xFFFF:
                raise ValueError("more than 65536 VIP ids")
            self.maps.update("vips", km.vip_key(addr), km.vip_value(i, False))
            self._vips[addr] = i
        return i

    def set_vips(self, addrs: Iterable[bytes]) -> None:
        """The VIPs of the plan, live (packed addresses): the kernel forwards their flows, and frames to them
        that it leaves are the engine's. A VIP that left stays, not live, keeping its id for when it comes
        back; the oldest of those are forgotten when the map would be full."""
        want = set(addrs)
        for a in want - self._live:
            self.maps.update("vips", km.vip_key(a), km.vip_value(self.vip_id(a), True))
        for a in self._live - want:
            self.maps.update("vips", km.vip_key(a), km.vip_value(self._vips[a], False))
        self._live = want
        dead = [a for a in self._vips if a not in want]
        for a in dead[:max(0, len(self._vips) - km.MAX_VIPS)]:
            self.maps.delete("vips", km.vip_key(a))
            del self._vips[a]
            self._heads.clear()  # its id may be given to another VIP

    def kernel_key(self, key: bytes) -> bytes:
        """The ``conns`` key of a connection-table key (kernelmaps.flow_key, with the protocol, family and
        VIP id of each (protocol, VIP) made once: this runs for every flow installed)."""
        if len(key) == 13:
            head = self._heads.get(key[:1] + key[5:9])
            if head is not None:
                return head + key[9:13] + key[1:5] + _PAD12
        elif len(key) == 37:
            head = self._heads.get(key[:1] + key[17:33])
            if head is not None:
                return head + key[33:37] + key[1:17]
        k = km.flow_key(key, self.vip_id(km.flow_vip(key)))
        self._heads[key[:1] + km.flow_vip(key)] = k[:4]
        return k

    def install(self, key: bytes, route: int, state: int, expires: float) -> None:
        """The flow (a connection-table key) goes to ``route`` until ``expires`` (``now`` seconds)."""
        self.maps.update("conns", self.kernel_key(key), km.flow_value(route, state, expires))

    def write_flows(self, changes: dict[bytes, bytes | None]) -> None:
        """Install (kernel key -> flow value) and remove (-> None) many flows: one batch of each."""
        self.maps.update_batch("conns", [(k, v) for k, v in changes.items() if v is not None])
        self.maps.delete_batch("conns", [k for k, v in changes.items() if v is None])

    def write_templates(self, changes: dict[bytes, bytes | None]) -> int:
        """Write (``templates`` key -> value) and delete (-> None) persistence templates; how many found no
        room (the map is full: the program leaves those clients' new flows to Python)."""
        ups = [(k, v) for k, v in changes.items() if v is not None]
        full = 0
        try:
            self.maps.update_batch("templates", ups)
        except KernelDataplaneError:  # full part-way: as many as fit, one at a time
            for k, v in ups:
                try:
                    self.maps.update("templates", k, v)
                except KernelDataplaneError:
                    full += 1
        self.maps.delete_batch("templates", [k for k, v in changes.items() if v is None])
        return full

    def write_replies(self, changes: dict[bytes, bytes | None]) -> None:
        """Install (``nat_replies`` key -> value) and remove (-> None) NAT flows' reply entries."""
        self.maps.update_batch("nat_replies", [(k, v) for k, v in changes.items() if v is not None])
        self.maps.delete_batch("nat_replies", [k for k, v in changes.items() if v is None])

    def remove(self, key: bytes) -> bool:
        return self.maps.delete("conns", self.kernel_key(key))

    def flow(self, key: bytes, now: float) -> tuple[int, int, float] | None:
        """(route, state, expires) of an installed flow; the kernel moves ``expires`` on. ``now`` places
        the kernel's 32-bit expiry in time (to ~1 ms)."""
        v = self.maps.lookup("conns", self.kernel_key(key))
        return None if v is None else km.parse_flow_value(v, now)

    def vips_by_id(self) -> dict[int, bytes]:
        """VIP id -> address: what :func:`~director.dataplane.kernelmaps.conn_key` reads a kernel key with."""
        return {i: a for a, i in self._vips.items()}

    def flows(self) -> list[bytes]:
        """Every installed flow's connection-table key."""
        ids = self.vips_by_id()
        return [k for k in (km.conn_key(k, ids) for k in self.maps.keys("conns")) if k is not None]

    def set_ident(self, ident: int) -> None:
        """The last outer IPv4 id on every CPU (the next tunnelled packet gets ident + 1)."""
        self.maps.update("ident", km.ZERO, km.percpu(km.U32.pack(ident & 0xFFFF), km.U32.size, self.maps.cpus))

    # -- reading ---------------------------------------------------------------

    def route_counters(self, index: int, name: str = "route_counters") -> tuple[int, int]:
        """(packets, bytes) the kernel forwarded along a route, summed over CPUs (``route_out_counters``:
        the NAT replies)."""
        v = self.maps.lookup(name, km.U32.pack(index))
        if v is None:
            return 0, 0
        packets, nbytes = km.sum_percpu(v, km.COUNTER.size, km.COUNTER)
        return packets, nbytes

    def route_new(self, index: int) -> int:
        """New flows the kernel scheduled along a route, summed over CPUs."""
        v = self.maps.lookup("route_new", km.U32.pack(index))
        return km.sum_percpu(v, km.U64.size, km.U64)[0] if v is not None else 0

    def events_lost(self) -> int:
        """Flow events the program could not tell (its ring was full), summed over CPUs."""
        v = self.maps.lookup("flow_events_lost", km.ZERO)
        return km.sum_percpu(v, km.U64.size, km.U64)[0] if v is not None else 0

    def reasons(self) -> dict[str, int]:
        """Packets per :data:`~director.dataplane.kernelmaps.REASONS` entry, summed over CPUs."""
        out = {}
        for i, name in enumerate(km.REASONS):
            v = self.maps.lookup("reasons", km.U32.pack(i))
            out[name] = km.sum_percpu(v, km.U64.size, km.U64)[0] if v is not None else 0
        return out


SWEEP_PASS_EVERY = 1.0
"""Seconds between the starts of two passes of :meth:`KernelSync.sweep` over ``conns``."""


class KernelSync:
    """Keeps the kernel's tables in step with one Forwarder (the engine worker's), incrementally.

    The forwarder calls :meth:`flow` for every flow packet it decided (its
    ``kernel`` hook): a confirmed flow is (re)installed with its route, state
    and expiry, so the kernel takes its next packets, and every scheduler
    keeps its semantics because only Python schedules. The connection table
    calls :meth:`expiry` before it expires an entry (the kernel refreshed
    flows Python never saw a packet of) and :meth:`forget` when it drops one
    (its ``outside`` hook). Installs and removals wait in :attr:`pending`
    until :meth:`flush` writes them in one batch each (the engine flushes
    after every batch of frames; a packet of a flow not yet flushed simply
    comes to Python once more). :meth:`plan_applied` rewrites the routes
    whose server or VIP changed, in one batch; :meth:`fold_counters` adds
    what the kernel forwarded to the forwarder's Route counters, so every
    figure an operator reads keeps its meaning.

    Over maps a previous director left (pinned): :meth:`plan_applied` finds
    the routes its flows hold by their identity and points them at this
    plan's servers (or turns them off, server or VIP gone), and
    :meth:`adopt` hands the forwarder such a flow when one of its packets
    comes up (a FIN, an expiry, a down server), so it closes or moves as if
    this director had scheduled it.
    """

    def __init__(self, tables: KernelTables, ifindex: int = 0, lan_ifindex: int = 0) -> None:
        self.tables = tables
        self.ifindex = ifindex
        """The client side's interface (DR out of it; NAT replies out of it)."""
        self.lan_ifindex = lan_ifindex
        """NAT: the real servers' side when it is another interface (0: the same)."""
        self._routes: dict[int, tuple[Any, Any]] = {}
        """route index -> (forwarder Route, the Dest its flows go to)."""
        self._index: dict[Any, int] = {}
        """forwarder Route -> its index (Routes live as long as the forwarder)."""
        self._written: dict[int, bytes] = {}
        self._counted: dict[int, tuple[int, int]] = {}
        self._off: set[int] = set()
        """A predecessor's routes this plan does not have: turned off (their flows come to Python, which drops
        or reschedules them)."""
        self._sweep_token: bytes | None = None
        """Where :meth:`sweep` goes on reading ``conns`` (None: from the start)."""
        self._next_pass = float("-inf")
        """When :meth:`sweep` may start its next pass over ``conns``."""
        self.pending: dict[bytes, bytes | None] = {}
        """``conns`` key -> the flow value to install, or None to remove; written by :meth:`flush`."""
        self.replies: dict[bytes, bytes | None] = {}
        """NAT: ``nat_replies`` key -> its value, or None to remove; written by :meth:`flush`."""
        self._counted_out: dict[int, tuple[int, int]] = {}
        """NAT routes (the only ones with replies) -> the kernel's reply counters last folded."""
        self._counted_new: dict[int, int] = {}
        """route index -> the new flows the kernel had scheduled along it when last folded."""
        self._svcs: dict[bytes, tuple[int, bytes]] = {}
        """``services`` key -> (its table's number, the value written): the lookup tables in the kernel."""
        self._built: dict[bytes, tuple[Any, str, int, dict[bytes, bytes]]] = {}
        """``services`` key -> (the scheduler's table it was made from, VIP label, table number, chunks):
        a Maglev table is 65537 slots, so a plan that leaves a scheduler's table alone costs nothing."""
        self._chunks: dict[bytes, bytes] | None = None
        """``slots`` key -> the chunk written; None until the first plan (then read back: a predecessor's)."""
        self._proutes: dict[bytes, bytes] | None = None
        """``persist_routes`` key -> the route index written; None until the first plan (as ``_chunks``)."""
        self._proutes_want: dict[bytes, bytes] = {}
        self._persist: dict[int, Any] = {}
        """Persistence id (kernelmaps.persist_id) -> the service's Persistence, for the services the kernel
        schedules with persistence: whose templates :meth:`sweep` asks before deleting an expired copy."""
        self.templates: dict[bytes, bytes | None] = {}
        """``templates`` key -> the template to write, or None to delete; written by :meth:`flush`."""
        self.templates_full = 0
        """Templates the kernel's map had no room for (their clients' new flows stay Python's)."""
        self._tpl_token: bytes | None = None
        self._tpl_next_pass = float("-inf")
        self._tpl_seen = True
        """Whether the last pass over ``templates`` found any (a predecessor's too): else none is made."""

    def _register(self, index: int, route, dest) -> None:
        if index not in self._counted:  # what the kernel counted before (a predecessor's) is not ours
            self._counted[index] = self.tables.route_counters(index)
            self._counted_new[index] = self.tables.route_new(index)
        if index not in self._counted_out and km.is_nat(dest.tx):
            self._counted_out[index] = self.tables.route_counters(index, "route_out_counters")
        self._routes[index] = (route, dest)

    def _route_value(self, index: int) -> bytes | None:
        """The route's entry if it differs from what was last written."""
        route, dest = self._routes[index]
        value = km.route_value(dest.tx, dest.available and route.live, self.ifindex, self.lan_ifindex,
                               new=dest.available and dest.weight > 0, track=not km.is_nat(dest.tx),
                               server=km.server_id(route.server))
        return None if self._written.get(index) == value else value

    def _write_routes(self, indexes: Iterable[int]) -> None:
        batch = [(i, v) for i in indexes if (v := self._route_value(i)) is not None]
        self.tables.maps.update_batch("routes", [(km.U32.pack(i), v) for i, v in batch])
        self._written.update(batch)

    def _route_of(self, route, dest) -> tuple[int, bool]:
        """The kernel's index of a forwarder Route to ``dest``, and whether it was (re)registered now."""
        index = self._index.get(route)
        if index is None:
            index = self._index[route] = self.tables.route_index(route)
        known = self._routes.get(index)
        if known is None or known[0] is not route or known[1] is not dest:
            self._register(index, route, dest)
            return index, True
        return index, False

    def flow(self, c) -> None:
        route = c.tag
        if not c.confirmed or route is None:
            return
        two_way = c.rkey is not None
        if two_way and c.peer is None:
            # NAT, and no client packet seen here yet (connection sync's entry): the replies' MAC is not
            # known, so the client's next packet must come to Python (which learns it) before the kernel's
            return
        index = self._index.get(route)
        known = self._routes.get(index) if index is not None else None
        if known is None or known[0] is not route or known[1] is not c.dest:  # once per route and server
            index = self._route_of(route, c.dest)[0]
            self._write_routes((index,))  # later changes to it come with plans (plan_applied)
        k = self.tables.kernel_key(c.key)
        self.pending[k] = km.flow_value(index, c.state, c.expires, two_way)
        if two_way:
            self.replies[km.reply_key(c.rkey)] = km.reply_value(k, km.flow_vip(c.key), c.peer, self.ifindex)

    def template(self, persist: int, key: tuple[int, int], t) -> None:
        """Persistence.watch: Python made or refreshed the template ``t`` of the client network ``key``
        (a flow it scheduled, one a master synced): the kernel's copy follows."""
        self.templates[km.template_key(persist, key)] = km.template_value(km.server_id(t.dest.key), t.expires)
        self._tpl_seen = True

    def _write_templates(self) -> None:
        if self.templates:
            changes, self.templates = self.templates, {}
            full = self.tables.write_templates(changes)
            if full and not self.templates_full:
                log.warning("the kernel's persistence templates table is full (connection_table.max_entries): "
                            "new connections of the clients it has no room for are scheduled by Python "
                            "(kernel reason pass_template)")
            self.templates_full += full

    def flush(self) -> None:
        self._write_templates()  # before the flows: a flow's next packet finds its template
        if self.pending:
            changes, self.pending = self.pending, {}
            self.tables.write_flows(changes)
        if self.replies:
            changes, self.replies = self.replies, {}
            self.tables.write_replies(changes)

    def expiry(self, c, now: float) -> float:
        k = self.tables.kernel_key(c.key)
        if k in self.pending:  # not written yet: Python's own
            v = self.pending[k]
            return 0.0 if v is None else km.parse_flow_value(v, now)[2]
        got = self.tables.flow(c.key, now)
        return got[2] if got is not None else 0.0

    def forget(self, c) -> None:
        self.pending[self.tables.kernel_key(c.key)] = None
        if c.rkey is not None:
            self.replies[km.reply_key(c.rkey)] = None

    def adopt(self, key: bytes, now: float) -> tuple[Any, Any, int, float] | None:
        """(Route, Dest, state, expires) of a live flow the kernel holds and Python does not (a previous
        director's), or None."""
        got = self.tables.flow(key, now)
        if got is None or got[2] <= now or got[0] not in self._routes:
            return None
        route, dest = self._routes[got[0]]
        return route, dest, got[1], got[2]

    def adopt_reply(self, rkey: bytes, now: float) -> tuple[bytes, Any, Any, int, float, bytes] | None:
        """(connection-table key, Route, Dest, state, expires, the client's and the director's MACs) of a
        NAT flow the kernel holds and Python does not, found by its real server's key; or None."""
        v = self.tables.maps.lookup("nat_replies", km.reply_key(rkey))
        if v is None:
            return None
        kernel_key, _vip, eth, _ifindex = km.REPLY.unpack(v)
        key = km.conn_key(kernel_key, self.tables.vips_by_id())
        got = self.adopt(key, now) if key is not None else None
        return None if got is None else (key, *got, eth)

    def plan_applied(self, vips: Iterable[bytes], fwd: Any = None) -> None:
        """The forwarder ``fwd`` took a new plan. When the maps hold routes this director has not
        registered (a predecessor's), those still in the plan are registered, the others turned off.
        The lookup tables of the services the kernel schedules follow (:meth:`_lookup_tables`)."""
        lookup = self._lookup_tables(fwd) if fwd is not None else None
        if lookup is not None:  # tables no longer wanted go before the VIPs change
            self._write_lookup(lookup, stale_only=True)
        self.tables.set_vips(vips)
        if fwd is not None:
            self.tables.set_nat_sources(fwd.nat_sources)
        strays = set(self.tables._route_ids.values()) - self._routes.keys() - self._off
        if strays and fwd is not None:
            by_id = {}
            for server, label, dest in fwd.plan_routes():
                index = self.tables._route_ids.get(km.route_id(server, label))
                if index in strays:
                    by_id[index] = (server, label, dest)
            for index, (server, label, dest) in by_id.items():
                self._register(index, fwd.route(server, label), dest)
            off = strays - by_id.keys()
            self.tables.maps.update_batch("routes", [(km.U32.pack(i), km.route_value(None, False)) for i in off])
            self._off |= off
        self._write_routes(list(self._routes))
        if lookup is not None:
            self._write_templates()  # a service's templates before its first lookup table
            self._write_lookup(lookup)

    def _lookup_tables(self, fwd: Any) -> dict[bytes, tuple[bytes, dict[bytes, bytes]]]:
        """``services`` key -> (its value, its ``slots`` chunks) for every VIP whose service the kernel
        schedules: the scheduler's table with each server as the route index of (server, VIP). Registers
        those routes (written with the rest by plan_applied). A table keeps its number while its kind and
        size stay, so an update only rewrites the slots that changed."""
        out = {}
        proutes: dict[bytes, bytes] = {}
        persist: dict[int, Any] = {}
        for sp, v, sched in fwd.vip_schedulers():
            svc = fwd.service(sp.name)
            if svc.persistence is not None:
                svc.persistence.watch = None  # unless the kernel schedules it (below)
            if sched is None or not km.kernel_schedules(sp) or getattr(sched, "port", False):
                continue
            key = km.svc_key(self.tables.vip_id(v.address), v.port, v.proto)
            slots = sched.lookup_table()
            old = self._svcs.get(key)
            shape = km.svc_value(sp.scheduler, 0, len(slots))
            if old is not None and (old[1][:1], old[1][8:]) != (shape[:1], shape[8:]):
                # another kind or size: a table of another number, so no packet reads a half-written one
                taken = {t for t, _ in self._svcs.values()} | {t for t, _, _ in out.values()}
            else:
                taken = {t for k, (t, _) in self._svcs.items() if k != key} | {t for t, _, _ in out.values()}
            table = old[0] if old is not None and old[0] not in taken else \
                next(t for t in range(len(taken) + 1) if t not in taken)
            built = self._built.get(key)
            if built is not None and built[0] is slots and built[1:3] == (v.label, table):
                chunks = built[3]  # the scheduler kept its table (a drain, a down server): the routes did not move
            else:
                chunks = km.slot_chunks(table, self._slot_routes(fwd, slots, v.label))
                self._built[key] = (slots, v.label, table, chunks)
            pid = 0
            if sp.persistence is not None:  # where each member's templates send this VIP's flows
                pid = km.persist_id(sp.name)
                persist[pid] = svc.persistence
                for d in sched.members:
                    index = self._route_of(fwd.route(d.key, v.label), d)[0]
                    proutes[km.proute_key(table, km.server_id(d.key))] = km.U32.pack(index)
            out[key] = (table, km.svc_value(sp.scheduler, table, len(slots), sp.persistence, pid), chunks)
        for k in self._built.keys() - out.keys():
            del self._built[k]
        for pid, pers in persist.items():
            pers.watch = functools.partial(self.template, pid)
            old = self._persist.get(pid)
            if old is pers:
                continue
            if old is not None:  # new timeout or prefix lengths: Python forgot the templates, so does the kernel
                head = km.U32.pack(pid)
                self.templates.update((k, None) for k in self.tables.maps.keys("templates") if k[:4] == head)
            for k, t in pers.items():  # newly the kernel's (a backup taking over): what Python holds
                self.template(pid, k, t)
        self._persist = persist
        self._proutes_want = proutes
        return {k: (value, chunks) for k, (_, value, chunks) in out.items()}

    def _slot_routes(self, fwd: Any, slots: list, label: str) -> list[int]:
        """A lookup table of Dests as route indexes (server x the VIP ``label``), registering the routes."""
        indexes: dict[int, int] = {}
        routes = []
        for d in slots:
            if d is None:
                routes.append(km.NO_ROUTE)
                continue
            i = indexes.get(id(d))
            if i is None:
                i = indexes[id(d)] = self._route_of(fwd.route(d.key, label), d)[0]
            routes.append(i)
        return routes

    def _write_lookup(self, lookup: dict[bytes, tuple[bytes, dict[bytes, bytes]]], stale_only: bool = False) -> None:
        """Bring ``services`` and ``slots`` to ``lookup``: only what changed, in one batch each; a table's
        chunks before its ``services`` entry, a removed entry before its chunks."""
        maps = self.tables.maps
        if self._chunks is None:  # maps a predecessor left: whatever this plan does not rewrite goes
            self._chunks = dict(maps.items("slots"))
            self._proutes = dict(maps.items("persist_routes"))
            for k, v in maps.items("services"):
                self._svcs[k] = (km.SVC.unpack(v)[3], v)
        gone = [k for k in self._svcs if k not in lookup]
        if gone:
            maps.delete_batch("services", gone)
            for k in gone:
                del self._svcs[k]
        if stale_only:
            return
        want = {ck: cv for _, chunks in lookup.values() for ck, cv in chunks.items()}
        maps.update_batch("slots", [(k, v) for k, v in want.items() if self._chunks.get(k) != v])
        proutes, written = self._proutes_want, self._proutes or {}
        maps.update_batch("persist_routes", [(k, v) for k, v in proutes.items() if written.get(k) != v])
        changed = [(k, value) for k, (value, _) in lookup.items() if self._svcs.get(k, (0, b""))[1] != value]
        maps.update_batch("services", changed)
        for k, value in changed:
            self._svcs[k] = (km.SVC.unpack(value)[3], value)
        maps.delete_batch("slots", [k for k in self._chunks if k not in want])
        maps.delete_batch("persist_routes", [k for k in written if k not in proutes])
        self._chunks, self._proutes = want, dict(proutes)

    def sweep(self, now: float, holds, budget: int = 1024, take=None) -> int:
        """Read the next ``budget`` kernel flows (batched, resuming where the last call stopped) and queue
        for removal the expired ones the connection table does not hold (``holds(key)`` False): a
        predecessor's flows that never came to Python, which the table's own sweep cannot see. How many.

        ``take(key, route, dest, state, expires, now)`` is handed each live flow the kernel scheduled or
        moved to another state (:data:`~director.dataplane.kernelmaps.FLOW_KERNEL`): so a flow whose
        packets all stay in the kernel still counts, on its server in its state, and reaches a backup
        (Forwarder.take).

        A pass starts at most every :data:`SWEEP_PASS_EVERY` seconds: reading a sparse LRU hash walks all
        of its buckets for a few entries, so a small table swept at every call cost the engine a bucket
        walk each 0.1 s (2 % of a core at 1M entries for 1,024 flows, in ``perf``) plus a take() of every
        flow; a large table's pass outlasts the interval anyway. The flows the kernel makes and moves reach
        Python at once through ``flow_events``; this is their backstop (a lost event) and the predecessor's
        expired flows' cleaner, for which a second does not matter. Persistence templates are swept
        alongside (:meth:`_sweep_templates`)."""
        self._sweep_templates(now, budget)
        if self._sweep_token is None:
            if now < self._next_pass:
                return 0
            self._next_pass = now + SWEEP_PASS_EVERY
        entries, self._sweep_token = self.tables.maps.items_batch("conns", self._sweep_token, budget)
        ids = self.tables.vips_by_id()
        base = km.ticks(now)
        doomed = 0
        for k, v in entries:
            if k in self.pending:
                continue
            if _live(v, base):
                if take is not None and v[3] & km.FLOW_KERNEL:
                    self._take(k, v, ids, take, now)
                continue
            key = km.conn_key(k, ids)
            if key is None or not holds(key):
                self.pending[k] = None
                doomed += 1
        return doomed

    def _sweep_templates(self, now: float, budget: int) -> None:
        """Delete the kernel's expired templates that Python's do not keep alive (one that still controls
        connections stays: the program leaves its clients' new flows to Python, which refreshes it). The
        map is not preallocated, so this is what bounds it; Python's own LRU evictions end here too. A
        pass starts at most every :data:`SWEEP_PASS_EVERY` seconds and only while there may be templates."""
        if self._tpl_token is None:
            if now < self._tpl_next_pass or not (self._persist or self._tpl_seen):
                return
            self._tpl_next_pass = now + SWEEP_PASS_EVERY
            self._tpl_seen = False
        entries, self._tpl_token = self.tables.maps.items_batch("templates", self._tpl_token, budget)
        if entries:
            self._tpl_seen = True
        base = km.ticks(now)
        for k, v in entries:
            if k in self.templates or _live(v, base):
                continue
            pid, family, addr = km.TPL_KEY.unpack(k)
            pers = self._persist.get(pid)
            if pers is None or not pers.alive((family, int.from_bytes(addr[:4 if family == 4 else 16], "big")), now):
                self.templates[k] = None

    def events(self, records: list[bytes], now: float, take) -> None:
        """The program's ``flow_events`` records (:data:`~director.dataplane.kernelmaps.FLOW_EVENT`: a flow
        it made or moved to another state, as ``conns`` held it then), oldest first: each flow's last one
        handed to ``take`` as :meth:`sweep` hands it, so Python knows it at once rather than when the sweep
        gets there. Only the last counts, as in the sweep: take() of an ESTABLISHED flow Python has not seen
        ends as its SYN_RECV then ESTABLISHED would (confirmed, active, told once), so a worker that falls
        behind does less per flow, not more. A flow Python has written since (in :attr:`pending`) is
        Python's own, as in the sweep."""
        ids = self.tables.vips_by_id()
        base = km.ticks(now)
        ks, size = km.FLOW_KEY.size, km.FLOW_EVENT.size
        for k, v in {r[:ks]: r[ks:size] for r in records}.items():
            if k not in self.pending and _live(v, base):
                self._take(k, v, ids, take, now)

    def _take(self, k: bytes, v: bytes, ids: dict[int, bytes], take, now: float) -> None:
        key = km.conn_key(k, ids)
        if key is None:
            return
        index, state, expires = km.parse_flow_value(v, now)
        known = self._routes.get(index)
        if known is not None:
            take(key, known[0], known[1], state, expires, now)

    def fold_counters(self) -> None:
        for index, (route, _) in self._routes.items():
            packets, nbytes = self.tables.route_counters(index)
            p0, b0 = self._counted.get(index, (0, 0))
            route.packets += packets - p0
            route.bytes += nbytes - b0
            self._counted[index] = (packets, nbytes)
            made = self.tables.route_new(index)
            route.conns += made - self._counted_new.get(index, 0)
            self._counted_new[index] = made
        for index, (p0, b0) in self._counted_out.items():
            route = self._routes[index][0]
            packets, nbytes = self.tables.route_counters(index, "route_out_counters")
            route.out_packets += packets - p0
            route.out_bytes += nbytes - b0
            self._counted_out[index] = (packets, nbytes)


def _live(value: bytes, base: int) -> bool:
    """Whether a ``conns`` value's expiry is after ``base`` (km.ticks of now): the kernel's own test, modulo 2^32."""
    return 0 < (km.U32.unpack_from(value, 4)[0] - base) & 0xFFFFFFFF < 1 << 31


def bpffs(path: Path) -> bool:
    """Whether ``path`` (existing or not) would be on a BPF filesystem (the mount holding it in mountinfo)."""
    best, fstype = "", ""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    target = str(path.resolve()) + "/"
    for line in lines:
        left, _, right = line.partition(" - ")
        point = left.split()[4].replace("\\040", " ")
        if target.startswith(point.rstrip("/") + "/") and len(point) >= len(best):
            best, fstype = point, right.split()[0]
    return fstype == "bpf"


@dataclass(frozen=True)
class Pins:
    """What :func:`prepare_pins` found: groups of maps (kernelmaps.GROUPS) kept, and rebuilt."""

    kept: tuple[str, ...] = ()
    rebuilt: tuple[str, ...] = ()

    @property
    def state(self) -> str:
        """``"new"`` (nothing was pinned), ``"reused"`` (every group), ``"rebuilt"`` (none), else ``"partly"``."""
        if not self.rebuilt:
            return "reused" if self.kept else "new"
        return "partly" if self.kept else "rebuilt"

    def note(self, pin_dir: Path) -> str:
        """The start-up log's words for it ("" when nothing was pinned)."""
        if "flows" in self.kept:
            rest = f"; rebuilt empty, another layout: {', '.join(self.rebuilt)}" if self.rebuilt else ""
            return f"reusing the maps pinned in {pin_dir} (established flows kept{rest})"
        if self.rebuilt:
            rest = f" (kept: {', '.join(self.kept)})" if self.kept else ""
            return f"the maps pinned in {pin_dir} had another layout or size: rebuilt empty{rest}"
        return ""


def prepare_pins(pin_dir: Path, max_entries: int, versions: dict[str, int] | None = None) -> Pins:
    """Make ``pin_dir`` ready for LibBpf, a group of maps at a time: a group whose pinned maps carry its
    id in ``layout`` (:func:`kernelmaps.group_ids`) is kept (libbpf will use them); the pins of the others
    are removed (made anew), and so are ``layout`` (rewritten after the load: its own size may change)
    and pins of maps this release does not have. ``versions``: as group_ids'."""
    from director.dataplane.libbpf import read_pinned

    if not pin_dir.exists():
        pin_dir.mkdir(parents=True)
    pins = {p.name: p for p in pin_dir.iterdir()}
    if not pins:
        return Pins()
    kept, rebuilt = [], []
    for (key, want), (group, (_, names)) in zip(km.layout_items(km.group_ids(max_entries, versions)),
                                                km.GROUPS.items()):
        if not any(n in pins for n in names):
            continue  # new in this release: made, nothing to keep or to rebuild
        if all(n in pins for n in names) and read_pinned(pin_dir / "layout", key, km.U64.size) == want:
            kept.append(group)
        else:
            rebuilt.append(group)
    keep = {n for g in kept for n in km.GROUPS[g][1]}
    for name, p in pins.items():
        if name not in keep:
            p.unlink()
    return Pins(tuple(kept), tuple(rebuilt))


class KernelDataplane:
    """The program loaded (libbpf), its tables, its slow-path veth, its attachment at tc ingress.

    What the engine worker holds while the kernel forwards established
    flows. With ``slowpath`` the frames the program leaves for the engine go
    to a veth pair whose far end (``rx_interface``) the engine reads, so
    the engine never sees a frame the kernel forwarded. ``close`` detaches,
    removes the veth and unloads.

    With ``pin_dir`` (a directory on a bpffs) the maps are pinned there and
    outlive the process: the next start over the same directory reuses them
    a group at a time (:data:`~director.dataplane.kernelmaps.GROUPS`), each
    when its layout (its maps' sizes, its version, the table's size) is the
    same, so established flows keep their servers across a restart, and
    across an upgrade of the program that changed only maps the plan
    rewrites; a group whose layout changed is rebuilt empty. :attr:`pins`
    says which (:class:`Pins`; None without ``pin_dir``).

    With ``lan`` (NAT's real-server side, another interface) the program is
    attached there too, with a slow-path veth of its own (``lan_rx_interface``,
    the map ``slowpaths``), so the engine's LAN socket sees only the real
    servers' frames the kernel did not forward.
    """

    def __init__(self, interface: str, max_entries: int, timeouts: Iterable[float], slowpath: bool = True,
                 pin_dir: Path | None = None, lan: str | None = None, tcx: bool = True) -> None:
        from director.dataplane.flowevents import FlowEvents
        from director.dataplane.libbpf import LibBpf
        from director.dataplane.tcattach import SlowPathVeth, TcIngress

        self.tc = self.veth = self.lan_tc = self.lan_veth = self.events = None
        self.rx_interface: str | None = None
        self.lan_rx_interface: str | None = None
        self.pins = prepare_pins(pin_dir, max_entries) if pin_dir is not None else None
        self.bpf = LibBpf(max_entries=km.sized(max_entries), sizes=km.MAPS, pin_dir=pin_dir)
        try:
            self.bpf.update_batch("layout", km.layout_items(km.group_ids(max_entries)))
            self.tables = KernelTables(self.bpf, timeouts)
            # Reused maps hold the VIPs live as the last director left them: nothing is forwarded until
            # this one's first plan says which it owns (a restarted standby must not forward).
            self.tables.set_vips(())
            self.events = FlowEvents(self.bpf.map_fd("flow_events"))
            """The flows the program makes and moves, as it does (the packet worker drains it)."""
            if slowpath:
                self.veth = SlowPathVeth(interface)
                self.tables.set_slowpath(self.veth.tx_ifindex)
                self.rx_interface = self.veth.rx_name
            self.tc = TcIngress(interface, self.bpf.prog_fd, tcx=tcx)
            if lan is not None and lan != interface:
                if slowpath:  # before attaching: the LAN side's frames for the engine come out here
                    self.lan_veth = SlowPathVeth(lan)
                    self.lan_rx_interface = self.lan_veth.rx_name
                    self.tables.set_slowpath_of(socket.if_nametoindex(lan), self.lan_veth.tx_ifindex)
                self.lan_tc = TcIngress(lan, self.bpf.prog_fd, tcx=tcx)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            for tc in (self.tc, self.lan_tc):
                if tc is not None:
                    tc.detach()
            for veth in (self.veth, self.lan_veth):
                if veth is not None:
                    veth.remove()
        finally:
            if self.events is not None:
                self.events.close()
            self.bpf.close()
