"""The lab's network as data: hosts, the segments joining them, addresses, routes.

Pure: nothing here touches the system. :mod:`deploy.lab.lab` builds it.
The addresses must agree with ``deploy/examples/lab.yaml``; :func:`check`
verifies that the config's sites, VIPs and real servers fit this network.

```
                         "internet" 172.16.0.0/24 (bridge inet0 in core, core = .1)
     ops .5   client .10   resolver .20   parent .30   ns1 .53   ns2 .54   redis .60
                                   |                                   |
                          dc1-gw .101                            dc2-gw .102
                 dc1 LAN 10.1.0.0/24 (lan0)        dc2 edge 192.0.2.128/26 (edge0)
                 VIP 192.0.2.10 on-link              director .130 (eth0), VIPs .140 (web, TUN)
   director .2 (active), .3 (standby)                and .141 (nat, NAT :80 -> :8080) on-link
        rs1 .11   rs2 .12                         dc2 servers 10.2.0.0/24 (srv0)
                                                         rs1 .11   rs2 .12 (TUN)
                                                  dc2 NAT 10.2.1.0/24 (nat0, no router address)
                                                         director .1 (eth1, director.lan)
                                                         nat1 .11  nat2 .12 (default route via .1)
```
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Segment:
    """An L2 network: a bridge inside the namespace of its router (which holds ``address`` on it)."""

    name: str
    router: str
    bridge: str
    address: str | None  # CIDR of the router on the bridge; None: it only switches (a private network)


@dataclass(frozen=True)
class Attachment:
    segment: str
    ifname: str
    address: str  # CIDR


@dataclass(frozen=True)
class Host:
    role: str
    what: str
    attachments: tuple[Attachment, ...] = ()
    gateway: str | None = None
    routes: tuple[str, ...] = ()  # extra `ip route add` arguments
    router: bool = False


SEGMENTS = (
    Segment("internet", "core", "inet0", "172.16.0.1/24"),
    Segment("dc1-lan", "dc1-gw", "lan0", "10.1.0.1/24"),
    Segment("dc2-edge", "dc2-gw", "edge0", "192.0.2.129/26"),
    Segment("dc2-servers", "dc2-gw", "srv0", "10.2.0.1/24"),
    # LVS-NAT's private network: the director is its only way out (the servers' gateway), so dc2-gw
    # holds just the switch, with no address on it.
    Segment("dc2-nat", "dc2-gw", "nat0", None),
)


def _on(segment: str, address: str, ifname: str = "eth0") -> tuple[Attachment, ...]:
    return (Attachment(segment, ifname, address),)


HOSTS = (
    Host("core", "the Internet's router (holds the internet bridge)", router=True,
         routes=("10.1.0.0/24 via 172.16.0.101", "192.0.2.0/26 via 172.16.0.101",
                 "10.2.0.0/24 via 172.16.0.102", "192.0.2.128/26 via 172.16.0.102")),
    Host("ops", "operator host: glb status, admin API calls", _on("internet", "172.16.0.5/24"), "172.16.0.1"),
    Host("client", "a client: resolves through the resolver, fetches through the VIP",
         _on("internet", "172.16.0.10/24"), "172.16.0.1"),
    Host("resolver", "recursive resolver (unbound), root hint = parent", _on("internet", "172.16.0.20/24"), "172.16.0.1"),
    Host("parent", "parent zones . and net. (NSD), delegate example.net to ns1/ns2",
         _on("internet", "172.16.0.30/24"), "172.16.0.1"),
    Host("ns1", "glb dnsfront (ns1.example.net)", _on("internet", "172.16.0.53/24"), "172.16.0.1"),
    Host("ns2", "glb dnsfront (ns2.example.net)", _on("internet", "172.16.0.54/24"), "172.16.0.1"),
    Host("redis", "redis-server, the shared state", _on("internet", "172.16.0.60/24"), "172.16.0.1"),
    Host("dc1-gw", "dc1's router; the VIP block is on-link on its LAN", _on("internet", "172.16.0.101/24", "uplink"),
         "172.16.0.1", routes=("192.0.2.0/26 dev lan0",), router=True),
    Host("dc1-director", "glb director --site dc1 --id dc1-a (DR), the pair's primary",
         _on("dc1-lan", "10.1.0.2/24"), "10.1.0.1"),
    Host("dc1-standby", "glb director --site dc1 --id dc1-b (DR), the pair's standby",
         _on("dc1-lan", "10.1.0.3/24"), "10.1.0.1"),
    Host("dc1-rs1", "real server (DR), HTTP", _on("dc1-lan", "10.1.0.11/24"), "10.1.0.1"),
    Host("dc1-rs2", "real server (DR), HTTP", _on("dc1-lan", "10.1.0.12/24"), "10.1.0.1"),
    Host("dc2-gw", "dc2's router: edge network and server subnet (and the NAT network's switch)",
         _on("internet", "172.16.0.102/24", "uplink"),
         "172.16.0.1", router=True),
    Host("dc2-director", "glb director --site dc2 (web: TUN; nat: NAT, eth1 on the NAT servers' network)",
         (Attachment("dc2-edge", "eth0", "192.0.2.130/26"), Attachment("dc2-nat", "eth1", "10.2.1.1/24")),
         "192.0.2.129"),
    Host("dc2-rs1", "real server (TUN), HTTP", _on("dc2-servers", "10.2.0.11/24"), "10.2.0.1"),
    Host("dc2-rs2", "real server (TUN), HTTP", _on("dc2-servers", "10.2.0.12/24"), "10.2.0.1"),
    # No gateway here: `glb realserver setup --mode nat --gateway 10.2.1.1` points the default route at the director.
    Host("dc2-nat1", "real server (NAT), HTTP on 8080", _on("dc2-nat", "10.2.1.11/24")),
    Host("dc2-nat2", "real server (NAT), HTTP on 8080", _on("dc2-nat", "10.2.1.12/24")),
)

BY_ROLE = {h.role: h for h in HOSTS}

# Well-known addresses the lab's processes and probes use.
RESOLVER = "172.16.0.20"
PARENT = "172.16.0.30"
DNSFRONTS = {"ns1": "172.16.0.53", "ns2": "172.16.0.54"}
REDIS = "172.16.0.60"
DIRECTORS = {"dc1": "10.1.0.2", "dc2": "192.0.2.130"}
REAL_SERVERS = {"dc1-rs1": "10.1.0.11", "dc1-rs2": "10.1.0.12", "dc2-rs1": "10.2.0.11", "dc2-rs2": "10.2.0.12",
                "dc2-nat1": "10.2.1.11", "dc2-nat2": "10.2.1.12"}
ZONE = "example.net"


def role_at(address: str) -> str | None:
    """The lab host that has ``address``."""
    return next((h.role for h in HOSTS for a in h.attachments if a.address.split("/")[0] == address), None)


def director_roles(site) -> dict[str, str | None]:
    """A config site's directors: {lab host role: pair member id (None without a pair)}."""
    pair = site.director.pair
    if pair is None:
        return {f"{site.name}-director": None}
    return {role_at(str(m.address)) or f"?{m.address}": m.id for m in pair.members}


def address_of(role: str) -> str:
    return BY_ROLE[role].attachments[0].address.split("/")[0]


def site_of(role: str) -> str:
    return role.split("-")[0]


@dataclass
class ServiceView:
    """What the lab needs to know about one service of a site, from the config."""

    name: str
    forwarding: str
    vips: list[str] = field(default_factory=list)
    port: int = 80
    real_servers: dict[str, str] = field(default_factory=dict)  # role -> address
    server_ports: dict[str, int] = field(default_factory=dict)
    """role -> the port its HTTP server listens on (NAT maps the VIP's port to it)."""
    gateway: str | None = None
    """NAT: the director's LAN address, the real servers' default route (``director.lan.address``)."""
    spilled_in: list[str] = field(default_factory=list)
    """Other sites' VIPs whose connections may spill to this service's real servers (they hold them too)."""


@dataclass
class SiteView:
    """What the lab needs to know about a site, from the config: its first service's view (the service
    the demo's names serve) spelt out, and every service of the site in ``services``."""

    name: str
    forwarding: str
    vips: list[str] = field(default_factory=list)
    port: int = 80
    real_servers: dict[str, str] = field(default_factory=dict)  # role -> address
    status_port: int = 9100
    spilled_in: list[str] = field(default_factory=list)
    """Other sites' VIPs whose connections may spill to this site's real servers (they hold them too)."""
    services: list[ServiceView] = field(default_factory=list)


def _service_view(cfg, site, svc) -> ServiceView:
    by_addr = {addr: role for role, addr in REAL_SERVERS.items()}
    lan = site.director.lan
    view = ServiceView(svc.name, svc.forwarding, [str(v.address) for v in svc.vips], svc.vips[0].port,
                       gateway=str(lan.address.ip) if svc.forwarding == "nat" and lan and lan.address else None,
                       spilled_in=list(dict.fromkeys(str(v.address) for v in cfg.spilled_in_vips(site.name, svc.name))))
    for rs in svc.real_servers:
        role = by_addr.get(str(rs.address))
        if role:
            view.real_servers[role] = str(rs.address)
            view.server_ports[role] = rs.port or view.port
    return view


def sites_from_config(cfg) -> dict[str, SiteView]:
    """The lab's view of ``cfg``'s sites; LabError-free: :func:`check` reports mismatches."""
    out = {}
    for site in cfg.sites:
        services = [_service_view(cfg, site, svc) for svc in site.services]
        first = services[0]
        out[site.name] = SiteView(site.name, first.forwarding, first.vips, first.port, first.real_servers,
                                  status_port=site.director.status_listen.port, spilled_in=first.spilled_in,
                                  services=services)
    return out


def service_of(sites: dict[str, SiteView], role: str) -> ServiceView | None:
    """The service whose real server is lab host ``role``."""
    site = sites.get(site_of(role))
    return next((s for s in site.services if role in s.real_servers), None) if site else None


def check(cfg) -> list[str]:
    """Ways ``cfg`` does not fit the lab's network (empty when it fits)."""
    problems = []
    names = {s.name for s in cfg.sites}
    if names != {"dc1", "dc2"}:
        problems.append(f"the lab has sites dc1 and dc2; the config has {', '.join(sorted(names)) or 'none'}")
    routed = {
        "dc1": [ipaddress.ip_network("192.0.2.0/26")],
        "dc2": [ipaddress.ip_network("192.0.2.128/26")],
    }
    for site in cfg.sites:
        if site.name not in routed:
            continue
        if len(site.services) != 1 and site.name != "dc2":
            problems.append(f"site {site.name}: the lab runs one service here (dc2 has a second: NAT)")
        for svc in site.services:
            for vip in svc.vips:
                if vip.address.version != 4 or not any(vip.address in n for n in routed[site.name]):
                    problems.append(f"site {site.name}: VIP {vip.address} is not in the lab's VIP block "
                                    f"{routed[site.name][0]}")
            for rs in svc.real_servers:
                role = next((r for r, a in REAL_SERVERS.items() if a == str(rs.address)), None)
                if role is None or site_of(role) != site.name:
                    problems.append(f"site {site.name}: real server {rs.address} is not one of the lab's hosts")
        for role in director_roles(site):
            if role not in BY_ROLE or site_of(role) != site.name:
                problems.append(f"site {site.name}: director pair member {role.lstrip('?')} is not one of the "
                                f"lab's {site.name} director hosts")
        if site.director.interface != "eth0":
            problems.append(f"site {site.name}: the lab's directors use interface eth0")
        if any(svc.forwarding == "nat" for svc in site.services) and (
                site.name != "dc2" or site.director.lan_interface != "eth1"
                or str(getattr(site.director.lan.address, "ip", "")) != "10.2.1.1"):
            problems.append(f"site {site.name}: the lab's NAT servers are dc2's, behind director.lan "
                            f"interface eth1, address 10.2.1.1/24")
    host = cfg.redis.url.split("//", 1)[-1].split("/")[0].rsplit(":", 1)[0].split("@")[-1]
    if host != REDIS:
        problems.append(f"redis.url must point at the lab's Redis {REDIS}")
    return problems
