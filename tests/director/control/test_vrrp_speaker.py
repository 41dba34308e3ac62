"""The VRRP speaker over the in-memory LAN: election, clean stop with priority 0, bad packets survived."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from director.control import vrrp_packet as wire
from director.control.datagram import MemoryLAN
from director.control.vrrp import Router, RouterConfig, State
from director.control.vrrp_speaker import Speaker
from tests.waiting import async_until as until

A = ipaddress.ip_address
VIPS = (A("10.0.0.100"),)


def speaker(lan: MemoryLAN, addr: str, priority: int, states: list) -> Speaker:
    cfg = RouterConfig(vrid=9, priority=priority, address=A(addr), addresses=VIPS, advert_interval=1)
    return Speaker(Router(cfg), lan.channel(A(addr)), on_state=lambda s, why: states.append((addr, s)))


async def test_two_speakers_elect_and_a_clean_stop_sends_priority_zero():
    lan, states = MemoryLAN(), []
    hi, lo = speaker(lan, "10.0.0.1", 200, states), speaker(lan, "10.0.0.2", 100, states)
    t_lo = asyncio.ensure_future(lo.run())
    t_hi = asyncio.ensure_future(hi.run())
    await until(lambda: hi.router.state is State.MASTER and lo.router.master == A("10.0.0.1"), "hi master, lo following")
    assert lo.router.state is State.BACKUP

    t_hi.cancel()
    await asyncio.gather(t_hi, return_exceptions=True)
    last_from_hi = [p for s, d, p in lan.sent if s == A("10.0.0.1")][-1]
    assert wire.decode(wire.Received(A("10.0.0.1"), wire.GROUP_V4, 255, last_from_hi)).priority == 0
    hi.channel.close()
    await until(lambda: lo.router.state is State.MASTER, "lo takes over")
    assert ("10.0.0.1", State.INITIALIZE) in states and states[-1] == ("10.0.0.2", State.MASTER)
    t_lo.cancel()
    await asyncio.gather(t_lo, return_exceptions=True)


async def test_bad_packets_are_counted_and_never_stop_the_speaker():
    lan, states, changes = MemoryLAN(), [], []
    sp = speaker(lan, "10.0.0.2", 100, states)
    sp.on_change = lambda s: changes.append(dict(s.counters()))
    task = asyncio.ensure_future(sp.run())
    good = wire.encode(wire.Advertisement(9, 200, 1, VIPS), A("10.0.0.1"), wire.GROUP_V4)
    for payload, ttl in ((good, 1), (b"\x31", 255), (good[:6] + b"\0\0" + good[8:], 255), (b"\xff" * 64, 255)):
        lan.deliver(A("10.0.0.1"), wire.GROUP_V4, payload, ttl)
    await until(lambda: sum(sp.counters()[k] for k in ("ttl", "length", "checksum", "version")) == 4, "4 drops")
    assert sp.counters()["ttl"] == sp.counters()["checksum"] == sp.counters()["version"] == 1
    assert changes and changes[-1]["length"] == 1
    lan.deliver(A("10.0.0.1"), wire.GROUP_V4, good)  # still alive and listening
    await until(lambda: sp.router.master == A("10.0.0.1"), "a good advertisement accepted")
    assert not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert sp.router.state is State.INITIALIZE


@pytest.mark.parametrize("args, line", [
    (["--vrid", "0"], "error: vrrp_speaker: vrid must be 1..255"),
    (["--interval", "50"], "error: vrrp_speaker: advert_interval must be 1..4095 centiseconds"),
    (["--interface", "glb-no-such-if"], "error: socket: VRRP socket on glb-no-such-if: no interface with this name"),
])
def test_runner_mistakes_are_one_line(args, line):
    base = {"--interface": "lo", "--address": "127.0.0.1", "--vrid": "9", "--priority": "100"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = [x for kv in base.items() for x in kv]
    r = subprocess.run([sys.executable, "-m", "director.control.vrrp_speaker", *argv], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[3], timeout=60)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [line]


async def test_a_master_hearing_a_lower_master_calls_on_reclaim():
    lan, states, reclaims = MemoryLAN(), [], []
    sp = speaker(lan, "10.0.0.1", 200, states)
    sp.on_reclaim = lambda: reclaims.append(sp.router.state)
    task = asyncio.ensure_future(sp.run())
    await until(lambda: sp.router.state is State.MASTER, "master")
    lower = wire.encode(wire.Advertisement(9, 100, 1, VIPS), A("10.0.0.2"), wire.GROUP_V4)
    lan.deliver(A("10.0.0.2"), wire.GROUP_V4, lower)  # a member that took over while our adverts were late
    await until(lambda: reclaims, "on_reclaim")
    assert reclaims == [State.MASTER]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
