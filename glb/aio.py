"""Small asyncio helpers shared by the long-running processes."""

from __future__ import annotations

import asyncio
from typing import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Task], retry: float = 0.2) -> None:
    """Cancel ``tasks`` and wait until every one has finished.

    Cancels again every ``retry`` seconds: on Python 3.11 a cancellation that
    lands while an ``asyncio.timeout`` block is expiring can be swallowed
    (redis-py's reads and our probes both use such blocks), and a single
    ``cancel()`` would then leave the caller waiting forever.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry)
