"""Small asyncio helpers for tests."""

from __future__ import annotations

import asyncio


async def until(predicate, what: str, tries: int = 2000, step: float = 0.005) -> None:
    """Yield to the loop until ``predicate()`` holds; a safety net against a hang, not a measurement."""
    for _ in range(tries):
        if predicate():
            return
        await asyncio.sleep(step)
    raise AssertionError(f"never happened: {what}")
