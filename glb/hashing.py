"""Consistent hashing: Maglev lookup tables and rendezvous (HRW) hashing.

Pure functions, no I/O. Everything here must give the same answer in every
process on every machine (two directors, a restarted director and the tests
must agree on which backend owns a flow), so the hashes are fixed:
BLAKE2b truncated to 64 bits (:func:`hash64`: fast in C, well mixed,
stable) for everything built in Python, and the kernel's jhash
(:func:`jhash_words`) for what the kernel data plane must compute per
packet too (the client's Maglev slot): BPF has no BLAKE2b. Python's
``hash()`` is salted per process and must never be used for this.

Maglev follows IPVS's ``mh`` scheduler (net/netfilter/ipvs/ip_vs_mh.c):

* each backend gets a permutation of the table positions from its name:
  ``offset = h1(name) mod M``, ``skip = h2(name) mod (M - 1) + 1``; M prime
  makes every permutation visit every slot;
* backends take turns claiming their next free preferred slot, each taking
  ``weight / gcd(weights)`` slots per turn (shifted right so the largest
  turn fits in 6 bits, as IPVS does, so a 1000:1 weight cannot make one
  backend fill the table before the others get a turn);
* the turns go in the order of the names, not of the list (IPVS goes in
  list order): the table depends on the set of (name, weight) pairs only;
* the weights given here are the *last non-zero* weights: a drained
  (weight 0) backend keeps its slots so draining does not reshuffle anyone
  else; the scheduler skips it at lookup time and falls back.
"""

from __future__ import annotations

import math
import struct
from hashlib import blake2b
from typing import Sequence

DEFAULT_TABLE_SIZE = 65537
"""Default Maglev table size: prime, > 100 x the backends of any sane service."""

TURN_BITS = 6
"""Significant bits kept of ``weight / gcd`` (IPVS's IP_VS_MH_TAB_BITS)."""

_U64 = float(1 << 64)


def hash64(data: bytes, seed: int = 0) -> int:
    """A stable 64-bit hash of ``data``; different seeds give independent hashes.

    The seed goes into BLAKE2b's salt, so h(data, 1) and h(data, 2) are
    unrelated functions (Maglev needs two: offset and skip).
    """
    return int.from_bytes(
        blake2b(data, digest_size=8, salt=seed.to_bytes(16, "little")).digest(), "little"
    )


_M32 = 0xFFFFFFFF
JHASH_INITVAL = 0xDEADBEEF


def _final(a: int, b: int, c: int) -> int:
    """lookup3's final mix (``__jhash_final``); rotations written out: this runs per new mh flow."""
    M = _M32
    c ^= b; c = (c - (((b << 14) | (b >> 18)) & M)) & M  # noqa: E702
    a ^= c; a = (a - (((c << 11) | (c >> 21)) & M)) & M  # noqa: E702
    b ^= a; b = (b - (((a << 25) | (a >> 7)) & M)) & M  # noqa: E702
    c ^= b; c = (c - (((b << 16) | (b >> 16)) & M)) & M  # noqa: E702
    a ^= c; a = (a - (((c << 4) | (c >> 28)) & M)) & M  # noqa: E702
    b ^= a; b = (b - (((a << 14) | (a >> 18)) & M)) & M  # noqa: E702
    c ^= b; c = (c - (((b << 24) | (b >> 8)) & M)) & M  # noqa: E702
    return c


def jhash_words(words: Sequence[int], initval: int = 0) -> int:
    """Linux's ``jhash2`` (include/linux/jhash.h, Bob Jenkins' lookup3) of 32-bit words: 32 bits.

    The hash the kernel data plane computes too (director/dataplane/tc/glb_tc.bpf.c
    ``jhash_addr``): the two must stay bit-identical, which
    tests/director/dataplane/test_kernel_newflows.py checks through the program.
    """
    M = _M32
    n = len(words)
    a = b = c = (JHASH_INITVAL + (n << 2) + initval) & M
    i = 0
    while n > 3:
        a = (a + words[i]) & M
        b = (b + words[i + 1]) & M
        c = (c + words[i + 2]) & M
        a = (a - c) & M; a ^= ((c << 4) | (c >> 28)) & M; c = (c + b) & M  # noqa: E702
        b = (b - a) & M; b ^= ((a << 6) | (a >> 26)) & M; a = (a + c) & M  # noqa: E702
        c = (c - b) & M; c ^= ((b << 8) | (b >> 24)) & M; b = (b + a) & M  # noqa: E702
        a = (a - c) & M; a ^= ((c << 16) | (c >> 16)) & M; c = (c + b) & M  # noqa: E702
        b = (b - a) & M; b ^= ((a << 19) | (a >> 13)) & M; a = (a + c) & M  # noqa: E702
        c = (c - b) & M; c ^= ((b << 4) | (b >> 28)) & M; b = (b + a) & M  # noqa: E702
        n -= 3
        i += 3
    if n == 0:
        return c
    if n == 3:
        c = (c + words[i + 2]) & M
    if n >= 2:
        b = (b + words[i + 1]) & M
    return _final((a + words[i]) & M, b, c)


def client_hash(addr: bytes, port: int | None, seed: int) -> int:
    """jhash of a packed address's big-endian 32-bit words (and the port as one more word): 32 bits.

    Maglev's per-flow hash (the table itself is built with :func:`hash64`):
    words, not bytes, so the kernel hashes the address it loaded as it is.
    """
    if port is None and len(addr) == 4:  # the common case: one word, no list
        v = (JHASH_INITVAL + 4 + seed) & _M32
        return _final((v + int.from_bytes(addr, "big")) & _M32, v, v)
    words = list(struct.unpack(f"!{len(addr) // 4}I", addr))
    if port is not None:
        words.append(port)
    return jhash_words(words, seed)


def is_prime(n: int) -> bool:
    """Deterministic primality for table sizes (trial division; n is small)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


# --------------------------------------------------------------------------
# Maglev
# --------------------------------------------------------------------------


def maglev_permutation(name: bytes, size: int) -> tuple[int, int]:
    """The (offset, skip) pair that defines ``name``'s preference list."""
    return hash64(name, 1) % size, hash64(name, 2) % (size - 1) + 1


def maglev_turns(weights: Sequence[int]) -> list[int]:
    """Slots each backend claims per round: weight / gcd, shifted like IPVS.

    A backend with weight 0 gets no turn (it owns no slot); any non-zero
    weight gets at least one turn even after the shift.
    """
    positive = [w for w in weights if w > 0]
    if not positive:
        return [0] * len(weights)
    g = math.gcd(*positive)
    shift = max(0, (max(positive) // g).bit_length() - TURN_BITS)
    return [((w // g) >> shift) or 1 if w > 0 else 0 for w in weights]


def maglev_table(names: Sequence[bytes], weights: Sequence[int], size: int = DEFAULT_TABLE_SIZE) -> list[int]:
    """Build a Maglev lookup table: slot -> index into ``names`` (-1 = no backend).

    ``weights`` are the weights the table is built from; pass a drained
    backend's last non-zero weight so its slots stay put. Listing the same
    (name, weight) pairs in another order gives the same table, its indices
    following the new order. Raises ValueError
    for a non-prime size, duplicate names or a length mismatch.
    """
    if not is_prime(size):
        raise ValueError(f"Maglev table size {size} is not prime")
    if len(names) != len(weights):
        raise ValueError("names and weights differ in length")
    if len(set(names)) != len(names):
        raise ValueError("duplicate backend names")
    if len(names) > size:
        raise ValueError(f"{len(names)} backends do not fit a table of {size}")
    table = [-1] * size
    turns = maglev_turns(weights)
    # Turns in name order, not list order: two directors listing the same
    # servers differently, or a reload that only reorders them, must build the
    # same table, or the same client lands on different servers.
    members = sorted((i for i, t in enumerate(turns) if t > 0), key=names.__getitem__)
    if not members:
        return table
    perms = [maglev_permutation(names[i], size) for i in members]
    nexts = [off for off, _ in perms]
    skips = [skip for _, skip in perms]
    taken = bytearray(size)
    filled = 0
    # Round-robin over backends, each claiming `turns` slots per round: the
    # next free slot along its own permutation (IPVS ip_vs_mh_populate).
    while True:
        for k, i in enumerate(members):
            c, skip = nexts[k], skips[k]
            for _ in range(turns[i]):
                while taken[c]:
                    c += skip
                    if c >= size:
                        c -= size
                taken[c] = 1
                table[c] = i
                filled += 1
                if filled == size:
                    return table
            nexts[k] = c


def maglev_lookup(table: Sequence[int], key: bytes) -> int:
    """The backend index owning ``key`` (-1 if the table is empty)."""
    return table[hash64(key, 1) % len(table)]


# --------------------------------------------------------------------------
# Rendezvous (highest random weight) hashing
# --------------------------------------------------------------------------


def rendezvous_score(key: bytes, name: bytes, weight: float = 1.0) -> float:
    """HRW score of ``name`` for ``key``; the highest score wins.

    Weighted with the logarithmic method (Schindelhauer & Schomaker): a
    backend of weight w wins a share w / sum(w) of keys, and changing one
    weight only moves keys to or from that backend. Weight <= 0 never wins.
    """
    if weight <= 0:
        return -math.inf
    h = hash64(struct.pack("!H", len(key)) + key + name, 3)
    u = (h + 0.5) / _U64  # in (0, 1), never 0 or 1
    return -weight / math.log(u)


def rendezvous_order(key: bytes, names: Sequence[bytes], weights: Sequence[float] | None = None) -> list[int]:
    """Indices of ``names`` ordered best first for ``key`` (ties: lower index)."""
    ws = weights if weights is not None else [1.0] * len(names)
    scores = [rendezvous_score(key, n, w) for n, w in zip(names, ws)]
    return sorted(range(len(names)), key=lambda i: (-scores[i], i))


def rendezvous_pick(key: bytes, names: Sequence[bytes], weights: Sequence[float] | None = None) -> int:
    """The winning index for ``key``, or -1 if nothing has a positive weight."""
    ws = weights if weights is not None else [1.0] * len(names)
    best, best_score = -1, -math.inf
    for i, (n, w) in enumerate(zip(names, ws)):
        s = rendezvous_score(key, n, w)
        if s > best_score:
            best, best_score = i, s
    return best


def rendezvous_table(names: Sequence[bytes], size: int = 65536, weights: Sequence[float] | None = None) -> list[tuple[int, int]]:
    """GitHub-GLB style table: each row holds (primary, secondary) for that row.

    A flow hashes to a row; a proxy that does not know a flow passes it to
    the secondary ("second chance"), so a change of primary breaks nothing.
    The secondary is -1 with fewer than two eligible backends.
    """
    rows = []
    for r in range(size):
        order = rendezvous_order(r.to_bytes(4, "big"), names, weights)
        ws = weights if weights is not None else [1.0] * len(names)
        eligible = [i for i in order if ws[i] > 0]
        primary = eligible[0] if eligible else -1
        secondary = eligible[1] if len(eligible) > 1 else -1
        rows.append((primary, secondary))
    return rows
