"""Small Linux helpers for the lab: `ip` commands, entering a namespace, PIDs.

Nothing here keeps state; :mod:`deploy.lab.lab` decides what to create and
records it. Every command targets a namespace by name; nothing is done in the
root namespace except creating and deleting the lab's own namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

IP = shutil.which("ip") or "/usr/sbin/ip"
ETHTOOL = shutil.which("ethtool") or "/usr/sbin/ethtool"
NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class LabError(Exception):
    """A lab operation failed; the message is one line for the operator."""


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip [-n NS] ARGS``; LabError with ip's own message on failure."""
    argv = [IP, *(("-n", ns) if ns else ()), *map(str, args)]
    res = subprocess.run(argv, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(argv[1:])}: {res.stderr.strip() or res.stdout.strip()}")
    return res


def ip_batch(ns: str, commands: Sequence[str]) -> None:
    """Run many ``ip`` commands in one process inside ``ns`` (``ip -n NS -batch -``)."""
    if not commands:
        return
    res = subprocess.run([IP, "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n", capture_output=True, text=True)
    if res.returncode != 0:
        raise LabError(f"[{ns}] ip -batch: {res.stderr.strip()}")


def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside ``ns``. ``ip netns exec`` execs, so a child's PID is the command's own."""
    return [IP, "netns", "exec", ns, *map(str, argv)]


def namespaces(prefix: str) -> list[str]:
    """Names of the existing namespaces that start with ``prefix``."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def add_namespace(name: str) -> None:
    ip("netns", "add", name)


def delete_namespace(name: str) -> None:
    if (NETNS_DIR / name).exists():
        ip("netns", "del", name, check=False)


def namespace_pids(name: str) -> list[int]:
    res = subprocess.run([IP, "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body with this thread inside namespace ``name``.

    Sockets created in the body live in that namespace for good, /proc/sys/net
    is the namespace's, and children started in the body inherit it. The
    thread always returns to where it was, even on an exception.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_DIR / name, os.O_RDONLY)
    except FileNotFoundError:
        os.close(home)
        raise LabError(f"no network namespace {name!r} (is the lab up?)") from None
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise LabError(f"setns: {os.strerror(err)}")


def sysctl(name: str, key: str, value: str | int) -> None:
    """Write a sysctl inside namespace ``name`` (``key`` dotted, e.g. ``net.ipv4.ip_forward``)."""
    with entered(name):
        Path("/proc/sys", *key.split(".")).write_text(f"{value}\n")


def tx_offload_off(name: str, ifnames: Sequence[str]) -> None:
    """veth hands packets over with partial checksums; make them complete."""
    if not Path(ETHTOOL).exists():
        return
    with entered(name):
        for ifname in ifnames:
            subprocess.run([ETHTOOL, "-K", ifname, "tx", "off"], capture_output=True)


# -- processes ---------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on now on this host's loopback (the root namespace's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None if it is gone: with the PID it names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def is_running(pid: int, started: int | None) -> bool:
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def signal_pid(pid: int, started: int | None, sig: int) -> bool:
    """Send ``sig`` to ``pid`` only if it is still the process that was started then."""
    if not is_running(pid, started):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def reap(pid: int) -> None:
    """Collect ``pid`` if it is our child (a no-op otherwise)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_pids(pids: Sequence[tuple[int, int | None]], timeout: float = 5.0) -> None:
    """SIGTERM each (pid, start time), wait up to ``timeout``, then SIGKILL what is left."""
    left = [p for p in pids if signal_pid(p[0], p[1], signal.SIGTERM)]
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for pid, _ in left:
            reap(pid)
        left = [p for p in left if is_running(*p)]
        if left:
            time.sleep(0.02)
    for pid, started in left:
        signal_pid(pid, started, signal.SIGKILL)
    deadline = time.monotonic() + 3
    while left and time.monotonic() < deadline:
        for pid, _ in left:
            reap(pid)
        left = [p for p in left if is_running(*p)]
        if left:
            time.sleep(0.02)
