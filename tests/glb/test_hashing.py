"""glb.hashing: Maglev tables with IPVS semantics and rendezvous hashing."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from glb.hashing import (
    DEFAULT_TABLE_SIZE,
    hash64,
    is_prime,
    maglev_lookup,
    maglev_permutation,
    maglev_table,
    maglev_turns,
    rendezvous_order,
    rendezvous_pick,
    rendezvous_table,
)

M = DEFAULT_TABLE_SIZE


def backends(n: int) -> list[bytes]:
    return [bytes([10, 1, i >> 8, i & 255]) + b"\x00\x50" for i in range(n)]


# ---- the hash ---------------------------------------------------------------


def test_hash64_is_pinned_and_seeded():
    # Pinned values: a change here would move every flow of every director.
    assert hash64(b"") == 0xB4B2797457A0A6E4
    assert hash64(b"glb") == 0x48E7A7531781FE18
    assert hash64(b"glb") == hash64(b"glb", 0)
    assert hash64(b"glb", 1) != hash64(b"glb", 2)
    assert 0 <= hash64(b"glb") < 2**64


def test_hash64_is_the_same_in_another_process():
    code = "from glb.hashing import hash64; print(hash64(b'10.1.0.1', 1), hash64(b'x' * 100, 7))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == [str(hash64(b"10.1.0.1", 1)), str(hash64(b"x" * 100, 7))]


def test_is_prime():
    assert [n for n in range(30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    assert is_prime(65537) and is_prime(251) and not is_prime(65536) and not is_prime(65535)


# ---- Maglev -------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 10, 50, 300])
def test_maglev_balances_within_one_percent(n):
    table = maglev_table(backends(n), [1] * n)
    share = Counter(table)
    assert set(share) == set(range(n))
    ideal = M / n
    assert max(abs(c - ideal) / ideal for c in share.values()) < 0.01


def test_maglev_weights_are_honoured():
    weights = [1, 2, 3, 4]
    share = Counter(maglev_table(backends(4), weights))
    for i, w in enumerate(weights):
        assert abs(share[i] / M - w / 10) < 0.002


@pytest.mark.parametrize("n", [5, 10, 40])
def test_maglev_removing_one_backend_moves_few_other_slots(n):
    names = backends(n)
    before = maglev_table(names, [1] * n)
    gone = n // 2
    rest = names[:gone] + names[gone + 1:]
    after = [names.index(rest[i]) for i in maglev_table(rest, [1] * (n - 1))]
    others = [i for i, b in enumerate(before) if b != gone]
    moved = sum(before[i] != after[i] for i in others) / len(others)
    assert moved < 0.02  # IPVS docs: ~0.6 % at M = 65537
    assert all(after[i] != gone for i in range(M))


def test_maglev_zero_weight_backend_owns_no_slot_and_only_its_slots_move():
    # What draining by last weight relies on (the scheduler's side is
    # tests/director/test_scheduler.py::test_mh_drained_server_keeps_its_slots_via_last_weight):
    # built with weight 0 a backend owns nothing, so keeping its last weight is what keeps its slots.
    names = backends(4)
    live = maglev_table(names, [5, 5, 5, 5])
    without = maglev_table(names, [5, 5, 0, 5])
    assert 2 not in without
    owned = [i for i in range(M) if live[i] == 2]
    assert abs(len(owned) / M - 0.25) < 0.01
    others_moved = sum(live[i] != without[i] for i in range(M) if live[i] != 2)
    assert others_moved / (M - len(owned)) < 0.02


def _by_name(names: list[bytes], table: list[int]) -> list[bytes | None]:
    return [names[i] if i >= 0 else None for i in table]


@pytest.mark.parametrize("n", [2, 6, 40])
def test_maglev_is_deterministic_and_order_independent_per_backend_name(n):
    names = backends(n)
    weights = [1 + i % 3 for i in range(n)]
    if n > 2:
        weights[n // 2] = 0  # a member without a turn does not shift the others either
    table = maglev_table(names, weights)
    want = _by_name(names, table)
    key = b"\xc6\x33\x64\x07"
    orders = [list(reversed(range(n)))] + [random.Random(seed).sample(range(n), n) for seed in range(3)]
    for order in orders:
        shuffled = [names[i] for i in order]
        other = maglev_table(shuffled, [weights[i] for i in order])
        assert _by_name(shuffled, other) == want, order
        assert shuffled[maglev_lookup(other, key)] == names[maglev_lookup(table, key)]
    # The same table in another process (no per-process hash salt anywhere).
    code = (f"import json; from glb.hashing import maglev_table; "
            f"print(json.dumps(maglev_table({list(reversed(names))!r}, {list(reversed(weights))!r}, 251)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONHASHSEED="4242")).stdout
    assert _by_name(list(reversed(names)), json.loads(out)) == _by_name(names, maglev_table(names, weights, 251))
    off, skip = maglev_permutation(names[0], M)
    assert 0 <= off < M and 1 <= skip < M


def test_maglev_turns_follow_ipvs_gcd_and_shift():
    assert maglev_turns([100, 200, 300]) == [1, 2, 3]
    assert maglev_turns([0, 4, 6]) == [0, 2, 3]
    assert maglev_turns([1000, 1]) == [62, 1]  # 1000 >> 4: at most 6 significant bits
    assert maglev_turns([0, 0]) == [0, 0]


def test_maglev_edge_cases():
    assert maglev_table(backends(2), [0, 0], 251) == [-1] * 251
    assert maglev_table([], [], 251) == [-1] * 251
    assert set(maglev_table(backends(1), [7], 251)) == {0}
    with pytest.raises(ValueError):
        maglev_table(backends(2), [1, 1], 65536)
    with pytest.raises(ValueError):
        maglev_table(backends(2), [1], 251)
    with pytest.raises(ValueError):
        maglev_table([b"a", b"a"], [1, 1], 251)
    with pytest.raises(ValueError):
        maglev_table(backends(12), [1] * 12, 11)


# ---- rendezvous -----------------------------------------------------------------


def test_rendezvous_pick_is_stable_and_minimal_on_removal():
    names = backends(5)
    keys = [i.to_bytes(4, "big") for i in range(3000)]
    before = [rendezvous_pick(k, names) for k in keys]
    assert Counter(before).keys() == set(range(5))
    survivors = names[:2] + names[3:]
    for k, b in zip(keys, before):
        after = survivors[rendezvous_pick(k, survivors)]
        if b != 2:
            assert after == names[b]  # only the removed backend's keys move


def test_rendezvous_weights():
    names = backends(3)
    keys = [i.to_bytes(4, "big") for i in range(30000)]
    share = Counter(rendezvous_pick(k, names, [1, 2, 0]) for k in keys)
    assert 2 not in share
    assert abs(share[1] / 30000 - 2 / 3) < 0.02


def test_rendezvous_order_and_table():
    names = backends(4)
    order = rendezvous_order(b"flow", names)
    assert sorted(order) == [0, 1, 2, 3] and order[0] == rendezvous_pick(b"flow", names)
    assert rendezvous_pick(b"flow", names, [0, 0, 0, 0]) == -1
    rows = rendezvous_table(names, size=256)
    assert len(rows) == 256 and all(p != s and p >= 0 and s >= 0 for p, s in rows)
    assert rendezvous_table(names[:1], size=4) == [(0, -1)] * 4
