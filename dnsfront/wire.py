"""DNS wire-format pieces shared by the fast path and the responder. Pure.

The fast path never builds a message object: it recognises the common query
shapes by a few byte comparisons, looks the question up by its exact bytes,
and patches a precomputed response (ID, RD/CD, question letter case, DO bit,
ECS option). Everything here is about those bytes; anything that does not
fit the expected shapes goes to the responder (dnslib), which is slower but
handles every case.

Query shapes the fast path takes (RFC 1035 4.1):

* header: QR=0, OPCODE=0, QDCOUNT=1, ANCOUNT=0, NSCOUNT=0, ARCOUNT 0 or 1;
* ARCOUNT=1 only for an OPT RR (root owner, type 41, version 0) that is the
  last thing in the packet, with no options or one well-formed ECS option.

The question's name is found without parsing labels: with ARCOUNT=0 it runs
from byte 12 to 4 bytes before the end; with an OPT it ends at the first zero
byte. Either way the candidate bytes are only used as a key into a table of
names we serve, and a table key is always a complete valid name, so a hit
proves the question was parsed right (a prefix of a packet that is a valid
name is that packet's name: label walking is deterministic).
"""

from __future__ import annotations

import struct

HEADER_PLAIN = b"\x00\x01\x00\x00\x00\x00\x00\x00"
"""QDCOUNT..ARCOUNT of a query without EDNS."""
HEADER_EDNS = b"\x00\x01\x00\x00\x00\x00\x00\x01"
"""QDCOUNT..ARCOUNT of a query with one additional record (the OPT)."""
OPT_HEAD = b"\x00\x00\x29"
"""Root owner name + TYPE=41: how every OPT RR starts."""

ECS_CODE = 8  # EDNS Client Subnet (RFC 7871)
COOKIE_CODE = 10  # DNS cookies (RFC 7873)
ECS_FAMILIES = {1: (4, 32), 2: (6, 128)}  # FAMILY -> (IP version, address bits)

NO_EDNS_LIMIT = 512
"""Largest UDP response to a query without EDNS (RFC 1035 4.2.1)."""


class WireError(ValueError):
    """Bytes that are not a valid encoding of what they claim to be."""


def key_fits_table(qtc: bytes) -> bool:
    """Whether a question with these QTYPE+QCLASS bytes may be a fast-path key.

    Keys are looked up as ``question_bytes.lower()`` so the name's case does
    not matter; lower() also touches QTYPE/QCLASS bytes in 0x41..0x5A. A key
    is only stored when none of its type/class bytes is a lower-case letter,
    so no other type can lower() onto it.
    """
    return not any(0x61 <= b <= 0x7A for b in qtc)


def parse_options(rdata: bytes) -> list[tuple[int, bytes]]:
    """EDNS options (RFC 6891 6.1.2) as (code, data); WireError if they overrun."""
    out, i, n = [], 0, len(rdata)
    while i < n:
        if i + 4 > n:
            raise WireError("truncated EDNS option header")
        code, length = struct.unpack_from("!HH", rdata, i)
        i += 4
        if i + length > n:
            raise WireError("EDNS option overruns the OPT record")
        out.append((code, rdata[i : i + length]))
        i += length
    return out


def find_options(data: bytes, start: int) -> tuple[bytes | None, bytes | None]:
    """(ECS option data, COOKIE option data), each or None, among the options
    from ``start`` to the end of ``data`` (an OPT's RDATA that ends the
    packet). WireError if the options overrun or one of the two is repeated."""
    ecs = cookie = None
    for code, value in parse_options(data[start:]):
        if code == ECS_CODE:
            if ecs is not None:
                raise WireError("two ECS options")
            ecs = value
        elif code == COOKIE_CODE:
            if cookie is not None:
                raise WireError("two COOKIE options")
            cookie = value
    return ecs, cookie


def parse_ecs(data: bytes) -> tuple[int, int, int, bytes]:
    """(IP version, SOURCE PREFIX-LENGTH, SCOPE PREFIX-LENGTH, ADDRESS) of an ECS option.

    Enforces RFC 7871 6: a known FAMILY, SOURCE within the family, exactly
    ceil(SOURCE/8) address bytes, and no address bits set beyond SOURCE.
    Violations are WireError (the responder answers FORMERR, RFC 7871 7.1.1).
    """
    if len(data) < 4:
        raise WireError("ECS option shorter than 4 bytes")
    family, source, scope = struct.unpack_from("!HBB", data)
    if family not in ECS_FAMILIES:
        raise WireError(f"ECS family {family} unknown")
    version, width = ECS_FAMILIES[family]
    if source > width or scope > width:
        raise WireError("ECS prefix longer than the address")
    address = data[4:]
    if len(address) != (source + 7) // 8:
        raise WireError("ECS address length does not match SOURCE PREFIX-LENGTH")
    if source % 8 and address and address[-1] & (0xFF >> (source % 8)):
        raise WireError("ECS address has bits set beyond SOURCE PREFIX-LENGTH")
    return version, source, scope, address


def ecs_address_int(version: int, address: bytes) -> int:
    """The ECS address padded with zeros to a full address, as an int."""
    width_bytes = 4 if version == 4 else 16
    return int.from_bytes(address + bytes(width_bytes - len(address)), "big")


def ecs_option(version: int, source: int, scope: int, address: bytes) -> bytes:
    """An ECS option for a response: the query's FAMILY/SOURCE/ADDRESS, our SCOPE."""
    family = 1 if version == 4 else 2
    body = struct.pack("!HBB", family, source, scope) + address
    return struct.pack("!HH", ECS_CODE, len(body)) + body


def opt_record(payload: int, do: bool, ext_rcode: int = 0, options: bytes = b"") -> bytes:
    """An OPT RR (RFC 6891 6.1.2): our UDP payload size, version 0, DO as asked."""
    return OPT_HEAD + struct.pack("!HBBHH", payload, ext_rcode, 0, 0x8000 if do else 0, len(options)) + options


def with_ecs(response: bytes, option: bytes) -> bytes:
    """Append an option to the OPT RR that ends ``response`` (RDLEN was 0)."""
    return response[:-2] + struct.pack("!H", len(option)) + option


def question_end(data: bytes, start: int = 12) -> int:
    """Offset just past the question name at ``start``, by walking labels.

    WireError for a compression pointer, a label running past the end, or a
    name longer than 255 bytes. Used by the responder's header-only answers.
    """
    i = start
    n = len(data)
    while True:
        if i >= n:
            raise WireError("question name runs past the end")
        length = data[i]
        if length == 0:
            end = i + 1
            if end - start > 255:
                raise WireError("name longer than 255 bytes")
            return end
        if length > 63:
            raise WireError("compressed or extended label in the question")
        i += length + 1


def header(ident: int, flags: int, qd: int = 0, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar)


def read_name(data: bytes, offset: int) -> tuple[bytes, int]:
    """(uncompressed wire name, offset after it in ``data``); follows pointers.

    Pointers must point backwards (no loops); labels > 63 and names > 255
    bytes are WireError (RFC 1035 4.1.4, 2.3.4).
    """
    out = bytearray()
    end = -1
    i = offset
    limit = offset
    n = len(data)
    while True:
        if i >= n:
            raise WireError("name runs past the end of the message")
        length = data[i]
        if length & 0xC0 == 0xC0:
            if i + 1 >= n:
                raise WireError("truncated compression pointer")
            target = ((length & 0x3F) << 8) | data[i + 1]
            if end < 0:
                end = i + 2
            if target >= limit:
                raise WireError("compression pointer does not point backwards")
            limit = target
            i = target
            continue
        if length & 0xC0:
            raise WireError("unknown label type")
        out.append(length)
        if length == 0:
            break
        if i + 1 + length > n:
            raise WireError("label runs past the end of the message")
        out += data[i + 1 : i + 1 + length]
        if len(out) > 255:
            raise WireError("name longer than 255 bytes")
        i += 1 + length
    return bytes(out), (end if end >= 0 else i + 1)


class RawQuery:
    """The parts of a query the responder needs, parsed by hand (no dnslib).

    ``opts`` holds every OPT RR found in the additional section as
    (owner, UDP payload, TTL field, RDATA) so the responder can apply RFC
    6891's rules (exactly one, root owner, version).
    """

    __slots__ = ("ident", "flags", "qdcount", "qname", "qtype", "qclass", "opts")

    def __init__(self, ident: int, flags: int, qdcount: int, qname: bytes, qtype: int, qclass: int,
                 opts: list[tuple[bytes, int, int, bytes]]):
        self.ident, self.flags, self.qdcount = ident, flags, qdcount
        self.qname, self.qtype, self.qclass, self.opts = qname, qtype, qclass, opts

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF


def parse_query(data: bytes) -> RawQuery:
    """Parse a whole query message; WireError if it is malformed.

    Needs a readable 12-byte header (the caller checks), walks every RR so
    trailing garbage or overruns are caught, and keeps only what answering
    needs. With QDCOUNT != 1 the name fields are empty.
    """
    ident, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data)
    i = 12
    qname, qtype, qclass = b"", 0, 0
    for q in range(qd):
        name, i = read_name(data, i)
        if i + 4 > len(data):
            raise WireError("question runs past the end of the message")
        t, c = struct.unpack_from("!HH", data, i)
        i += 4
        if q == 0:
            qname, qtype, qclass = name, t, c
    opts = []
    for section, count in enumerate((an, ns, ar)):
        for _ in range(count):
            owner, i = read_name(data, i)
            if i + 10 > len(data):
                raise WireError("resource record runs past the end of the message")
            rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", data, i)
            i += 10
            if i + rdlen > len(data):
                raise WireError("RDATA runs past the end of the message")
            if rtype == 41 and section == 2:
                opts.append((owner, rclass, ttl, data[i : i + rdlen]))
            i += rdlen
    if i != len(data):
        raise WireError("trailing bytes after the last record")
    return RawQuery(ident, flags, qd, qname, qtype, qclass, opts)


def full_rcode(message: bytes) -> int:
    """The 12-bit RCODE of a message we built: the header's 4 bits plus the
    upper 8 an OPT carries in its TTL field (RFC 6891 6.1.3), e.g. BADVERS = 16
    is header RCODE 0 with extended RCODE 1. For counting error responses."""
    rcode = message[3] & 0xF
    if message[10:12] == b"\x00\x00":
        return rcode  # no additional records, no OPT
    try:
        opts = parse_query(message).opts  # walks any message, not only queries
    except (WireError, struct.error):
        return rcode
    return rcode | ((opts[0][2] >> 24) << 4) if opts else rcode
