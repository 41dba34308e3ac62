"""director/dataplane/_fastpath.c, the engine's established-flow loop in C, against the Python forwarder.

The C loop must decide exactly what Forwarder.fast() decides for DR and leave
everything else (TUN, NAT) untouched, so it is driven here with the same traffic, plan
changes and sweeps as the Python fast path (tests/director/dataplane/test_forwarder.py)
and compared action by action, counter by counter, table entry by entry.
"""

from __future__ import annotations

import ctypes
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from director.dataplane.conntable import NEXT_BYTES
from director.dataplane.forwarder import Forwarder
from tests.director.dataplane.test_forwarder import FAST_OPS, _fast_vs_forward, long_random_ops, python_fast
from tests.environment import needs

try:
    from director.dataplane import _fastpath
except ImportError:  # pragma: no cover - test_the_c_loop_is_built says so
    _fastpath = None

SLOT = 2048
MAC_OFF = 90
_HDR = struct.Struct("=IIIH")


def test_the_c_loop_is_built():
    """scripts/setup installs a compiler and Python's headers, so the extension must be there."""
    assert _fastpath is not None, "director.dataplane._fastpath did not build: the engine would run the Python loop"


def c_then_python(f: Forwarder, data: bytes, now: float):
    """The engine's order: the C loop on the frame's slot, then Python for what it leaves."""
    ring = bytearray(2 * SLOT)
    slot = 1  # not the first, so slot offsets are exercised
    off = slot * SLOT
    ring[off + MAC_OFF:off + MAC_OFF + len(data)] = data
    _HDR.pack_into(ring, off, 1, len(data), len(data), MAC_OFF)
    iov = bytearray(8 * 8)
    t = f.table
    n = _fastpath.run(ring, iov, 2, slot, 1, SLOT, now, t.confirmed_flows, NEXT_BYTES, t.timeouts)
    if n == 0:
        assert ring[off + MAC_OFF:off + MAC_OFF + len(data)] == data  # declined: the frame is untouched
        assert iov == bytearray(64)
        r, _ = python_fast(f, data, now)
        return r, False
    assert n == 1
    base = ctypes.addressof(ctypes.c_char.from_buffer(ring))
    assert struct.unpack_from("=QQ", iov, (2 + 2 * slot) * 8) == (base + off + MAC_OFF - 10, len(data) + 10)
    assert ring[off + MAC_OFF + 12:off + MAC_OFF + len(data)] == data[12:]  # only the MACs change
    return bytes(ring[off + MAC_OFF:off + MAC_OFF + 12]), True


needs_c = needs(None if _fastpath is not None else "the C loop is not built (bash scripts/setup builds it; needs gcc)")


@needs_c
@settings(max_examples=300, deadline=None)
@given(FAST_OPS, st.sampled_from(["dr", "tun", "nat"]), st.sampled_from(["keep", "reschedule"]))
def test_the_c_loop_acts_exactly_as_forward(ops, forwarding, on_down):
    _fast_vs_forward(ops, forwarding, on_down, driver=c_then_python)


@needs_c
@pytest.mark.parametrize("seed", range(4))  # DR, DR, TUN, TUN
def test_the_c_loop_on_long_random_traffic(seed):
    taken = _fast_vs_forward(long_random_ops(seed), "dr" if seed < 2 else "tun", "keep" if seed % 2 else "reschedule",
                             driver=c_then_python)
    if seed < 2:
        assert taken > 30  # the comparison covered the C loop, not only its refusals
    else:
        assert taken == 0  # TUN is Python's


@needs_c
def test_the_c_loop_stops_at_the_first_slot_it_leaves_and_checks_its_bounds():
    f = Forwarder()
    ring, iov = bytearray(4 * SLOT), bytearray(16 * 8)
    t = f.table
    args = (t.confirmed_flows, NEXT_BYTES, t.timeouts)
    assert _fastpath.run(ring, iov, 0, 0, 4, SLOT, 0.0, *args) == 0  # nothing ready
    _HDR.pack_into(ring, 0, 1, 60, 60, MAC_OFF)
    assert _fastpath.run(ring, iov, 0, 0, 4, SLOT, 0.0, *args) == 0  # ready, not a known flow: Python's
    with pytest.raises(ValueError):
        _fastpath.run(ring, iov, 0, 3, 2, SLOT, 0.0, *args)  # past the ring's end
    with pytest.raises(ValueError):
        _fastpath.run(ring, bytearray(8), 0, 0, 4, SLOT, 0.0, *args)  # past the iovecs
    with pytest.raises(TypeError):
        _fastpath.run(ring, iov, 0, 0, 4, SLOT, 0.0, {}, b"", t.timeouts)
    with pytest.raises(BufferError):
        _fastpath.run(bytes(4 * SLOT), iov, 0, 0, 4, SLOT, 0.0, *args)  # the ring must be writable


@given(st.binary(min_size=4, max_size=4) | st.binary(min_size=16, max_size=16),
       st.none() | st.integers(0, 65535), st.integers(0, 2**32 - 1))
@settings(max_examples=500, deadline=None)
def test_the_c_client_hash_is_glb_hashing_s(addr, port, seed):
    """mh's per-flow hash in C (what scheduler.py uses) is the pure-Python reference, bit for bit."""
    from glb.hashing import client_hash

    if _fastpath is None:
        pytest.skip("the C extension is not built")
    assert _fastpath.client_hash(addr, port, seed) == client_hash(addr, port, seed)
