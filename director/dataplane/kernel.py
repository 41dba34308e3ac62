"""The kernel data plane's tables as the packet path programs them, over an injected map adapter.

:class:`KernelTables` says what to write (through kernelmaps.py's packing);
a :class:`BpfMaps` does the writing: :class:`~director.dataplane.libbpf.LibBpf`
on a real kernel, :class:`FakeMaps` (dicts) in unit tests, as Katran's
``BpfAdapter``. Nothing here knows ctypes or netlink.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

from director.dataplane import kernelmaps as km


class BpfMaps(Protocol):
    """Byte-level access to the program's maps, by the names of the C file."""

    cpus: int

    def update(self, name: str, key: bytes, value: bytes) -> None: ...

    def lookup(self, name: str, key: bytes) -> bytes | None: ...

    def delete(self, name: str, key: bytes) -> bool: ...

    def keys(self, name: str) -> list[bytes]: ...


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


class KernelTables:
    """What the tc program knows: flows, routes, the state machine; and its counters."""

    def __init__(self, maps: BpfMaps, timeouts: Iterable[float]) -> None:
        self.maps = maps
        self._routes: dict[tuple[Any, str], int] = {}
        """(server key, VIP label) -> route index: a forwarder Route's place in ``routes``."""
        self._vips: dict[bytes, int] = {}
        """VIP address -> its id in ``vips`` (flow keys hold it); read back from maps that outlived a director."""
        self._live: set[bytes] = set()
        """The VIPs written live."""
        for k in maps.keys("vips"):
            v = maps.lookup("vips", k)
            if v is not None:
                vip, flags = km.VIP.unpack(v)
                self._vips[km.vip_address(k)] = vip
                if flags & km.VIP_LIVE:
                    self._live.add(km.vip_address(k))
        maps.update("timeouts", km.ZERO, km.timeouts_value(list(timeouts)))
        maps.update("next_state", km.ZERO, km.next_state_value())

    # -- writing ---------------------------------------------------------------

    def set_route(self, index: int, tx, live: bool, ifindex: int = 0) -> None:
        if not 0 <= index < km.MAX_ROUTES:
            raise ValueError(f"route index {index} out of range")
        self.maps.update("routes", km.U32.pack(index), km.route_value(tx, live, ifindex))

    def route_index(self, route) -> int:
        """The kernel's index for a forwarder ``Route`` (one real server x one VIP), allocated once."""
        k = (route.server, route.vip)
        i = self._routes.get(k)
        if i is None:
            i = len(self._routes)
            if i >= km.MAX_ROUTES:
                raise ValueError(f"more than {km.MAX_ROUTES} routes")
            self._routes[k] = i
        return i

    def set_slowpath(self, ifindex: int) -> None:
        """Where the frames the program leaves for the engine go (0: to the host, as everything else)."""
        self.maps.update("slowpath", km.ZERO, km.U32.pack(ifindex))

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

    def _key(self, key: bytes) -> bytes:
        return km.flow_key(key, self.vip_id(km.flow_vip(key)))

    def install(self, key: bytes, route: int, state: int, expires: float) -> None:
        """The flow (a connection-table key) goes to ``route`` until ``expires`` (``now`` seconds)."""
        self.maps.update("conns", self._key(key), km.flow_value(route, state, expires))

    def remove(self, key: bytes) -> bool:
        return self.maps.delete("conns", self._key(key))

    def flow(self, key: bytes, now: float) -> tuple[int, int, float] | None:
        """(route, state, expires) of an installed flow; the kernel moves ``expires`` on. ``now`` places
        the kernel's 32-bit expiry in time (to ~1 ms)."""
        v = self.maps.lookup("conns", self._key(key))
        return None if v is None else km.parse_flow_value(v, now)

    def flows(self) -> list[bytes]:
        """Every installed flow's connection-table key."""
        ids = {i: a for a, i in self._vips.items()}
        return [k for k in (km.conn_key(k, ids) for k in self.maps.keys("conns")) if k is not None]

    def set_ident(self, ident: int) -> None:
        """The last outer IPv4 id on every CPU (the next tunnelled packet gets ident + 1)."""
        self.maps.update("ident", km.ZERO, km.percpu(km.U32.pack(ident & 0xFFFF), km.U32.size, self.maps.cpus))

    # -- reading ---------------------------------------------------------------

    def route_counters(self, index: int) -> tuple[int, int]:
        """(packets, bytes) the kernel forwarded along a route, summed over CPUs."""
        v = self.maps.lookup("route_counters", km.U32.pack(index))
        if v is None:
            return 0, 0
        packets, nbytes = km.sum_percpu(v, km.COUNTER.size, km.COUNTER)
        return packets, nbytes

    def reasons(self) -> dict[str, int]:
        """Packets per :data:`~director.dataplane.kernelmaps.REASONS` entry, summed over CPUs."""
        out = {}
        for i, name in enumerate(km.REASONS):
            v = self.maps.lookup("reasons", km.U32.pack(i))
            out[name] = km.sum_percpu(v, km.U64.size, km.U64)[0] if v is not None else 0
        return out


class KernelSync:
    """Keeps the kernel's tables in step with one Forwarder (the engine worker's), incrementally.

    The forwarder calls :meth:`flow` for every flow packet it decided (its
    ``kernel`` hook): a confirmed flow is (re)installed with its route, state
    and expiry, so the kernel takes its next packets, and every scheduler
    keeps its semantics because only Python schedules. The connection table
    calls :meth:`expiry` before it expires an entry (the kernel refreshed
    flows Python never saw a packet of) and :meth:`forget` when it drops one
    (its ``outside`` hook). :meth:`plan_applied` rewrites the routes whose
    server or VIP changed; :meth:`fold_counters` adds what the kernel
    forwarded to the forwarder's Route counters, so every figure an
    operator reads keeps its meaning.
    """

    def __init__(self, tables: KernelTables, ifindex: int = 0) -> None:
        self.tables = tables
        self.ifindex = ifindex
        self._routes: dict[int, tuple[Any, Any]] = {}
        """route index -> (forwarder Route, the Dest its flows go to)."""
        self._written: dict[int, bytes] = {}
        self._counted: dict[int, tuple[int, int]] = {}

    def _write_route(self, index: int) -> None:
        route, dest = self._routes[index]
        value = km.route_value(dest.tx, dest.available and route.live, self.ifindex)
        if self._written.get(index) != value:
            self.tables.maps.update("routes", km.U32.pack(index), value)
            self._written[index] = value

    def flow(self, c) -> None:
        if not c.confirmed or c.tag is None:
            return
        index = self.tables.route_index(c.tag)
        if self._routes.get(index) != (c.tag, c.dest):
            self._routes[index] = (c.tag, c.dest)
        self._write_route(index)
        self.tables.install(c.key, index, c.state, c.expires)

    def expiry(self, c, now: float) -> float:
        got = self.tables.flow(c.key, now)
        return got[2] if got is not None else 0.0

    def forget(self, c) -> None:
        self.tables.remove(c.key)

    def plan_applied(self, vips: Iterable[bytes]) -> None:
        self.tables.set_vips(vips)
        for index in self._routes:
            self._write_route(index)

    def fold_counters(self) -> None:
        for index, (route, _) in self._routes.items():
            packets, nbytes = self.tables.route_counters(index)
            p0, b0 = self._counted.get(index, (0, 0))
            route.packets += packets - p0
            route.bytes += nbytes - b0
            self._counted[index] = (packets, nbytes)


class KernelDataplane:
    """The program loaded (libbpf), its tables, its slow-path veth, its attachment at tc ingress.

    What the engine worker holds while the kernel forwards established
    flows. With ``slowpath`` the frames the program leaves for the engine go
    to a veth pair whose far end (``rx_interface``) the engine reads, so
    the engine never sees a frame the kernel forwarded. ``close`` detaches,
    removes the veth and unloads (the maps go with the program).
    """

    def __init__(self, interface: str, max_entries: int, timeouts: Iterable[float], slowpath: bool = True) -> None:
        from director.dataplane.libbpf import LibBpf
        from director.dataplane.tcattach import SlowPathVeth, TcIngress

        self.tc = self.veth = None
        self.rx_interface: str | None = None
        self.bpf = LibBpf(max_entries={"conns": max_entries}, sizes=km.MAPS)
        try:
            self.tables = KernelTables(self.bpf, timeouts)
            if slowpath:
                self.veth = SlowPathVeth(interface)
                self.tables.set_slowpath(self.veth.tx_ifindex)
                self.rx_interface = self.veth.rx_name
            self.tc = TcIngress(interface, self.bpf.prog_fd)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            if self.tc is not None:
                self.tc.detach()
            if self.veth is not None:
                self.veth.remove()
        finally:
            self.bpf.close()
