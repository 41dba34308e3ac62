"""What response rate limiting costs per UDP query, through dnsfront's real
UDP loop (``DNSServer._on_udp``: recvfrom, the engine's fast path, sendto).

    .venv/bin/python benchmarks/rrl_cost.py [--rounds N] [--batch K] [--edns]

Each round queues K copies of a query for the weighted name app.example.net
(two live sites) on the server's socket, then times, in CPU seconds of this
process, the server draining them: once with RRL off, once with RRL on at a
rate no client here reaches (every answer goes through its bucket, none is
limited), in alternation. The client side (sending the queries, reading the
answers) is outside the timed part. CPU time and the median of many rounds
keep the figure steady on a machine busy with other work, where dnsperf's
qps is not.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import sys
import time
from pathlib import Path

import dns.message

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glb import config as configmod  # noqa: E402
from glb.config import RRLConfig  # noqa: E402
from glb.state import DeploymentState, ServiceState, SiteSnapshot  # noqa: E402

from dnsfront.answers import Engine  # noqa: E402
from dnsfront.rrl import RateLimiter  # noqa: E402
from dnsfront.server import DNSServer  # noqa: E402

from benchmarks.dns_config import two_sites  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--edns", action="store_true", help="queries with an OPT record")
    args = ap.parse_args()

    config = configmod.loads(two_sites(), source="rrl_cost")
    now = time.time()
    state = DeploymentState.build(tuple(SiteSnapshot(s, f"{s}-d", now, (ServiceState("web", (v,), 1.0, True),))
                                        for s, v in (("dc1", "192.0.2.10:80/tcp"), ("dc2", "192.0.2.20:80/tcp"))))
    engine = Engine(config, rng=random.Random(1))
    engine.update(state, now)
    limiter = RateLimiter(RRLConfig(enabled=True, responses_per_second=10**9))
    server = DNSServer(config.dnsfront, engine.handle)

    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (srv, cli):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        s.bind(("127.0.0.1", 0))
    srv.setblocking(False)
    cli.setblocking(False)
    query = dns.message.make_query("app.example.net", "A", use_edns=0 if args.edns else None).to_wire()
    target = srv.getsockname()

    def round_(on: bool) -> float:
        engine.limit = limiter.check if on else None
        server.limiter = limiter if on else None
        for _ in range(args.batch):
            cli.sendto(query, target)
        t0 = time.process_time()
        for _ in range(args.batch // 256 + 2):
            server._on_udp(srv)
        spent = time.process_time() - t0
        got = 0
        while True:
            try:
                cli.recv(2048)
                got += 1
            except BlockingIOError:
                break
        if got != args.batch:
            raise SystemExit(f"rrl_cost: {got}/{args.batch} answers came back (socket buffers too small?)")
        return spent / args.batch

    off, on = [], []
    for _ in range(5):  # warm up both
        round_(False)
        round_(True)
    for _ in range(args.rounds):
        off.append(round_(False))
        on.append(round_(True))
    if limiter.counters.limited:
        raise SystemExit("rrl_cost: some answers were limited; the rate is meant to be out of reach")
    m_off, m_on = statistics.median(off), statistics.median(on)
    q_off, q_on = statistics.quantiles(off, n=4), statistics.quantiles(on, n=4)
    print(f"query: app.example.net A{' +EDNS' if args.edns else ''}; {args.rounds} rounds x {args.batch} queries each way")
    print(f"RRL off: {m_off * 1e6:.2f} us/query (quartiles {q_off[0] * 1e6:.2f}-{q_off[2] * 1e6:.2f})")
    print(f"RRL on:  {m_on * 1e6:.2f} us/query (quartiles {q_on[0] * 1e6:.2f}-{q_on[2] * 1e6:.2f})")
    print(f"cost: {100 * (m_on / m_off - 1):.1f} % CPU per query (median of rounds)")


if __name__ == "__main__":
    main()
