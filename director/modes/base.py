"""The interface every forwarding mode implements (one module per mode, registered in director.modes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # the forwarder imports the registry; these are for annotations only
    from director.dataplane.bpf import Match
    from director.dataplane.forwarder import Plan, ServerPlan, ServicePlan
    from director.realserver.plan import Facts, Request
    from director.realserver.steps import Step


class Mode:
    """One forwarding mode: what the director and the real server do differently for it.

    The packet path asks a mode for one *transmit object* per real server
    (:meth:`transmit`), built when a plan is applied. Either it is an
    action itself (a :data:`~director.dataplane.actions.MacRewrite`: every
    packet to that server is sent the same way, which is what the C loop
    handles), or it has two methods the forwarder calls per packet:

    * ``fast(fwd, buf, start, total, family, route)``: the action for an
      established flow's packet read straight off the ring, or None to let
      ``slow`` decide (see ``Forwarder.fast``);
    * ``slow(fwd, frame, pkt, vnet, route)``: the action for a parsed
      packet (``Forwarder.forward``): any action, or None once the reason
      was counted in ``fwd.drops``.

    Both count the packet on ``route`` when they forward it.
    """

    name: ClassVar[str]
    """The config's ``forwarding`` value."""
    label: ClassVar[str]
    """ipvsadm's word for it (``glb director list``'s Forward column)."""
    realserver_facts: ClassVar[frozenset[str]] = frozenset()
    """What the real server's adapter must find out beyond the basics: ``kernel_tunnels``
    (probe the kernel's tunnel drivers), ``nft_table`` (a leftover MSS-clamp table)."""
    needs_vnet: ClassVar[bool]
    """The slow path reads each frame's virtio_net_hdr (checksum and GSO state)."""
    mac_rewrite: ClassVar[bool]
    """Its transmit objects are MacRewrite actions: established flows can take the engine's C loop."""
    holds_vips: ClassVar[bool] = True
    """The real server holds the VIPs (DR, TUN); NAT's does not (the director rewrites the destination)."""
    two_way: ClassVar[bool] = False
    """The real servers' packets come back through the director (NAT): flows are indexed by
    the real server's key too, follow IPVS's two-way TCP table, and the transmit object
    has ``reply(fwd, frame, pkt, vnet, conn)`` for them."""

    def transmit(self, server: ServerPlan, plan: Plan) -> Any:
        """How packets reach ``server`` under ``plan``; None = unreachable (no neighbour, no source)."""
        raise NotImplementedError

    def filter_matches(self, service: ServicePlan) -> tuple[Match, ...]:
        """Frames besides those to a VIP that ``service``'s packets include, for the packet filter.

        DR and TUN only ever see traffic to a VIP; a mode that sees the
        real servers' replies (NAT) names them here.
        """
        return ()

    # -- the real server's side (glb realserver setup; director/realserver/plan.py) --

    def realserver_sysctls(self, req: Request) -> list[str]:
        """Sysctls beyond the ARP ones that :meth:`realserver_steps` reads (the adapter reads exactly these)."""
        return []

    def realserver_devices(self, req: Request, facts: Facts, *, notes: list[str]) -> tuple[dict[int, str], str | None]:
        """(IP version -> the device that holds that family's VIPs, decapsulation or None); pure."""
        raise NotImplementedError

    def realserver_steps(self, req: Request, facts: Facts, device: Mapping[int, str], *, new_tun: bool,
                         daemon: bool, stats_file: str, log_file: str, notes: list[str]) -> list[Step]:
        """The steps after the VIPs are on their devices (sysctls, tables, daemons); pure."""
        raise NotImplementedError
