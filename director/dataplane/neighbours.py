"""Where to send each real server's frames: MAC addresses from the kernel's tables.

DR needs each real server's own MAC (it is on the director's link); TUN needs
the MAC of the next hop towards the real server (the server itself, or the
gateway of the route to it). Both come from the kernel: the routing table
says which next hop, the neighbour table says its MAC. The director's own
health probes talk to the real servers through the kernel, so their entries
normally exist and stay fresh; when one is missing, failed or stale this
module asks the kernel to (re)resolve it (RTM_NEWNEIGH with NTF_USE, what a
packet sent by the stack would trigger) and reports "unresolved" meanwhile.
The packet path treats an unresolved server as down.

``next_hop`` and ``usable`` are pure; :class:`Neighbours` is the pyroute2
adapter, called from the control plane about once a second.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable

log = logging.getLogger("glb.director.neighbours")

NUD_INCOMPLETE, NUD_REACHABLE, NUD_STALE, NUD_DELAY, NUD_PROBE, NUD_FAILED, NUD_NOARP, NUD_PERMANENT = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80)
USABLE = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_NOARP | NUD_PERMANENT
"""States whose MAC can be used: the kernel itself still sends to a STALE entry."""
NEEDS_NUDGE = NUD_STALE | NUD_FAILED | NUD_INCOMPLETE
NTF_USE = 0x01


def next_hop(route: dict | None, address: str) -> str:
    """The address whose MAC frames to ``address`` go to: the route's gateway, or itself."""
    if route is None:
        return address
    return route.get("gateway") or address


def usable(state: int) -> bool:
    return bool(state & USABLE)


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


class Neighbours:
    """Resolves real servers to MACs on one interface, or two (NAT's LAN side: ``lan``) (pyroute2)."""

    def __init__(self, interface: str, lan: str | None = None) -> None:
        from pyroute2 import IPRoute

        self.interface = interface
        self.ipr = IPRoute()
        self.ifindexes: list[int] = []
        for name in (interface, lan) if lan else (interface,):
            links = self.ipr.link_lookup(ifname=name)
            if not links:
                self.ipr.close()
                raise LookupError(f"no interface {name!r}")
            self.ifindexes.append(links[0])
        self.ifindex = self.ifindexes[0]
        self._warned: set[str] = set()

    def close(self) -> None:
        self.ipr.close()

    def mtu(self) -> int:
        return self.ipr.get_links(self.ifindex)[0].get_attr("IFLA_MTU") or 1500

    def mac(self) -> bytes:
        return _mac(self.ipr.get_links(self.ifindex)[0].get_attr("IFLA_ADDRESS"))

    def _route(self, address: str) -> dict | None:
        try:
            r = self.ipr.route("get", dst=address)[0]
        except Exception:  # no route: resolve on-link and let the neighbour table decide
            return None
        oif = r.get_attr("RTA_OIF")
        if oif not in self.ifindexes and address not in self._warned:
            self._warned.add(address)
            log.warning("the route to real server %s leaves through another interface than %s; "
                        "the packet path only sends on %s", address, self.interface, self.interface)
        return {"gateway": r.get_attr("RTA_GATEWAY"), "oif": oif}

    def _nudge(self, hop: str, ifindex: int) -> None:
        """Ask the kernel to (re)resolve ``hop`` (it sends ARP / NS as for a packet of its own)."""
        fam = 10 if ":" in hop else 2
        try:
            self.ipr.neigh("replace", dst=hop, ifindex=ifindex, family=fam, flags=NTF_USE, state=NUD_INCOMPLETE)
        except Exception as e:  # best effort: health probes resolve it too
            log.debug("neighbour nudge for %s failed: %s", hop, e)

    def resolve(self, addresses: Iterable[bytes]) -> dict[bytes, bytes | None]:
        """Packed real server address -> MAC to send to (None = unresolved, being resolved)."""
        table: dict[tuple[int, str], tuple[int, str | None]] = {}
        for ifindex in self.ifindexes:
            for n in self.ipr.get_neighbours(ifindex=ifindex):
                dst = n.get_attr("NDA_DST")
                if dst:
                    table[(ifindex, str(ipaddress.ip_address(dst)))] = (n["state"], n.get_attr("NDA_LLADDR"))
        out: dict[bytes, bytes | None] = {}
        for packed in addresses:
            address = str(ipaddress.ip_address(packed))
            route = self._route(address)
            oif = route["oif"] if route is not None and route["oif"] in self.ifindexes else self.ifindex
            hop = next_hop(route, address)
            state, lladdr = table.get((oif, hop), (0, None))
            if state & NEEDS_NUDGE or state == 0:
                self._nudge(hop, oif)
            out[packed] = _mac(lladdr) if lladdr and usable(state) else None
        return out
