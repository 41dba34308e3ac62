"""The tc-BPF decapsulator's adapter: load director/dataplane/tc/glb_decap.bpf.o, fill its VIPs, attach it.

The program (its header comment says what it checks) unwraps IP-in-IP at tc
ingress of the real server's interfaces, so the inner packet reaches the VIP
on ``lo`` in the kernel, GSO frames whole: no raw sockets, no TUN device, no
process. ``glb realserver setup --mode tun --decap bpf`` (or ``auto`` on a
kernel without ipip) applies it as one :class:`~director.realserver.steps.
BpfDecap` step through :func:`start`; teardown calls :func:`stop`.

What stays after setup exits: the attachments (tcx, or clsact filters on a
kernel before 6.6) hold the program and the program its maps. Where a bpffs is mounted (not inside ``ip netns exec``)
the maps are also pinned, so ``glb realserver status`` reads the counters;
teardown removes the filters and the pins. Loading and attaching reuse the
director's libbpf adapter (director/dataplane/libbpf.py); failures are one
RealServerError line.
"""

from __future__ import annotations

import ipaddress
import shutil
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

from director.realserver.decapsulate import DROP_TUN_ERROR, REASONS
from glb.errors import KernelDataplaneError, RealServerError

OBJECT = Path(__file__).resolve().parent.parent / "dataplane" / "tc" / "glb_decap.bpf.o"
PROGRAM = "glb_decap"

COUNTERS = {0: "delivered", **{code: f"dropped_{name}" for code, name in REASONS.items() if code != DROP_TUN_ERROR},
            7: "received", 8: "outer_fragment", 9: "adjust_failed"}
"""Index in ``decap_counters`` -> name: the userspace decapsulator's names where the meaning is the same
(a "dropped" packet is passed on untouched, and the kernel, with no driver for it, discards it)."""
SLOTS = 16

_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")


class Loaded:
    """The program loaded with its VIPs (maps pinned in ``pin_dir`` if given); :meth:`close` drops our fds."""

    def __init__(self, vips: Iterable[str], pin_dir: Path | None = None) -> None:
        from director.dataplane.libbpf import LibBpf

        try:
            self.bpf = LibBpf(OBJECT, pin_dir=pin_dir, program=PROGRAM)
        except KernelDataplaneError as e:
            raise RealServerError(f"cannot load the BPF decapsulator: {e}") from None
        try:
            for text in vips:
                addr = ipaddress.ip_address(text)
                self.bpf.update("decap_vips4" if addr.version == 4 else "decap_vips6", addr.packed, b"\x01")
        except KernelDataplaneError as e:
            self.close()
            raise RealServerError(f"cannot write the VIPs into the BPF decapsulator: {e}") from None

    @property
    def prog_fd(self) -> int:
        return self.bpf.prog_fd

    def counters(self) -> dict[str, int]:
        return decode_counters(lambda i: self.bpf.lookup("decap_counters", _U32.pack(i)), self.bpf.cpus)

    def close(self) -> None:
        self.bpf.close()


def decode_counters(lookup, cpus: int) -> dict[str, int]:
    """The per-CPU slots summed, by name; ``lookup(index)`` gives a slot's bytes (8 per CPU) or None."""
    out = {}
    for index, name in COUNTERS.items():
        raw = lookup(index)
        out[name] = sum(_U64.unpack_from(raw, 8 * c)[0] for c in range(cpus)) if raw else 0
    return out


def probe() -> str | None:
    """None if the program loads here, else why not (one line)."""
    try:
        Loaded(()).close()
    except RealServerError as e:
        return str(e)
    return None


def attach(ifname: str, prog_fd: int) -> str:
    """The program at ``ifname``'s ingress (tcx, else a clsact filter: director/dataplane/tcattach.py);
    how, for :func:`detach`."""
    from director.dataplane import tcattach

    try:
        return tcattach.attach(ifname, prog_fd, PROGRAM, tcattach.DECAP_PRIO)[1]
    except KernelDataplaneError as e:
        raise RealServerError(f"cannot attach the BPF decapsulator: {e}") from None


def detach(ifname: str, how: str | bool) -> None:
    """Undo :func:`attach` (``how`` True/False: a runtime record from before tcx, a clsact filter on a
    qdisc setup made / found); gone already is fine."""
    import socket

    from director.dataplane import tcattach

    if isinstance(how, bool):
        how = tcattach.CLSACT_MADE if how else tcattach.CLSACT
    try:
        ifindex = socket.if_nametoindex(ifname)
    except OSError:
        return  # the interface is gone, and the program with it
    try:
        tcattach.detach(ifindex, how, PROGRAM, tcattach.DECAP_PRIO)
    except KernelDataplaneError as e:
        raise RealServerError(f"cannot remove the BPF decapsulator from {ifname}: {e}") from None


def start(vips: Iterable[str], interfaces: Iterable[str], pin_dir: str) -> dict:
    """Load, fill, attach to every interface; the runtime record :func:`stop` undoes. All or nothing."""
    from director.dataplane.kernel import bpffs

    pins = Path(pin_dir) if pin_dir and bpffs(Path(pin_dir)) else None
    if pins is not None:
        shutil.rmtree(pins, ignore_errors=True)  # a leftover's pins would be reused with its VIPs
        pins.mkdir(parents=True)
    attached: list[list] = []
    loaded = None
    try:
        loaded = Loaded(vips, pins)
        for ifname in interfaces:
            attached.append([ifname, attach(ifname, loaded.prog_fd)])
    except BaseException:
        stop({"attached": attached, "pin_dir": str(pins) if pins else None})
        raise
    finally:
        if loaded is not None:
            loaded.close()  # the attachments hold the program, the program its maps
    return {"attached": attached, "pin_dir": str(pins) if pins else None}


def stop(runtime: Mapping) -> None:
    """Undo :func:`start`: detach every filter, remove the pins."""
    for ifname, how in reversed(runtime.get("attached") or []):
        detach(ifname, how)
    if runtime.get("pin_dir"):
        shutil.rmtree(runtime["pin_dir"], ignore_errors=True)


def read_counters(pin_dir: str | None) -> dict[str, int] | None:
    """The counters through the pinned map (None: not pinned, or gone)."""
    if not pin_dir:
        return None
    from director.dataplane.libbpf import _libbpf, read_pinned

    path = Path(pin_dir) / "decap_counters"
    if not path.exists():
        return None
    cpus = _libbpf().libbpf_num_possible_cpus()
    return decode_counters(lambda i: read_pinned(path, _U32.pack(i), 8 * cpus), cpus)
