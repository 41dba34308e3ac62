"""DNS cookies (RFC 7873) with interoperable server cookies (RFC 9018). Pure.

A client cookie (8 bytes) comes in a COOKIE EDNS option (code 10), alone or
followed by the server cookie we gave that client earlier. We answer with
the client cookie and a server cookie for this client:

    server cookie = Version (1) | Reserved (3 x 0) | Timestamp (32-bit Unix time)
                    | Hash = SipHash-2-4(secret, Client Cookie | Version | Reserved
                                                  | Timestamp | Client IP)

A server cookie presented back is *valid* when its hash matches with the
current or the previous secret and its timestamp is no more than an hour old
(nor more than 5 minutes in the future); a valid one younger than half an
hour is sent back as it is, an older one is replaced (RFC 9018 4.3). A
valid server cookie proves the client receives what is sent to its address,
so such queries are exempt from response rate limiting (``dnsfront.rrl``).

The secret: a 16-byte master (the config's ``secret_file``, which several
dnsfront instances behind one address should share, or random per start,
made by the supervisor and handed to every worker) from which one SipHash
key per ``rotate`` seconds is derived (BLAKE2b keyed with the master, of the
period's number). Every worker derives the same keys with no messages
between them, and keys change on their own; the previous period's key is
still accepted, so a cookie stays valid for at least ``rotate`` seconds.

A malformed COOKIE option (client cookie not 8 bytes, server cookie not 8
to 32 bytes) is FORMERR (RFC 7873 5.2.2); the responder does that.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from typing import Any

from siphashc import siphash

from dnsfront import wire

COOKIE_CODE = 10
CLIENT_LEN = 8
SERVER_MIN, SERVER_MAX = 8, 32
VERSION_RESERVED = b"\x01\x00\x00\x00"
MAX_AGE = 3600
"""A server cookie older than this is invalid (RFC 9018 4.3)."""
MAX_FUTURE = 300
REFRESH_AGE = 1800
"""A valid server cookie older than this is replaced by a new one."""
BADCOOKIE = 23
_OPTION_HEAD = struct.pack("!HH", COOKIE_CODE, CLIENT_LEN + 16)
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("!I")


def well_formed(value: bytes) -> bool:
    """Whether a COOKIE option's data has legal lengths (RFC 7873 4)."""
    n = len(value)
    return n == CLIENT_LEN or CLIENT_LEN + SERVER_MIN <= n <= CLIENT_LEN + SERVER_MAX


def client_ip(addr: Any) -> bytes:
    """The packed source address the hash covers."""
    host = addr[0]
    if ":" in host:
        return socket.inet_pton(socket.AF_INET6, host.split("%")[0])
    return socket.inet_aton(host)


class CookieJar:
    """Makes and checks server cookies with secrets derived from ``master``."""

    def __init__(self, master: bytes, rotate: float):
        if len(master) < 16:
            raise ValueError("the cookie master secret must be at least 16 bytes")
        self.master = master
        self.rotate = rotate
        self._keys: dict[int, bytes] = {}

    def key(self, period: int) -> bytes:
        k = self._keys.get(period)
        if k is None:
            if len(self._keys) > 4:
                self._keys.clear()
            k = self._keys[period] = hashlib.blake2b(period.to_bytes(8, "big", signed=True), key=self.master,
                                                     digest_size=16).digest()
        return k

    def make(self, client_cookie: bytes, ip: bytes, now: float) -> bytes:
        """A new 16-byte server cookie for this client at ``now``."""
        return server_cookie(self.key(int(now // self.rotate)), client_cookie, ip, int(now))

    def valid(self, value: bytes, ip: bytes, now: float) -> bool:
        """Whether the option's server cookie is one we made for this client, and fresh."""
        if len(value) != CLIENT_LEN + 16 or value[8:12] != VERSION_RESERVED:
            return False
        stamp = _U32.unpack_from(value, 12)[0]
        age = (int(now) - stamp) & 0xFFFFFFFF  # serial arithmetic (RFC 1982): wraps in 2106
        if age > MAX_AGE and (stamp - int(now)) & 0xFFFFFFFF > MAX_FUTURE:
            return False
        period = int(now // self.rotate)
        client = value[:8]
        for p in (period, period - 1):
            if server_cookie(self.key(p), client, ip, stamp) == value[8:]:
                return True
        return False

    def reply(self, value: bytes, addr: Any, now: float) -> bytes:
        """The whole COOKIE option to put in the response to a well-formed ``value``."""
        ip = client_ip(addr)
        if len(value) == CLIENT_LEN + 16 and self.valid(value, ip, now):
            stamp = _U32.unpack_from(value, 12)[0]
            if (int(now) - stamp) & 0xFFFFFFFF <= REFRESH_AGE:
                return _OPTION_HEAD + value
        return _OPTION_HEAD + value[:8] + self.make(value[:8], ip, now)


def presents_valid(jar: CookieJar, query: bytes, addr: Any, now: float) -> bool:
    """Whether ``query`` carries a server cookie ``jar`` made for ``addr`` (for the rate limiter)."""
    try:
        opts = wire.parse_query(query).opts
        if len(opts) != 1:
            return False
        value = next((v for code, v in wire.parse_options(opts[0][3]) if code == COOKIE_CODE), None)
        return value is not None and jar.valid(value, client_ip(addr), now)
    except (wire.WireError, struct.error, OSError, ValueError, TypeError, IndexError):
        return False


def server_cookie(key: bytes, client_cookie: bytes, ip: bytes, stamp: int) -> bytes:
    """RFC 9018 4.4: Version | Reserved | Timestamp | SipHash-2-4 of all of it with the client's parts."""
    head = VERSION_RESERVED + _U32.pack(stamp & 0xFFFFFFFF)
    return head + _U64.pack(siphash(key, client_cookie + head + ip))


def badcookie(response: bytes, payload: int) -> bytes:
    """A BADCOOKIE answer (RFC 7873 5.2.3) built from our ``response``, whose
    OPT ends with the COOKIE option carrying a new server cookie: header
    (rcode 23: 7 in the header, 1 in the OPT), the question, an OPT with that
    option only. Used as the rate limiter's slip answer to cookie clients."""
    flags = (response[2] & 0xF9) << 8 | (response[3] & 0xF0) | (BADCOOKIE & 0xF)  # AA, TC cleared
    qd = response[4:6] == b"\x00\x01"
    question = response[12 : response.find(b"\x00", 12) + 5] if qd else b""
    option = response[-28:]
    opt = b"\x00\x00\x29" + struct.pack("!HBBHH", payload, BADCOOKIE >> 4, 0, 0, len(option)) + option
    return response[:2] + struct.pack("!HHHHH", flags, 1 if qd else 0, 0, 0, 1) + question + opt
