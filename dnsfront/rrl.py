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
quiet for up to ``window`` seconds (BIND's *window*). A limited response is
dropped, except every ``slip``-th one of a bucket, which is answered *truncated* (TC=1, the
question and nothing else, smaller than the query) so a real resolver caught
in a spoofed flood retries over TCP, which cannot be spoofed. ``slip`` 0
drops every limited response. When the query carried a DNS cookie, the slip
answer is BADCOOKIE with a fresh server cookie instead (RFC 7873 5.2.3: the
client retries with it and is then exempt).

Exempt: networks on the allow list, and queries that present a valid server
cookie (their source address is proven; checked only when the bucket is
empty, so the common case pays nothing). TCP is never rate-limited (the
engine calls this for UDP answers only).

Memory is bounded (``table_size`` buckets): a network's buckets live in one
of two generations; when the young one holds half the table, the old one is
forgotten and the young one becomes old. A network used in either
generation is kept (moved to the young one), so what is forgotten was idle for a whole generation, and a bucket
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
"""The network key of every allow-listed source: its buckets have no limit."""
_UNLIMITED = 1 << 62  # an int: inf x 0 seconds would be NaN
NETS_CACHE_MAX = 65536
"""Source addresses -> network's buckets cached before the cache starts over (a flood of random sources)."""

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
    """Buckets per (client network, kind of answer).

    ``check`` (see ``Check``) is called by the answer engine for every UDP
    response; ``tick(now)`` sets the time it uses (the server, once per batch
    of datagrams). A bucket is ``[second, used, rate, limited]``: responses
    counted in the current second plus the debt carried over, and how many
    were limited (for slip). ``cookie_valid(query, addr)`` and
    ``badcookie(response)`` come from ``dnsfront.cookies`` (None: cookies off).
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
        self._gens: list[dict[Any, dict]] = [{}, {}]
        """[young, old]: network -> its buckets (kind -> bucket), used lately / the generation before."""
        self._young_buckets = 0
        self._hosts: dict[str, dict] = {}
        """Source address -> its network's buckets (a cache, emptied when the generations turn)."""
        self._v4_shift = 32 - config.ipv4_prefix_length
        self._v6_shift = 128 - config.ipv6_prefix_length
        self._allow = [(n.version, int(n.network_address), int(n.hostmask)) for n in config.allow]
        self._cookie_valid = cookie_valid
        self._badcookie = badcookie
        self._clock = [0]
        self.check: Check = self._checker()

    def __len__(self) -> int:
        return sum(len(d) - 1 for g in self._gens for d in g.values())  # each dict also holds its network

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
        """``check`` as a closure: at ~100,000 answers/s every lookup saved is
        a measurable share of the limiter's cost. The common case (a source
        seen before, a bucket already used this second) is two dict lookups,
        a compare and an increment; the rest is in ``_buckets``/``_renew``."""
        hosts, limited, renew, clock, buckets = self._hosts, self._limited, self._renew, self._clock, self._buckets

        def check(query: bytes, response: bytes, addr: Any, kind: bytes | str | None) -> bytes | None:
            d = hosts.get(addr[0])
            if d is None:
                d = buckets(addr[0])
            if kind is None:
                # Responses we build carry the question uncompressed at 12 (when they have one).
                end = response.find(b"\x00", 12) + 5 if response[4:6] == b"\x00\x01" else 12
                kind = kind_of(response[12:end].lower(), response[3] & 0xF)
            b = d.get(kind)
            if b is None or b[0] != clock[0]:
                b = renew(d, kind, b)
            used = b[1] + 1
            b[1] = used
            if used <= b[2]:
                return response
            return limited(query, response, addr, b)

        return check

    def _buckets(self, host: str) -> dict:
        """The buckets of ``host``'s network (kind -> bucket, and None -> the
        network), found in either generation or made, and cached for ``host``."""
        try:
            net = self.network(host)
        except (OSError, ValueError):
            net = _ALLOWED  # not an address we can key (a test's fake peer): never limited
        young, old = self._gens
        d = young.get(net)
        if d is None:
            d = old.pop(net, None)
            if d is None:
                d = {None: net}
            young[net] = d
            self._young_buckets += len(d) - 1
        if len(self._hosts) >= NETS_CACHE_MAX:
            self._hosts.clear()
        self._hosts[host] = d
        return d

    def _renew(self, d: dict, kind: bytes | str, b: list | None) -> list:
        """``kind``'s bucket in ``d`` brought to the current second: made (full
        credit) if new, the last seconds' credit added, the debt capped at
        ``window`` seconds' worth. Turns the generations over when the young
        one is full: the old one is forgotten (its buckets idle a whole
        generation), the young one becomes old."""
        now = self._clock[0]
        if b is None:
            if self._young_buckets >= self._half:
                young, old = self._gens
                old.clear()
                old[d[None]] = d  # the new young generation starts with this network
                young.pop(d[None], None)
                self._gens[0], self._gens[1] = old, young
                self._hosts.clear()
                self._young_buckets = len(d) - 1
            rate = _UNLIMITED if d[None] is _ALLOWED else self._rates.get(kind, self._rate)  # type: ignore[arg-type]
            b = d[kind] = [now, 0, rate, 0]
            self._young_buckets += 1
        rate = b[2]
        used = min(b[1], self._window * rate) - (now - b[0]) * rate
        b[0] = now
        b[1] = 0 if used < 0 else used
        return b

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

