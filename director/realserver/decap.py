"""Userspace IP-in-IP decapsulator for a real server in TUN mode.

When the kernel has no ``ipip``/``ip6_tunnel`` module (this machine, many
minimal kernels), a real server behind a TUN-mode director still has to turn
the director's tunnelled packets back into the client's packets. This
process does it:

* raw sockets receive every packet of IP protocol 4 (IPv4 inside) and 41
  (IPv6 inside) addressed to this host, over IPv4 and IPv6 (``AF_INET``
  raw sockets include the outer header, ``AF_INET6`` ones start at the
  inner packet). The kernel has already validated and reassembled the
  outer packet; because a raw socket took it, it sends no ICMP "protocol
  unreachable";
* ``decapsulate.decapsulate`` (pure, director/realserver/decapsulate.py) checks the inner packet: version matching the
  outer protocol number, sane header and lengths, IPv4 header checksum,
  destination one of the configured VIPs (otherwise the host would forward
  anything someone tunnels to it), no nested tunnel. It returns where the
  inner packet lies in the buffer, or why it is dropped;
* the inner packet is written into a TUN device (``IFF_TUN | IFF_NO_PI |
  IFF_VNET_HDR``) that holds the VIPs, so the kernel receives it as if it
  had arrived on that interface: the local socket bound to the VIP gets it
  and its reply leaves through the normal route, straight to the client;
* a TCP/UDP checksum that is still *partial* (only the pseudo-header sum,
  as veth/virtio hand over packets whose checksum offload never ran, and as
  GRO leaves aggregated packets) is marked ``VIRTIO_NET_HDR_F_NEEDS_CSUM``
  in the virtio_net_hdr so the kernel accepts it instead of dropping it.

Every packet is counted (``received``, ``delivered``, one ``dropped_*``
counter per reason, and ``socket_overflow``: packets the kernel dropped
because the decapsulator fell behind); nothing in a packet can raise. SIGTERM/SIGINT stop the
loop cleanly; SIGHUP writes the counters to the log and the stats file.

Run by ``glb realserver setup --mode tun`` (as a daemon, or in the
foreground with ``--foreground``), or directly::

    python -m director.realserver.decap --tun glbtun0 --vip 192.0.2.10 [--vip ...] \
        [--stats-file FILE] [--ready-fd N]

The TUN device must already exist (setup creates it persistent, with the
VIPs on it); the decapsulator only attaches to it.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from glb.errors import RealServerError

from director.realserver.decapsulate import (
    DROP_BAD_HEADER,
    DROP_TUN_ERROR,
    IPPROTO_IPIP,
    IPPROTO_IPV6,
    REASONS,
    VNET_NONE,
    decapsulate,
    packed_vips,
)

log = logging.getLogger("glb.decap")

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_FLAGS = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR

MAX_PACKET = 65535 + 60  # a reassembled outer packet plus an outer IPv4 header with options
BATCH = 64  # packets read from one socket before polling again (fairness between sockets)


def open_tun(name: str) -> int:
    """Attach to the existing TUN device ``name`` (never create one) and return its fd."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        raise RealServerError(f"TUN device {name} does not exist: run 'glb realserver setup --mode tun' first") from None
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise RealServerError(f"cannot open /dev/net/tun: {e.strerror} (is the tun module available?)") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), TUN_FLAGS))
    except OSError as e:
        os.close(fd)
        hint = " (is it a TUN device, and not held by another decapsulator?)" if e.errno in (errno.EINVAL, errno.EBUSY) else ""
        raise RealServerError(f"cannot attach to TUN device {name}: {e.strerror}{hint}") from None
    os.set_blocking(fd, False)
    return fd


class Decapsulator:
    """The long-lived loop: raw sockets in, TUN device out, counters kept.

    ``open()`` acquires everything (and raises RealServerError with a clear
    line if it cannot); ``run()`` loops until ``stop()`` or SIGTERM/SIGINT
    (when ``install_signals``), then ``close()``.
    """

    # (socket family, protocol) pairs opened, if the address family is available.
    SOCKETS = (
        (socket.AF_INET, IPPROTO_IPIP),
        (socket.AF_INET6, IPPROTO_IPV6),
        (socket.AF_INET, IPPROTO_IPV6),
        (socket.AF_INET6, IPPROTO_IPIP),
    )

    def __init__(self, tun: str, vips: Iterable[str], *, stats_file: Path | None = None, stats_interval: float = 1.0):
        self.tun = tun
        self.vips = sorted(set(vips))
        self.vips4, self.vips6 = packed_vips(self.vips)
        if not self.vips4 and not self.vips6:
            raise RealServerError("the decapsulator needs at least one --vip")
        self.stats_file = stats_file
        self.stats_interval = stats_interval
        self.counters = {"received": 0, "delivered": 0, "checksum_completed": 0, "tun_discarded": 0,
                         "socket_overflow": 0}
        self.counters.update({f"dropped_{r}": 0 for r in REASONS.values()})
        self.started = time.time()
        self._tun_fd: int | None = None
        self._socks: list[tuple[socket.socket, bool, int]] = []
        self._sel: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._running = False
        self._stop = False
        self._dump = False
        self._buf = bytearray(MAX_PACKET)

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> None:
        try:
            self._tun_fd = open_tun(self.tun)
            for family, proto in self.SOCKETS:
                inner_v4 = proto == IPPROTO_IPIP
                if (inner_v4 and not self.vips4) or (not inner_v4 and not self.vips6):
                    continue
                try:
                    s = socket.socket(family, socket.SOCK_RAW, proto)
                except PermissionError:
                    raise RealServerError("the decapsulator needs root (CAP_NET_RAW) to open raw IP sockets") from None
                except OSError as e:
                    if e.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
                        log.info("no %s raw socket for protocol %d (%s); skipped", family.name, proto, e.strerror)
                        continue
                    raise RealServerError(f"cannot open a raw socket for IP protocol {proto}: {e.strerror}") from None
                self._tune(s)
                s.setblocking(False)
                self._socks.append((s, family == socket.AF_INET, proto))
            if not self._socks:
                raise RealServerError("the decapsulator could not open any raw socket")
            self._sel = selectors.DefaultSelector()
            for i, (s, _, _) in enumerate(self._socks):
                self._sel.register(s, selectors.EVENT_READ, i)
            self._sel.register(self._tun_fd, selectors.EVENT_READ, "tun")
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        except BaseException:
            self.close()
            raise
        log.info("decapsulating into %s for %s (%d raw sockets)", self.tun, ", ".join(self.vips), len(self._socks))

    @staticmethod
    def _tune(s: socket.socket) -> None:
        for opt in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
                return
            except OSError:
                continue

    def close(self) -> None:
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        for s, _, _ in self._socks:
            s.close()
        self._socks = []
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._wake_r = self._wake_w = None
        if self._tun_fd is not None:
            os.close(self._tun_fd)
            self._tun_fd = None

    def stop(self) -> None:
        """Ask run() to return, even before it started (safe from a signal handler or another thread)."""
        self._stop = True
        self._wake()

    def request_dump(self) -> None:
        """Ask run() to log and write the counters now (what SIGHUP does)."""
        self._dump = True
        self._wake()

    def _wake(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGHUP:
            self._dump = True
        else:
            log.info("signal %s: stopping", signal.Signals(signum).name)
            self._stop = True

    # -- the loop ----------------------------------------------------------

    def run(self, *, install_signals: bool = True) -> int:
        """Loop until stop() or (with ``install_signals``) SIGTERM/SIGINT; returns 0.

        Without ``install_signals`` the caller owns the signals and calls
        stop() / request_dump() from its handlers.
        """
        if self._sel is None:
            self.open()
        old = {}
        old_wakeup = None
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                old[sig] = signal.signal(sig, self._on_signal)
            old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self._running = True
        self.write_stats()
        next_stats = time.monotonic() + self.stats_interval
        try:
            while not self._stop:
                for key, _ in self._sel.select(timeout=self.stats_interval):
                    tag = key.data
                    if tag == "wake":
                        self._drain_wake()
                    elif tag == "tun":
                        self._drain_tun()
                    else:
                        self._receive(*self._socks[tag])
                now = time.monotonic()
                if now >= next_stats or self._dump:
                    if self._dump:
                        self._dump = False
                        log.info("counters: %s", json.dumps(self.counters, sort_keys=True))
                    self.write_stats()
                    next_stats = now + self.stats_interval
        finally:
            if install_signals:
                signal.set_wakeup_fd(old_wakeup if old_wakeup is not None else -1)
                for sig, handler in old.items():
                    signal.signal(sig, handler)
            self._running = False
            self.write_stats(final=True)
            log.info("stopped; counters: %s", json.dumps(self.counters, sort_keys=True))
        return 0

    def _receive(self, s: socket.socket, outer_header: bool, proto: int) -> None:
        buf = self._buf
        mv = memoryview(buf)
        recv_into = s.recv_into
        tun = self._tun_fd
        writev = os.writev
        vips4, vips6 = self.vips4, self.vips6
        c = self.counters
        received = delivered = fixed = 0
        none = VNET_NONE
        drops = [0] * (len(REASONS) + 1)
        try:
            for _ in range(BATCH):
                try:
                    n = recv_into(buf)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:  # e.g. ENOBUFS; never fatal
                    log.debug("raw socket receive error: %s", e)
                    break
                received += 1
                try:
                    reason, start, end, vnet = decapsulate(buf, n, outer_header, proto, vips4, vips6)
                except Exception:  # defensive: decapsulate is total, but a bug must not stop the server
                    log.exception("decapsulate failed on a %d-byte packet", n)
                    drops[DROP_BAD_HEADER] += 1
                    continue
                if reason:
                    drops[reason] += 1
                    continue
                try:
                    writev(tun, (vnet, mv[start:end]))
                except OSError as e:
                    drops[DROP_TUN_ERROR] += 1
                    log.debug("TUN write failed: %s", e)
                    continue
                delivered += 1
                if vnet is not none:
                    fixed += 1
        finally:
            c["received"] += received
            c["delivered"] += delivered
            c["checksum_completed"] += fixed
            for code, name in REASONS.items():
                if drops[code]:
                    c[f"dropped_{name}"] += drops[code]

    def _drain_tun(self) -> None:
        """Discard what the kernel sends out through the TUN device (IPv6 router solicitations, MLD...)."""
        for _ in range(BATCH):
            try:
                os.read(self._tun_fd, MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.counters["tun_discarded"] += 1

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(512):
                pass
        except (BlockingIOError, InterruptedError, OSError):
            pass

    # -- reporting ---------------------------------------------------------

    def _socket_overflow(self) -> int:
        """Packets the kernel dropped because a raw socket's buffer was full (we were too slow): /proc/net/raw*."""
        inodes = set()
        for sock, _, _ in self._socks:
            try:
                inodes.add(os.fstat(sock.fileno()).st_ino)
            except OSError:
                continue
        total = 0
        for table in ("/proc/net/raw", "/proc/net/raw6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                f = line.split()
                # ... uid timeout inode ref pointer drops: the inode is the 4th field from the end
                if len(f) >= 5 and f[-4].isdigit() and int(f[-4]) in inodes and f[-1].isdigit():
                    total += int(f[-1])
        return total

    def stats(self) -> dict:
        if self._socks:
            self.counters["socket_overflow"] = self._socket_overflow()
        return {
            "pid": os.getpid(),
            "tun": self.tun,
            "vips": self.vips,
            "started": self.started,
            "updated": time.time(),
            "running": self._running,
            "counters": dict(self.counters),
        }

    def write_stats(self, final: bool = False) -> None:
        if self.stats_file is None:
            return
        doc = self.stats()
        if final:
            doc["running"] = False
        tmp = self.stats_file.with_name(f".{self.stats_file.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(doc, sort_keys=True) + "\n")
            os.replace(tmp, self.stats_file)
        except OSError as e:
            log.warning("cannot write stats file %s: %s", self.stats_file, e)


def read_stats(path: Path) -> dict | None:
    """The last counters a decapsulator wrote to ``path`` (None if absent or unreadable)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m director.realserver.decap", description="GLB userspace IP-in-IP decapsulator (real server, TUN mode)")
    p.add_argument("--tun", required=True, help="existing TUN device holding the VIPs")
    p.add_argument("--vip", action="append", required=True, help="a VIP (repeat); inner packets to other addresses are dropped")
    p.add_argument("--stats-file", type=Path, help="JSON counters, rewritten every second and at exit")
    p.add_argument("--ready-fd", type=int, help="write 'ready' (or 'error: ...') to this fd once started, then close it")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")

    def report(text: str) -> None:
        if args.ready_fd is not None:
            try:
                os.write(args.ready_fd, text.encode() + b"\n")
                os.close(args.ready_fd)
            except OSError:
                pass

    try:
        d = Decapsulator(args.tun, args.vip, stats_file=args.stats_file)
        d.open()
    except RealServerError as e:
        report(f"error: {e}")
        print(f"glb decap: error: {e}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until run() installs its handlers
    report("ready")
    try:
        return d.run()
    finally:
        d.close()


if __name__ == "__main__":
    sys.exit(main())
