"""The AF_PACKET I/O engine: frames in from an RX ring, actions out in batches.

Layout (one worker per process; ``workers`` processes share the interface
through a PACKET_FANOUT_CBPF group whose program, director/dataplane/fanout.py,
sends every frame about one client to the same worker, and they count
connections in one shared table, director/dataplane/counters.py):

* **RX**: one AF_PACKET socket on the director's interface, TPACKET_V2 RX
  ring, PACKET_VNET_HDR (veth/virtio checksum and GSO metadata arrive with
  each frame), a classic BPF filter (director/dataplane/bpf.py) so only frames for
  a VIP (and ARP/NDP asking for one) ever wake Python. Frames the host
  itself sends and frames for other MACs (promiscuous mode) are refused by
  the filter too.
* **TX**: the same socket (a packet socket never receives its own frames
  back), PACKET_QDISC_BYPASS, and ``sendmmsg(2)`` through ctypes with
  iovecs pointing *into the RX ring*: DR is zero-copy (the 12 MAC bytes are
  rewritten in the slot, the slot's virtio_net_hdr goes out with it); TUN
  sends a small scratch header (virtio_net_hdr + Ethernet + outer IP) and
  the inner packet straight from the slot. Slots go back to the kernel
  only after the batch was sent.
* **Decisions**: runs of established DR flows go through the C loop
  (director/dataplane/_fastpath.c, Forwarder.fast's DR case in C); the rest through
  Forwarder.fast() and Forwarder.forward() in Python.

Why TPACKET_V2 and not V3: a V3 block is handed to userspace when it is full
or when its retire timer fires (>= 1 ms), which adds ~0.9 ms at low load
(REFERENCES.md); V2 hands over every frame at once, so the added latency is
the poll wake-up. V3 packs small frames densely and reads ~5 % faster at
saturation; V2 needs a slot per frame sized for the largest (64 KiB GSO
frames), which costs memory: 1024 slots = 67 MB per worker. Documented in
docs/packet-path.md.

The worker is a separate process so the packet path never holds the GIL of
the asyncio control plane (and vice versa), and so ``workers`` > 1 can use
more cores. It gets a whole :class:`~director.dataplane.forwarder.Plan` through a pipe
whenever the control plane decides something and applies it between two
batches (so no packet ever sees half a plan); it sends its counters back
every half second. It exits when the pipe closes (the director died) and
on PR_SET_PDEATHSIG. The director's glb.supervisor restarts a worker that dies.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import mmap
import multiprocessing
import os
import select
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from director.dataplane import bpf, codec, fanout
from director.dataplane.actions import Crossed, Encap, Frames, MacRewrite
from director.dataplane.conntable import NEXT_BYTES, ConnTable
from director.dataplane.counters import DEFAULT_SLOTS, CountTable, SlotAllocator
from director.dataplane.forwarder import Forwarder, ForwarderStats, Plan
from director.dataplane.announce import Announcer
from director.dataplane.connsync import ConnSync
from director.dataplane.spillflags import DEFAULT_FLAGS, SpillFlags
from director.modes import MODES
from glb.errors import EngineError, KernelDataplaneError, SupervisorError
from glb.supervisor import RestartPolicy, Supervisor

try:  # the established-flow loop in C; the same logic runs in Python without it
    from director.dataplane import _fastpath
except ImportError:  # pragma: no cover - built by `pip install` wherever a compiler is
    _fastpath = None
LOOP = "c" if _fastpath is not None else "python"
"""Which loop forwards established DR flows (/status packet_path.loop)."""

log = logging.getLogger("glb.director.engine")

# <linux/if_packet.h>, <asm-generic/socket.h>
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_VNET_HDR = 15
PACKET_FANOUT = 18
PACKET_QDISC_BYPASS = 20
PACKET_IGNORE_OUTGOING = 23
TPACKET_V2 = 1
SO_ATTACH_FILTER = 26
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
TP_STATUS_USER = 1
MSG_DONTWAIT = 0x40

VNET_LEN = codec.VNET_HDR_LEN
FRAME_SIZE = 65792
"""One V2 slot: tpacket2_hdr + sockaddr_ll + virtio_net_hdr + a 64 KiB GSO frame, 16-aligned."""
BLOCK_SIZE = FRAME_SIZE * 16
"""16 slots per block: the smallest multiple of both the slot and the page size."""
DEFAULT_FRAMES = 1024
BATCH = 64
"""Frames per sendmmsg call."""
RX_BUDGET = 256
"""Frames handled before housekeeping gets a look."""
TICK = 0.02
SWEEP_EVERY = 0.1
STATS_EVERY = 0.5

_IOV2 = struct.Struct("=QQQQ")  # two struct iovec
_TPACKET_REQ = struct.Struct("=IIII")
_TPACKET_STATS = struct.Struct("=II")


# --------------------------------------------------------------------------
# Batched TX: sendmmsg through ctypes
# --------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int

_MSG_SIZE = 64  # struct mmsghdr on 64-bit Linux
_IOV_SIZE = 32  # two struct iovec per message
_SCRATCH = 128  # virtio_net_hdr + Ethernet + outer IPv6 header fit
_MSG = struct.Struct("=QI4xQQQQi4xI4x")  # name, namelen, iov, iovlen, control, controllen, flags, msg_len


def _address(buf) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _send_messages(fd: int, base: int, first: int, end: int, errors: dict[int, int]) -> int:
    """sendmmsg(2) messages first .. end - 1 of the mmsghdr array at ``base``.

    A message the kernel refuses is counted under its errno and skipped, so
    one bad frame never holds up the rest. Returns how many went out.
    """
    sent = 0
    while first < end:
        done = _sendmmsg(fd, base + first * _MSG_SIZE, end - first, MSG_DONTWAIT)
        if done < 0:
            err = ctypes.get_errno()
            errors[err] = errors.get(err, 0) + 1
            done = 1
        else:
            sent += done
        first += done
    return sent


class Sender:
    """Up to BATCH frames described by iovecs, sent with one sendmmsg call.

    Every message has two iovecs: a frame straight from the ring is one
    iovec (the second empty), a tunnelled frame is scratch header + ring
    slice. The memory they point to must stay put until :meth:`flush`.
    """

    def __init__(self, fd: int, batch: int = BATCH) -> None:
        self.fd = fd
        self.batch = batch
        self.mm = mmap.mmap(-1, batch * (_MSG_SIZE + _IOV_SIZE + _SCRATCH))
        self.base = _address(self.mm)
        self._iov = batch * _MSG_SIZE
        self._scratch = self._iov + batch * _IOV_SIZE
        for i in range(batch):
            _MSG.pack_into(self.mm, i * _MSG_SIZE, 0, 0, self.base + self._iov + i * _IOV_SIZE, 2, 0, 0, 0, 0)
        self.n = 0
        self.sent = 0
        self.errors: dict[int, int] = {}

    def frame(self, addr: int, length: int) -> None:
        n = self.n
        _IOV2.pack_into(self.mm, self._iov + n * _IOV_SIZE, addr, length, 0, 0)
        self.n = n + 1
        if n + 1 == self.batch:
            self.flush()

    def parts(self, head: bytes, addr: int, length: int) -> None:
        n = self.n
        s = self._scratch + n * _SCRATCH
        self.mm[s:s + len(head)] = head
        _IOV2.pack_into(self.mm, self._iov + n * _IOV_SIZE, self.base + s, len(head), addr, length)
        self.n = n + 1
        if n + 1 == self.batch:
            self.flush()

    def flush(self) -> None:
        n, self.n = self.n, 0
        self.sent += _send_messages(self.fd, self.base, 0, n, self.errors)

    def close(self) -> None:
        self.mm.close()


class SlotSender:
    """DR transmission straight from the RX ring: one message per ring slot.

    Message *i* always describes slot *i* (one iovec, set per frame to the
    frame's virtio_net_hdr and bytes), so the messages of consecutive slots
    are consecutive in memory and a run of forwarded frames goes out with
    one ``sendmmsg`` from the run's first message. Per frame that is two
    integer stores: no packing, no copy.
    """

    def __init__(self, fd: int, frames: int) -> None:
        self.fd = fd
        self.frames = frames
        self.mm = mmap.mmap(-1, frames * (_MSG_SIZE + 16))
        self.base = _address(self.mm)
        iov = frames * _MSG_SIZE
        for i in range(frames):
            _MSG.pack_into(self.mm, i * _MSG_SIZE, 0, 0, self.base + iov + i * 16, 1, 0, 0, 0, 0)
        self.iov = memoryview(self.mm).cast("Q")
        """Slot i's iovec: base at [iov0 + 2 i], length at [iov0 + 2 i + 1]."""
        self.iov0 = iov // 8
        self.sent = 0
        self.errors: dict[int, int] = {}

    def send(self, first: int, count: int) -> None:
        """Send the messages of slots first .. first + count - 1."""
        self.sent += _send_messages(self.fd, self.base, first, first + count, self.errors)

    def close(self) -> None:
        self.iov.release()
        self.mm.close()


# --------------------------------------------------------------------------
# The socket and its RX ring
# --------------------------------------------------------------------------


def _prctl_pdeathsig() -> None:
    try:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: go when the director goes
    except Exception:  # pragma: no cover - not Linux
        pass


@dataclass
class EngineConfig:
    """How to open the interface (picklable: it crosses into the worker process)."""

    interface: str
    frames: int = DEFAULT_FRAMES
    """RX ring slots (64 KiB each)."""
    workers: int = 1
    fanout_group: int = 0
    """PACKET_FANOUT group id shared by the workers (0 = none; set by Engine)."""
    conntable: Any = None
    """glb.config.ConnectionTableConfig (None = defaults)."""
    announce: tuple[float, ...] = (0.0, 1.0, 2.0)
    """When (s after taking a VIP) gratuitous ARP / unsolicited NA go out."""
    busy_poll: bool = False
    """Spin on the ring instead of sleeping in poll(2) when it is empty: a
    whole core per worker, always, for the lowest latency (no wake-up)."""
    dataplane: str = "userspace"
    """glb.config.PacketPathConfig.dataplane: auto, kernel or userspace."""
    sync_id: int = 0
    """Connection sync's id (the pair's VRID; director/dataplane/connsync.py); 0 = a director alone, no sync."""
    cpus: tuple[int, ...] = ()
    """CPUs the workers pin themselves to (director.control.placement); () = where they start."""
    lan_interface: str | None = None
    """NAT: the real servers' side when it is another interface (glb.config director.lan.interface):
    the workers read the real servers' replies there and send the client packets they rewrite there."""

    def lan(self) -> EngineConfig | None:
        """How to open the LAN-side interface (its own fanout group), or None: one interface for both."""
        if not self.lan_interface or self.lan_interface == self.interface:
            return None
        return dataclasses.replace(self, interface=self.lan_interface, lan_interface=None,
                                   fanout_group=self.fanout_group ^ 0x8000 if self.fanout_group else 0)
    pin_dir: str = ""
    """Where the kernel data plane pins its maps (on a bpffs), so a restart keeps its flows; "" = nowhere."""


class PacketSocket:
    """The AF_PACKET socket: V2 RX ring, vnet headers, BPF filter, optional fanout."""

    def __init__(self, cfg: EngineConfig, vips, rx_interface: str | None = None) -> None:
        """``rx_interface``: read frames there, send them on ``cfg.interface`` (the kernel data
        plane's slow-path veth: only what the tc program left for the engine comes out of it)."""
        # Protocol 0: receives nothing until bind, so nothing slips in before the filter.
        self.rx = s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.sock = s
        """Sends (the same socket as ``rx`` unless frames come in elsewhere)."""
        try:
            self.ifindex = socket.if_nametoindex(cfg.interface)
            self._setup(s)
            try:
                s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            except OSError:  # kernels before 4.20: the BPF filter refuses them anyway
                pass
            self.set_filter(vips)
            self.frames = frames = max(16, (cfg.frames + 15) // 16 * 16)
            s.setsockopt(SOL_PACKET, PACKET_RX_RING,
                         _TPACKET_REQ.pack(BLOCK_SIZE, frames // 16, FRAME_SIZE, frames))
            self.ring = mmap.mmap(s.fileno(), FRAME_SIZE * frames, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            s.bind((rx_interface or cfg.interface, ETH_P_ALL))
            if cfg.fanout_group:
                s.setsockopt(SOL_PACKET, PACKET_FANOUT, (cfg.fanout_group & 0xFFFF) | fanout.PACKET_FANOUT_CBPF << 16)
            if rx_interface is not None:
                self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: never receives
                self._setup(self.sock)
                self.sock.bind((cfg.interface, 0))
        except BaseException:
            self.close()
            raise
        self.mac = bytes.fromhex(open(f"/sys/class/net/{cfg.interface}/address").read().strip().replace(":", ""))

    @staticmethod
    def _setup(s: socket.socket) -> None:
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
        s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        for opt in (SO_SNDBUFFORCE, SO_RCVBUFFORCE):
            s.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)

    def set_filter(self, vips, extra=()) -> None:
        self._attach(socket.SOL_SOCKET, SO_ATTACH_FILTER, bpf.socket_filter(vips, extra))

    def set_fanout(self, prog) -> None:
        """Install the group's fanout program (director/dataplane/fanout.py); any member may."""
        self._attach(SOL_PACKET, fanout.PACKET_FANOUT_DATA, prog)

    def _attach(self, level: int, opt: int, prog) -> None:
        code = ctypes.create_string_buffer(bpf.bpf_bytes(prog))
        fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(code))
        self.rx.setsockopt(level, opt, fprog)

    def statistics(self) -> tuple[int, int]:
        """(packets, drops) since the last call (the kernel resets them on read)."""
        return _TPACKET_STATS.unpack(self.rx.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))

    def close(self) -> None:
        ring = getattr(self, "ring", None)
        if ring is not None:
            ring.close()
        if self.sock is not self.rx:
            self.sock.close()
        self.rx.close()


# --------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------


@dataclass
class EngineStats:
    """What a worker reports every STATS_EVERY seconds."""

    forwarder: ForwarderStats = field(default_factory=ForwarderStats)
    rx_frames: int = 0
    ring_drops: int = 0
    """Frames the kernel dropped because the ring was full (the worker fell behind)."""
    truncated: int = 0
    """Frames larger than a ring slot."""
    tx_frames: int = 0
    tx_errors: dict[int, int] = field(default_factory=dict)
    """errno -> frames sendmmsg refused."""
    cpu: float = 0.0
    """CPU seconds this worker used (user + system)."""
    dataplane: str = "userspace"
    """Who forwards established flows: ``kernel`` (the tc program) or ``userspace``."""
    kernel: dict[str, int] = field(default_factory=dict)
    """The kernel data plane's packets per reason (kernelmaps.REASONS); empty in userspace."""
    sync: dict[str, int] = field(default_factory=dict)
    """Connection sync applied here (a backup): the SyncReceiver's counters."""
    flow_events: dict[str, int] = field(default_factory=dict)
    """The kernel's flow events (director/dataplane/flowevents.py): ``received``, ``lost`` (its ring was
    full); empty in userspace."""

    def merge(self, other: EngineStats) -> EngineStats:
        errors = dict(self.tx_errors)
        for k, v in other.tx_errors.items():
            errors[k] = errors.get(k, 0) + v
        kernel = dict(self.kernel)
        for k, v in other.kernel.items():
            kernel[k] = kernel.get(k, 0) + v
        sync = dict(self.sync)
        for k, v in other.sync.items():
            sync[k] = sync.get(k, 0) + v
        events = dict(self.flow_events)
        for k, v in other.flow_events.items():
            events[k] = events.get(k, 0) + v
        return EngineStats(self.forwarder.merge(other.forwarder), self.rx_frames + other.rx_frames,
                           self.ring_drops + other.ring_drops, self.truncated + other.truncated,
                           self.tx_frames + other.tx_frames, errors, self.cpu + other.cpu,
                           "kernel" if "kernel" in (self.dataplane, other.dataplane) else "userspace", kernel, sync,
                           events)


def _nothing() -> None:
    pass


def _declined(buf, start: int, length: int, now: float) -> None:
    """Forwarder.fast's answer for a frame the C loop already declined, without asking."""
    return None


class Worker:
    """One packet loop: ring -> Forwarder -> Sender; plans and stats over a pipe."""

    def __init__(self, cfg: EngineConfig, plan: Plan, conn, index: int = 0, ps: PacketSocket | None = None,
                 cells: Any = None, positions: tuple[int, ...] | None = None, spill_flags: Any = None) -> None:
        """``ps`` replaces the AF_PACKET socket (tests: any datagram socket and an mmap laid out as a ring).

        ``cells``: the workers' shared connection counts (director/dataplane/counters.py);
        ``positions``: each fanout bucket's socket position (fanout.Members.table);
        ``spill_flags``: the control plane's spill flags (director/dataplane/spillflags.py).
        """
        self.cfg = cfg
        self.conn = conn
        self.index = index
        table = ConnTable.from_config(cfg.conntable) if cfg.conntable is not None else ConnTable()
        counts = None
        if cells is not None:
            counts = CountTable(cells, cfg.workers, index)
            counts.reset()  # whatever a dead predecessor counted died with it
        self.fwd = Forwarder(table, counts=counts, spill_flags=spill_flags)
        self.sync = ConnSync(self.fwd, cfg.sync_id, workers=cfg.workers, index=index) if cfg.sync_id else None
        """Connection sync (a pair member); the director says when to send (master) or apply (backup)."""
        self.positions = positions
        self._fanout: list | None = None
        self.kernel = None
        """The kernel data plane (director/dataplane/kernel.py) while it forwards established flows."""
        self.dataplane_note = ""
        """Why ``dataplane: auto`` runs in userspace ("" when it does not)."""
        self.maps_note = ""
        """How the kernel data plane is attached and what became of its pinned maps, for the director's log
        ("" when it is not running)."""
        if ps is None and cfg.dataplane != "userspace":
            self._open_kernel(cfg, table)
        try:
            self.ps = ps if ps is not None else PacketSocket(
                cfg, plan.vips, self.kernel.rx_interface if self.kernel is not None else None)
        except BaseException:
            if self.kernel is not None:
                self.kernel.close()
            raise
        self.ring = self.ps.ring
        self.view = memoryview(self.ring)
        self.words = self.view.cast("I")  # tpacket2_hdr fields, read without unpacking
        self.halves = self.view.cast("H")
        self._ring_ref = ctypes.c_char.from_buffer(self.ring)
        self.ring_addr = ctypes.addressof(self._ring_ref)
        self.lan: PacketSocket | None = None
        """NAT's real-server side when it is another interface (EngineConfig.lan_interface)."""
        lan_cfg = cfg.lan() if ps is None else None
        # With the kernel data plane the real servers' frames it does not forward come out of a slow-path
        # veth too: the LAN side's own (another interface), or the client side's (the same one).
        if lan_cfg is not None:
            try:
                self.lan = PacketSocket(lan_cfg, (), self.kernel.lan_rx_interface if self.kernel is not None else None)
            except BaseException:
                self.ps.close()
                if self.kernel is not None:
                    self.kernel.close()
                raise
            self.lan_view = memoryview(self.lan.ring)
            self.lan_words = self.lan_view.cast("I")
            self.lan_halves = self.lan_view.cast("H")
            self.lan_idx = 0
        self.cross = (self.lan or self.ps).sock
        """Where a NAT action read on the client side goes (the real servers' side)."""
        self._lan_filter: frozenset = frozenset()
        self.sender = Sender(self.ps.sock.fileno())
        self.slots = SlotSender(self.ps.sock.fileno(), self.ps.frames)
        self.idx = 0
        self.stats = EngineStats()
        self.announcer = Announcer(cfg.announce)
        self.need_vnet = self.mac_rewrites = False
        self._filter = (plan.vips, frozenset())  # what PacketSocket opened with
        self._sent_now = 0
        self.running = True
        self.apply(plan, time.monotonic())

    def _open_kernel(self, cfg: EngineConfig, table: ConnTable) -> None:
        """Load and attach the kernel data plane (``dataplane: kernel`` raises what ``auto`` only notes).

        Here in the worker, not in the director's process: the forwarder that
        installs flows lives here, and BPF map fds do not cross the spawn
        boundary (pinning them needs a bpffs, which ``ip netns exec`` hides).
        """
        from director.dataplane.kernel import KernelDataplane, KernelSync, bpffs

        pin = Path(cfg.pin_dir) if cfg.pin_dir else None
        if pin is not None and not bpffs(pin):
            self.maps_note = (f"maps not pinned: {pin} is not on a bpffs (a restart starts with an empty "
                              "kernel table)")
            pin = None
        try:
            if cfg.workers > 1:
                raise KernelDataplaneError("the kernel data plane needs packet.workers: 1")
            lan = cfg.lan()
            kd = KernelDataplane(cfg.interface, table.max_entries, table.timeouts, pin_dir=pin,
                                 lan=lan.interface if lan is not None else None)
        except KernelDataplaneError as e:
            if cfg.dataplane == "kernel":
                raise
            self.dataplane_note = str(e)
            return
        self.maps_note = (kd.pins.note(pin) if kd.pins is not None else "") or self.maps_note
        # How it is attached (tcx, or the clsact fallback on a kernel before 6.6), in the start-up log line.
        where = " and ".join(f"{tc.how} ingress of {tc.interface}" for tc in (kd.tc, kd.lan_tc) if tc is not None)
        self.maps_note = f"attached at {where}" + (f"; {self.maps_note}" if self.maps_note else "")
        self.kernel = kd
        self.fwd.kernel = table.outside = KernelSync(
            kd.tables, socket.if_nametoindex(cfg.interface),
            kd.lan_tc.ifindex if kd.lan_tc is not None else 0)

    def apply(self, plan: Plan, now: float) -> None:
        if plan.mac == b"\x00" * 6 or not plan.mac:
            plan = dataclasses.replace(plan, mac=self.ps.mac)
        if plan.lan_mac is None and self.lan is not None:
            plan = dataclasses.replace(plan, lan_mac=self.lan.mac)
        wanted = (plan.vips, frozenset(m for s in plan.services for m in MODES[s.forwarding].filter_matches(s)))
        if wanted != self._filter:
            self.ps.set_filter(*wanted)
            self._filter = wanted
        if self.lan is not None and wanted[1] != self._lan_filter:
            self.lan.set_filter((), wanted[1])  # only the real servers' packets on their side
            self._lan_filter = wanted[1]
        self.fwd.apply(plan)
        if self.kernel is not None:
            self.fwd.kernel.plan_applied(plan.vips, self.fwd)
        modes = {MODES[s.forwarding] for s in plan.services}
        self.need_vnet = any(m.needs_vnet for m in modes)
        self.mac_rewrites = any(m.mac_rewrite for m in modes)
        self.set_fanout(plan)
        if self.index == 0:  # one worker announces for all
            self.announcer.update(plan.vips, plan.mac, now)

    def set_fanout(self, plan: Plan) -> None:
        """(Re)install the group's program when the persistence masks or the positions changed."""
        if not self.cfg.fanout_group:
            return
        replies = fanout.sources(plan)
        prog = fanout.program(self.cfg.workers, fanout.masks(plan), self.positions, replies)
        if len(prog) > bpf.BPF_MAXINSNS:  # very many persistent VIPs: whole addresses (persistence per worker)
            log.warning("too many persistent VIPs for the fanout program; persistence holds per worker only")
            prog = fanout.program(self.cfg.workers, None, self.positions,
                                  {a: 8 * len(a) for a in replies})
        if prog != self._fanout:
            self.ps.set_fanout(prog)
            if self.lan is not None:  # the same buckets: a client's replies reach its worker
                self.lan.set_fanout(prog)
            self._fanout = prog

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.ps.rx.fileno(), select.POLLIN | select.POLLERR)
        control_fd = self.conn.fileno()
        poller.register(control_fd, select.POLLIN)
        if self.lan is not None:
            poller.register(self.lan.rx.fileno(), select.POLLIN | select.POLLERR)
        if self.kernel is not None:
            poller.register(self.kernel.events.fileno(), select.POLLIN)
        next_tick = next_sweep = next_stats = 0.0
        while self.running:
            n = self.drain()
            if self.lan is not None:
                n += self.drain_lan()
            if self.kernel is not None:
                n += self.drain_events()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK
                self.control(now)
                if self.sync is not None and self.sync.sending:
                    self.send_sync(now)
                for f in self.announcer.due(now):
                    self.send_now(f)
                if now >= next_sweep:
                    next_sweep = now + SWEEP_EVERY
                    self.fwd.sweep(now)
                    if self.kernel is not None:
                        self.fwd.kernel.sweep(now, self.fwd.table.__contains__, take=self.fwd.take)
                        self.fwd.kernel.flush()
                if now >= next_stats:
                    next_stats = now + STATS_EVERY
                    self.report()
            if n == 0:
                if self.cfg.busy_poll:
                    # Watch the next slot's status word until a frame lands or housekeeping is due.
                    words, w, clock = self.words, (self.idx * FRAME_SIZE) >> 2, time.monotonic
                    while not words[w] & TP_STATUS_USER and clock() < next_tick:
                        pass
                elif any(fd == control_fd for fd, _ in poller.poll(int(TICK * 1000))):
                    next_tick = 0.0  # a plan is waiting: apply it now, not up to a tick later

    def drain(self) -> int:
        """Handle up to RX_BUDGET ready frames; send them; give the slots back.

        Frames go in ring order. A DR frame (the fast path's or forward's)
        joins the current run of consecutive slots, sent with one sendmmsg
        from the ring itself; anything else ends the run first, so frames of
        one flow never overtake each other.
        """
        ring, view, words, halves = self.ring, self.view, self.words, self.halves
        fsz, nfr = FRAME_SIZE, self.ps.frames
        forward = self.fwd.forward
        sender, slots = self.sender, self.slots
        iov, iov0 = slots.iov, slots.iov0
        base = self.ring_addr
        need_vnet = self.need_vnet
        vnet_none = codec.VNET_NONE
        idx = self.idx
        first = idx  # the current DR run: slots first .. idx - 1
        step = fsz >> 2  # tpacket2_hdr words per slot
        w = idx * step  # the slot's status word
        now = time.monotonic()
        handled = truncated = 0
        # The C loop takes runs of established DR flows (Forwarder.fast's DR case, in C);
        # whatever it leaves, Python's fast() or forward() decides.
        # With the kernel data plane, frames here are those the kernel left (they come out of
        # its slow-path veth): forward() decides them all, so that it installs each flow back.
        kernel = self.kernel is not None
        crun = _fastpath.run if _fastpath is not None and self.mac_rewrites and not kernel else None
        confirmed, timeouts = self.fwd.table.confirmed_flows, self.fwd.table.timeouts
        # Python's fast() would only repeat the C loop's refusal unless a TUN service needs it.
        fast = self.fwd.fast if (crun is None or self.need_vnet) and not kernel else _declined
        # The flows these frames confirmed (or ended) go into the kernel in one batch, before the frames
        # go out: a reply they provoke must find the flow installed, or its next packet comes here too.
        installs = self.fwd.kernel.flush if kernel else _nothing
        while handled < RX_BUDGET:
            if crun is not None:
                n = crun(ring, iov, iov0, idx, min(RX_BUDGET - handled, nfr - idx), fsz, now, confirmed,
                         NEXT_BYTES, timeouts)
                if n:
                    handled += n
                    idx += n
                    w += n * step
                    if idx == nfr:
                        if nfr > first:
                            slots.send(first, nfr - first)
                        idx = first = w = 0
                    continue
            if not words[w] & TP_STATUS_USER:
                break
            handled += 1
            snaplen = words[w + 2]
            start = (w << 2) + halves[(w << 1) + 6]  # tp_mac
            # fast() refuses a cut frame by itself: its IP length does not fit.
            r = fast(ring, start, snaplen, now)
            if r is None:
                if snaplen != words[w + 1]:
                    truncated += 1
                else:
                    r = forward(view[start:start + snaplen], now, view[start - VNET_LEN:start] if need_vnet else None)
            if r.__class__ is MacRewrite:
                ring[start:start + 12] = r
                j = iov0 + 2 * idx
                iov[j] = base + start - VNET_LEN
                iov[j + 1] = snaplen + VNET_LEN
            else:
                installs()
                if idx > first:
                    slots.send(first, idx - first)
                first = idx + 1
                cls = r.__class__
                if cls is Encap:
                    v, head, n = r
                    sender.parts((v or vnet_none) + head, base + start + 14, n)
                elif cls is Crossed:  # NAT: virtio_net_hdr + a rewritten frame, to the other side
                    self.send_cross(r)
                elif cls is Frames:
                    for out in r:
                        self.send_now(out)
            idx += 1
            w += step
            if idx == nfr:  # the next slot is not next in memory: end the run
                installs()
                if nfr > first:
                    slots.send(first, nfr - first)
                idx = first = w = 0
        if handled:
            installs()
            if idx > first:
                slots.send(first, idx - first)
            sender.flush()
            # Give the slots back (TP_STATUS_KERNEL) only now: the sends above read them.
            start_slot = self.idx
            end_slot = start_slot + handled
            for x in range(start_slot * step, min(end_slot, nfr) * step, step):
                words[x] = 0
            for x in range(0, (end_slot - nfr) * step, step):  # wrapped round
                words[x] = 0
            self.idx = idx
            self.stats.rx_frames += handled
            self.stats.truncated += truncated
        return handled

    def drain_events(self) -> int:
        """Every flow the kernel made or moved since the last call, into the table as the sweep would
        put it (and so to connection sync at the next tick); how many records."""
        records = self.kernel.events.drain()
        if records:
            self.fwd.kernel.events(records, time.monotonic(), self.fwd.take)
        return len(records)

    def drain_lan(self) -> int:
        """Handle up to RX_BUDGET frames from the real servers' side (NAT replies), one at a time:
        each rewritten reply goes out on the client side, anything else the forwarder makes
        (nothing today) back where it came from."""
        lan, view, words, halves = self.lan, self.lan_view, self.lan_words, self.lan_halves
        nfr, step = lan.frames, FRAME_SIZE >> 2
        forward, send = self.fwd.forward, self.ps.sock.send
        idx = self.lan_idx
        now = time.monotonic()
        handled = 0
        while handled < RX_BUDGET:
            w = idx * step
            if not words[w] & TP_STATUS_USER:
                break
            handled += 1
            snaplen = words[w + 2]
            start = (w << 2) + halves[(w << 1) + 6]
            if snaplen != words[w + 1]:
                self.stats.truncated += 1
            else:
                r = forward(view[start:start + snaplen], now, view[start - VNET_LEN:start])
                if r.__class__ is Crossed:
                    self._send(send, r)
                elif r.__class__ is Frames:
                    for out in r:
                        self._send(lan.sock.send, codec.VNET_NONE + out)
            words[w] = 0
            idx = idx + 1 if idx + 1 < nfr else 0
        self.lan_idx = idx
        self.stats.rx_frames += handled
        if handled and self.kernel is not None:
            self.fwd.kernel.flush()  # the state changes and confirmations these replies made
        return handled

    def send_cross(self, data) -> None:
        """A NAT action (virtio_net_hdr + frame) read on the client side: out on the real servers' side."""
        self._send(self.cross.send, data)

    def _send(self, send, data) -> None:
        try:
            send(data, MSG_DONTWAIT)
            self._sent_now += 1
        except OSError as e:
            self.sender.errors[e.errno or 0] = self.sender.errors.get(e.errno or 0, 0) + 1

    def send_now(self, frame: bytes) -> None:
        """A frame the forwarder made (ARP/NDP answer, ICMP error, a tunnelled fragment)."""
        self._send(self.ps.sock.send, codec.VNET_NONE + frame)

    def control(self, now: float) -> None:
        try:
            while self.conn.poll():
                msg = self.conn.recv()
                if msg[0] == "plan":
                    self.apply(msg[1], now)
                    self.conn.send(("applied", msg[2]))
                elif msg[0] == "fanout":
                    self.positions = msg[1]
                    self.set_fanout(self.fwd.plan)
                elif msg[0] == "stop":
                    self.running = False
                elif msg[0] == "announce" and self.index == 0:  # one worker announces for all
                    self.announcer.reclaim(self.fwd.plan.vips, self.fwd.plan.mac, now)
                elif msg[0] == "stats":
                    self.report()
                elif msg[0] == "sync_apply" and self.sync is not None:
                    self.sync.apply(msg[1], now, msg[2])
                elif msg[0] == "sync_send" and self.sync is not None:
                    self.sync.send(msg[1])
                elif msg[0] == "sync_all" and self.sync is not None:
                    self.sync.dump()
                elif msg[0] == "sync_flush":
                    self.flush_sync(now, msg[1])
        except (EOFError, OSError):
            self.running = False  # the director is gone

    def send_sync(self, now: float) -> None:
        """The table's changes since the last tick, to the control plane's SyncSender."""
        records = self.sync.records(now)
        if records:
            try:
                self.conn.send(("sync", records))
            except (BrokenPipeError, OSError):
                self.running = False

    def flush_sync(self, now: float, mark: int) -> None:
        """Everything filed for sync goes up now, not at the next ticks, then ``("sync_flushed", mark)``
        (a master stopping cleanly: its standby must have every flow before the priority 0)."""
        if self.sync is not None and self.sync.sending:
            while self.sync.pending:
                self.send_sync(now)
        try:
            self.conn.send(("sync_flushed", mark))
        except (BrokenPipeError, OSError):
            self.running = False

    def report(self) -> None:
        s = self.stats
        _, drops = self.ps.statistics()
        s.ring_drops += drops
        if self.kernel is not None:
            self.fwd.kernel.fold_counters()
            s.kernel = self.kernel.tables.reasons()
            s.flow_events = {"received": self.kernel.events.received, "lost": self.kernel.tables.events_lost()}
            s.dataplane = "kernel"
        s.forwarder = self.fwd.stats()
        if self.sync is not None:
            s.sync = dict(self.sync.receiver.counters)
        s.tx_frames = self.sender.sent + self.slots.sent + self._sent_now
        s.tx_errors = dict(self.sender.errors)
        for err, n in self.slots.errors.items():
            s.tx_errors[err] = s.tx_errors.get(err, 0) + n
        t = os.times()
        s.cpu = t.user + t.system
        try:
            self.conn.send(("stats", s))
        except (BrokenPipeError, OSError):
            self.running = False

    def close(self) -> None:
        self.sender.close()
        self.slots.close()
        del self._ring_ref
        self.words.release()
        self.halves.release()
        self.view.release()
        self.ps.close()
        if self.lan is not None:
            for v in (self.lan_words, self.lan_halves, self.lan_view):
                v.release()
            self.lan.close()
        if self.kernel is not None:
            self.kernel.close()


def worker_main(cfg: EngineConfig, plan: Plan, index: int, cells: Any, positions: tuple[int, ...] | None,
                spill_flags: Any, conn) -> None:
    """Entry point of a worker process (glb.supervisor's protocol: ready or error, then stats)."""
    _prctl_pdeathsig()
    if cfg.cpus:  # off the control plane's CPU (it started us from there)
        os.sched_setaffinity(0, cfg.cpus)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the director decides when we stop
    signal.signal(signal.SIGTERM, lambda *_: setattr(w, "running", False) if w else os._exit(0))
    w = None
    try:
        w = Worker(cfg, plan, conn, index, cells=cells, positions=positions, spill_flags=spill_flags)
    except OSError as e:
        conn.send(("error", f"cannot open {cfg.interface}: {e.strerror or e}"))
        return
    except KernelDataplaneError as e:
        conn.send(("error", str(e)))
        return
    conn.send(("ready", (w.ps.mac, "kernel" if w.kernel is not None else "userspace", w.dataplane_note,
                         w.maps_note)))
    try:
        w.run()
    finally:
        w.close()


# --------------------------------------------------------------------------
# The director's handle on its workers
# --------------------------------------------------------------------------


class Engine:
    """Starts the worker processes, hands them plans, gathers their counters.

    Used from the asyncio control plane: every method returns at once
    (``start`` waits for the workers to open the interface, bounded). The
    workers run under a glb.supervisor.Supervisor, polled from a thread: a
    worker that dies is started again (with the latest plan) after a
    backoff. Its flows resume on their next packet when the service's
    scheduler is stateless (mh); others are re-learnt (a SYN reschedules).

    With several workers they share a PACKET_FANOUT group whose program
    (director/dataplane/fanout.py) sends all frames about one client to one
    worker, and one table of connection counts (director/dataplane/counters.py).
    They start one at a time, so the kernel's array of the group's sockets is
    known (fanout.Members) and kept right as workers leave and come back.
    """

    def __init__(self, cfg: EngineConfig, policy: RestartPolicy = RestartPolicy()) -> None:
        self.cfg = cfg
        self.policy = policy
        self._sup: Supervisor | None = None
        self._stats: list[EngineStats] = []
        self._lock = threading.Lock()
        self._poller: threading.Thread | None = None
        self._closing = threading.Event()
        self.mac: bytes | None = None
        self.dataplane = "userspace"
        """Who forwards established flows, as the workers reported when they started."""
        self.dataplane_note = ""
        """Why ``dataplane: auto`` fell back to userspace ("" if it did not)."""
        self.maps_note = ""
        """What the kernel data plane found of its pinned maps, when worth a log line ("" if nothing)."""
        # Plans are numbered so the control plane can tell when every worker
        # forwards by the latest one (0 = the plan given to start()).
        self.generation = 0
        self._applied: list[int] = []
        self._spawned_with: list[int] = []
        self._plan: Plan | None = None
        self._cells: Any = None
        self._counts: CountTable | None = None
        self._slots = SlotAllocator(DEFAULT_SLOTS)
        self._members = fanout.Members(cfg.workers)
        self.on_sync: Any = None
        """Called (from the supervisor's thread) with each batch of sync records a worker sends."""
        self._sync_sending = False
        self._flush_mark = 0
        self._flushed: list[int] = []
        self.spill_flags: SpillFlags | None = None
        """The spill flags the workers read (shared memory; director/dataplane/spillflags.py)."""

    @property
    def failed(self) -> str | None:
        """Why the packet path is down (its workers keep dying), else None."""
        return self._sup.failed if self._sup is not None else None

    def _placed(self, plan: Plan) -> Plan:
        if self.spill_flags is not None:
            plan, unplaced = self.spill_flags.place(plan)
            if unplaced:
                log.warning("%d service(s) beyond %d spill flags: they spill when their plan says so",
                            len(unplaced), len(self.spill_flags.cells))
        if self._counts is None:
            return plan
        plan, unplaced = self._slots.assign(plan, self._counts.in_use)
        if unplaced:
            log.warning("%d real server(s) beyond %d count slots: each worker counts their connections alone",
                        len(unplaced), self._slots.slots)
        return plan

    def start(self, plan: Plan, timeout: float = 20.0) -> None:
        cfg = self.cfg
        n = cfg.workers
        ctx = multiprocessing.get_context("spawn")
        self.spill_flags = SpillFlags(ctx.RawArray("d", DEFAULT_FLAGS))
        if n > 1:
            if not cfg.fanout_group:
                cfg.fanout_group = (os.getpid() & 0xFFFF) or 1
            self._cells = ctx.RawArray("q", CountTable.size(DEFAULT_SLOTS, n))
            self._counts = CountTable(self._cells, n, 0)
        self._plan = self._placed(plan)
        self._stats = [EngineStats() for _ in range(n)]
        self._applied = [0] * n
        self._spawned_with = [0] * n
        self._flushed = [0] * n
        self._sup = Supervisor("glb-engine", worker_main, self._worker_args, n, policy=self.policy, serial=True,
                               ready_timeout=timeout, on_message=self._message, on_ready=self._ready,
                               on_exit=self._exit)
        try:
            self._sup.start()
        except SupervisorError as e:
            raise EngineError(str(e)) from None
        self._poller = threading.Thread(target=self._poll, name="glb-engine-supervisor", daemon=True)
        self._poller.start()

    def _worker_args(self, i: int) -> tuple:
        """Called as worker ``i`` (re)starts: it joins the fanout group last."""
        positions = None
        if self.cfg.workers > 1:
            self._members.join(i)
            positions = self._members.table()
        self._spawned_with[i] = self.generation
        return (self.cfg, self._plan, i, self._cells, positions, self.spill_flags.cells)

    def _ready(self, i: int, payload: tuple[bytes, str, str, str]) -> None:
        self.mac, self.dataplane, self.dataplane_note, self.maps_note = payload
        self._applied[i] = self._spawned_with[i]
        self._flushed[i] = self._flush_mark  # a fresh worker has filed nothing
        if self._sync_sending:  # a restarted worker of a master
            self._sup.send(i, ("sync_send", True))
        if self.cfg.workers > 1:  # the others learn the new member's position
            self._sup.broadcast(("fanout", self._members.table()))

    def _exit(self, i: int) -> None:
        self._applied[i] = -1  # forwards by no plan until its replacement is ready
        if self.cfg.workers > 1:
            self._members.leave(i)  # the kernel moved the last socket into its place
            self._sup.broadcast(("fanout", self._members.table()))

    def _message(self, i: int, msg) -> None:
        if msg[0] == "stats":
            with self._lock:
                self._stats[i] = msg[1]
        elif msg[0] == "applied":
            self._applied[i] = msg[1]
        elif msg[0] == "sync" and self.on_sync is not None:
            self.on_sync(msg[1])
        elif msg[0] == "sync_flushed":
            self._flushed[i] = msg[1]

    def _poll(self) -> None:
        while not self._closing.is_set():
            self._sup.poll(0.2)

    def update(self, plan: Plan) -> None:
        self.generation += 1
        self._plan = self._placed(plan)
        self._sup.broadcast(("plan", self._plan, self.generation))

    def announce_again(self) -> None:
        """The workers announce the VIPs of their plan again (gratuitous ARP, unsolicited NA)."""
        self._sup.broadcast(("announce",))

    def arm_spill(self, service: str, at: float | None) -> None:
        """``service``'s new connections spill from ``at`` (``time.monotonic``), None: not before its
        plan says so. Shared memory: every worker reads it with its next new connection, no message."""
        if self.spill_flags is not None:
            self.spill_flags.arm(service, at)

    def sync_send(self, on: bool) -> None:
        """Workers tell their tables' changes (a master) or not (a backup)."""
        self._sync_sending = on
        self._sup.broadcast(("sync_send", on))

    def sync_all(self) -> None:
        """Workers tell their whole tables again (a backup joined)."""
        self._sup.broadcast(("sync_all",))

    def sync_flush(self) -> int:
        """Workers send up everything they filed for sync now; returns the mark :meth:`sync_flushed` takes."""
        self._flush_mark += 1
        self._sup.broadcast(("sync_flush", self._flush_mark))
        return self._flush_mark

    def sync_flushed(self, mark: int) -> bool:
        """Whether every running worker sent up what it had filed when :meth:`sync_flush` returned ``mark``
        (the records came first: ``on_sync`` was called with them before this turns true)."""
        return all(f >= mark or a == -1 for f, a in zip(self._flushed, self._applied))

    def sync_apply(self, datagram: bytes, sender: Any) -> None:
        """A sync datagram from the master: every worker applies the flows of its clients."""
        self._sup.broadcast(("sync_apply", datagram, sender))

    @property
    def applied(self) -> int:
        """The newest plan generation every worker forwards by (-1 while one restarts)."""
        return min(self._applied, default=0)

    def stats(self) -> EngineStats:
        with self._lock:
            out = EngineStats()
            for s in self._stats:
                out = out.merge(s)
            return out

    def worker_stats(self) -> list[tuple[int | None, EngineStats, int]]:
        """(pid, its last report, restarts) per worker: how the fanout spreads the load."""
        with self._lock:
            return list(zip(self.pids, self._stats, self._sup.restarts if self._sup else []))

    @property
    def pids(self) -> list[int | None]:
        return self._sup.pids if self._sup is not None else []

    def stop(self, timeout: float = 5.0) -> None:
        self._closing.set()
        if self._poller is not None:
            self._poller.join(timeout)
        if self._sup is not None:
            self._sup.stop(timeout)
