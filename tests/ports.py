"""Loopback ports for the servers tests start, chosen where nothing else will take them.

A port the kernel picks (bind to port 0, then close) lies in the ephemeral
range, and between that check and the server's own bind any outgoing
connection on the machine (a health check, a Redis client, a /status request,
another test's) may take it as its source port: the server then exits
"Address already in use". Ports below (or above) the ephemeral range are never
given out as source ports, so a port free now stays free for the server.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_given: set[int] = set()
"""Ports this process handed out: two servers of one test never get the same one."""


def ephemeral_ports() -> range:
    """The kernel's range of ports for outgoing connections' source ports."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    return range(lo, hi + 1)


def free_ports(n: int, host: str = "127.0.0.1", rng: random.Random | None = None) -> list[int]:
    """``n`` distinct ports on ``host``, free now for both TCP and UDP, outside the ephemeral range."""
    eph = ephemeral_ports()
    pool = range(10000, eph.start) if eph.start > 11000 else range(eph.stop, 65536)
    rng = rng or random.Random()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    out: list[int] = []
    while len(out) < n:
        port = rng.choice(pool)
        if port in out or port in _given:
            continue
        try:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(family, kind) as s:
                    s.bind((host, port))
        except OSError:
            continue
        out.append(port)
    _given.update(out)
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """One port on ``host`` free for both TCP and UDP (see :func:`free_ports`)."""
    return free_ports(1, host)[0]
