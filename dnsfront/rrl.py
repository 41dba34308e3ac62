"""Response rate limiting (RRL) for UDP answers. Pure: time is passed in.

An authoritative server answers whoever the source address says, so a
spoofed flood turns it into a reflector aimed at that address. RRL, as BIND,
NSD and Knot ship it, caps the responses per second that one *client
network* (the source's /24, IPv6 /56, configurable) gets for one *kind of
answer*:

* the same question (name + type, case folded): positive answers and NODATA;
* NXDOMAIN, all names together (a random-subdomain flood is one kind);
* errors (FORMERR, SERVFAIL, REFUSED, NOTIMP, BADVERS...), all together.

Each (network, kind) has a bucket that counts responses per second of the
clock, as NSD does: up to the kind's rate pass in each second; every
response counts, limited ones too, and what is over the rate is carried into
the next seconds as debt (paid at the rate per second), capped at ``window``
seconds' worth: a network that kept flooding stays limited until it has been
quiet for up to ``window`` seconds (BIND's *window*). A
limited response is dropped, except every
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

Cost: one dict lookup for the network (cached per source address), one for
the bucket, a compare and an increment; the engine hands over the kind of
answer its precomputed entry already knows (``Entry.rrl``), so the fast path
parses nothing more: measured in docs/benchmarks.md.
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

Check = Callable[[bytes, bytes, Any, "bytes | str | None"], "bytes | None"]
"""``check(query, response, addr, kind)``: the bytes to send (the response,
a slip answer) or None (drop). ``kind`` is ``kind_of``'s result when the
caller knows it (the fast path's entries carry it), else None: found from
the response."""


def kind_of(question: bytes, rcode: int) -> bytes | str:
    """What a response counts as: its question (lower-cased name + type +
    class) for answers and NODATA, else NXDOMAIN or error, all names together."""
    if rcode == 0:
        return question
    return KIND_NXDOMAIN if rcode == 3 else KIND_ERROR

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

    ``check`` (see ``Check``) is called by the answer engine for every UDP
    response; ``tick(now)`` sets the time it uses (the server, once per batch
    of datagrams). A bucket is ``[second, used, rate, limited]``: responses
    counted in the current second plus the debt carried over.
    ``cookie_valid(query, addr)``
    and ``badcookie(query, response)`` come from ``dnsfront.cookies`` (None:
    cookies are off).
    """

    def __init__(self, config: RRLConfig, *,
                 cookie_valid: Callable[[bytes, Any], bool] | None = None,
                 badcookie: Callable[[bytes], bytes | None] | None = None):
        self.config = config
        self.counters = RRLCounters()
        self._rates = {KIND_NXDOMAIN: config.nxdomains_per_second, KIND_ERROR: config.errors_per_second}
        self._rate = config.responses_per_second
        self._window = config.window
        self._slip = config.slip
        self._half = max(1, config.table_size // 2)
        self._gens: list[dict[tuple, list]] = [{}, {}]
        """[young, old]: buckets used lately, and those of the generation before."""
        self._nets: dict[str, Any] = {}
        self._v4_shift = 32 - config.ipv4_prefix_length
        self._v6_shift = 128 - config.ipv6_prefix_length
        self._allow = [(n.version, int(n.network_address), int(n.hostmask)) for n in config.allow]
        self._cookie_valid = cookie_valid
        self._badcookie = badcookie
        self._clock = [0]
        self.check: Check = self._checker()

    def __len__(self) -> int:
        return len(self._gens[0]) + len(self._gens[1])

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

    def tick(self, now: float) -> None:
        """The (monotonic) time ``check`` uses until the next tick; buckets count whole seconds."""
        self._clock[0] = int(now)

    def _checker(self) -> Check:
        """``check`` as a closure: at ~100,000 answers/s every attribute lookup
        saved is a measurable share of the limiter's cost. The common case (a
        bucket already used this second) is one dict lookup, a compare and an
        increment; the rest is in ``_renew``."""
        nets, gens, limited, renew, clock = self._nets, self._gens, self._limited, self._renew, self._clock

        def check(query: bytes, response: bytes, addr: Any, kind: bytes | str | None) -> bytes | None:
            net = nets.get(addr[0])
            if net is None:
                net = self._cache_network(addr[0])
            if net is _ALLOWED:
                return response
            if kind is None:
                # Responses we build carry the question uncompressed at 12 (when they have one).
                end = response.find(b"\x00", 12) + 5 if response[4:6] == b"\x00\x01" else 12
                kind = kind_of(response[12:end].lower(), response[3] & 0xF)
            key = (net, kind)
            b = gens[0].get(key)
            if b is None or b[0] != clock[0]:
                b = renew(key, kind, b)
            used = b[1] + 1
            b[1] = used
            if used <= b[2]:
                return response
            return limited(query, response, addr, b)

        return check

    def _renew(self, key: tuple, kind: bytes | str, b: list | None) -> list:
        """``key``'s bucket brought to the current second: found in the old
        generation or made (full credit), the last seconds' credit added, the
        debt capped at ``window`` seconds' worth. Turns generations over."""
        now = self._clock[0]
        if b is None:
            young, old = self._gens
            b = old.pop(key, None)
            if b is None:
                rate = self._rates.get(kind, self._rate)  # type: ignore[arg-type]
                b = [now, 0.0, rate, 0]
            if len(young) >= self._half:
                old.clear()
                self._gens[0], self._gens[1] = old, young
                young = old
            young[key] = b
        rate = b[2]
        used = min(b[1], self._window * rate) - (now - b[0]) * rate
        b[0] = now
        b[1] = 0.0 if used < 0.0 else used
        return b

    def _cache_network(self, host: str) -> Any:
        try:
            net = self.network(host)
        except (OSError, ValueError):
            return _ALLOWED  # not an address we can key (a test's fake peer): not limited
        if len(self._nets) >= NETS_CACHE_MAX:
            self._nets.clear()
        self._nets[host] = net
        return net

    def _limited(self, query: bytes, response: bytes, addr: Any, b: list) -> bytes | None:
        has_cookie = response[-28:-24] == COOKIE_OPTION
        if has_cookie and self._cookie_valid is not None and self._cookie_valid(query, addr):
            self.counters.exempt_cookie += 1
            return response
        self.counters.limited += 1
        if not self._slip:
            return None
        b[3] += 1
        if b[3] % self._slip:
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

