"""Zone data: what the configured zones say about a name, before any policy.

Built once per config (re)load from ``glb.config.Config``; pure (no I/O).
``Zones.resolve(qname, qtype)`` answers the question "what does the zone hold
for this name and type?" with a ``Resolution``: NXDOMAIN, NODATA, a chain of
RRsets (following CNAMEs inside our own zones), or a *load-balanced step* that
the answer policy fills in later. Building DNS messages is the responder's job.

Names are handled in DNS wire form, lower-cased (``b"\\x03www\\x07example\\x03net\\x00"``).
Wire form is unambiguous where text is not (a label may contain a dot or any
byte), it is exactly what the fast path sees in a query, and the parent of a
name is a slice (drop the first label).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from glb.config import Config, LBName, Zone
from glb.errors import DNSFrontError

# RR types we hold or treat specially (RFC 1035, 3596, 2782, 8659, 6891, 8482).
A, NS, CNAME, SOA, PTR, HINFO, MX, TXT, AAAA, SRV, OPT = 1, 2, 5, 6, 12, 13, 15, 16, 28, 33, 41
IXFR, AXFR, ANY, CAA = 251, 252, 255, 257
TYPE_CODES = {"A": A, "NS": NS, "CNAME": CNAME, "SOA": SOA, "PTR": PTR, "MX": MX, "TXT": TXT,
              "AAAA": AAAA, "SRV": SRV, "CAA": CAA}
TYPE_NAMES = {v: k for k, v in TYPE_CODES.items()}

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
MAX_CNAME_CHAIN = 8
"""CNAME links followed inside our own data before we stop (loop guard)."""

# RFC 8482 lets a server answer ANY with any one RRset it holds; we prefer the
# addresses since that is what a client asking ANY almost always wants.
_ANY_PREFERENCE = (A, AAAA, CNAME, MX, TXT, SRV, CAA, PTR, NS, SOA)


# --------------------------------------------------------------------------
# Name helpers


def to_wire(name: str) -> bytes:
    """Lower-cased wire form of a config name (absolute, LDH or '*' labels)."""
    name = name.lower().rstrip(".")
    if not name:
        return b"\x00"
    out = bytearray()
    for label in name.split("."):
        raw = label.encode("ascii")
        if not 0 < len(raw) <= 63:
            raise DNSFrontError(f"bad label {label!r} in name {name!r}")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > 255:
        raise DNSFrontError(f"name {name!r} is longer than 255 bytes")
    return bytes(out)


def labels(wire: bytes) -> list[bytes]:
    """The labels of a wire name (without the root)."""
    out, i = [], 0
    while wire[i]:
        n = wire[i]
        out.append(wire[i + 1 : i + 1 + n])
        i += 1 + n
    return out


def to_text(wire: bytes) -> str:
    """Presentation form, escaping anything that is not a plain hostname byte."""
    parts = []
    for label in labels(wire):
        chars = []
        for b in label:
            c = chr(b)
            if c in ".\\\"();$@" :
                chars.append("\\" + c)
            elif 0x21 <= b <= 0x7E:
                chars.append(c)
            else:
                chars.append(f"\\{b:03d}")
        parts.append("".join(chars))
    return ".".join(parts) + "."


def parent(wire: bytes) -> bytes:
    """The name with its first label removed (root stays root)."""
    return wire[wire[0] + 1 :] if wire[0] else wire


def is_subdomain(wire: bytes, apex: bytes) -> bool:
    """``wire`` equals ``apex`` or lies below it, on a label boundary."""
    if not wire.endswith(apex):
        return False
    cut = len(wire) - len(apex)
    i = 0
    while i < cut:  # walk labels so "xexample.net" is not inside "example.net"
        i += wire[i] + 1
    return i == cut


# --------------------------------------------------------------------------
# Data


@dataclass(frozen=True, slots=True)
class RRset:
    """Records of one type at one owner; RDATA in presentation form from the config."""

    owner: bytes
    rtype: int
    ttl: int
    rdata: tuple[str, ...]

    def at(self, owner: bytes) -> RRset:
        """The same records under another owner (wildcard synthesis)."""
        return RRset(owner, self.rtype, self.ttl, self.rdata)


@dataclass(frozen=True, slots=True)
class Node:
    """Everything held at one name. A load-balanced name holds no static RRsets."""

    name: bytes
    rrsets: Mapping[int, RRset] = field(default_factory=dict)
    lb: LBName | None = None


@dataclass(frozen=True, slots=True)
class ZoneData:
    """One zone: its nodes, indexed by lower-cased wire name."""

    zone: Zone
    apex: bytes
    nodes: Mapping[bytes, Node]
    names: frozenset[bytes]
    """Every existing name: nodes plus empty non-terminals (RFC 8020)."""

    @property
    def negative_soa(self) -> RRset:
        """The SOA for negative answers, TTL = min(SOA TTL, MINIMUM) (RFC 2308 3)."""
        s = self.zone.soa
        rdata = f"{s.mname} {s.rname} {s.serial} {s.refresh} {s.retry} {s.expire} {s.minimum}"
        return RRset(self.apex, SOA, s.negative_ttl, (rdata,))


@dataclass(frozen=True, slots=True)
class Step:
    """One link of an answer: static records, or a load-balanced name to fill in.

    For a load-balanced step ``rrset`` is None and ``lb`` says which name's
    policy chooses the addresses (of type ``rtype``, A or AAAA).
    """

    owner: bytes
    rtype: int
    rrset: RRset | None = None
    lb: LBName | None = None


@dataclass(frozen=True, slots=True)
class Resolution:
    """What the zones say for (qname, qtype).

    ``rcode`` is NOERROR, NXDOMAIN or REFUSED (outside every zone, ``zone`` is
    None then). An empty ``answer`` with NOERROR is NODATA. ``authority``
    holds the SOA of negative answers; ``additional`` holds glue.
    """

    rcode: int
    zone: ZoneData | None
    answer: tuple[Step, ...] = ()
    authority: tuple[RRset, ...] = ()
    additional: tuple[RRset, ...] = ()

    @property
    def lb_step(self) -> Step | None:
        """The load-balanced step, if the answer depends on the policy."""
        for step in self.answer:
            if step.lb is not None:
                return step
        return None

    @property
    def final_zone_soa(self) -> RRset | None:
        """SOA to put in authority if the load-balanced step turns out empty."""
        return self.zone.negative_soa if self.zone else None


# --------------------------------------------------------------------------
# Building


class Zones:
    """All configured zones, ready for lookups. Immutable once built."""

    def __init__(self, zones: Iterable[ZoneData], glue: Mapping[bytes, tuple[RRset, ...]]):
        # Most specific apex first, so a child zone wins over its parent.
        self.zones: tuple[ZoneData, ...] = tuple(sorted(zones, key=lambda z: -len(z.apex)))
        self._glue = MappingProxyType(dict(glue))

    @classmethod
    def from_config(cls, config: Config) -> Zones:
        lb_by_name = {to_wire(lb.name): lb for lb in config.names}
        zones = []
        glue: dict[bytes, tuple[RRset, ...]] = {}
        for zone in config.zones:
            zones.append(_build_zone(zone, lb_by_name))
        built = cls(zones, {})
        # Glue: addresses of name servers, wherever the NS name lives in our data.
        for zd in built.zones:
            for ns in zd.zone.nameservers:
                w = to_wire(ns.name)
                sets = []
                owner = built.find_zone(w)
                node = owner.nodes.get(w) if owner else None
                if node is not None:
                    sets = [node.rrsets[t] for t in (A, AAAA) if t in node.rrsets]
                glue[w] = tuple(sets)
        return cls(built.zones, glue)

    def find_zone(self, qname: bytes) -> ZoneData | None:
        for zd in self.zones:
            if is_subdomain(qname, zd.apex):
                return zd
        return None

    # -- lookups

    def resolve(self, qname: bytes, qtype: int) -> Resolution:
        """Look ``qname`` (lower-cased wire) up for ``qtype``; follows in-zone CNAMEs."""
        zd = self.find_zone(qname)
        if zd is None:
            return Resolution(REFUSED, None)
        steps: list[Step] = []
        seen: set[bytes] = set()
        name = qname
        while True:
            node, exists = _find(zd, name)
            if node is None:
                rcode = NOERROR if exists else NXDOMAIN
                return Resolution(rcode, zd, tuple(steps), (zd.negative_soa,))
            if node.lb is not None:
                rtype = qtype
                if qtype == ANY:
                    rtype = A  # RFC 8482: one RRset; the policy step falls back to AAAA if needed
                if rtype in (A, AAAA):
                    steps.append(Step(name, rtype, None, node.lb))
                    return Resolution(NOERROR, zd, tuple(steps))
                return Resolution(NOERROR, zd, tuple(steps), (zd.negative_soa,))
            cname = node.rrsets.get(CNAME)
            if cname is not None and qtype not in (CNAME, ANY):
                steps.append(Step(name, CNAME, cname.at(name)))
                target = to_wire(cname.rdata[0])
                seen.add(name)
                nzd = self.find_zone(target)
                if nzd is None or target in seen or len(steps) >= MAX_CNAME_CHAIN:
                    # Out of our data (the resolver follows it) or a loop: stop here.
                    return Resolution(NOERROR, zd, tuple(steps))
                zd, name = nzd, target
                continue
            if qtype == ANY:
                rrset = next((node.rrsets[t] for t in _ANY_PREFERENCE if t in node.rrsets), None)
            else:
                rrset = node.rrsets.get(qtype)
            if rrset is None:
                return Resolution(NOERROR, zd, tuple(steps), (zd.negative_soa,))
            steps.append(Step(name, rrset.rtype, rrset.at(name)))
            additional: tuple[RRset, ...] = ()
            if rrset.rtype == NS:
                additional = tuple(g for ns in rrset.rdata for g in self._glue.get(to_wire(ns), ()))
            return Resolution(NOERROR, zd, tuple(steps), (), additional)

    def lbnames(self) -> list[tuple[bytes, LBName]]:
        """Every load-balanced node (not wildcards synthesised at query time)."""
        return [(w, n.lb) for zd in self.zones for w, n in zd.nodes.items() if n.lb is not None]

    def static_keys(self) -> list[tuple[bytes, int]]:
        """(name, type) pairs with static data, to precompute answers for."""
        out = []
        for zd in self.zones:
            for w, node in zd.nodes.items():
                if b"\x01*" == w[:2]:
                    continue  # a wildcard owner is not queried by its own name in practice
                out.extend((w, t) for t in node.rrsets)
        return out


def _find(zd: ZoneData, name: bytes) -> tuple[Node | None, bool]:
    """(node, exists) for ``name`` in ``zd``, with wildcard synthesis (RFC 4592).

    ``exists`` is True for empty non-terminals, whose node is None.
    """
    node = zd.nodes.get(name)
    if node is not None:
        return node, True
    if name in zd.names:
        return None, True  # empty non-terminal: NODATA, not NXDOMAIN (RFC 8020)
    # The closest encloser is the longest existing ancestor; "*.<encloser>" matches.
    encloser = parent(name)
    while encloser not in zd.names and encloser != zd.apex:
        encloser = parent(encloser)
    wild = zd.nodes.get(b"\x01*" + encloser)
    if wild is None:
        return None, False
    return Node(name, {t: r.at(name) for t, r in wild.rrsets.items()}, wild.lb), True


def _build_zone(zone: Zone, lb_by_name: Mapping[bytes, LBName]) -> ZoneData:
    apex = to_wire(zone.apex)
    grouped: dict[bytes, dict[int, tuple[int, list[str]]]] = {}

    def add(owner: bytes, rtype: int, ttl: int, value: str) -> None:
        sets = grouped.setdefault(owner, {})
        old_ttl, values = sets.get(rtype, (ttl, []))
        if value not in values:
            values.append(value)
        # RFC 2181 5.2: one TTL per RRset; keep the smallest the config gave.
        sets[rtype] = (min(old_ttl, ttl), values)

    s = zone.soa
    add(apex, SOA, s.ttl, f"{s.mname} {s.rname} {s.serial} {s.refresh} {s.retry} {s.expire} {s.minimum}")
    for ns in zone.nameservers:
        add(apex, NS, zone.ttl, ns.name)
        w = to_wire(ns.name)
        if is_subdomain(w, apex):
            for addr in ns.glue:
                add(w, A if addr.version == 4 else AAAA, zone.ttl, str(addr))
    for r in zone.records:
        add(to_wire(r.name), TYPE_CODES[r.rtype], r.ttl, r.value)

    nodes: dict[bytes, Node] = {}
    for owner, sets in grouped.items():
        rrsets = {t: RRset(owner, t, ttl, tuple(vals)) for t, (ttl, vals) in sets.items()}
        nodes[owner] = Node(owner, MappingProxyType(rrsets))
    for w, lb in lb_by_name.items():
        if not is_subdomain(w, apex):
            continue
        # A more specific configured zone owns it.
        if w in nodes and nodes[w].rrsets:
            raise DNSFrontError(f"{lb.name} is load-balanced and also has static records")
        nodes[w] = Node(w, MappingProxyType({}), lb)

    names: set[bytes] = set()
    for w in nodes:
        n = w
        while n != apex and n not in names:
            names.add(n)
            n = parent(n)
    names.add(apex)
    return ZoneData(zone, apex, MappingProxyType(nodes), frozenset(names))
