"""Waiting for an event in tests: a bounded poll on the condition, never a fixed sleep.

A fixed sleep is too short on a loaded machine and wasted time on an idle one;
polling the condition the sleep stood for is neither.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

STEP = 0.005
"""Seconds between two looks at the condition: short, so a test waits little past the event."""


def until(predicate: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Return once ``predicate()`` is truthy; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(STEP)


async def async_until(predicate: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """:func:`until` for a coroutine: the event loop runs on while it waits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(STEP)
