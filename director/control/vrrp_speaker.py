"""The VRRP driver: feeds a channel's packets and the clock to a :class:`~director.control.vrrp.Router`, carries out its actions.

This is the whole of the I/O around the pure core: wait for a packet or the
router's timer, hand it over with ``now``, send what it says to send, call
``on_state`` on each state change (where the director will switch VIP
ownership on and off), log each drop reason once. Cancelling :meth:`Speaker.run`
is a clean stop: a master sends priority 0 on the way out so its backup takes
over after Skew_Time instead of the master-down interval.

Also a small standalone runner, used by the keepalived interop tests and
handy on a lab LAN::

    python -m director.control.vrrp_speaker --interface eth0 --address 10.0.0.2 \\
        --vrid 51 --priority 100 --vip 10.0.0.100 [--interval 0.1] [--no-preempt] \\
        [--preempt-delay 5] [--peer 10.0.0.3] [--status-file st.json]

SIGTERM or SIGINT stops it cleanly. ``--status-file`` is rewritten (atomically)
whenever the state or a drop counter changes: ``{"state", "master", "counters"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from typing import Callable

from director.control.datagram import Channel
from director.control.vrrp import (
    CancelTimer, LogDrop, Reclaim, Router, RouterConfig, SetTimer, State, StateChange, Transmit,
)
from glb.errors import GLBError

log = logging.getLogger("glb.director.vrrp")


class Speaker:
    """Runs one :class:`Router` over one channel until cancelled."""

    def __init__(self, router: Router, channel: Channel, *, clock: Callable[[], float] = time.monotonic,
                 on_state: Callable[[State, str], None] | None = None,
                 on_change: Callable[[Speaker], None] | None = None,
                 on_reclaim: Callable[[], None] | None = None,
                 ready: Callable[[], bool] = lambda: True) -> None:
        self.router = router
        self.channel = channel
        self.clock = clock
        self.on_state = on_state
        """Called with (new state, reason) on every transition."""
        self.on_change = on_change
        """Called when the state, the master followed or a drop counter changed (status writers)."""
        self.on_reclaim = on_reclaim
        self.ready = ready
        """Whether this member could serve now (the router's ``ready``: no preemption before)."""
        """Called when the VIPs must be announced again (vrrp.Reclaim: another member took them for a moment)."""
        self._shown: tuple | None = None

    def counters(self) -> Counter:
        """The router's and the channel's counters together."""
        return self.router.counters + self.channel.counters

    async def run(self) -> None:
        router, channel = self.router, self.channel
        self._apply(router.startup(self.clock()))
        self._changed()
        receiving: asyncio.Task | None = None
        try:
            while True:
                # One recv task lives across timer wake-ups: nothing is cancelled mid-read.
                receiving = receiving or asyncio.ensure_future(channel.recv())
                timeout = None if router.timer is None else max(0.0, router.timer - self.clock())
                done, _ = await asyncio.wait({receiving}, timeout=timeout)
                if done:
                    pkt, receiving = receiving.result(), None
                    self._apply(router.receive(pkt, self.clock(), self.ready()))
                self._apply(router.on_timer(self.clock()))
                self._changed()
        finally:
            if receiving:
                receiving.cancel()
            self._apply(router.shutdown(self.clock()))
            self._changed()

    def _changed(self) -> None:
        """Call ``on_change`` if what a status shows moved (not on every advertisement counted)."""
        drops = {k: v for k, v in self.counters().items() if k not in ("rx", "tx")}
        shown = (self.router.state, self.router.master, tuple(sorted(drops.items())))
        if shown != self._shown:
            self._shown = shown
            if self.on_change:
                self.on_change(self)

    def _apply(self, actions) -> None:
        for action in actions:
            if isinstance(action, Transmit):
                self.channel.send(action.dst, action.payload)
            elif isinstance(action, StateChange):
                log.info("VRRP vrid %d: %s (%s)", self.router.config.vrid, action.state.value, action.reason)
                if self.on_state:
                    self.on_state(action.state, action.reason)
            elif isinstance(action, Reclaim):
                log.warning("VRRP vrid %d: %s advertised priority %d as master (ours is %d): announcing the VIPs "
                            "again", self.router.config.vrid, action.src, action.priority,
                            self.router.config.priority)
                if self.on_reclaim:
                    self.on_reclaim()
            elif isinstance(action, LogDrop):
                verb = "dropped" if action.dropped else "accepted"
                log.warning("VRRP vrid %d: %s packet from %s: %s (logged once per reason; counted in %r)",
                            self.router.config.vrid, verb, action.src, action.detail, action.reason)
            elif not isinstance(action, (SetTimer, CancelTimer)):  # the timer is router.timer, read each turn
                raise TypeError(f"unknown VRRP action {action!r}")

    def status(self) -> dict:
        return {
            "state": self.router.state.value,
            "master": str(self.router.master) if self.router.master else None,
            "counters": dict(self.counters()),
        }


def _write_status(path: str) -> Callable[[Speaker], None]:
    def write(speaker: Speaker) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(speaker.status(), f)
        os.replace(tmp, path)
    return write


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m director.control.vrrp_speaker", description="A standalone VRRPv3 speaker.")
    addr = ipaddress.ip_address
    p.add_argument("--interface", required=True)
    p.add_argument("--address", required=True, type=addr, help="this host's address on the LAN (IPv6: link-local)")
    p.add_argument("--vrid", required=True, type=int)
    p.add_argument("--priority", required=True, type=int)
    p.add_argument("--vip", action="append", type=addr, default=[], help="a virtual address (repeat)")
    p.add_argument("--interval", type=float, default=0.1, help="advertisement interval, seconds (default 0.1)")
    p.add_argument("--no-preempt", action="store_true")
    p.add_argument("--preempt-delay", type=float, default=0.0)
    p.add_argument("--peer", action="append", type=addr, default=[], help="a unicast peer (repeat); default multicast")
    p.add_argument("--status-file")
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    from director.control.vrrp_socket import RawChannel

    try:
        cfg = RouterConfig(vrid=args.vrid, priority=args.priority, address=args.address, addresses=tuple(args.vip),
                           advert_interval=round(args.interval * 100), preempt=not args.no_preempt,
                           preempt_delay=args.preempt_delay, peers=tuple(args.peer))
    except ValueError as e:
        raise GLBError(f"vrrp_speaker: {e}") from None
    speaker = Speaker(Router(cfg), RawChannel(args.interface, args.address),
                      on_change=_write_status(args.status_file) if args.status_file else None)
    task = asyncio.ensure_future(speaker.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass
    finally:
        speaker.channel.close()
        if args.status_file:
            _write_status(args.status_file)(speaker)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve(_parse(argv)))
    except GLBError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
