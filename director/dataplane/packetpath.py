"""The director's packet path as one object: neighbours, VIP ownership, the engine and its plans.

:class:`PacketPath` is what the control plane (director/control/main.py)
sees of the packet path: ``start``, ``stop``, ``apply`` (the decisions
changed: send a new plan, coalesced), ``set_owned`` (VIP ownership on or
off) and the counters. Inside it:

* **Neighbours** (director/dataplane/neighbours.py): every real server's
  MAC, or its next hop's, looked up at start, once a second, and soon after
  a plan names a server whose MAC is unknown. A changed MAC is a new plan.
* **VIP ownership** (:class:`VipOwnership`): whether this director answers
  for its VIPs. On: the engine answers ARP/ND for them and announces them
  (gratuitous ARP, unsolicited NA), the kernel guard keeps the director's
  own kernel off their traffic, the solicited-node groups are joined. Off:
  none of that, and nothing is forwarded (the engine gets the plan without
  VIPs; flows, counters and scheduler state stay for when it comes back).
  An active/standby pair switches it at run time.
* **The engine** (director/dataplane/engine.py) in worker processes, and
  plan coalescing: however many decisions one event-loop iteration makes,
  one plan is built and sent.

The plan itself is the control plane's (``build(mac, neighbours, mtu)``,
``forwarder.build_plan`` over the health table); the Linux side comes in
:class:`Adapters` so tests can replace it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from director.control.site import ServerCounters, VipCounters
from director.dataplane.forwarder import Plan
from glb.aio import cancel_and_wait
from glb.errors import DirectorError

log = logging.getLogger("glb.director")

PlanBuilder = Callable[[bytes, Mapping[bytes, "bytes | None"], int], Plan]
"""(director MAC, real server address -> next-hop MAC, link MTU) -> the plan."""


def _linux_adapters() -> Adapters:
    # Imported here: a control-plane-only director (on lo) never loads pyroute2 or the engine.
    from director.dataplane.engine import Engine
    from director.dataplane.neighbours import Neighbours
    from director.dataplane.ownership import KernelGuard, NatGuard, SolicitedNodeGroups, vips_on_kernel

    return Adapters(Neighbours, vips_on_kernel, KernelGuard, SolicitedNodeGroups, Engine, NatGuard)


@dataclass(frozen=True)
class Adapters:
    """The packet path's Linux side: factories taking the interface (the engine: its EngineConfig)."""

    neighbours: Callable[[str], Any]
    vips_on_kernel: Callable[[Iterable[bytes]], list[str]]
    guard: Callable[[str], Any]
    groups: Callable[[str], Any]
    engine: Callable[[Any], Any]
    nat_guard: Callable[[], Any] | None = None
    """ownership.NatGuard (None: no NAT guard, e.g. tests' fakes)."""


def real_addresses(plan: Plan) -> list[bytes]:
    """Every address the plan may send to (servers, sorry servers, spill targets), once each, in plan order."""
    return list(dict.fromkeys(s.address for svc in plan.services for s in svc.all_servers()))


def nat_sources(plan: Plan) -> frozenset[tuple[int, bytes, int]]:
    """(protocol, address, port) the NAT real servers answer from: what the NAT guard drops in the kernel."""
    from director.modes import MODES

    out = set()
    for svc in plan.services:
        if not MODES[svc.forwarding].two_way:
            continue
        for s in (*svc.servers, *((svc.sorry,) if svc.sorry is not None else ())):
            for v in svc.vips:
                out.add((v.proto, s.address, s.key.port or v.port))
    return frozenset(out)


def without_vips(plan: Plan) -> Plan:
    """The plan with no VIP: the engine answers and forwards nothing, and keeps every flow and counter.

    The VIPs stay as ``parked_vips``: a standby's connection sync places flows by them."""
    return dataclasses.replace(plan, services=tuple(dataclasses.replace(s, vips=(), parked_vips=s.vips)
                                                    for s in plan.services))


class VipOwnership:
    """Whether this director owns its VIPs now; switchable at run time.

    ``guard`` (ownership.KernelGuard) and ``groups``
    (ownership.SolicitedNodeGroups) follow the VIPs while owned and are
    cleared while not; :meth:`engine_plan` is the plan the engine must
    forward by (announcements follow from it: the engine announces a VIP
    when it appears in its plan).
    """

    def __init__(self, guard, groups, owned: bool = True) -> None:
        self.guard = guard
        self.groups = groups
        self.owned = owned
        self._vips: frozenset[bytes] = frozenset()

    def follow(self, vips: Iterable[bytes]) -> None:
        """The site's VIPs are now ``vips``. Raises the guard's error when it cannot be installed."""
        self._vips = frozenset(vips)
        if self.owned:
            try:
                self.guard.install(self._vips)
            finally:  # solicitations for the VIPs must reach the engine even without the guard
                self.groups.update(self._vips)

    def set(self, owned: bool) -> None:
        """Take (True) or release (False) the VIPs."""
        if owned == self.owned:
            return
        self.owned = owned
        if owned:
            self.follow(self._vips)
        else:
            self.guard.remove()
            self.groups.update(())

    def engine_plan(self, plan: Plan) -> Plan:
        return plan if self.owned else without_vips(plan)

    def close(self) -> None:
        self.guard.remove()
        self.groups.close()


class PacketPath:
    """The userspace packet path on one interface. Use from one event loop."""

    def __init__(self, interface: str, engine_config, build: PlanBuilder, *, owned: bool = True,
                 adapters: Adapters | None = None) -> None:
        self.interface = interface
        self.engine_config = engine_config
        self._build = build
        self._adapters = adapters
        self._owned = owned
        self.engine = None
        self.ownership: VipOwnership | None = None
        self._neighbours = None
        self._nat_guard = None
        self._netlink: concurrent.futures.ThreadPoolExecutor | None = None
        self._macs: dict[bytes, bytes | None] = {}
        self._resolving: asyncio.Task | None = None
        self._resolved_at = 0.0
        self._mtu = 1500
        self._plan: Plan | None = None
        self._plan_pending = False
        self._housekeeping: asyncio.Task | None = None
        self._counters: dict = {}
        self._vip_counters: dict[str, VipCounters] = {}
        self._rates_at: tuple[float, dict] | None = None

    # -- lifecycle

    async def start(self) -> None:
        """Open the interface and start forwarding; DirectorError for what stops a director from starting."""
        from director.dataplane.engine import EngineError
        from director.dataplane.ownership import GuardError

        adapters = self._adapters or _linux_adapters()
        iface = self.interface
        # pyroute2's synchronous API runs its own event loop: keep it on one thread of its own.
        self._netlink = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="glb-netlink")
        loop = asyncio.get_running_loop()
        try:
            lan = getattr(self.engine_config, "lan_interface", None)
            args = (iface,) if not lan or lan == iface else (iface, lan)
            self._neighbours = await loop.run_in_executor(self._netlink, adapters.neighbours, *args)
        except LookupError as e:
            key, name = ("director.lan.interface", args[1]) if repr(args[-1]) in str(e) and len(args) > 1 \
                else ("director.interface", iface)
            raise DirectorError(f"{key} {name!r}: no such interface") from None
        self._mtu = await loop.run_in_executor(self._netlink, self._neighbours.mtu)
        plan = self._build(await loop.run_in_executor(self._netlink, self._neighbours.mac), self._macs, self._mtu)
        on_kernel = await loop.run_in_executor(self._netlink, adapters.vips_on_kernel, plan.vips)
        if on_kernel:
            raise DirectorError(f"VIPs must not be configured on the director's interfaces "
                                f"(the kernel would answer for them): {', '.join(on_kernel)}")
        self.ownership = VipOwnership(adapters.guard(iface), adapters.groups(iface), self._owned)
        try:
            self.ownership.follow(plan.vips)
        except GuardError as e:
            raise DirectorError(f"cannot keep the kernel off VIP traffic: {e}") from None
        if adapters.nat_guard is not None:
            self._nat_guard = adapters.nat_guard()
            try:
                self._nat_guard.install(nat_sources(plan))
            except GuardError as e:
                raise DirectorError(f"cannot keep the kernel off NAT replies: {e}") from None
        self._macs = await loop.run_in_executor(self._netlink, self._resolve, plan)
        plan = self._build(plan.mac, self._macs, self._mtu)
        engine = adapters.engine(self.engine_config)
        try:
            await loop.run_in_executor(None, engine.start, self.ownership.engine_plan(plan))
        except EngineError as e:
            raise DirectorError(f"packet engine on {iface}: {e}") from None
        self.engine, self._plan = engine, plan
        self._housekeeping = asyncio.create_task(self._packet_housekeeping())
        if engine.maps_note:  # how the kernel data plane is attached, what became of its pinned maps
            log.info("kernel data plane: %s", engine.maps_note)
        if engine.dataplane_note:  # dataplane: auto, and the kernel's program could not run here
            log.warning("kernel data plane unavailable, the userspace engine forwards every packet: %s",
                        engine.dataplane_note)
        log.info("packet path on %s (MAC %s, pids %s, established flows forwarded in %s): %d VIPs%s", iface,
                 plan.mac.hex(":"), engine.pids, engine.dataplane, len(plan.vips),
                 "" if self.ownership.owned else " (not owned: standing by)")

    async def stop(self) -> None:
        await cancel_and_wait(t for t in (self._housekeeping, self._resolving) if t is not None)
        self._housekeeping = self._resolving = None
        if self.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)
            self.engine = None
        if self.ownership is not None:
            self.ownership.close()
            self.ownership = None
        if self._nat_guard is not None:
            self._nat_guard.remove()
            self._nat_guard = None
        if self._neighbours is not None:
            await asyncio.get_running_loop().run_in_executor(self._netlink, self._neighbours.close)
            self._neighbours = None
        if self._netlink is not None:
            self._netlink.shutdown(wait=False)
            self._netlink = None

    # -- control

    def apply(self) -> None:
        """The decisions changed. Coalesced: however many this loop iteration, one plan is built and sent."""
        if self.engine is None or self._plan_pending:
            return
        self._plan_pending = True
        asyncio.get_running_loop().call_soon(self._send_plan)

    def announce_again(self) -> None:
        """Announce the owned VIPs again, as when they were taken (another pair member took them for a
        moment: the LAN's caches may point at it)."""
        if self.engine is not None and self.owned:
            self.engine.announce_again()

    def arm_spill(self, service: str, at: float | None) -> None:
        """``service``'s new connections spill from ``at`` (``time.monotonic``; None: when its plan says):
        the workers read it with their next new connection, before the plan is even built
        (director/dataplane/spillflags.py)."""
        if self.engine is not None:
            self.engine.arm_spill(service, at)

    @property
    def owned(self) -> bool:
        return self.ownership.owned if self.ownership is not None else self._owned

    def set_owned(self, owned: bool) -> None:
        """Take (True) or release (False) the VIPs now; the engine gets the plan at once, not coalesced."""
        self._owned = owned
        if self.ownership is None or self.ownership.owned == owned:
            return
        try:
            self.ownership.set(owned)
        except Exception as e:  # forwarding matters more than the guard: go on without it, loudly
            log.error("could not install the nftables guard: %s", e)
        log.warning("VIP ownership %s: %d VIPs", "taken" if owned else "released", len(self._plan.vips))
        self.engine.update(self.ownership.engine_plan(self._plan))

    def _send_plan(self) -> None:
        self._plan_pending = False
        if self.engine is None:
            return
        plan = self._build(self._plan.mac, self._macs, self._mtu)
        if plan != self._plan:
            if plan.vips != self._plan.vips:
                try:
                    self.ownership.follow(plan.vips)
                except Exception as e:
                    log.error("could not update the nftables guard: %s", e)
            if self._nat_guard is not None:
                try:
                    self._nat_guard.install(nat_sources(plan))
                except Exception as e:
                    log.error("could not update the NAT guard: %s", e)
            self._plan = plan
            self.engine.update(self.ownership.engine_plan(plan))
        if any(s.available and s.mac is None for svc in plan.services for s in svc.all_servers()):
            self._resolve_soon()

    # -- neighbours

    def _resolve(self, plan: Plan | None = None) -> dict[bytes, bytes | None]:
        assert self._neighbours is not None
        return self._neighbours.resolve(real_addresses(plan or self._plan))

    def _resolve_soon(self) -> None:
        """A server may take flows but its MAC is unknown (just added, or just
        up): look now rather than at the next tick, at most every 100 ms."""
        if self._resolving is not None and not self._resolving.done():
            return
        delay = max(0.0, self._resolved_at + 0.1 - time.monotonic())
        self._resolving = asyncio.get_running_loop().create_task(self._refresh_neighbours(delay))

    async def _refresh_neighbours(self, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        if self._netlink is None or self._neighbours is None:
            return
        self._resolved_at = time.monotonic()
        try:
            macs = await asyncio.get_running_loop().run_in_executor(self._netlink, self._resolve)
        except Exception as e:
            log.warning("neighbour refresh failed: %s", e)
            return
        if macs != self._macs:
            lost = [a for a, m in self._macs.items() if m and not macs.get(a)]
            if lost:
                log.warning("lost the MAC of %d real server(s); they are unreachable", len(lost))
            self._macs = macs
            self.apply()

    async def _packet_housekeeping(self) -> None:
        """Once a second: refresh neighbours (a changed MAC means a new plan), derive rates."""
        reported_failure = False
        while True:
            await asyncio.sleep(1.0)
            await self._refresh_neighbours()
            self._update_counters()
            if self.engine is not None and self.engine.failed and not reported_failure:
                reported_failure = True
                log.error("%s: the packet path is down", self.engine.failed)

    # -- counters

    def counters(self) -> Mapping:
        """ServerKey -> ServerCounters, as of the last second."""
        return self._counters

    def vip_counters(self) -> Mapping[str, VipCounters]:
        return self._vip_counters

    def stats(self):
        """The engine's merged EngineStats, or None before start."""
        return self.engine.stats() if self.engine is not None else None

    def worker_stats(self) -> list:
        return self.engine.worker_stats() if self.engine is not None else []

    def plan_state(self) -> tuple[int, int, dict[str, bytes | None]]:
        """(plan generation sent, generation every worker applied, address -> next-hop MAC)."""
        if self.engine is None:
            return 0, 0, {}
        hops = {str(ipaddress.ip_address(a)): m for a, m in self._macs.items()}
        return self.engine.generation, self.engine.applied, hops

    def _update_counters(self) -> None:
        if self.engine is None:
            return
        stats = self.engine.stats().forwarder
        now = time.monotonic()
        prev_at, prev = self._rates_at or (now, {})
        dt = now - prev_at
        counters = {}
        for key, (active, inactive, packets, octets, conns) in stats.servers.items():
            p = prev.get(key)
            if p is not None and dt > 0:
                rates = ((conns - p[4]) / dt, (packets - p[2]) / dt, (octets - p[3]) / dt)
            else:
                rates = (0.0, 0.0, 0.0)
            counters[key] = ServerCounters(active, inactive, *(max(0.0, r) for r in rates), packets, octets,
                                           *stats.outbound.get(key, (0, 0)))
        self._rates_at = (now, dict(stats.servers))
        self._counters = counters
        self._vip_counters = {label: VipCounters(*v) for label, v in stats.vips.items()}
