"""Benchmark helper for benchmarks/dns_scale.sh: dnsfront with many sites and names.

    python benchmarks/dns_scale.py config SITES NAMES REDIS_URL DNS_PORT STATUS_PORT [--quiet] > glb.yaml
    python benchmarks/dns_scale.py load PATH [RUNS]           seconds to load and check a config
    python benchmarks/dns_scale.py heartbeat REDIS_URL SITES  publish every site once a second, spread
                                                              over the second (until SIGTERM)
    python benchmarks/dns_scale.py publish REDIS_URL SITES    publish every site once
    python benchmarks/dns_scale.py change REDIS_URL DNS_PORT SITES NAMES [RUNS]
                                                              seconds from a site's publish to the answer

The config: each site has one director and one service ``web`` with one
VIP; each name is ``weighted`` over 8 members picked at random (seeded, so
a size always gives the same config) among the sites. A random pick, rather
than a window of consecutive sites, gives every name its own member set:
nothing a rebuild could share between names that a real deployment would
not have. ``--quiet`` gives the same names and answers with staleness and
heartbeat intervals so long that nothing changes without heartbeats: the
"no heartbeats" side of the comparison.
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import struct
import sys
import time

MEMBERS = 8
TTL = 30
DEGRADED_TTL = 5


def site_name(i: int) -> str:
    return f"s{i:03d}"


def site_vip(i: int) -> str:
    return f"10.{100 + i // 250}.{i % 250}.1"


def members_of(sites: int, names: int, seed: int = 18) -> list[list[int]]:
    """The member sites (indices) of every name."""
    rng = random.Random(seed)
    k = min(MEMBERS, sites)
    return [rng.sample(range(sites), k) for _ in range(names)]


def config_text(sites: int, names: int, redis_url: str, dns_port: int, status_port: int, quiet: bool = False) -> str:
    stale_after, heartbeat = (86400.0, 3600.0) if quiet else (3.0, 1.0)
    out = [
        f'redis: {{url: "{redis_url}", stale_after: {stale_after}}}',
        "dnsfront:",
        f'  listen: ["127.0.0.1:{dns_port}"]',
        f"  status_listen: 127.0.0.1:{status_port}",
        "zones:",
        "  - apex: example.net",
        "    soa: {mname: ns1.example.net, rname: hostmaster@example.net}",
        "    ns: [{name: ns1.example.net, addresses: [192.0.2.53]}]",
        "names:",
    ]
    for n, members in enumerate(members_of(sites, names)):
        out.append(f"  n{n}.example.net:")
        out.append(f"    service: web\n    ttl: {TTL}\n    degraded_ttl: {DEGRADED_TTL}")
        out.append("    members: [" + ", ".join(f"{{site: {site_name(i)}, weight: 100}}" for i in members) + "]")
    out.append("sites:")
    for i in range(sites):
        out.append(f"  {site_name(i)}:")
        out.append(f"    director: {{interface: eth0, heartbeat: {heartbeat}}}")
        out.append(f'    services: [{{name: web, vips: ["{site_vip(i)}:80/tcp"], real_servers: [10.250.0.1]}}]')
    return "\n".join(out) + "\n"


def snapshot(i: int, up: bool = True):
    from glb.state import ServiceState, SiteSnapshot

    return SiteSnapshot(site_name(i), f"bench-{i}", time.time(), (ServiceState("web", (f"{site_vip(i)}:80/tcp",), 1.0, up),))


def store(url: str):
    from glb.config import RedisConfig
    from glb.store import RedisStore

    return RedisStore(RedisConfig(url=url))


async def heartbeat(url: str, sites: int) -> None:
    """Each site once a second, site i at i/sites into the second: as independent directors."""
    st = store(url)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    start = time.monotonic()
    k = 0
    try:
        while not stop.is_set():
            await st.publish(snapshot(k % sites))
            k += 1
            delay = start + k / sites - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
    finally:
        await st.close()


async def publish(url: str, sites: int) -> None:
    st = store(url)
    try:
        for i in range(sites):
            await st.publish(snapshot(i))
    finally:
        await st.close()


def query(name: str, ident: int) -> bytes:
    wire = b"".join(bytes((len(p),)) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + wire + struct.pack("!HH", 1, 1)


def answer_ttl(data: bytes, qlen: int) -> int | None:
    """TTL of the first answer record (the question is ``qlen`` bytes), None if none."""
    if struct.unpack_from("!H", data, 6)[0] == 0:
        return None
    return struct.unpack_from("!I", data, 12 + qlen + 2 + 4)[0]


async def change(url: str, port: int, sites: int, names: int, runs: int) -> None:
    """Per run: a site's service goes down; seconds until a name it serves answers
    with the degraded TTL. Then it comes back (the heartbeat publisher would
    put it back within a second anyway). Timed right after the site's own
    heartbeat, so no heartbeat lands in the middle."""
    st = store(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(1.0)
    members = members_of(sites, names)
    rng = random.Random(7)
    out = []
    try:
        for run in range(runs):
            i = rng.randrange(sites)
            n = max(k for k, m in enumerate(members) if i in m)  # the last name that has it
            q = query(f"n{n}.example.net", run)
            qlen = len(q) - 12
            last = (await st.load_site(site_name(i))).version
            while (await st.load_site(site_name(i))).version == last:
                await asyncio.sleep(0.005)
            t0 = time.perf_counter()
            await st.publish(snapshot(i, up=False))
            while True:
                sock.send(q)
                ttl = answer_ttl(sock.recv(4096), qlen)
                if ttl == DEGRADED_TTL:
                    break
                if time.perf_counter() - t0 > 5:
                    raise SystemExit(f"site {site_name(i)} down: n{n} still answers TTL {ttl} after 5 s")
            out.append(time.perf_counter() - t0)
            await st.publish(snapshot(i))
            await asyncio.sleep(0.3)
    finally:
        sock.close()
        await st.close()
    print(" ".join(f"{x * 1000:.1f}" for x in out))


def load(path: str, runs: int) -> None:
    from glb import config as configmod

    times = []
    for _ in range(runs):
        t = time.perf_counter()
        configmod.load(path)
        times.append(time.perf_counter() - t)
    print(" ".join(f"{x:.2f}" for x in times))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "config":
        s, n, url, dport, sport = args[:5]
        sys.stdout.write(config_text(int(s), int(n), url, int(dport), int(sport), "--quiet" in args))
    elif cmd == "load":
        load(args[0], int(args[1]) if len(args) > 1 else 3)
    elif cmd == "heartbeat":
        asyncio.run(heartbeat(args[0], int(args[1])))
    elif cmd == "publish":
        asyncio.run(publish(args[0], int(args[1])))
    elif cmd == "change":
        asyncio.run(change(args[0], int(args[1]), int(args[2]), int(args[3]), int(args[4]) if len(args) > 4 else 5))
    else:
        raise SystemExit(f"unknown command {cmd!r}")
