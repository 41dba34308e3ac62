"""The answer engine: precomputed responses, the fast path and the slow path.

Pure (no sockets, no asyncio): the server hands it query bytes and the
client's address and sends back whatever it returns. Randomness and time are
injected so tests can drive it.

Precomputed: for every (name, type) we serve, the response bytes of every
possible choice: an ``Entry``. Static answers are built once per config; a
load-balanced name's ``Plan`` and entries are rebuilt only when a site among
its members changes in a way an answer can see (``dnsfront.sitewatch``), so
a heartbeat that changes nothing costs nothing and a change costs what it
touches. The hot path is then

    header check -> dict lookup on the question's bytes -> pick a choice
    (random or by client, cached) -> patch ID/flags/question case -> bytes

and everything else (other shapes, names not precomputed or out of date,
truncation) goes to the slow path: ``Responder.parse`` + ``Zones.resolve`` +
``Responder.build``. Deterministic slow-path results are added to the table,
so repeated queries (NXDOMAIN floods, rarely asked types) become fast too;
that part of the table is bounded, and an added entry that depends on a
load-balanced name leaves with that name's.
"""

from __future__ import annotations

import dataclasses
import logging
import random as _random
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from glb.config import Config, LBName
from glb.state import DeploymentState

from dnsfront import cookies as cookies_mod
from dnsfront import policy, rrl, wire
from dnsfront.cookies import CookieJar
from dnsfront.policy import ANSWER, SLOT_BITS, Client, Plan
from dnsfront.responder import Query, Responder
from dnsfront.sitewatch import SiteWatch
from dnsfront.zone import AAAA, ANY, A, Zones, to_text
from dnsfront.zone import SERVFAIL as RCODE_SERVFAIL

log = logging.getLogger("glb.dnsfront")

CLIENT_CACHE_MAX = 65536
"""Per-entry cache of client -> choice for topology/sticky; reset when full."""
DYNAMIC_MAX = 20000
"""Slow-path results added to the table before they are all dropped (and added again as asked)."""
TEMPLATES_PER_NAME = 32
"""Response templates kept per load-balanced name (choices x TTLs x EDNS) before the cache starts over."""

_HEADER_PLAIN = wire.HEADER_PLAIN
_HEADER_EDNS = wire.HEADER_EDNS
_OPT_HEAD = wire.OPT_HEAD
_ECS_CODE = struct.pack("!H", wire.ECS_CODE)


def _part(template: bytes, qlen: int) -> tuple[tuple[bytes, ...], bytes, bytes]:
    """(four header variants, tail, tail with DO set) of one response template."""
    flags = struct.unpack_from("!H", template, 2)[0]
    heads = []
    for v in range(4):  # bit 0: RD, bit 1: CD (from the query)
        f = flags | (0x0100 if v & 1 else 0) | (0x0010 if v & 2 else 0)
        heads.append(struct.pack("!H", f) + template[4:12])
    tail = template[12 + qlen :]
    tail_do = tail
    if len(tail) >= 11 and tail[-11:-8] == _OPT_HEAD:
        # Our OPT is always last, RDLEN 0: its flags are at [-4:-2].
        tail_do = tail[:-4] + bytes((tail[-4] | 0x80,)) + tail[-3:]
    return tuple(heads), tail, tail_do


class Entry:
    """Every possible response for one question shape.

    ``parts[i]`` = (four header variants for choice i, tail, tail with DO set)
    (see ``_part``). A header variant is bytes 2..12 of the response (flags +
    counts) with the query's RD/CD bits folded in, indexed by ``rd | cd >> 3``;
    the tail is everything after the question.

    Picking a choice per query: ``slots`` (random policies) is a table of
    2**16 choice indices in proportion to the weights, indexed by 16 random
    bits: one C call and one byte read, no Python-level function call.
    ``choose`` (topology, sticky) maps the client address to an index.
    Neither set: there is one choice. ``choose_ecs`` does the same from an
    ECS option and also returns the SCOPE.
    """

    __slots__ = ("parts", "slots", "choose", "choose_ecs", "hits", "qtype", "rcodes", "sites", "name", "label", "rrl")

    def __init__(self, name: bytes, qtype: int, parts: list, rcodes: list[int], sites: list[str | None],
                 slots: bytes | None, choose: Callable[[Any], int] | None,
                 choose_ecs: Callable[[bytes], tuple[int, int]], label: str | None = None):
        self.name, self.qtype, self.sites = name, qtype, sites
        self.label = label if label is not None else to_text(name)
        """Name the site answers are counted under: the load-balanced name
        (the slow path's ``plan.name``), also when a CNAME led to it."""
        self.slots, self.choose, self.choose_ecs = slots, choose, choose_ecs
        self.hits = [0] * len(parts)
        self.parts, self.rcodes = parts, rcodes
        self.rrl = rrl.kind_of(name + struct.pack("!HH", qtype, 1), rcodes[0])
        """What the rate limiter counts these answers as (the same for every choice)."""


class Engine:
    """Answers queries for one config, following state given to ``apply``/``update``.

    Answers that no state can change are built once per config. Each
    load-balanced name's plans and entries are rebuilt only when a site among
    its members changes in a way an answer can see (``SiteWatch``): ``apply``
    drops them at once (the next query of such a name computes its answer on
    the slow path, and puts it back in the table) and queues the name in
    ``pending``; ``build_pending`` rebuilds queued names, a bounded number at
    a time, so a caller can let queries through between batches.
    """

    def __init__(self, config: Config, *, rng: _random.Random | None = None, cookies: CookieJar | None = None,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.cookies = cookies
        """Server cookies (RFC 7873); None: COOKIE options are ignored."""
        self._clock = clock
        """Wall-clock time for cookie timestamps (the only time the answering path reads)."""
        self.responder = Responder(config.dnsfront.udp_payload, cookies=cookies is not None)
        self.limit: rrl.Check | None = None
        """Response rate limiting of UDP answers (``RateLimiter.check``); None: off."""
        self.zones = Zones.from_config(config)
        self.sites = {s.name: s for s in config.sites}
        self.stale_after = config.redis.stale_after
        self.udp_payload = config.dnsfront.udp_payload
        self.rng = rng if rng is not None else _random.Random()
        self._bits = self.rng.getrandbits
        self.state: DeploymentState | None = None
        self.plans: dict[tuple[str, int], Plan] = {}
        self.plain: dict[bytes, Entry] = {}
        self.edns: dict[bytes, Entry] = {}
        self.watch = SiteWatch({s.name: s.director.heartbeat for s in config.sites}, self.stale_after)
        self.names = {lb.name: lb for lb in config.names}
        self._names_of_site: dict[str, list[str]] = {}
        for lb in config.names:
            for m in lb.members:
                self._names_of_site.setdefault(m.site, []).append(lb.name)
        self.pending: dict[str, None] = {}
        """Load-balanced names whose plans and entries are out of date (in order)."""
        self._keys_of: dict[str, list[tuple[bytes, bytes, int]]] = {}
        """Per load-balanced name: the (key, qname, qtype) of the precomputed
        entries that depend on it (its A and AAAA, CNAMEs that lead to it)."""
        self._fixed_built = False
        self._status: dict[str, dict[str, Any]] = {}
        self._dynamic: list[tuple[dict[bytes, Entry], bytes]] = []
        self._dynamic_of: dict[str, list[tuple[dict[bytes, Entry], bytes]]] = {}
        self._templates: dict[tuple, tuple[tuple, int, int]] = {}
        self._templates_max = 4 * DYNAMIC_MAX + TEMPLATES_PER_NAME * len(config.names)
        # Counters. Fast-path hits live in the entries (one list increment per
        # query); they are folded in here when an entry is replaced.
        self.responses: Counter[tuple[int, int]] = Counter()  # (qtype, rcode)
        self.site_answers: Counter[tuple[str, str]] = Counter()  # (name, site)
        self.dropped = 0
        self.malformed = 0
        self.internal_errors = 0
        self.fast = 0
        self.slow = 0
        self.updated_at: float | None = None

    # ------------------------------------------------------------------
    # Rebuilding

    def update(self, state: DeploymentState | None, now: float) -> int:
        """``apply`` then ``build_pending`` with no bound: everything current
        on return. Returns the number of load-balanced names rebuilt."""
        self.apply(state, now)
        return self.build_pending()

    def apply(self, state: DeploymentState | None, now: float) -> int:
        """Take ``state`` as of ``now``; returns how many names went out of date.

        Only the names with a changed site among their members are dropped
        (their entries leave the table, their plans are forgotten) and queued;
        a heartbeat that changes no condition drops nothing.
        """
        if not self._fixed_built:
            self._build_fixed()
            self._fixed_built = True
        changed = self.watch.changed(state, now)
        self.state, self.updated_at = state, now
        if changed and log.isEnabledFor(logging.DEBUG):
            for site in sorted(changed):
                age = state.site_age(site, now) if state is not None else None
                log.debug("site %s: condition %s (age %s at %.3f)", site, self.watch.conditions.get(site),
                          "-" if age is None else f"{age:.3f}", now)
        names: set[str] = set()
        for site in changed:
            names.update(self._names_of_site.get(site, ()))
        for name in names:
            self._drop(name)
        return len(names)

    def next_deadline(self) -> float:
        """Local time at which time alone may change an answer (``math.inf``: never)."""
        return self.watch.next_deadline()

    def build_pending(self, limit: int | None = None, until: Callable[[], bool] | None = None) -> int:
        """Rebuild queued names, up to ``limit`` (default: all) or until
        ``until()`` says stop (checked after each name); returns how many."""
        n = 0
        while self.pending and (limit is None or n < limit):
            self._build_name(next(iter(self.pending)))
            n += 1
            if until is not None and until():
                break
        return n

    def _drop(self, name: str) -> None:
        """Forget one name's plans and entries (folding their hits) and queue it."""
        gone = []
        for key, _, _ in self._keys_of.get(name, ()):
            for table in (self.plain, self.edns):
                e = table.pop(key, None)
                if e is not None:
                    gone.append(e)
        for table, key in self._dynamic_of.pop(name, ()):
            e = table.pop(key, None)
            if e is not None:
                gone.append(e)
        self._fold(gone)
        self.plans.pop((name, 4), None)
        self.plans.pop((name, 6), None)
        self._status.pop(name, None)
        self.pending[name] = None

    def _build_name(self, name: str) -> None:
        """Plans and entries of one load-balanced name, from the state as of ``updated_at``."""
        self.pending.pop(name, None)
        lb = self.names[name]
        for family in (4, 6):
            if (name, family) not in self.plans:  # (or made since the drop by ``_plan_for``)
                self._make_plan(lb, family)
        for key, qname, qtype in self._keys_of.get(name, ()):
            for table, use_edns in ((self.plain, False), (self.edns, True)):
                entry = self._build_entry(qname, qtype, use_edns)
                if entry is not None:
                    table[key] = entry
        if len(self._templates) > self._templates_max:
            self._templates.clear()

    def _build_fixed(self) -> None:
        """Entries that no state can change, and which keys depend on which name."""
        for qname, qtype in self._precomputed_keys():
            key = qname + struct.pack("!HH", qtype, 1)
            step = self.zones.resolve(qname, qtype).lb_step
            if step is not None:
                self._keys_of.setdefault(step.lb.name, []).append((key, qname, qtype))
                continue
            for table, use_edns in ((self.plain, False), (self.edns, True)):
                entry = self._build_entry(qname, qtype, use_edns)
                if entry is not None:
                    table[key] = entry
        for name in self.names:
            self.pending[name] = None

    def _precomputed_keys(self) -> list[tuple[bytes, int]]:
        """Every (name, type) with data, plus A and AAAA at every name (the
        common questions, also answered NODATA or via a CNAME)."""
        keys = set(self.zones.static_keys())
        for zd in self.zones.zones:
            for w in zd.nodes:
                if w[:2] != b"\x01*":
                    keys.update(((w, A), (w, AAAA)))
        return sorted(keys)

    def plan(self, name: str, family: int) -> Plan:
        """The current plan of load-balanced ``name`` (built now if out of date)."""
        return self._plan_for(self.names[name], family)

    def _plan_for(self, lb: LBName, family: int) -> Plan:
        p = self.plans.get((lb.name, family))
        if p is None:
            # Out of date (queued): this query gets the current answer now,
            # from a plan alone; the entries are left to build_pending, so a
            # burst of queries for dropped names costs a plan each, not more.
            p = self._make_plan(lb, family)
        return p

    def _make_plan(self, lb: LBName, family: int) -> Plan:
        now = self.updated_at if self.updated_at is not None else 0.0
        p = self.plans[(lb.name, family)] = policy.plan(lb, self.sites, self.state, now, self.stale_after, family)
        return p

    def _template(self, qname: bytes, qtype: int, use_edns: bool, res, kind, choice) -> tuple[tuple, int, int]:
        """(entry part, rcode, length) of one response; (qname, qtype) determine ``res``."""
        key = (qname, qtype, use_edns, kind, choice.addresses if choice else None, choice.ttl if choice else None)
        t = self._templates.get(key)
        if t is None:
            raw = self.responder.template(qname, qtype, use_edns, res, kind, choice)
            t = (_part(raw, len(qname) + 4), raw[3] & 0xF, len(raw))
            self._templates[key] = t
        return t

    def _build_entry(self, qname: bytes, qtype: int, use_edns: bool) -> Entry | None:
        """All responses for (qname, qtype), or None if they cannot take the fast path."""
        res = self.zones.resolve(qname, qtype)
        step = res.lb_step
        slots, choose, choose_ecs = None, None, _fixed_ecs
        label = None
        if step is None:
            made = [self._template(qname, qtype, use_edns, res, None, None)]
            sites: list[str | None] = [None]
        else:
            plan = self._plan_for(step.lb, 4 if step.rtype == A else 6)
            label = plan.name
            if plan.kind == ANSWER:
                made = [self._template(qname, qtype, use_edns, res, ANSWER, c) for c in plan.choices]
                sites = [c.sites[0] if c.sites else "fallback" for c in plan.choices]
                if len(made) > 1:
                    slots, choose, choose_ecs = self._choosers(plan)
            else:
                made = [self._template(qname, qtype, use_edns, res, plan.kind, None)]
                sites = [None]
        if not use_edns and max(m[2] for m in made) > wire.NO_EDNS_LIMIT:
            return None  # needs TC over UDP: the slow path does that
        return Entry(qname, qtype, [m[0] for m in made], [m[1] for m in made], sites, slots, choose, choose_ecs,
                     label)

    def _choosers(self, plan: Plan) -> tuple[bytes, Callable[[Any], int] | None, Callable[[bytes], tuple[int, int]]]:
        """(slot table, client chooser, ECS chooser) for a plan with several choices."""
        sel = plan.selector
        bits = self.rng.getrandbits
        slots = sel.slot_table(len(plan.choices))

        def weighted(_addr: Any = None) -> int:
            return slots[bits(SLOT_BITS)]

        if not sel.client_dependent:
            def weighted_ecs(option: bytes) -> tuple[int, int]:
                wire.parse_ecs(option)  # validate: a malformed option is FORMERR
                return weighted(), 0

            return slots, None, weighted_ecs

        by_addr: dict[str, int | None] = {}
        by_ecs: dict[bytes, tuple[int | None, int]] = {}
        decide = sel.decide

        def by_client(addr: Any) -> int:
            host = addr[0]
            i = by_addr.get(host, -1)
            if i == -1:
                try:
                    i = decide(Client.from_ip(host))[0]
                except ValueError:
                    i = None
                if len(by_addr) >= CLIENT_CACHE_MAX:
                    by_addr.clear()
                by_addr[host] = i
            return weighted() if i is None else i

        def by_ecs_option(option: bytes) -> tuple[int, int]:
            hit = by_ecs.get(option)
            if hit is None:
                version, source, _scope, address = wire.parse_ecs(option)
                hit = decide(Client(version, wire.ecs_address_int(version, address), source))
                if len(by_ecs) >= CLIENT_CACHE_MAX:
                    by_ecs.clear()
                by_ecs[option] = hit
            i, scope = hit
            return (weighted() if i is None else i), scope

        return slots, by_client, by_ecs_option

    def _fold(self, entries: list[Entry]) -> None:
        for e in entries:
            for i, n in enumerate(e.hits):
                if n:
                    self.responses[(e.qtype, e.rcodes[i])] += n
                    if e.sites[i] is not None:
                        self.site_answers[(e.label, e.sites[i])] += n
                    self.fast += n

    # ------------------------------------------------------------------
    # Answering

    def handle(self, data: bytes, addr: Any, tcp: bool = False) -> bytes | None:
        """The response to one query, or None to send nothing. Never raises.

        ``addr`` is the peer as the socket reports it ((host, port, ...)).
        The fast path is written flat, with no helper calls, because at
        120k queries/s each Python call costs about 1 % of the budget. A
        ``try`` costs nothing in CPython 3.11 until something raises; if the
        fast path ever does, the slow path answers (and counts) instead.
        """
        try:
            if data[4:12] == _HEADER_PLAIN:
                if not data[2] & 0xF8:  # QR=0, OPCODE=0
                    question = data[12:]
                    e = self.plain.get(question.lower())
                    if e is not None:
                        if e.slots is not None and e.choose is None:
                            i = e.slots[self._bits(SLOT_BITS)]
                        elif e.choose is not None:
                            i = e.choose(addr)
                        else:
                            i = 0
                        e.hits[i] += 1
                        heads, tail, _ = e.parts[i]
                        if tcp or self.limit is None:
                            return data[:2] + heads[(data[2] & 1) | ((data[3] & 0x10) >> 3)] + question + tail
                        return self.limit(data, data[:2] + heads[(data[2] & 1) | ((data[3] & 0x10) >> 3)] + question
                                          + tail, addr, e.rrl)
            elif data[4:12] == _HEADER_EDNS and not data[2] & 0xF8:
                o = data.find(b"\x00", 12) + 5  # start of the OPT RR, if the shape is right
                if len(data) >= o + 11 and data[o : o + 3] == _OPT_HEAD and not data[o + 6]:
                    rdlen = (data[o + 9] << 8) | data[o + 10]
                    e = self.edns.get(data[12:o].lower()) if len(data) == o + 11 + rdlen else None
                    if e is not None:
                        ecs = cookie = None
                        if rdlen:
                            # Options (ECS, a resolver's COOKIE...): unknown ones are
                            # ignored (RFC 6891 6.1.2); malformed ones go to the slow
                            # path, which answers FORMERR.
                            try:
                                ecs, cookie = wire.find_options(data, o + 11)
                                if ecs is not None:
                                    i, scope = e.choose_ecs(ecs)
                                if cookie is not None and self.cookies is not None:
                                    cookie = self._cookie_option(cookie, addr)  # None if malformed
                                    if cookie is None:
                                        e = None
                                else:
                                    cookie = None
                            except wire.WireError:
                                e = None
                        if ecs is None and e is not None:
                            if e.slots is not None and e.choose is None:
                                i = e.slots[self._bits(SLOT_BITS)]
                            elif e.choose is not None:
                                i = e.choose(addr)
                            else:
                                i = 0
                        if e is not None:
                            heads, tail, tail_do = e.parts[i]
                            out = data[:2] + heads[(data[2] & 1) | ((data[3] & 0x10) >> 3)] + data[12:o] + (
                                tail_do if data[o + 7] & 0x80 else tail
                            )
                            if ecs is not None or cookie is not None:
                                opt = b""
                                if ecs is not None:
                                    # Echo FAMILY, SOURCE and ADDRESS; put our SCOPE (RFC 7871 7.2.1).
                                    opt = _ECS_CODE + struct.pack("!H", len(ecs)) + ecs[:3] + bytes((scope,)) + ecs[4:]
                                if cookie is not None:
                                    opt += cookie  # last: dnsfront.rrl looks for it there
                                out = out[:-2] + struct.pack("!H", len(opt)) + opt
                            if tcp or len(out) <= wire.NO_EDNS_LIMIT or len(out) <= min(
                                (data[o + 3] << 8) | data[o + 4], self.udp_payload
                            ):
                                e.hits[i] += 1
                                if tcp or self.limit is None:
                                    return out
                                return self.limit(data, out, addr, e.rrl)
        except Exception:  # noqa: BLE001 - a fast-path bug must not drop a query
            log.exception("fast path failed; answering on the slow path")
        if tcp or self.limit is None:
            return self.answer_slow(data, addr, tcp)
        out = self.answer_slow(data, addr, tcp)
        return None if out is None else self.limit(data, out, addr, None)

    def _cookie_option(self, value: bytes, addr: Any) -> bytes | None:
        """The COOKIE option answering ``value`` from ``addr``; None if malformed."""
        if not cookies_mod.well_formed(value):
            return None
        try:
            return self.cookies.reply(value, addr, self._clock())
        except (OSError, ValueError, TypeError, IndexError):
            return None  # a peer that is no address (a test's fake peer)

    def answer_slow(self, data: bytes, addr: Any, tcp: bool) -> bytes | None:
        """Every query the fast path did not take. Never raises."""
        self.slow += 1
        try:
            parsed = self.responder.parse(data)
            if parsed is None:
                self.dropped += 1
                return None
            if isinstance(parsed, bytes):
                rcode = wire.full_rcode(parsed)  # BADVERS (16) lives partly in the OPT
                if rcode == 1:
                    self.malformed += 1
                self.responses[(_qtype_of(data), rcode)] += 1
                return parsed
            if parsed.edns is not None and parsed.edns.cookie is not None and self.cookies is not None:
                reply = self._cookie_option(parsed.edns.cookie, addr)
                if reply is not None:
                    parsed = dataclasses.replace(parsed, edns=dataclasses.replace(parsed.edns, cookie_reply=reply))
            out, cacheable = self._resolve(parsed, addr, tcp)
            self.responses[(parsed.qtype, out[3] & 0xF)] += 1
            if cacheable:
                self._remember(data, parsed)
            return out
        except Exception:  # noqa: BLE001 - the edge: log, count, SERVFAIL, keep serving
            self.internal_errors += 1
            log.exception("internal error answering a query; sent SERVFAIL")
            if len(data) < 12:
                return None
            ident, flags = struct.unpack_from("!HH", data)
            self.responses[(_qtype_of(data), RCODE_SERVFAIL)] += 1
            return self.responder.header_only(ident, flags, RCODE_SERVFAIL)

    def _resolve(self, q: Query, addr: Any, tcp: bool) -> tuple[bytes, bool]:
        """(response, whether an Entry would reproduce it for this query shape)."""
        res = self.zones.resolve(q.qname, q.qtype)
        limit = self.responder.limit(q, tcp)
        step = res.lb_step
        if step is None:
            return self.responder.build(q, res, limit=limit), True
        family = 6 if step.rtype == AAAA else 4
        plan = self._plan_for(step.lb, family)
        if q.qtype == ANY and plan.kind != ANSWER:
            plan = self._plan_for(step.lb, 6)  # ANY at a v6-only name: the AAAA set
            if plan.kind == ANSWER:
                res = self.zones.resolve(q.qname, AAAA)
        if plan.kind != ANSWER:
            return self.responder.build(q, res, plan.kind, None, limit=limit), True
        client = None
        if plan.selector.client_dependent:
            if q.edns is not None and q.edns.ecs is not None:
                client = q.edns.ecs.client()
            else:
                try:
                    client = Client.from_ip(addr[0])
                except (ValueError, TypeError, IndexError):
                    client = None
        i, scope = plan.selector.select(self.rng.random(), client)
        choice = plan.choices[i]
        # Counted like the fast path's entries: a sorry answer under "fallback".
        self.site_answers[(plan.name, choice.sites[0] if choice.sites else "fallback")] += 1
        return self.responder.build(q, res, ANSWER, choice, scope=scope, limit=limit), q.qtype != ANY

    def _remember(self, data: bytes, q: Query) -> None:
        """Add an Entry for this question so the next one takes the fast path."""
        qtc = struct.pack("!HH", q.qtype, 1)
        if not wire.key_fits_table(qtc) or q.qname_raw.find(b"\x00") != len(q.qname_raw) - 1:
            return  # a zero byte inside a label would defeat the EDNS shape check
        use_edns = q.edns is not None
        table = self.edns if use_edns else self.plain
        key = q.qname + qtc
        if key in table:
            return
        if len(self._dynamic) >= DYNAMIC_MAX:
            # Full (a flood of random names, most likely): start over, so the
            # questions asked from now on get their place.
            gone = [e for t, k in self._dynamic if (e := t.pop(k, None)) is not None]
            self._fold(gone)
            self._dynamic.clear()
            self._dynamic_of.clear()
        entry = self._build_entry(q.qname, q.qtype, use_edns)
        if entry is not None:
            table[key] = entry
            self._dynamic.append((table, key))
            step = self.zones.resolve(q.qname, q.qtype).lb_step
            if step is not None:  # e.g. a wildcard CNAME to a load-balanced name
                self._dynamic_of.setdefault(step.lb.name, []).append((table, key))

    # ------------------------------------------------------------------
    # Reporting

    def take_counters(self, old: Engine) -> None:
        """Start from ``old``'s totals (config reload: metrics keep counting)."""
        c = old.counters()
        self.responses.update(c["responses"])
        self.site_answers.update(c["site_answers"])
        self.fast += c["fast"]
        self.slow += c["slow"]
        self.dropped += c["dropped"]
        self.malformed += c["malformed"]
        self.internal_errors += c["internal_errors"]

    def counters(self) -> dict[str, Any]:
        """Totals including the live entries' hits (cheap enough per scrape)."""
        responses = Counter(self.responses)
        sites = Counter(self.site_answers)
        fast = self.fast
        for table in (self.plain, self.edns):
            for e in table.values():
                for i, n in enumerate(e.hits):
                    if n:
                        responses[(e.qtype, e.rcodes[i])] += n
                        if e.sites[i] is not None:
                            sites[(e.label, e.sites[i])] += n
                        fast += n
        return {
            "responses": responses,
            "site_answers": sites,
            "dropped": self.dropped,
            "malformed": self.malformed,
            "internal_errors": self.internal_errors,
            "fast": fast,
            "slow": self.slow,
        }

    def names_status(self) -> list[dict[str, Any]]:
        """Every name's plans for /status; a name's part is made again only after it changed.

        A name waiting to be rebuilt shows ``"rebuilding": true`` and no plans:
        a report (every /healthz, /metrics and, with workers, every second)
        must not compute thousands of plans after a change.
        """
        cache = self._status
        return [cache[lb.name] if lb.name in cache else self._name_status(lb) for lb in self.config.names]

    def _name_status(self, lb: LBName) -> dict[str, Any]:
        if lb.name in self.pending:
            return {"name": lb.name, "policy": lb.policy, "ttl": lb.ttl, "rebuilding": True}
        fams = {}
        for family in (4, 6):
            p = self._plan_for(lb, family)
            fams[f"ipv{family}"] = {
                "kind": p.kind,
                "reason": p.reason,
                "degraded": p.degraded,
                "choices": [
                    {"sites": list(c.sites), "addresses": list(c.addresses), "ttl": c.ttl, "reason": c.reason}
                    for c in p.choices
                ],
                "members": [
                    {"site": m.site, "live": m.live, "status": m.status, "weight": m.weight,
                     "configured_weight": m.configured_weight, "healthy_fraction": m.healthy_fraction}
                    for m in p.members
                ],
            }
        status = {"name": lb.name, "policy": lb.policy, "ttl": lb.ttl, **fams}
        self._status[lb.name] = status
        return status


def _fixed_ecs(option: bytes) -> tuple[int, int]:
    """ECS chooser for single-choice entries: only validates the option."""
    wire.parse_ecs(option)
    return 0, 0


def _qtype_of(data: bytes) -> int:
    """Best-effort QTYPE for counting a response we could not parse."""
    try:
        end = wire.question_end(data)
        return struct.unpack_from("!H", data, end)[0]
    except (wire.WireError, struct.error, IndexError):
        return 0
