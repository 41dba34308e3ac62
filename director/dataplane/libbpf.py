"""The thin adapter over libbpf.so.1 (ctypes): load the tc program, move map bytes, run it on a packet.

Only bytes cross this module: what the bytes mean is director/dataplane/kernelmaps.py's.
Maps are written and read in batches where the kernel has the batch commands
(5.6+ for hashes, 5.7+ for arrays), else entry by entry.
Why ctypes over Debian's libbpf rather than a PyPI binding: libbpf is what
compiles against the kernel's BTF and is packaged with the distribution
(scripts/setup installs libbpf-dev, whose libbpf.so.1 is this), the calls
needed are few (load, maps, test runs, tcx attach), and no binding on PyPI
is both maintained and free of a compiler step (bcc needs kernel headers
this machine does not have).
Every failure becomes one :class:`~glb.errors.KernelDataplaneError` line.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

from glb.errors import KernelDataplaneError

OBJECT = Path(__file__).with_name("tc") / "glb_tc.bpf.o"
PROGRAM = "glb_ingress"

_c_p = ctypes.c_void_p
_PERCPU = {5, 6, 10}
"""BPF_MAP_TYPE_PERCPU_HASH, _PERCPU_ARRAY, _LRU_PERCPU_HASH: a lookup returns one 8-byte-aligned slot per CPU."""


class _BatchOpts(ctypes.Structure):
    """struct bpf_map_batch_opts (libbpf 1.x bpf.h)."""

    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


_NO_BATCH = {errno.EINVAL, errno.EOPNOTSUPP, 524}
"""What a kernel or map type without the batch commands answers (524: the kernel's ENOTSUPP)."""
BATCH = 4096
"""Entries per batch syscall when reading."""


class _TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf 1.x bpf.h)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", _c_p), ("data_out", _c_p),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("ctx_in", _c_p), ("ctx_out", _c_p),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]


_lib: ctypes.CDLL | None = None


def _libbpf() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as e:
            raise KernelDataplaneError(f"cannot load libbpf ({name}): {e}; install libbpf1") from None
        for fn, res, args in (
            ("bpf_object__open_file", _c_p, [ctypes.c_char_p, _c_p]),
            ("bpf_object__load", ctypes.c_int, [_c_p]),
            ("bpf_object__close", None, [_c_p]),
            ("bpf_object__find_program_by_name", _c_p, [_c_p, ctypes.c_char_p]),
            ("bpf_object__find_map_by_name", _c_p, [_c_p, ctypes.c_char_p]),
            ("bpf_program__fd", ctypes.c_int, [_c_p]),
            ("bpf_map__fd", ctypes.c_int, [_c_p]),
            ("bpf_map__key_size", ctypes.c_uint32, [_c_p]),
            ("bpf_map__value_size", ctypes.c_uint32, [_c_p]),
            ("bpf_map__type", ctypes.c_int, [_c_p]),
            ("bpf_map__set_max_entries", ctypes.c_int, [_c_p, ctypes.c_uint32]),
            ("bpf_map_update_elem", ctypes.c_int, [ctypes.c_int, _c_p, _c_p, ctypes.c_uint64]),
            ("bpf_map_lookup_elem", ctypes.c_int, [ctypes.c_int, _c_p, _c_p]),
            ("bpf_map_delete_elem", ctypes.c_int, [ctypes.c_int, _c_p]),
            ("bpf_map_get_next_key", ctypes.c_int, [ctypes.c_int, _c_p, _c_p]),
            ("bpf_map_update_batch", ctypes.c_int, [ctypes.c_int, _c_p, _c_p, ctypes.POINTER(ctypes.c_uint32), _c_p]),
            ("bpf_map_delete_batch", ctypes.c_int, [ctypes.c_int, _c_p, ctypes.POINTER(ctypes.c_uint32), _c_p]),
            ("bpf_map_lookup_batch", ctypes.c_int,
             [ctypes.c_int, _c_p, _c_p, _c_p, _c_p, ctypes.POINTER(ctypes.c_uint32), _c_p]),
            ("bpf_obj_get", ctypes.c_int, [ctypes.c_char_p]),
            ("bpf_object__next_map", _c_p, [_c_p, _c_p]),
            ("bpf_map__name", ctypes.c_char_p, [_c_p]),
            ("bpf_map__set_pin_path", ctypes.c_int, [_c_p, ctypes.c_char_p]),
            ("bpf_prog_test_run_opts", ctypes.c_int, [ctypes.c_int, ctypes.POINTER(_TestRunOpts)]),
            ("libbpf_num_possible_cpus", ctypes.c_int, []),
            ("bpf_prog_attach_opts", ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int, _c_p]),
            ("bpf_prog_detach2", ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int]),
            ("bpf_prog_query", ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_uint32, _c_p, _c_p,
                                              ctypes.POINTER(ctypes.c_uint32)]),
            ("bpf_prog_get_fd_by_id", ctypes.c_int, [ctypes.c_uint32]),
            ("bpf_obj_get_info_by_fd", ctypes.c_int, [ctypes.c_int, _c_p, ctypes.POINTER(ctypes.c_uint32)]),
            ("libbpf_set_print", _c_p, [_c_p]),
        ):
            f = getattr(lib, fn)
            f.restype, f.argtypes = res, args
        lib.libbpf_set_print(None)  # its log is many lines; the caller gets one
        _lib = lib
    return _lib


def _errno(rc: int) -> int:
    """libbpf returns -errno (and sets errno); either way, a positive errno."""
    return -rc if rc < 0 else (ctypes.get_errno() or errno.EIO)


def read_pinned(path: Path, key: bytes, size: int) -> bytes | None:
    """One value of a map pinned at ``path`` (None: no such pin, or no such entry), without loading anything."""
    lib = _libbpf()
    fd = lib.bpf_obj_get(str(path).encode())
    if fd < 0:
        return None
    try:
        out = ctypes.create_string_buffer(size)
        return out.raw if lib.bpf_map_lookup_elem(fd, key, out) == 0 else None
    finally:
        os.close(fd)


TCX_INGRESS = 46
"""enum bpf_attach_type BPF_TCX_INGRESS (kernel 6.6+): tc ingress without the classifier layer."""
_F_REPLACE = 1 << 2
_PROG_NAME_AT, _PROG_INFO_LEN = 64, 80
"""struct bpf_prog_info up to its ``name`` (char[16] at byte 64): the kernel fills what the caller asks."""


class _AttachOpts(ctypes.Structure):
    """struct bpf_prog_attach_opts (libbpf 1.1 bpf.h; for tcx ``replace_prog_fd`` is the relative fd)."""

    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32), ("replace_prog_fd", ctypes.c_int)]


def tcx_programs(ifindex: int) -> list[tuple[int, str]]:
    """(id, name) of each program at ``ifindex``'s tcx ingress, in run order; raises OSError (EINVAL:
    this kernel has no tcx; EPERM: a program's name cannot be read without CAP_SYS_ADMIN, and a caller
    that cannot tell its own program from others would stack a second one instead of replacing it)."""
    lib = _libbpf()
    ids = (ctypes.c_uint32 * 64)()
    count = ctypes.c_uint32(len(ids))
    rc = lib.bpf_prog_query(ifindex, TCX_INGRESS, 0, None, ids, ctypes.byref(count))
    if rc:
        raise OSError(_errno(rc), os.strerror(_errno(rc)))
    out = []
    for pid in ids[:count.value]:
        fd = lib.bpf_prog_get_fd_by_id(pid)
        if fd < 0:
            if _errno(fd) == errno.ENOENT:
                continue  # detached and freed since the query
            e = _errno(fd)
            raise OSError(e, f"cannot read the programs there: {os.strerror(e)}"
                             f"{' (needs CAP_SYS_ADMIN)' if e == errno.EPERM else ''}")
        try:
            info, size = ctypes.create_string_buffer(_PROG_INFO_LEN), ctypes.c_uint32(_PROG_INFO_LEN)
            if lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)) == 0:
                out.append((pid, info.raw[_PROG_NAME_AT:_PROG_INFO_LEN].split(b"\0")[0].decode()))
        finally:
            os.close(fd)
    return out


def tcx_attach(ifindex: int, prog_fd: int, replace_id: int = 0) -> None:
    """Attach at ``ifindex``'s tcx ingress, in place of program ``replace_id`` if given (atomically: no
    packet sees neither); the attachment stays after this process exits, as a tc filter does. OSError."""
    lib = _libbpf()
    old = lib.bpf_prog_get_fd_by_id(replace_id) if replace_id else -1
    if replace_id and old < 0:
        raise OSError(_errno(old), f"program {replace_id}: {os.strerror(_errno(old))}")
    try:
        opts = _AttachOpts(ctypes.sizeof(_AttachOpts), _F_REPLACE if old >= 0 else 0, max(old, 0))
        rc = lib.bpf_prog_attach_opts(prog_fd, ifindex, TCX_INGRESS, ctypes.byref(opts))
        if rc:
            raise OSError(_errno(rc), os.strerror(_errno(rc)))
    finally:
        if old >= 0:
            os.close(old)


def tcx_detach(ifindex: int, prog_id: int) -> bool:
    """Detach program ``prog_id`` from ``ifindex``'s tcx ingress; False if it was not there. OSError."""
    lib = _libbpf()
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return False
    try:
        rc = lib.bpf_prog_detach2(fd, ifindex, TCX_INGRESS)
        if rc and _errno(rc) in (errno.ENOENT, errno.ENODEV):
            return False
        if rc:
            raise OSError(_errno(rc), os.strerror(_errno(rc)))
        return True
    finally:
        os.close(fd)


class LibBpf:
    """The loaded program and its maps (the real :class:`~director.dataplane.kernel.BpfMaps`)."""

    def __init__(self, path: Path = OBJECT, max_entries: dict[str, int] | None = None,
                 sizes: dict[str, tuple[int, int]] | None = None, pin_dir: Path | None = None,
                 program: str = PROGRAM) -> None:
        """Open and load the object; ``max_entries`` resizes maps before loading; ``sizes``
        (map -> key and value size) is checked after, so a stale object is refused.

        ``pin_dir`` (on a bpffs): every map is pinned there as ``<pin_dir>/<map name>``, and maps
        already pinned there are used instead of new ones (libbpf refuses one whose type, sizes or
        entries differ: the caller clears the directory first when its layout changed). ``program``: the
        program's name in the object (the real server's decapsulator is another object and name)."""
        lib = _libbpf()
        self._batch = True
        if not path.exists():
            raise KernelDataplaneError(f"the tc program {path} is not built: run scripts/setup (needs clang)")
        obj = lib.bpf_object__open_file(str(path).encode(), None)
        if not obj:
            raise KernelDataplaneError(f"cannot open {path}: {os.strerror(ctypes.get_errno() or errno.EINVAL)}")
        self._lib, self._obj = lib, obj
        self._maps: dict[str, tuple[int, int, int]] = {}
        try:
            for name, n in (max_entries or {}).items():
                m = self._map_ptr(name)
                if lib.bpf_map__set_max_entries(m, n):
                    raise KernelDataplaneError(f"cannot size BPF map {name} to {n}")
            if pin_dir is not None:
                m = lib.bpf_object__next_map(obj, None)
                while m:
                    lib.bpf_map__set_pin_path(m, str(pin_dir / lib.bpf_map__name(m).decode()).encode())
                    m = lib.bpf_object__next_map(obj, m)
            rc = lib.bpf_object__load(obj)
            if rc:
                e = _errno(rc)
                hint = " (not root, or no CAP_BPF)" if e in (errno.EPERM, errno.EACCES) else ""
                raise KernelDataplaneError(f"the kernel refused the tc program: {os.strerror(e)}{hint}")
            prog = lib.bpf_object__find_program_by_name(obj, program.encode())
            if not prog:
                raise KernelDataplaneError(f"{path} has no program {program}")
            self.prog_fd = lib.bpf_program__fd(prog)
            for name, (ks, vs) in (sizes or {}).items():
                m = self._map_ptr(name)
                got = (lib.bpf_map__key_size(m), lib.bpf_map__value_size(m))
                if got != (ks, vs):
                    raise KernelDataplaneError(f"{path}: map {name} has key/value sizes {got}, GLB expects "
                                               f"{(ks, vs)}: rebuild it (scripts/setup)")
        except BaseException:
            self.close()
            raise
        self.cpus = lib.libbpf_num_possible_cpus()

    def _map_ptr(self, name: str):
        m = self._lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise KernelDataplaneError(f"the tc program has no map {name}")
        return m

    def _map(self, name: str) -> tuple[int, int, int]:
        """(fd, key size, value size as lookups return it: per CPU maps hold one slot per CPU)."""
        got = self._maps.get(name)
        if got is None:
            m = self._map_ptr(name)
            vs = self._lib.bpf_map__value_size(m)
            if self._lib.bpf_map__type(m) in _PERCPU:
                vs = ((vs + 7) & ~7) * self._lib.libbpf_num_possible_cpus()
            got = self._maps[name] = (self._lib.bpf_map__fd(m), self._lib.bpf_map__key_size(m), vs)
        return got

    def _call(self, what: str, name: str, rc: int) -> None:
        if rc:
            raise KernelDataplaneError(f"BPF map {name}: {what} failed: {os.strerror(_errno(rc))}")

    def update(self, name: str, key: bytes, value: bytes) -> None:
        fd, _, _ = self._map(name)
        self._call("update", name, self._lib.bpf_map_update_elem(fd, key, value, 0))

    def lookup(self, name: str, key: bytes) -> bytes | None:
        fd, _, vs = self._map(name)
        out = ctypes.create_string_buffer(vs)
        rc = self._lib.bpf_map_lookup_elem(fd, key, out)
        if rc and _errno(rc) == errno.ENOENT:
            return None
        self._call("lookup", name, rc)
        return out.raw

    def delete(self, name: str, key: bytes) -> bool:
        fd, _, _ = self._map(name)
        rc = self._lib.bpf_map_delete_elem(fd, key)
        if rc and _errno(rc) == errno.ENOENT:
            return False
        self._call("delete", name, rc)
        return True

    def keys(self, name: str) -> list[bytes]:
        fd, ks, _ = self._map(name)
        out, key, nxt = [], None, ctypes.create_string_buffer(ks)
        while True:
            rc = self._lib.bpf_map_get_next_key(fd, key, nxt)
            if rc:
                if _errno(rc) == errno.ENOENT:
                    return out
                self._call("iteration", name, rc)
            out.append(nxt.raw)
            key = ctypes.create_string_buffer(nxt.raw, ks)

    def map_fd(self, name: str) -> int:
        """A map's descriptor (the ring buffer's consumer, director/dataplane/flowevents.py, maps it)."""
        return self._map(name)[0]

    def memlock(self, name: str) -> int:
        """The bytes the kernel charges for a map (its fdinfo's ``memlock``: elements, buckets, LRU lists)."""
        fd, _, _ = self._map(name)
        for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("memlock:"):
                return int(line.split()[1])
        raise KernelDataplaneError(f"BPF map {name}: the kernel reports no memlock")

    def update_batch(self, name: str, items: list[tuple[bytes, bytes]]) -> None:
        """Write many entries in one BPF_MAP_UPDATE_BATCH (one update each where the kernel has none)."""
        if not items:
            return
        fd, ks, vs = self._map(name)
        if self._batch:
            keys = b"".join(k for k, _ in items)
            values = b"".join(v for _, v in items)
            count = ctypes.c_uint32(len(items))
            opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
            rc = self._lib.bpf_map_update_batch(fd, keys, values, ctypes.byref(count), ctypes.byref(opts))
            if not rc:
                return
            if _errno(rc) not in _NO_BATCH:
                self._call("batch update", name, rc)
            self._batch = False
        for k, v in items:
            self.update(name, k, v)

    def delete_batch(self, name: str, keys: list[bytes]) -> int:
        """Delete many entries (BPF_MAP_DELETE_BATCH; one delete each where the kernel has none); how many
        were there. A key already gone (the LRU evicted it) is skipped."""
        fd, _, _ = self._map(name)
        done = 0
        while keys and self._batch:
            count = ctypes.c_uint32(len(keys))
            opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
            rc = self._lib.bpf_map_delete_batch(fd, b"".join(keys), ctypes.byref(count), ctypes.byref(opts))
            if not rc:
                return done + len(keys)
            e = _errno(rc)
            if e == errno.ENOENT:  # stops at the first missing key, having deleted those before it
                done += count.value
                keys = keys[count.value + 1:]
                continue
            if e not in _NO_BATCH:
                self._call("batch delete", name, rc)
            self._batch = False
        return done + sum(self.delete(name, k) for k in keys)

    def items(self, name: str) -> list[tuple[bytes, bytes]]:
        """Every entry (BPF_MAP_LOOKUP_BATCH, BATCH at a time; key by key where the kernel has none)."""
        out, token = self.items_batch(name, None)
        while token is not None:
            more, token = self.items_batch(name, token)
            out.extend(more)
        return out

    def items_batch(self, name: str, token: bytes | None, count: int = BATCH) -> tuple[list[tuple[bytes, bytes]],
                                                                                       bytes | None]:
        """Up to ``count`` entries from where ``token`` left off (None: the start), and the token to go on
        with (None: the end). Without the batch commands: every entry at once."""
        fd, ks, vs = self._map(name)
        if self._batch:
            keys, values = ctypes.create_string_buffer(ks * count), ctypes.create_string_buffer(vs * count)
            out_token = ctypes.create_string_buffer(max(ks, 8))
            n = ctypes.c_uint32(count)
            opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
            rc = self._lib.bpf_map_lookup_batch(fd, token, out_token, keys, values, ctypes.byref(n),
                                                ctypes.byref(opts))
            e = _errno(rc) if rc else 0
            if not e or e == errno.ENOENT:
                kr, vr = keys.raw, values.raw
                got = [(kr[i * ks:(i + 1) * ks], vr[i * vs:(i + 1) * vs]) for i in range(n.value)]
                return got, None if e else out_token.raw
            if e not in _NO_BATCH or token is not None:
                self._call("batch lookup", name, rc)
            self._batch = False
        out = []
        for k in self.keys(name):
            v = self.lookup(name, k)
            if v is not None:
                out.append((k, v))
        return out, None

    def test_run(self, frame: bytes, ctx: bytes | None = None, repeat: int = 1) -> tuple[int, bytes]:
        """BPF_PROG_TEST_RUN: run the program once on ``frame`` (``repeat`` times on the same skb, which
        the first run may have changed); (return code, the frame after it)."""
        out = ctypes.create_string_buffer(len(frame) + 256)
        opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_size_in=len(frame), data_size_out=len(out),
                            repeat=repeat)
        data = ctypes.create_string_buffer(frame, len(frame))
        opts.data_in = ctypes.cast(data, _c_p)
        opts.data_out = ctypes.cast(out, _c_p)
        if ctx is not None:
            cbuf = ctypes.create_string_buffer(ctx, len(ctx))
            opts.ctx_in = ctypes.cast(cbuf, _c_p)
            opts.ctx_size_in = len(ctx)
        rc = self._lib.bpf_prog_test_run_opts(self.prog_fd, ctypes.byref(opts))
        if rc:
            raise KernelDataplaneError(f"BPF_PROG_TEST_RUN failed: {os.strerror(_errno(rc))}")
        self.last_duration = opts.duration
        """Nanoseconds the program ran on the last test run's frame, on average over its repeats
        (benchmarks/director_newconns.py, kernel_nat_ns.py)."""
        return opts.retval, out.raw[:opts.data_size_out]

    def close(self) -> None:
        obj, self._obj = self._obj, None
        if obj:
            self._lib.bpf_object__close(obj)
