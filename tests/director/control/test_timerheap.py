"""director.control.timerheap: many timers behind one loop timer."""

from __future__ import annotations

import asyncio

from director.control.timerheap import TimerHeap


async def test_entries_fire_in_time_order_and_cancelled_ones_never():
    loop = asyncio.get_running_loop()
    timers = TimerHeap(loop)
    fired: list[str] = []
    now = loop.time()
    timers.call_at(now + 0.03, fired.append, "c")
    timers.call_at(now + 0.01, fired.append, "a")
    dropped = timers.call_at(now + 0.02, fired.append, "x")
    timers.call_at(now + 0.02, fired.append, "b")
    TimerHeap.cancel(dropped)
    done = loop.create_future()
    timers.call_at(now + 0.04, done.set_result, None)
    await done
    assert fired == ["a", "b", "c"]
    assert len(timers) == 0
    timers.close()


async def test_an_entry_added_for_now_by_a_callback_runs_on_a_later_turn():
    loop = asyncio.get_running_loop()
    timers = TimerHeap(loop)
    order: list[str] = []
    done = loop.create_future()

    def first(_):
        order.append("first")
        timers.call_at(loop.time(), lambda _: (order.append("again"), done.set_result(None)), None)
        loop.call_soon(order.append, "other callbacks")

    timers.call_at(loop.time(), first, None)
    await done
    assert order == ["first", "other callbacks", "again"]
    timers.close()


async def test_a_failing_callback_does_not_strand_the_others():
    loop = asyncio.get_running_loop()
    timers = TimerHeap(loop)
    done = loop.create_future()
    timers.call_at(loop.time(), lambda _: 1 / 0, None)
    timers.call_at(loop.time(), done.set_result, "ran")
    assert await done == "ran"
    timers.close()
