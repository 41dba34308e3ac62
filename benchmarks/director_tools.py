"""Traffic tools the director benchmark runs inside its namespaces.

    python benchmarks/director_tools.py blast IFACE DST_MAC SRC VIP PORT SECONDS [FLOWS]
        small UDP frames (64 bytes on the wire) as fast as one core sends them,
        FLOWS source ports; prints frames sent.
    python benchmarks/director_tools.py sink PORT          TCP sink; prints bytes/s of the busiest 5 s
    python benchmarks/director_tools.py stream VIP PORT SECONDS    TCP sender
    python benchmarks/director_tools.py echo PORT          UDP echo (replies from the address asked)
    python benchmarks/director_tools.py ping VIP PORT COUNT INTERVAL   UDP RTTs; prints p50/p90/p99 in us
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import struct
import sys
import time


def blast(iface: str, dst_mac: str, src: str, vip: str, port: int, seconds: float, flows: int = 1024) -> None:
    from director.dataplane.codec import internet_checksum
    from director.dataplane.engine import Sender, _address

    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    s.bind((iface, 0))
    s.setsockopt(263, 20, 1)  # PACKET_QDISC_BYPASS
    my_mac = bytes.fromhex(open(f"/sys/class/net/{iface}/address").read().strip().replace(":", ""))
    eth = bytes.fromhex(dst_mac.replace(":", "")) + my_mac + b"\x08\x00"
    size = 60  # + FCS = 64 on a wire
    buf = mmap.mmap(-1, flows * 64)
    for i in range(flows):
        payload = b"x" * (size - 14 - 28)
        udp = struct.pack("!HHHH", 10000 + i, port, 8 + len(payload), 0) + payload
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i, 0, 64, 17, 0,
                                   socket.inet_aton(src), socket.inet_aton(vip)))
        struct.pack_into("!H", ip, 10, internet_checksum(ip))
        buf[i * 64:i * 64 + size] = eth + bytes(ip) + udp
    base = _address(buf)
    tx = Sender(s.fileno())
    tx.batch = 64
    end = time.monotonic() + seconds
    sent = 0
    addrs = [base + i * 64 for i in range(flows)]
    while time.monotonic() < end:
        for a in addrs:
            tx.frame(a, size)
        tx.flush()
        sent += flows
    t = os.times()
    print(json.dumps({"sent": tx.sent, "errors": tx.errors, "cpu": t.user + t.system}))


def sink(port: int) -> None:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(4)
    print("ready", flush=True)
    c, _ = ls.accept()
    buf = bytearray(1 << 20)
    total = 0
    start = time.monotonic()
    while True:
        n = c.recv_into(buf)
        if not n:
            break
        total += n
    dt = time.monotonic() - start
    print(json.dumps({"bytes": total, "seconds": dt, "gbit": total * 8 / dt / 1e9}), flush=True)


def stream(vip: str, port: int, seconds: float) -> None:
    c = socket.create_connection((vip, port), timeout=10)
    data = b"\0" * (1 << 20)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        c.sendall(data)
    c.close()


def echo(port: int) -> None:
    socks = []
    for fam, addr in ((socket.AF_INET, "0.0.0.0"),):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IP, 8, 1)  # IP_PKTINFO: reply from the address asked (the VIP)
        s.bind((addr, port))
        socks.append(s)
    print("ready", flush=True)
    s = socks[0]
    while True:
        data, anc, _, peer = s.recvmsg(2048, 256)
        out = []
        for level, kind, value in anc:
            if kind == 8 and len(value) >= 12:  # in_pktinfo: reply from the address asked, any interface
                out.append((level, kind, bytes(4) + value[8:12] + bytes(4)))
        s.sendmsg([data], out, 0, peer)


def ping(vip: str, port: int, count: int, interval: float) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((vip, port))
    s.settimeout(0.2)
    rtts = []
    for i in range(count):
        t0 = time.perf_counter_ns()
        s.send(i.to_bytes(4, "big"))
        try:
            while int.from_bytes(s.recv(64)[:4], "big") != i:
                pass
            rtts.append((time.perf_counter_ns() - t0) / 1000)
        except socket.timeout:
            if i - len(rtts) > 50:
                break  # the path is broken: report what we have
        time.sleep(interval)
    rtts.sort()
    q = lambda p: rtts[min(len(rtts) - 1, int(p * len(rtts)))] if rtts else None  # noqa: E731
    print(json.dumps({"n": len(rtts), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "blast":
        blast(args[0], args[1], args[2], args[3], int(args[4]), float(args[5]), *(int(x) for x in args[6:]))
    elif cmd == "sink":
        sink(int(args[0]))
    elif cmd == "stream":
        stream(args[0], int(args[1]), float(args[2]))
    elif cmd == "echo":
        echo(int(args[0]))
    elif cmd == "ping":
        ping(args[0], int(args[1]), int(args[2]), float(args[3]))
