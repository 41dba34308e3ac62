"""glb.supervisor: restart decisions with explicit time, and real worker processes."""

from __future__ import annotations

import os
import signal
import time

import pytest

from glb.errors import SupervisorError
from glb.supervisor import RestartBook, RestartPolicy, Supervisor

POLICY = RestartPolicy(backoff=0.1, backoff_max=1.0, stable_after=30.0, window=60.0, crash_limit=2)


def test_backoff_doubles_for_quick_deaths_and_starts_over_after_a_stable_run():
    book = RestartBook(POLICY, workers=2)
    book.started(0, 0.0)
    assert book.died(0, 1.0) == pytest.approx(1.1)
    book.started(0, 1.1)
    assert book.died(0, 2.0) == pytest.approx(2.2)
    book.started(0, 2.2)
    assert book.died(0, 3.0) == pytest.approx(3.4)
    book.started(0, 3.4)
    assert book.restarts == [3, 0]
    # Ran for 100 s: a new problem, the backoff starts over (and old deaths left the window).
    assert book.died(0, 103.4) == pytest.approx(103.5)


def test_backoff_is_capped():
    book = RestartBook(RestartPolicy(backoff=0.5, backoff_max=1.0, crash_limit=100), workers=1)
    delays = []
    for k in range(5):
        book.started(0, float(k * 10))
        delays.append(book.died(0, k * 10 + 1.0) - (k * 10 + 1.0))
    assert delays == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_a_crash_loop_gives_up_and_old_deaths_are_forgotten():
    book = RestartBook(POLICY, workers=2)  # limit: more than 2 x 2 deaths in 60 s
    for k in range(4):
        assert book.died(k % 2, float(k)) is not None
    assert book.died(0, 4.0) is None
    book = RestartBook(POLICY, workers=2)
    for k in range(4):
        book.died(0, float(k))
    assert book.died(1, 70.0) is not None  # the four are over a minute old


# ---- real processes ---------------------------------------------------------------


def echo_worker(index: int, fail: str, conn) -> None:
    """Handshake, then echo every message with the worker's index until SIGTERM."""
    if fail == "stubborn":  # ignores SIGTERM: only the stop deadline's SIGKILL ends it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        conn.send(("ready", os.getpid()))
        while True:
            time.sleep(1)
    if fail:
        conn.send(("error", fail))
        return
    running = True

    def term(*_):
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, term)
    conn.send(("ready", os.getpid()))
    while running:
        if conn.poll(0.05):
            conn.send(("echo", index, conn.recv()))


def until(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("serial", [False, True])
def test_workers_start_talk_restart_after_sigkill_and_stop(serial):
    got, ready, exits = [], [], []
    sup = Supervisor("t", echo_worker, lambda i: (i, ""), 2, serial=serial, policy=POLICY,
                     on_message=lambda i, m: got.append((i, m)), on_ready=lambda i, p: ready.append((i, p)),
                     on_exit=exits.append)
    sup.start()
    try:
        pids = sup.pids
        assert sorted(ready) == sorted(enumerate(pids))
        if serial:
            assert [i for i, _ in ready] == [0, 1]  # in index order, one at a time
        sup.broadcast("hi")
        until(lambda: (sup.poll(0.05), len(got) == 2)[1])
        assert sorted(got) == [(0, ("echo", 0, "hi")), (1, ("echo", 1, "hi"))]
        os.kill(pids[1], signal.SIGKILL)
        until(lambda: (sup.poll(0.05), sup.alive(1) and sup.pids[1] != pids[1])[1])
        assert exits == [1] and sup.restarts == [0, 1] and sup.pids[0] == pids[0]
        assert ready[-1] == (1, sup.pids[1])
        assert sup.send(1, "again")
        until(lambda: (sup.poll(0.05), got[-1] == (1, ("echo", 1, "again")))[1])
    finally:
        sup.stop(5.0)
    assert sup.pids == [None, None]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_worker_that_cannot_start_is_a_one_line_error():
    sup = Supervisor("t", echo_worker, lambda i: (i, "cannot open eth9: No such device" if i else ""), 2,
                     policy=POLICY)
    with pytest.raises(SupervisorError, match="^cannot open eth9: No such device$"):
        sup.start()
    assert sup.pids == [None, None]


def test_a_crash_loop_stops_the_restarts():
    sup = Supervisor("t", echo_worker, lambda i: (i, ""), 1,
                     policy=RestartPolicy(backoff=0.01, backoff_max=0.01, crash_limit=2))
    sup.start()
    try:
        for _ in range(3):
            pid = sup.pids[0]
            os.kill(pid, signal.SIGKILL)
            until(lambda: (sup.poll(0.05), sup.failed or (sup.alive(0) and sup.pids[0] != pid))[1])
        assert sup.failed and "keep dying" in sup.failed and sup.pids == [None]
    finally:
        sup.stop(5.0)


def test_a_worker_that_ignores_sigterm_is_killed_at_the_stop_deadline():
    sup = Supervisor("t", echo_worker, lambda i: (i, "stubborn"), 1, policy=POLICY)
    sup.start()
    pid = sup.pids[0]
    sup.stop(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
