"""The one place for DNS error policy and message building. Pure (no I/O).

``Responder.parse`` turns query bytes into a ``Query`` or, when the query
itself is wrong, into the error response (or ``None`` = drop). ``build``
turns a zone ``Resolution`` plus the policy's choice into response bytes with
dnslib. The fast path's precomputed answers are built here too (``template``),
so the fast and slow paths cannot disagree on flags, sections or TTLs.

Rules applied here (RFC in brackets):

* QR, AA on authoritative answers and negatives, RD and CD copied, RA never,
  Z and AD never set (1035 4.1.1, 8906 3.1.3.1).
* NXDOMAIN only for names that do not exist; NODATA for existing names,
  empty non-terminals and types we do not hold; the zone's SOA in the
  authority section with TTL = min(SOA TTL, MINIMUM) (2308 3, 8020).
* REFUSED without AA outside our zones, for classes other than IN and for
  zone transfers.
* EDNS (6891): OPT in the reply iff the query had one; FORMERR for more than
  one OPT or an OPT not owned by the root; BADVERS for version > 0; unknown
  options ignored; the client's UDP size honoured, capped by ours.
* ECS (7871): echoed with our SCOPE; malformed -> FORMERR.
* COOKIE (7873), when cookies are on: a malformed option or two of them ->
  FORMERR; the reply's option (client + server cookie) is the OPT's last.
* Truncation: an answer that does not fit gets TC and empty sections, the
  OPT is kept (6891 7).
* NOTIMP for opcodes other than QUERY; FORMERR for QDCOUNT != 1 or bytes that
  do not parse; a message shorter than a header, or a response (QR=1), is
  dropped: there is nobody sensible to answer (8906 keeps well-formed queries).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import dnslib

from dnsfront import cookies, wire
from dnsfront.policy import ANSWER, SERVFAIL, Choice, Client
from dnsfront.zone import (
    AAAA, AXFR, CAA, CNAME, FORMERR, IXFR, MX, NOTIMP, NS, OPT, PTR, REFUSED, SOA, SRV, TXT, A,
    Resolution, RRset, labels,
)
from dnsfront.zone import SERVFAIL as RCODE_SERVFAIL

CLASS_IN = 1
BADVERS = 16
TSIG = 250
TCP_LIMIT = 65535

# Flag bits of the header's second 16-bit word.
QR, AA_BIT, TC_BIT, RD_BIT, CD_BIT = 0x8000, 0x0400, 0x0200, 0x0100, 0x0010


@dataclass(frozen=True, slots=True)
class Ecs:
    """A query's EDNS Client Subnet option (RFC 7871)."""

    version: int
    source: int
    scope: int
    address: bytes

    def client(self) -> Client:
        return Client(self.version, wire.ecs_address_int(self.version, self.address), self.source)

    def option(self, scope: int) -> bytes:
        return wire.ecs_option(self.version, self.source, scope, self.address)


@dataclass(frozen=True, slots=True)
class Edns:
    payload: int
    do: bool
    ecs: Ecs | None = None
    cookie: bytes | None = None
    """The query's COOKIE option data (well-formed), when cookies are on."""
    cookie_reply: bytes | None = None
    """The whole COOKIE option to answer with (set by the engine, which holds the secret)."""


@dataclass(frozen=True, slots=True)
class Query:
    """A query that passed every check and can be answered."""

    ident: int
    flags: int
    """The query's flags word, for RD/CD copying."""
    qname_raw: bytes
    """The question name in wire form with the client's letter case."""
    qname: bytes
    """Lower-cased wire name, for lookups."""
    qtype: int
    edns: Edns | None


# ---------------------------------------------------------------------------
# RDATA from the config's presentation form


_CAA = re.compile(r'(\d+)\s+(\S+)\s+"(.*)"')


def _rdata(rtype: int, value: str) -> dnslib.RD:
    if rtype == A:
        return dnslib.A(value)
    if rtype == AAAA:
        return dnslib.AAAA(value)
    if rtype == CNAME:
        return dnslib.CNAME(value)
    if rtype == NS:
        return dnslib.NS(value)
    if rtype == PTR:
        return dnslib.PTR(value)
    if rtype == MX:
        pref, target = value.split()
        return dnslib.MX(target, int(pref))
    if rtype == SRV:
        prio, weight, port, target = value.split()
        return dnslib.SRV(int(prio), int(weight), int(port), target)
    if rtype == TXT:
        raw = value.encode("utf-8")
        # One long text becomes consecutive <character-string>s of <= 255 bytes (RFC 1035 3.3.14).
        return dnslib.TXT([raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""])
    if rtype == CAA:
        m = _CAA.fullmatch(value)
        if m is None:
            raise ValueError(f"bad CAA value {value!r}")
        return dnslib.CAA(int(m.group(1)), m.group(2), m.group(3))
    if rtype == SOA:
        mname, rname, *times = value.split()
        return dnslib.SOA(mname, rname, tuple(int(t) for t in times))
    raise ValueError(f"no RDATA builder for type {rtype}")


def _label(wire_name: bytes) -> dnslib.DNSLabel:
    return dnslib.DNSLabel(labels(wire_name))


def _rrs(rrset: RRset, owner: dnslib.DNSLabel) -> list[dnslib.RR]:
    return [dnslib.RR(owner, rrset.rtype, CLASS_IN, rrset.ttl, _rdata(rrset.rtype, v)) for v in rrset.rdata]


# ---------------------------------------------------------------------------


class Responder:
    """Parses queries and builds responses. ``udp_payload`` = our EDNS size."""

    def __init__(self, udp_payload: int = 1232, cookies: bool = False):
        self.udp_payload = udp_payload
        self.cookies = cookies
        """Whether COOKIE options are parsed (a malformed one is FORMERR) or ignored."""

    # -- parsing and query-level errors

    def parse(self, data: bytes) -> Query | bytes | None:
        """A ``Query`` to answer, an error response (bytes), or None to drop."""
        if len(data) < 12:
            return None  # not even a header: no ID to answer to
        ident, flags = struct.unpack_from("!HH", data)
        if flags & QR:
            return None  # a response; answering it could start a loop
        try:
            raw = wire.parse_query(data)
        except (wire.WireError, struct.error):
            return self.header_only(ident, flags, FORMERR)
        edns: Edns | None = None
        if raw.opts:
            if len(raw.opts) > 1:
                return self._error(raw, FORMERR, edns=Edns(self.udp_payload, False))  # 6891 6.1.1
            owner, payload, ttl, rdata = raw.opts[0]
            do = bool(ttl & 0x8000)
            if owner != b"\x00":
                return self._error(raw, FORMERR, edns=Edns(self.udp_payload, do))
            if (ttl >> 16) & 0xFF > 0:
                return self._error(raw, BADVERS, edns=Edns(self.udp_payload, do))  # 6891 6.1.3
            ecs = cookie = None
            try:
                for code, value in wire.parse_options(rdata):
                    if code == wire.ECS_CODE:
                        if ecs is not None:
                            raise wire.WireError("two ECS options")
                        ecs = Ecs(*wire.parse_ecs(value))
                    elif code == wire.COOKIE_CODE and self.cookies:
                        if cookie is not None or not cookies.well_formed(value):
                            raise wire.WireError("malformed COOKIE option")  # 7873 5.2.2
                        cookie = value
            except wire.WireError:
                return self._error(raw, FORMERR, edns=Edns(self.udp_payload, do))
            edns = Edns(payload, do, ecs, cookie)
        if raw.opcode != 0:
            return self._error(raw, NOTIMP, edns=edns)
        if raw.qdcount != 1:
            return self._error(raw, FORMERR, edns=edns, question=False)
        if raw.qtype in (OPT, TSIG):
            return self._error(raw, FORMERR, edns=edns)  # meta types never appear in a question
        if raw.qclass != CLASS_IN or raw.qtype in (AXFR, IXFR):
            return self._error(raw, REFUSED, edns=edns)
        return Query(ident, flags, raw.qname, raw.qname.lower(), raw.qtype, edns)

    def header_only(self, ident: int, flags: int, rcode: int) -> bytes:
        """An error reply when nothing past the header can be trusted."""
        out = QR | (flags & 0x7800) | (flags & RD_BIT) | rcode
        return wire.header(ident, out)

    def _error(self, raw: wire.RawQuery, rcode: int, *, edns: Edns | None, question: bool = True) -> bytes:
        q = Query(raw.ident, raw.flags, raw.qname, raw.qname.lower(), raw.qtype, edns)
        return self.message(q, rcode, aa=False, question=question and raw.qdcount == 1,
                            qclass=raw.qclass, opcode=raw.opcode)

    def limit(self, q: Query, tcp: bool) -> int:
        """Largest response this client takes."""
        if tcp:
            return TCP_LIMIT
        if q.edns is None:
            return wire.NO_EDNS_LIMIT
        return max(wire.NO_EDNS_LIMIT, min(q.edns.payload, self.udp_payload))

    # -- building

    def message(
        self,
        q: Query,
        rcode: int,
        *,
        aa: bool,
        answer: Sequence[dnslib.RR] = (),
        authority: Sequence[dnslib.RR] = (),
        additional: Sequence[dnslib.RR] = (),
        scope: int = 0,
        limit: int = TCP_LIMIT,
        question: bool = True,
        qclass: int = CLASS_IN,
        opcode: int = 0,
    ) -> bytes:
        """Pack a response; truncates (TC, empty sections, OPT kept) past ``limit``."""
        hdr = dnslib.DNSHeader(id=q.ident, qr=1, opcode=opcode, aa=int(aa), rd=int(bool(q.flags & RD_BIT)),
                               ra=0, rcode=rcode & 0xF)
        hdr.cd = int(bool(q.flags & CD_BIT))
        rec = dnslib.DNSRecord(hdr)
        if question and q.qname_raw:
            rec.add_question(dnslib.DNSQuestion(_label(q.qname_raw), q.qtype, qclass))
        opt: list[dnslib.RR] = []
        if q.edns is not None:
            options = []
            if q.edns.ecs is not None and rcode != FORMERR:
                e = q.edns.ecs
                options.append(dnslib.EDNSOption(wire.ECS_CODE, e.option(scope)[4:]))
            if q.edns.cookie_reply is not None:
                options.append(dnslib.EDNSOption(wire.COOKIE_CODE, q.edns.cookie_reply[4:]))  # last: rrl looks there
            opt.append(dnslib.EDNS0(flags="do" if q.edns.do else "", udp_len=self.udp_payload,
                                    ext_rcode=rcode >> 4, opts=options))
        rec.rr = list(answer)
        rec.auth = list(authority)
        rec.ar = list(additional) + opt
        packed = bytes(rec.pack())  # dnslib returns a bytearray
        if len(packed) > limit:
            rec.rr, rec.auth, rec.ar = [], [], opt
            rec.header.tc = 1
            packed = bytes(rec.pack())
        return packed

    def build(
        self,
        q: Query,
        res: Resolution,
        kind: str | None = None,
        choice: Choice | None = None,
        *,
        scope: int = 0,
        limit: int = TCP_LIMIT,
    ) -> bytes:
        """The response for a resolved query.

        ``kind``/``choice`` come from the policy when ``res`` has a
        load-balanced step (ANSWER with a choice, NODATA, or SERVFAIL).
        """
        if res.rcode == REFUSED:
            return self.message(q, REFUSED, aa=False, limit=limit)
        answer: list[dnslib.RR] = []
        authority = [rr for s in res.authority for rr in _rrs(s, _label(s.owner))]
        additional = [rr for s in res.additional for rr in _rrs(s, _label(s.owner))]
        for step in res.answer:
            # The first owner is the question name: spell it as the client did.
            owner = _label(q.qname_raw if step.owner == q.qname else step.owner)
            if step.rrset is not None:
                answer.extend(_rrs(step.rrset, owner))
                continue
            if kind == SERVFAIL:
                return self.message(q, RCODE_SERVFAIL, aa=False, limit=limit)
            if kind == ANSWER and choice is not None and choice.addresses:
                rd = dnslib.A if step.rtype == A else dnslib.AAAA
                answer.extend(dnslib.RR(owner, step.rtype, CLASS_IN, choice.ttl, rd(a)) for a in choice.addresses)
            elif res.zone is not None:
                authority.extend(_rrs(res.zone.negative_soa, _label(res.zone.apex)))
        return self.message(q, res.rcode, aa=True, answer=answer, authority=authority, additional=additional,
                            scope=scope, limit=limit)

    def template(self, qname: bytes, qtype: int, edns: bool, res: Resolution,
                 kind: str | None = None, choice: Choice | None = None) -> bytes:
        """A precomputed response for the fast path: ID 0, RD/CD clear, the
        question lower-cased, DO clear, no ECS, never truncated. The fast
        path patches those per query (see ``dnsfront.answers``)."""
        q = Query(0, 0, qname, qname, qtype, Edns(self.udp_payload, False) if edns else None)
        return self.build(q, res, kind, choice)

    def servfail(self, q: Query, limit: int = TCP_LIMIT) -> bytes:
        return self.message(q, RCODE_SERVFAIL, aa=False, limit=limit)
