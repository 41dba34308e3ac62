"""Benchmark helper: keep sites "live" in Redis by publishing a snapshot per
site every second, like a director's heartbeat. Stops on SIGTERM.

    python benchmarks/dns_state.py REDIS_URL SITE=VIP[,VIP] [SITE=VIP ...]
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time

from glb.config import RedisConfig
from glb.state import ServiceState, SiteSnapshot
from glb.store import RedisStore


async def main(url: str, specs: list[str]) -> None:
    store = RedisStore(RedisConfig(url=url))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    sites = [(s.split("=")[0], tuple(f"{v}:80/tcp" for v in s.split("=")[1].split(","))) for s in specs]
    try:
        while not stop.is_set():
            for name, vips in sites:
                snap = SiteSnapshot(name, f"bench-{name}", time.time(), (ServiceState("web", vips, 1.0, True),))
                await store.publish(snap)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
