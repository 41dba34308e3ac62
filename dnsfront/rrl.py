"""Response rate limiting (RRL) for UDP answers. Pure: time is passed in.

An authoritative server answers whoever the source address says, so a
spoofed flood turns it into a reflector aimed at that address. RRL, as BIND,
NSD and Knot ship it, caps the responses per second that one *client
network* (the source's /24, IPv6 /56, configurable) gets for one *kind of
answer*:

* the same question (name + type, case folded): positive answers and NODATA;
* NXDOMAIN, all names together (a random-subdomain flood is one kind);
* errors (FORMERR, SERVFAIL, REFUSED, NOTIMP, BADVERS...), all together.

Each (network, kind) is a token bucket: credit flows in at the kind's rate
per second and is capped at one second's worth (the burst); every response
takes one token, limited ones too, down to ``-window x rate``: a network that
kept flooding stays limited until it has been quiet for up to ``window``
seconds (BIND's *window*). A limited response is dropped, except every
``slip``-th one of a bucket, which is answered *truncated* (TC=1, the
question and nothing else, smaller than the query) so a real resolver caught
in a spoofed flood retries over TCP, which cannot be spoofed. ``slip`` 0
drops every limited response. When the query carried a DNS cookie, the slip
answer is BADCOOKIE with a fresh server cookie instead (RFC 7873 5.2.3: the
client retries with it and is then exempt).

Exempt: networks on the allow list, and queries that present a valid server
cookie (their source address is proven; checked only when the bucket is
empty, so the common case pays nothing). TCP is never rate-limited (the
server never calls this for TCP).

Memory is bounded (``table_size`` buckets): buckets live in two generations;
when the young one is full, the old one is forgotten and the young one
becomes old. A bucket used in either generation is kept (moved to the young
one), so what is forgotten was idle for a whole generation, and a bucket
idle for ``window`` seconds holds full credit anyway: forgetting it changes
nothing. A flood from many networks at once can make the table turn over
faster than ``window``; the victim's bucket, being hot, stays.

Cost: one dict lookup for the network (cached per source address), one to
find the bucket, a few float operations: measured in docs/benchmarks.md.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from glb.config import RRLConfig

PASS, DROP, SLIP = 0, 1, 2

KIND_NXDOMAIN = "nxdomain"
KIND_ERROR = "error"

_ALLOWED = object()
"""Network cache value of an allow-listed source."""
NETS_CACHE_MAX = 65536
"""Source addresses -> network cached before the cache starts over (a spoofed flood of random sources)."""

TC_BIT = 0x02  # in the third header byte
COOKIE_OPTION = b"\x00\x0a\x00\x18"
"""Code 10, length 24: how the COOKIE option with a server cookie starts (we always put it last)."""


@dataclass(slots=True)
class RRLCounters:
    limited: int = 0
    """Responses over the limit (dropped or slipped)."""
    slipped: int = 0
    """Limited responses answered truncated (or BADCOOKIE) instead of dropped."""
    exempt_cookie: int = 0
    """Responses over the limit sent anyway: the query had a valid server cookie."""


class RateLimiter:
    """Token buckets keyed by (client network, kind of answer).

    ``check(query, response, addr, now)`` returns the bytes to send: the
    response, a slip answer, or None (drop). ``cookie_valid(query, addr, now)``
    and ``badcookie(query, response)`` come from ``dnsfront.cookies`` (None:
    cookies are off).
    """

    def __init__(self, config: RRLConfig, *,
                 cookie_valid: Callable[[bytes, Any, float], bool] | None = None,
                 badcookie: Callable[[bytes], bytes | None] | None = None):
        self.config = config
        self.counters = RRLCounters()
        self._rates = {KIND_NXDOMAIN: float(config.nxdomains_per_second),
                       KIND_ERROR: float(config.errors_per_second)}
        self._rate = float(config.responses_per_second)
        self._window = float(config.window)
        self._slip = config.slip
        self._half = max(1, config.table_size // 2)
        self._young: dict[tuple, list] = {}
        self._old: dict[tuple, list] = {}
        self._nets: dict[str, Any] = {}
        self._v4_shift = 32 - config.ipv4_prefix_length
        self._v6_shift = 128 - config.ipv6_prefix_length
        self._allow = [(n.version, int(n.network_address), int(n.hostmask)) for n in config.allow]
        self._cookie_valid = cookie_valid
        self._badcookie = badcookie

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def network(self, host: str) -> Any:
        """The bucket-key part for a source address (``_ALLOWED`` if allow-listed)."""
        if ":" in host:
            version, n, shift = 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, host.split("%")[0]), "big"), self._v6_shift
        else:
            version, n, shift = 4, int.from_bytes(socket.inet_aton(host), "big"), self._v4_shift
        for v, net, hostmask in self._allow:
            if v == version and n & ~hostmask == net:
                return _ALLOWED
        return (n >> shift) if version == 4 else -1 - (n >> shift)  # v6 keys negative: never equal a v4 one

    def check(self, query: bytes, response: bytes, addr: Any, now: float) -> bytes | None:
        """What to send for ``response`` (to ``query`` from ``addr``, over UDP)."""
        host = addr[0]
        net = self._nets.get(host)
        if net is None:
            try:
                net = self.network(host)
            except (OSError, ValueError):
                return response  # not an address we can key (a test's fake peer)
            if len(self._nets) >= NETS_CACHE_MAX:
                self._nets.clear()
            self._nets[host] = net
        if net is _ALLOWED:
            return response
        rcode = response[3] & 0xF
        if rcode == 0:
            # Responses we build always carry the question uncompressed at 12.
            key = (net, response[12 : response.find(b"\x00", 12) + 5].lower())
            rate = self._rate
        elif rcode == 3:
            key = (net, KIND_NXDOMAIN)
            rate = self._rates[KIND_NXDOMAIN]
        else:
            key = (net, KIND_ERROR)
            rate = self._rates[KIND_ERROR]
        b = self._young.get(key)
        if b is None:
            b = self._old.pop(key, None)
            if b is None:
                b = [rate, now, 0]
            if len(self._young) >= self._half:
                self._old = self._young
                self._young = {}
            self._young[key] = b
        credit = b[0] + (now - b[1]) * rate
        if credit > rate:
            credit = rate  # the burst: one second's worth
        credit -= 1.0
        b[1] = now
        if credit >= 0.0:
            b[0] = credit
            return response
        floor = -self._window * rate
        b[0] = credit if credit > floor else floor
        return self._limited(query, response, addr, now, b)

    def _limited(self, query: bytes, response: bytes, addr: Any, now: float, b: list) -> bytes | None:
        has_cookie = response[-28:-24] == COOKIE_OPTION
        if has_cookie and self._cookie_valid is not None and self._cookie_valid(query, addr, now):
            self.counters.exempt_cookie += 1
            return response
        self.counters.limited += 1
        if not self._slip:
            return None
        b[2] += 1
        if b[2] % self._slip:
            return None
        self.counters.slipped += 1
        if has_cookie and self._badcookie is not None:
            out = self._badcookie(response)
            if out is not None:
                return out
        return truncated(response)


def truncated(response: bytes) -> bytes:
    """``response`` cut down to its header (TC set, counts cleared) and question.

    No OPT: the slip answer must be smaller than any query that asked it.
    """
    if response[4:6] == b"\x00\x01":
        end = response.find(b"\x00", 12) + 5
        return response[:2] + bytes((response[2] | TC_BIT, response[3])) + b"\x00\x01" + bytes(6) + response[12:end]
    return response[:2] + bytes((response[2] | TC_BIT, response[3])) + bytes(8)

