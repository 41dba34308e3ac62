"""The thin adapter over libbpf's ring buffer API: the tc program's ``flow_events`` records, as bytes.

The tc program submits one record per flow it makes and per TCP state change
it applies (glb_tc.bpf.c ``tell()``); the packet worker polls
:meth:`FlowEvents.fileno` with its other descriptors and calls
:meth:`FlowEvents.drain`, which takes every record the ring holds at once
(libbpf's ``ring_buffer__consume``: no syscall, the ring is mmap'd).
What a record means, and what Python does with it, is
:meth:`director.dataplane.kernel.KernelSync.events`' (the sweep's path).

Why libbpf's consumer rather than reading the mmap here: it already has the
memory ordering (acquire/release on the positions), the busy and discard
bits and the wrap-around right on every architecture; the cost is one ctypes
callback per record, small next to what a record then costs in Python.
"""

from __future__ import annotations

import ctypes

from glb.errors import KernelDataplaneError

_c_p = ctypes.c_void_p
_SAMPLE = ctypes.CFUNCTYPE(ctypes.c_int, _c_p, _c_p, ctypes.c_size_t)
"""ring_buffer_sample_fn: (ctx, data, size) -> 0 to go on."""

_bound = False


def _ring_api() -> ctypes.CDLL:
    from director.dataplane.libbpf import _libbpf

    global _bound
    lib = _libbpf()
    if not _bound:
        for fn, res, args in (
            ("ring_buffer__new", _c_p, [ctypes.c_int, _SAMPLE, _c_p, _c_p]),
            ("ring_buffer__consume", ctypes.c_int, [_c_p]),
            ("ring_buffer__epoll_fd", ctypes.c_int, [_c_p]),
            ("ring_buffer__free", None, [_c_p]),
        ):
            f = getattr(lib, fn)
            f.restype, f.argtypes = res, args
        _bound = True
    return lib


class FlowEvents:
    """One consumer of a BPF ring buffer map (by its fd); records come back as bytes."""

    def __init__(self, map_fd: int) -> None:
        self._lib = _ring_api()
        self._got: list[bytes] = []
        got, string_at = self._got, ctypes.string_at

        def sample(_ctx, data, size) -> int:
            got.append(string_at(data, size))
            return 0

        self._sample = _SAMPLE(sample)  # held: libbpf calls it for as long as the ring lives
        self._rb = self._lib.ring_buffer__new(map_fd, self._sample, None, None)
        if not self._rb:
            raise KernelDataplaneError("cannot read the tc program's flow events (ring_buffer__new failed)")
        self.received = 0
        """Records taken off the ring since it was opened."""

    def fileno(self) -> int:
        """An epoll descriptor that polls readable while the ring holds records."""
        return self._lib.ring_buffer__epoll_fd(self._rb)

    def drain(self) -> list[bytes]:
        """Every record the ring holds now, oldest first (empty when none)."""
        rc = self._lib.ring_buffer__consume(self._rb)
        if rc < 0:
            raise KernelDataplaneError(f"reading the tc program's flow events failed (error {-rc})")
        if not self._got:
            return []
        out = self._got[:]
        self._got.clear()
        self.received += len(out)
        return out

    def close(self) -> None:
        rb, self._rb = self._rb, None
        if rb:
            self._lib.ring_buffer__free(rb)
