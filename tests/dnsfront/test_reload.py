"""A reload reads and builds the new config off the event loop, then swaps."""

from __future__ import annotations

import asyncio
import threading

import dns.message

from glb import config as configmod

from dnsfront import main


async def test_reload_builds_in_a_thread_while_the_loop_keeps_answering(write_config, monkeypatch):
    path = write_config()
    worker = main.Worker(str(path), configmod.load(path))
    gate = threading.Event()
    real = main._prepare

    def slow(*args):
        assert threading.current_thread() is not threading.main_thread()
        gate.wait(10)
        return real(*args)

    monkeypatch.setattr(main, "_prepare", slow)
    old = worker.engine
    old.update(None, 0.0)
    query = dns.message.make_query("app.example.net", "A").to_wire()
    try:
        reload = asyncio.create_task(worker.reload())
        await asyncio.sleep(0.05)
        # The build is blocked in its thread; this loop still answers, from the old engine.
        assert not reload.done()
        assert worker.engine is old and old.handle(query, ("127.0.0.1", 5300)) is not None
        gate.set()
        assert await reload
        assert worker.engine is not old and worker.server.handler == worker.engine.handle
        assert worker.engine.handle(query, ("127.0.0.1", 5300)) is not None
    finally:
        gate.set()
        await worker.updater.stop()


async def test_reload_turns_rrl_on_and_keeps_its_counters(write_config):
    from tests.dnsfront.conftest import config_text

    path = write_config()
    worker = main.Worker(str(path), configmod.load(path))
    try:
        assert worker.server.limiter is None and worker.engine.limit is None
        path.write_text(config_text(dnsfront_extra="  rrl: {enabled: true, responses_per_second: 1, slip: 0}\n"))
        assert await worker.reload()
        lim = worker.server.limiter
        assert lim is not None and worker.engine.limit == lim.check  # the new engine limits UDP
        lim.tick(100.0)
        query = dns.message.make_query("mail.example.net", "A").to_wire()
        out = [worker.engine.handle(query, ("192.0.2.1", 5300), False) for _ in range(3)]
        assert [o is not None for o in out] == [True, False, False]
        path.write_text(config_text(dnsfront_extra="  rrl: {enabled: true, responses_per_second: 2, slip: 0}\n"))
        assert await worker.reload()
        assert worker.server.limiter is not lim and worker.engine.limit == worker.server.limiter.check
        assert worker.report()["counters"]["rrl_limited"] == 2  # carried over
    finally:
        await worker.updater.stop()
