"""Helpers run inside test namespaces (``python -m tests.dnsfront.flood_tools``).

    flood SPOOFED_SRC DST NAME QPS SECONDS   spoofed-source UDP queries (raw socket, IP_HDRINCL)
    clients DST NAMES QPS SECONDS            a resolver's behaviour: ask, retry over TCP on TC, retry once

Each prints one JSON line with what it did.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import sys
import time

import dns.exception
import dns.message
import dns.query


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def flood(src: str, dst: str, name: str, qps: int, seconds: float) -> dict:
    """Queries for ``name`` (EDNS, 4096: ask for the largest answer) that claim to come from ``src``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    query = dns.message.make_query(name, "A", use_edns=0, payload=4096)
    sent = sent_bytes = 0
    start = time.monotonic()
    tick = 0.01
    while time.monotonic() - start < seconds:
        for _ in range(max(1, int(qps * tick))):
            query.id = random.getrandbits(16)
            payload = query.to_wire()
            sport = random.randint(1024, 65535)
            udp = struct.pack("!HHHH", sport, 53, 8 + len(payload), 0) + payload  # UDP checksum 0: none (IPv4)
            total = 20 + len(udp)
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, random.getrandbits(16), 0, 64, socket.IPPROTO_UDP, 0,
                             socket.inet_aton(src), socket.inet_aton(dst))
            ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
            sock.sendto(ip + udp, (dst, 0))
            sent += 1
            sent_bytes += len(payload)
        time.sleep(tick)
    return {"sent": sent, "dns_bytes": sent_bytes, "query_bytes": len(payload)}


def clients(dst: str, names: list[str], qps: int, seconds: float) -> dict:
    asked = answered = over_tcp = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        name = names[asked % len(names)]
        asked += 1
        q = dns.message.make_query(name, "A")
        for _attempt in range(2):  # a resolver retries once
            try:
                r, tcp = dns.query.udp_with_fallback(q, dst, timeout=1.0)
            except (dns.exception.Timeout, OSError):
                continue
            if r.answer:
                answered += 1
                over_tcp += bool(tcp)
            break
        time.sleep(max(0.0, start + asked / qps - time.monotonic()))
    return {"asked": asked, "answered": answered, "over_tcp": over_tcp}


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "flood":
        out = flood(args[0], args[1], args[2], int(args[3]), float(args[4]))
    else:
        out = clients(args[0], args[1].split(","), int(args[2]), float(args[3]))
    print(json.dumps(out), flush=True)
