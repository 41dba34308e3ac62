"""The kernel data plane's map layout: how keys and values are packed, and what they mean.

Pure: struct packing and the translation from the forwarder's objects
(connection-table keys and entries, transmit objects) to the bytes the tc
program (director/dataplane/tc/glb_tc.bpf.c) reads. No BPF calls: the adapter
(director/dataplane/kernel.py) moves these bytes, and its loader checks every
map's key and value size against :data:`MAPS`, so a C struct and its Python
twin cannot drift apart silently.

Maps (names as in the C file):

* ``conns`` (LRU hash): :func:`flow_key` -> :func:`flow_value` (route index,
  IPVS state, expiry in ticks (:data:`TICK`) of CLOCK_MONOTONIC, 32 bits, compared
  modulo 2^32). Python writes an entry when a flow is confirmed or changes
  state; the kernel only refreshes the expiry, as ``ConnTable.refresh`` does.
  Small on purpose (24 + 8 bytes): the key holds the VIP's id, not its address.
* ``routes`` (array): route index -> :func:`route_value`. A route is one
  real server x one VIP, the forwarder's ``Route``: counting per route gives
  both the per-server and the per-VIP figures.
* ``route_counters`` (per-CPU array): route index -> packets, bytes.
* ``reasons`` (per-CPU array): :data:`REASONS` index -> packets.
* ``timeouts``, ``next_state`` (one-element arrays): the connection table's
  timeouts per state and its transition table (``conntable.NEXT_BYTES``), so
  the kernel's idea of "this packet changes nothing" is Python's.
* ``ident`` (per-CPU array): the last outer IPv4 id of a tunnel.
* ``vips`` (hash): :func:`vip_key` -> :func:`vip_value` (the VIP's id, which
  flow keys hold, and whether it is live: its flows forwarded, the frames
  the program leaves for it the engine's). A VIP that leaves the plan stays,
  not live, so its id and flows are still there if it comes back.
* ``slowpath`` (one-element array): the ifindex of the veth the engine reads,
  where those go (0: none; everything left goes to the host).
* LVS-NAT (director/modes/nat.py): a NAT flow's ``conns`` value says it is
  two-way, so its client packets move the state by IPVS's INPUT table
  (``nat_next_state`` 0; 1: OUTPUT, the real server's packets); its route
  (:func:`route_value`, mode NAT) holds the real server's address, port and
  MACs and the LAN side's ifindex. ``nat_replies`` (LRU hash):
  :func:`reply_key` (the flow as its real server's replies carry it) ->
  :func:`reply_value` (the ``conns`` key, the VIP, the client's and the
  director's MACs, the client side's ifindex): how a reply is found and where
  it goes. ``route_out_counters`` (per-CPU array) counts the replies per
  route, ``nat_sources`` (hash, :func:`vip_key` -> 1) holds the NAT real
  servers' addresses (their frames the program does not forward are the
  engine's, and the host's too), ``slowpaths`` (hash: ifindex -> ifindex) the
  LAN side's own slow-path veth when it is another interface.
* ``services`` (hash): :func:`svc_key` (VIP id, port, protocol) ->
  :func:`svc_value` (scheduler kind, table number, slots; persistence: the
  service's id, timeout and prefix lengths) for every VIP whose
  service the kernel schedules new flows of (:func:`kernel_schedules`: mh,
  sh, dh; DR or TUN; no spill configured). ``slots`` (hash, not
  preallocated): (table, chunk) -> :data:`SLOT_CHUNK` route indexes, the
  scheduler's lookup table (:func:`slot_chunks`). A route's
  :data:`ROUTE_NEW` says whether its server takes new flows; a flow the
  kernel made, or whose TCP state it moved (:data:`ROUTE_TRACK`), carries
  :data:`FLOW_KERNEL` until Python writes it again.
  ``route_new`` (per-CPU array): route index -> new flows the kernel made.
* ``templates`` (hash, not preallocated, sized as ``conns``):
  :func:`template_key` (the service's :func:`persist_id`, the client network:
  ``Persistence.key``) -> :func:`template_value` (the server's
  :func:`server_id`, which a route also carries, and the expiry in ticks): the
  kernel's copy of Python's persistence templates, for the services it
  schedules. Python writes the ones it makes or refreshes (``Persistence.watch``),
  the kernel the ones it makes, an expired one it leaves to Python
  (``pass_template``: only Python knows whether it still controls
  connections), and Python's sweep deletes the expired ones it does not keep.
  ``persist_routes`` (hash): :func:`proute_key` (a VIP's table number, a
  member's server id) -> the route of that server x that VIP: where a
  template sends this VIP's flow (a template is per service, across its VIPs
  and ports).
* ``flow_events`` (ring buffer): a :data:`FLOW_EVENT` record (the ``conns``
  key and value after the packet) for each flow the kernel made and each
  state change it applied, read by director/dataplane/flowevents.py;
  ``flow_events_lost`` (per-CPU, one entry): records the ring had no room
  for (those flows wait for the sweep).
* ``layout`` (array, one entry per :data:`GROUPS` member) and ``route_ids``
  (array): Python's alone, pinned with the rest. :func:`group_ids` says which
  groups of pinned maps can be reused; :func:`route_id` is a route's
  identity (its server and VIP), so a restarted director finds the index its
  predecessor gave each route.
"""

from __future__ import annotations

import functools
import struct
from typing import Any

from director.dataplane.conntable import NEXT_BYTES, NEXT_IN, NEXT_OUT, table_bytes
from glb.hashing import hash64

STATES = 16
"""Rows the kernel's tables have (the 12 states of conntable.py, padded so the C can mask an index)."""

MODE_NONE, MODE_DR, MODE_TUN, MODE_NAT = 0, 1, 2, 3
ROUTE_LIVE = 1
ROUTE_NEW = 2
"""The route's server takes new flows (available, weight > 0): the kernel may schedule onto it."""
ROUTE_TRACK = 4
"""The kernel applies the TCP state changes of the route's flows (DR and TUN routes, every scheduler); Python
hears each at once through ``flow_events`` (lc/wlc's active/inactive counts follow within a loop turn) and
reads them back in its sweep besides."""

REASONS = (
    "forwarded_dr",
    "forwarded_tun",
    "pass_not_ip",
    "pass_not_simple",
    "pass_no_flow",
    "pass_expired",
    "pass_state_change",
    "pass_route_down",
    "pass_too_big",
    "pass_family",
    "error",
    "pass_other_host",
    "forwarded_nat",
    "forwarded_nat_reply",
    "new_flow",
    "state_tracked",
    "pass_template",
)
"""What happened to each packet the program saw, in the C ``enum reason`` order:
forwarded by the kernel, or passed to the userspace engine and why."""

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7

FLOW_KEY = struct.Struct("=BBH2s2s16s")
FLOW_VALUE = struct.Struct("=HBBI")
VIP = struct.Struct("=HBx")
VIP_LIVE = 1
TICK_SHIFT = 20
TICK = (1 << TICK_SHIFT) / 1e9
"""Seconds per unit of a flow's expiry (2^20 ns, ~1.05 ms)."""
CLOCK_LAG = 0.01
"""How far the program's clock (CLOCK_MONOTONIC as of the last timer tick, bpf_ktime_get_coarse_ns) may
be behind ``time.monotonic``: 1/HZ at the lowest HZ a kernel is built with (100). An expiry the kernel
writes is that much early at most; nothing in Python corrects for it (LVS's timers are jiffies too)."""
MAX_TIMEOUT = 24 * 86400.0
"""The longest timeout the kernel keeps exactly: expiries are compared modulo 2^32 ticks (~52 days)."""
MAX_VIPS = 4096
ROUTE = struct.Struct("=6s6sBBBxIHH16s16sI")
VIP_KEY = struct.Struct("=B3x16s")
COUNTER = struct.Struct("=QQ")
TIMEOUTS = struct.Struct(f"={STATES}Q")
U16 = struct.Struct("=H")
REPLY_KEY = struct.Struct("=BBxx2s2s16s16s")
REPLY = struct.Struct(f"={FLOW_KEY.size}s16s12sI")
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
SVC_KEY = struct.Struct("=H2sB3x")
SVC = struct.Struct("=BBBxIIII")
TPL_KEY = struct.Struct("=IB3x16s")
TPL = struct.Struct("=II")
PROUTE_KEY = struct.Struct("=II")
SLOT_KEY = struct.Struct("=II")
SLOT_CHUNK = 256
"""Slots per ``slots`` entry (a Maglev table of 65537 slots is 257 of them)."""
SLOTS = struct.Struct(f"={SLOT_CHUNK}H")
NO_ROUTE = 0xFFFF
"""A slot no server owns."""
FLOW_KERNEL = 1
"""A ``conns`` value's fourth byte (flags): the kernel made this flow or changed its state since Python last
wrote it."""
FLOW_TWO_WAY = 2
"""A ``conns`` value's flags: a NAT flow (its state moves by IPVS's INPUT table, ``nat_next_state``)."""
FLOW_EVENT = struct.Struct(f"={FLOW_KEY.size}s{FLOW_VALUE.size}s")
"""A ``flow_events`` record (C ``struct flow_event``): a ``conns`` key and its value."""
SCHED_KINDS = {"mh": 1, "sh": 2, "dh": 3}
"""The schedulers whose new flows the kernel computes (glb_tc.bpf.c SCHED_*)."""
KERNEL_MODES = frozenset({"dr", "tun"})

MAPS = {
    "conns": (FLOW_KEY.size, FLOW_VALUE.size),
    "routes": (U32.size, ROUTE.size),
    "route_counters": (U32.size, COUNTER.size),
    "reasons": (U32.size, U64.size),
    "timeouts": (U32.size, TIMEOUTS.size),
    "next_state": (U32.size, STATES * 256),
    "ident": (U32.size, U32.size),
    "vips": (VIP_KEY.size, VIP.size),
    "slowpath": (U32.size, U32.size),
    "layout": (U32.size, U64.size),
    "route_ids": (U32.size, U64.size),
    "nat_replies": (REPLY_KEY.size, REPLY.size),
    "nat_next_state": (U32.size, STATES * 256),
    "route_out_counters": (U32.size, COUNTER.size),
    "nat_sources": (VIP_KEY.size, U32.size),
    "slowpaths": (U32.size, U32.size),
    "services": (SVC_KEY.size, SVC.size),
    "slots": (SLOT_KEY.size, SLOTS.size),
    "templates": (TPL_KEY.size, TPL.size),
    "persist_routes": (PROUTE_KEY.size, U32.size),
    "route_new": (U32.size, U64.size),
    "flow_events": (0, 0),
    "flow_events_lost": (U32.size, U64.size),
}
"""Map name -> (key size, value size), as the C structs must have them."""


def sized(max_entries: int) -> dict[str, int]:
    """The maps the loader sizes to the connection table (libbpf's max_entries before loading)."""
    return {"conns": max_entries, "nat_replies": max_entries, "templates": max_entries}


PERCPU_MAPS = frozenset({"route_counters", "reasons", "ident", "route_out_counters", "route_new",
                         "flow_events_lost"})
"""Per-CPU maps: a lookup returns one 8-byte-aligned value per CPU, an update takes as many."""
MAX_ROUTES = 65536
ZERO = U32.pack(0)


FLOW_MAPS = ("conns", "nat_replies", "route_ids", "vips")
"""What established flows are: ``conns`` keys hold VIP ids (``vips``) and values route indexes
(``route_ids``), ``nat_replies`` values hold ``conns`` keys; kept or rebuilt together."""
GROUPS: dict[str, tuple[int, tuple[str, ...]]] = {
    "flows": (1, FLOW_MAPS),
    "templates": (1, ("templates",)),
    "plan": (1, tuple(m for m in MAPS if m not in FLOW_MAPS and m not in ("templates", "layout"))),
}
"""Pinned maps are reused or rebuilt a group at a time: group -> (version, its maps). Only ``flows`` and
``templates`` hold what Python cannot write again; the ``plan`` group (routes, lookup tables, counters,
state tables...) is rewritten by the first plan, so a release that changes one of its maps still keeps
every established flow. Bump a group's version when one of its maps keeps its sizes but changes meaning.
The position here is the group's key in ``layout``: append new groups, never reorder (key 0 held the
single id of every map before the groups, which matches no group's id now, so such pins are rebuilt)."""


def group_ids(max_entries: int, versions: dict[str, int] | None = None) -> dict[str, int]:
    """Group -> the id its pinned maps must carry in ``layout`` to be reused: the group's version, its
    maps' key and value sizes, and for the maps sized to the table (:func:`sized`) ``max_entries`` (libbpf
    refuses a pinned map of another size anyway). ``versions`` overrides GROUPS' (tests: another release).
    Never 0 (an unset array slot)."""
    size = sized(max_entries)
    out = {}
    for group, (version, names) in GROUPS.items():
        version = (versions or {}).get(group, version)
        shape = [(n, MAPS[n], size.get(n)) for n in names]
        out[group] = hash64(repr((group, version, shape)).encode()) | 1
    return out


def layout_items(ids: dict[str, int]) -> list[tuple[bytes, bytes]]:
    """``layout`` entries: each group's id under its position in GROUPS."""
    return [(U32.pack(i), U64.pack(ids[g])) for i, g in enumerate(GROUPS)]


def route_id(server: Any, vip: str) -> int:
    """A route's identity in ``route_ids``: its server (service, address, port) and VIP label. Never 0 (free)."""
    return hash64(f"{server.service}|{server.address}|{server.port}|{vip}".encode()) | 1


def flow_vip(key: bytes) -> bytes:
    """The VIP address of a connection-table key (codec.flow_key: proto | client | VIP | ports)."""
    if len(key) == 13:
        return key[5:9]
    if len(key) == 37:
        return key[17:33]
    raise ValueError(f"not a flow key: {len(key)} bytes")


def flow_key(key: bytes, vip: int) -> bytes:
    """The kernel's key for a connection-table key whose VIP has the id ``vip``.

    The ports stay in network order; an IPv4 client fills the first 4 bytes of 16.
    """
    if len(key) == 13:
        return FLOW_KEY.pack(key[0], 4, vip, key[9:11], key[11:13], key[1:5])
    if len(key) == 37:
        return FLOW_KEY.pack(key[0], 6, vip, key[33:35], key[35:37], key[1:17])
    raise ValueError(f"not a flow key: {len(key)} bytes")


def conn_key(kernel_key: bytes, vips: dict[int, bytes]) -> bytes | None:
    """The inverse of :func:`flow_key`, given VIP id -> address; None for an id not there."""
    proto, family, vip, sport, dport, src = FLOW_KEY.unpack(kernel_key)
    addr = vips.get(vip)
    if addr is None:
        return None
    n = 4 if family == 4 else 16
    return bytes([proto]) + src[:n] + addr + sport + dport


def vip_value(vip: int, live: bool) -> bytes:
    return VIP.pack(vip, VIP_LIVE if live else 0)


def vip_address(key: bytes) -> bytes:
    """The packed address of a ``vips`` key."""
    family, addr = VIP_KEY.unpack(key)
    return addr[:4] if family == 4 else addr


def vip_key(addr: bytes) -> bytes:
    """A packed VIP address (4 or 16 bytes) as the ``vips`` map's key."""
    return VIP_KEY.pack(4 if len(addr) == 4 else 6, addr)


def ns(seconds: float) -> int:
    """A ``now``-style time (time.monotonic seconds) as the kernel's bpf_ktime_get_ns."""
    return max(0, int(seconds * 1e9))


_TICKS_PER_SECOND = 1e9 / (1 << TICK_SHIFT)


def ticks(seconds: float) -> int:
    """A ``now``-style time as the kernel's expiry unit, modulo 2^32; rounded up, so never early."""
    t = max(0.0, seconds) * _TICKS_PER_SECOND
    i = int(t)
    return (i + (i < t)) & 0xFFFFFFFF


def flow_value(route: int, state: int, expires: float, two_way: bool = False, _pack=FLOW_VALUE.pack) -> bytes:
    """Once per confirmed flow and state change: kept to one multiplication and one pack.
    ``two_way``: a NAT flow (its state moves by IPVS's INPUT table, ``nat_next_state``)."""
    t = expires * _TICKS_PER_SECOND
    i = int(t)
    return _pack(route, state, FLOW_TWO_WAY if two_way else 0, (i + (i < t)) & 0xFFFFFFFF if t > 0 else 0)


def parse_flow_value(value: bytes, now: float) -> tuple[int, int, float]:
    """(route, state, expires in seconds), the expiry read as the one within 2^31 ticks of ``now``."""
    route, state, _, expires = FLOW_VALUE.unpack(value)
    base = ns(now) >> TICK_SHIFT
    delta = (expires - base) & 0xFFFFFFFF
    if delta >= 1 << 31:
        delta -= 1 << 32
    return route, state, (base + delta) * TICK


def is_nat(tx: Any) -> bool:
    """Whether a transmit object is modes/nat.py's NatTransmit (the real server's address and port)."""
    return getattr(tx, "family", None) in (4, 6) and hasattr(tx, "port")


def route_value(tx: Any, live: bool, ifindex: int = 0, lan_ifindex: int = 0,
                new: bool = False, track: bool = False, server: int = 0) -> bytes:
    """A route's entry for a transmit object (director/modes/): DR's 12 MAC bytes, a TUN tunnel or
    a NAT real server.

    ``live``: the server is available and the VIP in the plan (``Dest.available``
    and ``Route.live``). ``tx`` None (unreachable) or a mode the kernel does not
    do gives a route the kernel always passes to userspace. ``ifindex`` 0: out
    of the interface the packet came in on; NAT goes out of ``lan_ifindex``
    (the real servers' side) when it is another. ``new``: it takes new flows (:data:`ROUTE_NEW`);
    ``track``: the kernel applies its flows' state changes (:data:`ROUTE_TRACK`); ``server``: the
    server's :func:`server_id` (what a persistence template names).
    """
    flags = (ROUTE_LIVE | (ROUTE_NEW if new else 0) | (ROUTE_TRACK if track else 0)) if live else 0
    empty = bytes(16)
    if isinstance(tx, bytes) and len(tx) == 12:
        return ROUTE.pack(tx[:6], tx[6:], MODE_DR, 0, flags, ifindex, 0, 0, empty, empty, server)
    family = getattr(tx, "family", None)
    if is_nat(tx):
        return ROUTE.pack(tx.eth[:6], tx.eth[6:12], MODE_NAT, family, flags, lan_ifindex or ifindex, 0,
                          U16.unpack(tx.port.to_bytes(2, "big"))[0], empty, tx.address.ljust(16, b"\0"), server)
    if family in (4, 6) and hasattr(tx, "max_inner"):
        eth = tx.eth
        return ROUTE.pack(eth[:6], eth[6:12], MODE_TUN, family, flags, ifindex, tx.max_inner, 0,
                          tx.src.ljust(16, b"\0"), tx.dst.ljust(16, b"\0"), server)
    return ROUTE.pack(bytes(6), bytes(6), MODE_NONE, 0, 0, ifindex, 0, 0, empty, empty, server)


def timeouts_value(timeouts: tuple[float, ...] | list[float]) -> bytes:
    """The connection table's per-state timeouts (seconds), padded to :data:`STATES`."""
    values = [ns(min(t, MAX_TIMEOUT)) for t in timeouts][:STATES]
    return TIMEOUTS.pack(*values, *([0] * (STATES - len(values))))


def next_state_value(table: bytes = NEXT_BYTES) -> bytes:
    """conntable.NEXT_BYTES (or another of its tables as bytes) padded to :data:`STATES` rows; an unused row
    never matches its own state."""
    return table + bytes(STATES * 256 - len(table))


def nat_next_state_values() -> tuple[bytes, bytes]:
    """``nat_next_state``'s two entries: IPVS's INPUT table (client packets) and OUTPUT (the real server's)."""
    return next_state_value(table_bytes(NEXT_IN)), next_state_value(table_bytes(NEXT_OUT))


def reply_key(rkey: bytes) -> bytes:
    """The ``nat_replies`` key of a flow's reply key (forwarder.reply_key: proto | RIP | client | ports)."""
    if len(rkey) == 13:
        return REPLY_KEY.pack(rkey[0], 4, rkey[9:11], rkey[11:13], rkey[1:5], rkey[5:9])
    if len(rkey) == 37:
        return REPLY_KEY.pack(rkey[0], 6, rkey[33:35], rkey[35:37], rkey[1:17], rkey[17:33])
    raise ValueError(f"not a flow key: {len(rkey)} bytes")


def reply_value(kernel_key: bytes, vip: bytes, eth: bytes, ifindex: int) -> bytes:
    """Where a reply goes: the flow's ``conns`` key, the VIP (its new source), ``eth`` (the client's MAC,
    then the director's: ``Conn.peer``) and the client side's ifindex."""
    return REPLY.pack(kernel_key, vip.ljust(16, b"\0"), eth, ifindex)


def sum_percpu(value: bytes, size: int, fmt: struct.Struct) -> tuple[int, ...]:
    """Sum a per-CPU map's value (one ``size``-byte slot, rounded up to 8, per CPU) field by field."""
    stride = (size + 7) & ~7
    total = [0] * len(fmt.unpack(bytes(fmt.size)))
    for off in range(0, len(value) - size + 1, stride):
        for i, v in enumerate(fmt.unpack_from(value, off)):
            total[i] += v
    return tuple(total)


def percpu(value: bytes, size: int, cpus: int) -> bytes:
    """The same value for every CPU, as a per-CPU map update takes it."""
    stride = (size + 7) & ~7
    return value.ljust(stride, b"\0") * cpus


def kernel_schedules(sp: Any) -> bool:
    """Whether the kernel may schedule a service's new flows (a forwarder ``ServicePlan``): a hash
    scheduler (:data:`SCHED_KINDS`), DR or TUN, with or without persistence, no spill configured:
    the packet workers switch a spilling service's new flows on the spill flag (spillflags.py) before any plan
    reaches the kernel's tables, so those stay Python's."""
    return sp.scheduler in SCHED_KINDS and sp.forwarding in KERNEL_MODES and sp.spill is None


def svc_key(vid: int, port: int, proto: int) -> bytes:
    """A ``services`` key: the VIP's id, its port (network order), the protocol."""
    return SVC_KEY.pack(vid, port.to_bytes(2, "big"), proto)


def svc_value(kind: str, table: int, size: int, persistence: tuple[float, int, int] | None = None,
              persist: int = 0) -> bytes:
    """A ``services`` value; ``persistence`` (timeout, netmask, netmask6) with the service's ``persist`` id."""
    if persistence is None:
        return SVC.pack(SCHED_KINDS[kind], 0, 0, table, size, 0, 0)
    timeout, m4, m6 = persistence
    return SVC.pack(SCHED_KINDS[kind], m4, m6, table, size, persist, ticks(min(timeout, MAX_TIMEOUT)))


@functools.lru_cache(maxsize=1 << 16)
def server_id(server: Any) -> int:
    """A real server's id in its service (route ``server``, template value): its key hashed, never 0.
    Cached: a template Python writes names its server (a ServerKey, hashable) on every new connection."""
    return (hash64(f"{server.service}|{server.address}|{server.port}".encode()) & 0xFFFFFFFF) | 1


def persist_id(service: str) -> int:
    """A service's id in ``templates`` keys, never 0 (no persistence)."""
    return (hash64(f"persist|{service}".encode()) & 0xFFFFFFFF) | 1


def template_key(persist: int, key: tuple[int, int]) -> bytes:
    """The ``templates`` key of a Persistence key (family, masked address as an integer)."""
    family, value = key
    return TPL_KEY.pack(persist, family, value.to_bytes(4 if family == 4 else 16, "big"))


def template_value(server: int, expires: float) -> bytes:
    return TPL.pack(server, ticks(expires))


def proute_key(table: int, server: int) -> bytes:
    """A ``persist_routes`` key: a VIP's table number (its ``services`` value's) and a server's id."""
    return PROUTE_KEY.pack(table, server)


def slot_chunks(table: int, routes: list[int]) -> dict[bytes, bytes]:
    """A lookup table (slot -> route index, :data:`NO_ROUTE` for none) as ``slots`` entries."""
    out = {}
    for start in range(0, len(routes), SLOT_CHUNK):
        part = routes[start:start + SLOT_CHUNK]
        out[SLOT_KEY.pack(table, start // SLOT_CHUNK)] = SLOTS.pack(*part, *([NO_ROUTE] * (SLOT_CHUNK - len(part))))
    return out
