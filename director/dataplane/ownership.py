"""VIP ownership's Linux side: the director answers for its VIPs, and its own kernel stays out.

Whether the director owns its VIPs at all is ``packetpath.VipOwnership``
(switchable at run time); this module holds the adapters it drives.

A director owns a VIP without configuring it on any interface of its kernel:

* **Answers.** The packet engine answers ARP requests and neighbour
  solicitations for each VIP with the director's MAC (codec.arp_reply /
  codec.neighbor_advert, from the forwarder), so clients and routers send
  VIP traffic to the director's interface.
* **Announcements.** When the director takes a VIP (start, or a reload that
  adds one) it announces it: gratuitous ARP (an RFC 5227 announcement) for
  IPv4, an unsolicited neighbour advertisement with the override flag for
  IPv6, at ``EngineConfig.announce`` offsets (0, 1 and 2 s by default;
  keepalived sends 5 and 5 more after 5 s), so caches that pointed at a
  previous owner move at once. ``announce.Announcer`` decides when (pure).
* **The kernel stays out** (:class:`KernelGuard`). AF_PACKET taps see a
  frame before the IP stack does, so the engine gets every VIP packet; the
  kernel must then *not* act on its own copy: forwarding it (if
  ip_forward is on, a second copy would go wherever the routing table
  says), answering it (a local VIP would get a RST for an unknown
  connection, or an ICMP port unreachable), or sending redirects. The guard
  installs one nftables table, ``glb_director``, with

  - a netdev ``ingress`` chain on the director's interface dropping IPv4
    and IPv6 packets to a VIP (after the taps, before ``ip_rcv``: the
    cheapest place; the kernel spends nothing more on them), and
  - an ``inet`` ``prerouting`` chain at priority raw doing the same for
    any other interface (VIP traffic that arrives where the engine does not
    listen is dropped rather than routed).

  ARP and NDP need no rule: the kernel only answers for addresses it has,
  and the VIPs are not on its interfaces.
* **Solicitations reach us** (:class:`SolicitedNodeGroups`). A neighbour
  solicitation for an IPv6 VIP goes to the VIP's solicited-node multicast
  group; a switch (or a Linux bridge) with MLD snooping only forwards it to
  ports that joined that group, and the NIC filters unknown multicast MACs.
  The director joins each group on its interface (IPV6_JOIN_GROUP, which
  programs the NIC's filter and sends MLD reports) as a host owning the
  address would. :func:`vips_on_kernel` reports
  VIPs that are (an operator's leftover), which would make the kernel
  answer ARP and accept connections: the director refuses to start then.
  IPv4 forwarding may stay on (a director can also be a router): the drop
  happens before routing.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable

from director.dataplane import codec
from glb import nft as nftables
from glb.errors import GuardError, NftError

log = logging.getLogger("glb.director.ownership")

NFT_TABLE = "glb_director"


def nft_script(interface: str, vips: Iterable[bytes]) -> str:
    """The guard's ruleset: (re)create table ``glb_director`` dropping VIP traffic in the kernel."""
    v4 = sorted(str(ipaddress.ip_address(v)) for v in vips if len(v) == 4)
    v6 = sorted(str(ipaddress.ip_address(v)) for v in vips if len(v) == 16)

    def sets(kind4: str = "ipv4_addr", kind6: str = "ipv6_addr") -> str:
        e4 = f" elements = {{ {', '.join(v4)} }};" if v4 else ""
        e6 = f" elements = {{ {', '.join(v6)} }};" if v6 else ""
        return (f"  set vips4 {{ type {kind4};{e4} }}\n"
                f"  set vips6 {{ type {kind6};{e6} }}\n")

    # "table X; delete table X" makes the script idempotent in one transaction.
    return (
        f"table netdev {NFT_TABLE}\ndelete table netdev {NFT_TABLE}\n"
        f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"
        f"table netdev {NFT_TABLE} {{\n{sets()}"
        f"  chain ingress {{ type filter hook ingress device \"{interface}\" priority 0; policy accept;\n"
        f"    ip daddr @vips4 counter drop\n    ip6 daddr @vips6 counter drop\n  }}\n}}\n"
        f"table inet {NFT_TABLE} {{\n{sets()}"
        f"  chain prerouting {{ type filter hook prerouting priority raw; policy accept;\n"
        f"    ip daddr @vips4 counter drop\n    ip6 daddr @vips6 counter drop\n  }}\n}}\n"
    )


class KernelGuard:
    """Installs, updates and removes the nftables table that keeps the kernel off VIP traffic."""

    def __init__(self, interface: str, nft: str | None = None) -> None:
        self.interface = interface
        self.nft = nft or nftables.binary() or "/usr/sbin/nft"
        self.installed = False

    def _run(self, script: str) -> None:
        try:
            nftables.load(script, nft=self.nft)
        except NftError as e:
            raise GuardError(f"nft: {e}") from None

    def install(self, vips: Iterable[bytes]) -> None:
        self._run(nft_script(self.interface, vips))
        self.installed = True

    def remove(self) -> None:
        if not self.installed:
            return
        try:
            self._run(f"table netdev {NFT_TABLE}\ndelete table netdev {NFT_TABLE}\n"
                      f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")
        except GuardError as e:
            log.warning("could not remove nftables table %s: %s", NFT_TABLE, e)
        self.installed = False


NAT_TABLE = "glb_director_nat"


def nat_script(sources: Iterable[tuple[int, bytes, int]]) -> str:
    """The NAT guard's ruleset: the kernel drops what NAT real servers send from a service
    port (``(protocol, address, port)``), and the ICMP errors they send, to anywhere but
    the director itself. The engine rewrites those replies; the kernel, if it forwards,
    would send a second copy with the private source (and nothing answers a probe's reply
    but the kernel: those, to a local address, pass)."""
    names = {6: "tcp", 17: "udp"}
    el4 = sorted(f"{ipaddress.ip_address(a)} . {names[p]} . {port}" for p, a, port in sources if len(a) == 4)
    el6 = sorted(f"{ipaddress.ip_address(a)} . {names[p]} . {port}" for p, a, port in sources if len(a) == 16)
    ad4 = sorted({str(ipaddress.ip_address(a)) for _, a, _ in sources if len(a) == 4})
    ad6 = sorted({str(ipaddress.ip_address(a)) for _, a, _ in sources if len(a) == 16})

    def elements(items: list[str]) -> str:
        return f" elements = {{ {', '.join(items)} }};" if items else ""

    return (
        f"table inet {NAT_TABLE}\ndelete table inet {NAT_TABLE}\n"
        f"table inet {NAT_TABLE} {{\n"
        f"  set rs4 {{ type ipv4_addr . inet_proto . inet_service;{elements(el4)} }}\n"
        f"  set rs6 {{ type ipv6_addr . inet_proto . inet_service;{elements(el6)} }}\n"
        f"  set addr4 {{ type ipv4_addr;{elements(ad4)} }}\n"
        f"  set addr6 {{ type ipv6_addr;{elements(ad6)} }}\n"
        f"  chain prerouting {{ type filter hook prerouting priority raw; policy accept;\n"
        f"    ip saddr . meta l4proto . th sport @rs4 fib daddr type != local counter drop\n"
        f"    ip6 saddr . meta l4proto . th sport @rs6 fib daddr type != local counter drop\n"
        f"    ip saddr @addr4 icmp type {{ destination-unreachable, time-exceeded, parameter-problem }} "
        f"fib daddr type != local counter drop\n"
        f"    ip6 saddr @addr6 icmpv6 type {{ destination-unreachable, packet-too-big, time-exceeded, "
        f"parameter-problem }} fib daddr type != local counter drop\n"
        f"  }}\n}}\n"
    )


class NatGuard:
    """Installs, updates and removes the NAT guard's table (:func:`nat_script`); nothing while no NAT service."""

    def __init__(self, nft: str | None = None) -> None:
        self.nft = nft or nftables.binary() or "/usr/sbin/nft"
        self.installed: frozenset = frozenset()

    def install(self, sources: Iterable[tuple[int, bytes, int]]) -> None:
        sources = frozenset(sources)
        if sources == self.installed:
            return
        if not sources:
            self.remove()
            return
        try:
            nftables.load(nat_script(sources), nft=self.nft)
        except NftError as e:
            raise GuardError(f"nft: {e}") from None
        self.installed = sources

    def remove(self) -> None:
        if not self.installed:
            return
        try:
            nftables.load(f"table inet {NAT_TABLE}\ndelete table inet {NAT_TABLE}\n", nft=self.nft)
        except NftError as e:
            log.warning("could not remove nftables table %s: %s", NAT_TABLE, e)
        self.installed = frozenset()


def vips_on_kernel(vips: Iterable[bytes]) -> list[str]:
    """VIPs configured on an interface of this network namespace (they must not be)."""
    from pyroute2 import IPRoute

    wanted = set(vips)
    found = []
    with IPRoute() as ipr:
        for a in ipr.get_addr():
            addr = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
            if addr and ipaddress.ip_address(addr).packed in wanted:
                link = ipr.get_links(a["index"])[0].get_attr("IFLA_IFNAME")
                found.append(f"{addr} on {link}")
    return found


class SolicitedNodeGroups:
    """Membership of the solicited-node multicast groups of the IPv6 VIPs on one interface."""

    def __init__(self, interface: str) -> None:
        self.ifindex = socket.if_nametoindex(interface)
        self._socks: dict[bytes, socket.socket] = {}

    def update(self, vips: Iterable[bytes]) -> None:
        groups = {codec.solicited_node(v) for v in vips if len(v) == 16}
        for g in list(self._socks):
            if g not in groups:
                self._socks.pop(g).close()  # closing the socket leaves the group
        for g in groups - set(self._socks):
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            try:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, g + struct.pack("@I", self.ifindex))
            except OSError as e:
                s.close()
                log.warning("cannot join %s on ifindex %d: %s", ipaddress.ip_address(g), self.ifindex, e)
                continue
            self._socks[g] = s

    def close(self) -> None:
        for s in self._socks.values():
            s.close()
        self._socks.clear()
