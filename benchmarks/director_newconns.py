"""New connections per second through the userspace scheduler, installed into the kernel's table (issue 12).

    python benchmarks/director_newconns.py [CONNECTIONS] [SCHEDULER] [SERVERS] [NETMASK]

What one engine worker does for each new TCP connection with the kernel data
plane: ``Forwarder.forward`` on the SYN (the scheduler picks a server, the
table tracks the flow) and on the handshake's ACK (the flow is confirmed and
queued for the kernel), and the engine's flush of the queued flows into
``conns`` before a batch of frames goes out (``BATCH`` connections a
batch, one ``BPF_MAP_UPDATE_BATCH``). Frames are prebuilt; no sockets, so
this is the worker's CPU per connection, not the ring's. CPU time of this
thread (user + system: the map writes are syscalls), best of 5 rounds of
CONNECTIONS (default 20,000) new clients; SCHEDULER (default wlc) over
SERVERS (default 3) DR servers; with NETMASK, the service has persistence
(``-p 300 -M /NETMASK``): the clients are consecutive addresses, so /32
makes a template per connection and /24 reuses one for 256 of them.
Prints one line per variant:

* ``userspace``: no kernel data plane (the forwarder alone);
* ``kernel, batched``: flows written as the engine writes them;
* ``kernel, one by one``: a flush per connection (one update syscall each);
* ``kernel schedules``: with SCHEDULER mh, sh or dh the tc program itself
  schedules the SYN, installs the flow and applies the ACK's state change:
  the program's own run time (``BPF_PROG_TEST_RUN``'s duration) of both,
  best of 5 rounds; no Python per connection on the packet path; then the
  median (10th-90th percentile) ns per SYN (``new_flow``) and per ACK
  (``state_tracked``) over the 5 rounds. Where the
  program has flow events (director/dataplane/flowevents.py) the ring is
  drained every EVENTS_EVERY connections, as the worker drains it, and a
  second line gives the worker's CPU to take the records into its table
  (``KernelSync.events``: what Python now spends per kernel-made
  connection, off the packet path).

The kernel variants need root (the tc program is loaded, not attached).
"""

from __future__ import annotations

import ipaddress
import statistics
import struct
import sys
import time

from director.control.health import ServerKey
from director.dataplane.forwarder import Forwarder, Plan, ServerPlan, ServicePlan, VipPlan

BATCH = 64
EVENTS_EVERY = 256
"""Connections between two drains of the kernel's flow events (its ring holds ~13,000)."""
DIR_MAC = bytes.fromhex("020000000001")
CLIENT_MAC = bytes.fromhex("020000000002")
VIP = ipaddress.ip_address("10.0.0.100").packed


def tcp_frame(client: bytes, sport: int, flags: int) -> bytes:
    """Ethernet + IPv4 + TCP to VIP:80 (the forwarder reads no checksum of what it forwards)."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, 6, 0, client, VIP)
    tcp = struct.pack("!HHIIBBHHH", sport, 80, 1, 0, 5 << 4, flags, 65535, 0, 0)
    return DIR_MAC + CLIENT_MAC + b"\x08\x00" + ip + tcp


def plan(scheduler: str, servers: int, netmask: int | None = None) -> Plan:
    rs = tuple(ServerPlan(ServerKey("web", f"10.0.1.{i + 1}", 0), bytes([10, 0, 1, i + 1]), 1, True, False,
                          bytes([2, 0, 0, 0, 1, i + 1])) for i in range(servers))
    vips = (VipPlan(VIP, 80, 6, "10.0.0.100:80/tcp"),)
    persistence = None if netmask is None else (300.0, netmask, 128)
    return Plan(DIR_MAC, (ServicePlan("web", "dr", scheduler, vips, rs, persistence=persistence),), None, None)


def frames(n: int, round_: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        client = struct.pack("!I", 0x0B000000 + round_ * n + i)  # 11.x.x.x: new clients every round
        out.append((tcp_frame(client, 40000 + i % 20000, 0x02), tcp_frame(client, 40000 + i % 20000, 0x10)))
    return out


def one_round(n: int, round_: int, scheduler: str, servers: int, kernel: str | None,
              netmask: int | None = None) -> float:
    from director.dataplane.kernel import KernelSync, KernelTables

    f = Forwarder()
    f.apply(plan(scheduler, servers, netmask))
    bpf = sync = None
    if kernel is not None:
        from director.dataplane import kernelmaps as km
        from director.dataplane.libbpf import LibBpf

        bpf = LibBpf(max_entries={"conns": 2 * n}, sizes=km.MAPS)
        sync = KernelSync(KernelTables(bpf, f.table.timeouts))
        f.kernel = f.table.outside = sync
        sync.plan_applied(f.vips, f)
    batch = 1 if kernel == "one" else BATCH
    work = [(memoryview(bytearray(s)), memoryview(bytearray(a))) for s, a in frames(n, round_)]
    now = time.monotonic()
    forward = f.forward
    try:
        t0 = time.thread_time()
        for i, (syn, ack) in enumerate(work):
            forward(syn, now)
            forward(ack, now)
            if sync is not None and (i + 1) % batch == 0:
                sync.flush()
        if sync is not None:
            sync.flush()
        cpu = time.thread_time() - t0
        if sync is not None:
            assert len(sync.tables.flows()) == n, "every connection installed"
        else:
            assert len(f.table) == n
        return cpu
    finally:
        if bpf is not None:
            bpf.close()


def kernel_round(n: int, round_: int, scheduler: str, servers: int,
                 per_packet: tuple[list[int], list[int]], netmask: int | None = None) -> tuple[float, float | None]:
    """Seconds the tc program ran to open ``n`` connections itself (SYN + ACK each), and the worker's CPU
    seconds to take their flow events (None: a program without them). Each SYN's and ACK's ns are appended
    to ``per_packet``'s two lists."""
    from director.dataplane import kernelmaps as km
    from director.dataplane.kernel import KernelSync, KernelTables
    from director.dataplane.libbpf import LibBpf

    f = Forwarder()
    f.apply(plan(scheduler, servers, netmask))
    bpf = LibBpf(max_entries={"conns": 2 * n}, sizes=km.MAPS)
    events = None
    try:
        sync = KernelSync(KernelTables(bpf, f.table.timeouts))
        sync.plan_applied(f.vips, f)
        if "flow_events" in km.MAPS:
            from director.dataplane.flowevents import FlowEvents

            events = FlowEvents(bpf.map_fd("flow_events"))
        ns, taking = 0, 0.0
        for i, (syn, ack) in enumerate(frames(n, round_)):
            for frame, out in zip((syn, ack), per_packet):
                rc, _ = bpf.test_run(bytes(6) + frame[6:])  # to the test device's zero MAC: this host's
                assert rc == km.TC_ACT_REDIRECT, "the program forwards what it scheduled"
                ns += bpf.last_duration
                out.append(bpf.last_duration)
            if events is not None and ((i + 1) % EVENTS_EVERY == 0 or i + 1 == n):
                t0 = time.thread_time()
                sync.events(events.drain(), time.monotonic(), f.take)
                taking += time.thread_time() - t0
        assert sync.tables.reasons()["new_flow"] == n
        if events is None:
            return ns / 1e9, None
        assert sync.tables.events_lost() == 0 and events.received == 2 * n and len(f.table) == n
        return ns / 1e9, taking
    finally:
        if events is not None:
            events.close()
        bpf.close()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    scheduler = sys.argv[2] if len(sys.argv) > 2 else "wlc"
    servers = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    netmask = int(sys.argv[4]) if len(sys.argv) > 4 else None
    if netmask is not None:
        scheduler_label = f"{scheduler} -p /{netmask}"
    else:
        scheduler_label = scheduler
    for label, kernel in (("userspace", None), ("kernel, batched", "batched"), ("kernel, one by one", "one")):
        try:
            best = min(one_round(n, r, scheduler, servers, kernel, netmask) for r in range(5))
        except Exception as e:  # no root or no BPF: say so, keep the other lines
            print(f"{label:20s} unavailable: {e}")
            continue
        print(f"{label:20s} {scheduler_label} over {servers}: {n / best:>9,.0f} new connections/s of one core "
              f"({best / n * 1e6:.1f} us each: SYN + ACK through forward()" +
              (", install" if kernel else "") + ")")
    if scheduler in ("mh", "sh", "dh"):
        try:
            per_packet: tuple[list[int], list[int]] = ([], [])
            rounds = [kernel_round(n, r, scheduler, servers, per_packet, netmask) for r in range(5)]
        except Exception as e:
            print(f"{'kernel schedules':20s} unavailable: {e}")
            return
        best = min(b for b, _ in rounds)
        print(f"{'kernel schedules':20s} {scheduler_label} over {servers}: {n / best:>9,.0f} new connections/s of one core "
              f"({best / n * 1e6:.2f} us each: SYN + ACK in the tc program, no Python)")
        cells = []
        for name, ns in zip(("SYN (new_flow)", "ACK (state_tracked)"), per_packet):
            q = statistics.quantiles(ns, n=10)
            cells.append(f"{name} {statistics.median(ns):.0f} ns ({q[0]:.0f}-{q[-1]:.0f})")
        print(f"{'kernel per packet':20s} " + ", ".join(cells))
        if rounds[0][1] is not None:
            took = min(t for _, t in rounds)
            print(f"{'flow events taken':20s} {scheduler_label} over {servers}: {n / took:>9,.0f} connections/s of the "
                  f"worker ({took / n * 1e6:.2f} us each: 2 records into the table, off the packet path)")


if __name__ == "__main__":
    main()
