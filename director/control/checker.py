"""The health checker: runs every real server's probe on its own schedule.

One asyncio task per real server sleeps a random start offset (the check's
``start_jitter``, so a restart does not fire every probe in the same
millisecond), then probes every ``interval`` seconds on a fixed cadence. A
semaphore of ``max_probes`` bounds the probes in flight, so a site with
thousands of servers cannot exhaust sockets or file descriptors; a probe that
waited for the semaphore simply runs late, and missed ticks are skipped
rather than fired in a burst.

Results go to a callback (the director feeds them to the pure
``director.control.health.HealthTable``). The checker knows nothing about states: it
only schedules, bounds and reports. A probe that misbehaves (raises, or
ignores its own timeout) is reported as a failure; it never stops the loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from director.control.health import ServerKey, server_keys
from director.control.probes import Probe, ProbeResult
from glb.aio import cancel_and_wait
from glb.config import HealthCheck, Site

log = logging.getLogger("glb.director.checker")

BACKSTOP = 1.0
"""Seconds past a check's timeout after which the checker abandons a probe
that did not enforce its own timeout (a bug, never a server's doing)."""


@dataclass(frozen=True, slots=True)
class Target:
    """What to probe for one real server."""

    key: ServerKey
    address: str
    port: int
    """Port probed: the check's port, else the real server's, else the first VIP's."""
    check: HealthCheck


def targets(site: Site) -> list[Target]:
    """Every real server of ``site`` with the address, port and check to probe."""
    out = []
    for svc in site.services:
        vip_port = svc.vips[0].port if svc.vips else 0
        for rs, key in zip(svc.real_servers, server_keys(svc)):
            port = svc.health_check.port or rs.port or vip_port
            out.append(Target(key, str(rs.address), port, svc.health_check))
    return out


OnResult = Callable[[Target, ProbeResult], None]


class Checker:
    """Schedules probes for a changing set of targets. Use from one event loop."""

    def __init__(
        self,
        probe: Probe,
        on_result: OnResult,
        max_probes: int,
        *,
        rng: Callable[[], float] = random.random,
    ):
        self._probe = probe
        self._on_result = on_result
        self._sem = asyncio.Semaphore(max_probes)
        self._max_probes = max_probes
        self._rng = rng
        self._tasks: dict[ServerKey, tuple[Target, asyncio.Task[None]]] = {}
        self.in_flight = 0
        self.probes_run = 0

    @property
    def max_probes(self) -> int:
        return self._max_probes

    def targets(self) -> list[Target]:
        return [t for t, _ in self._tasks.values()]

    def update(self, new: Iterable[Target]) -> None:
        """Probe exactly ``new`` from now on.

        Targets whose check did not change keep their task and cadence (a
        reload must not reset timing or burst probes); changed ones restart
        with a fresh start jitter; removed ones are cancelled.
        """
        wanted = {t.key: t for t in new}
        for key in list(self._tasks):
            target, task = self._tasks[key]
            if wanted.get(key) != target:
                task.cancel()
                del self._tasks[key]
        for key, target in wanted.items():
            if key not in self._tasks:
                task = asyncio.create_task(self._loop(target), name=f"probe {key}")
                self._tasks[key] = (target, task)

    async def stop(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        await cancel_and_wait(tasks)

    async def _loop(self, target: Target) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self._rng() * target.check.start_jitter)
        due = loop.time()
        while True:
            result = await self._run_one(target)
            try:
                self._on_result(target, result)
            except Exception:  # a consumer bug must not silence this server's checks
                log.exception("health result handler failed for %s", target.key)
            due += target.check.interval
            now = loop.time()
            if due < now:
                due = now  # late (slow probe or full semaphore): skip, do not burst
            await asyncio.sleep(due - now)

    async def _run_one(self, target: Target) -> ProbeResult:
        async with self._sem:
            self.in_flight += 1
            try:
                return await asyncio.wait_for(
                    self._probe(target.check, target.address, target.port),
                    target.check.timeout + BACKSTOP,
                )
            except asyncio.TimeoutError:
                return ProbeResult(False, f"probe overran its timeout ({target.check.timeout:g}s)", target.check.timeout)
            except Exception as e:  # noqa: BLE001 - a probe bug is a failed check, not a dead loop
                log.exception("probe for %s raised", target.key)
                return ProbeResult(False, f"probe error: {type(e).__name__}", 0.0)
            finally:
                self.in_flight -= 1
                self.probes_run += 1
