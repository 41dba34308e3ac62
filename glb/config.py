"""The GLB configuration model: one YAML file describes a whole deployment.

It is read once into frozen, typed objects with named defaults. Loading never
stops at the first mistake: every problem is collected and reported as one line
``FILE: KEY.PATH: reason`` so an operator fixes a file in one pass.

Names are stored lower-case, absolute, with a trailing dot (``app.example.net.``).
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from collections.abc import Hashable, Mapping
from typing import Any, Callable, ClassVar, Iterable

import dnslib
import yaml

from director.control.spill import TRIGGERS as _SPILL_TRIGGERS
from director.dataplane.scheduler import SCHEDULERS as _SCHEDULER_REGISTRY
from dnsfront.policy import POLICIES as _POLICY_REGISTRY
from glb import yamlfast
from glb.errors import ConfigError
from glb.hashing import is_prime

DATAPLANES = ("auto", "kernel", "userspace")
"""director.packet.dataplane: who forwards established flows (docs/packet-path.md, section 10)."""
SCHEDULERS = tuple(_SCHEDULER_REGISTRY)
FORWARDING = ("dr", "tun", "nat")
POLICIES = tuple(_POLICY_REGISTRY)
ALL_DOWN = ("fail-open", "fallback", "servfail")
SERVER_DOWN_ACTIONS = ("keep", "reschedule")
SPILL_TRIGGERS = tuple(_SPILL_TRIGGERS)
STATIC_TYPES = ("A", "AAAA", "CNAME", "MX", "TXT", "SRV", "CAA", "PTR")
MAX_TTL = 2**31 - 1

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SentinelConfig:
    """Find the Redis master through Sentinel instead of a fixed URL."""

    service: str
    """The master's service name as Sentinel knows it."""
    addresses: tuple[tuple[str, int], ...]
    """Sentinel (host, port) pairs."""


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """How every GLB process reaches the shared state."""

    url: str = "redis://127.0.0.1:6379/0"
    """redis:// or rediss:// URL; with ``sentinel`` only its db/password are used."""
    sentinel: SentinelConfig | None = None
    prefix: str = "{glb}"
    """Key prefix. The braces make it a Cluster hash tag: every key lands in one slot."""
    stale_after: float = 3.0
    """Seconds after its last heartbeat at which a site counts as down."""
    resync_interval: float = 10.0
    """Seconds between full reloads by followers, in case a pub/sub message was lost."""
    timeout: float = 1.0
    """Socket timeout for each Redis call, seconds."""


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The operator API's credentials."""

    token: str | None = field(default=None, repr=False)
    """One shared bearer token (scope operate, named ``shared-token``); prefer ``tokens_file``."""
    tokens_file: str | None = None
    """Scoped tokens, one per line ``NAME SCOPE TOKEN`` (see glb/tokens.py); read by the
    director at start and on SIGHUP, never by the CLI. Absolute path."""
    tls_cert: str | None = None
    """PEM certificate (chain) the admin listener serves; None = plain HTTP. Absolute path."""
    tls_key: str | None = None
    """PEM private key of ``tls_cert``. Absolute path."""
    ca_file: str | None = None
    """For ``glb drain/undrain/weight``: the CA that signed the directors' admin
    certificates; None = the system's trust store. Absolute path."""
    tls_verify: bool = True
    """For the CLI: verify the director's certificate (and its address in it)."""

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RRLConfig:
    """Response rate limiting of UDP answers (dnsfront/rrl.py; off unless enabled, as in BIND and Knot)."""

    enabled: bool = False
    responses_per_second: int = 20
    """Identical answers (same name and type, NODATA too) per second to one client network."""
    nxdomains_per_second: int = 20
    """NXDOMAIN answers per second to one client network, all names together."""
    errors_per_second: int = 20
    """Error answers (FORMERR, SERVFAIL, REFUSED...) per second to one client network."""
    window: int = 15
    """Seconds of excess a bucket remembers: a flooding network is limited until quiet this long."""
    slip: int = 2
    """Every Nth limited answer is sent truncated (TC=1) so real clients retry over TCP; 0 = drop all."""
    ipv4_prefix_length: int = 24
    ipv6_prefix_length: int = 56
    allow: tuple[IPNetwork, ...] = ()
    """Client networks never limited (monitoring, your own resolvers)."""
    table_size: int = 200000
    """Buckets kept (per worker) before the least recently used half is forgotten."""


@dataclass(frozen=True, slots=True)
class CookieConfig:
    """DNS cookies (RFC 7873, server cookies as RFC 9018; dnsfront/cookies.py)."""

    enabled: bool = True
    secret: bytes | None = field(default=None, repr=False)
    """16-byte SipHash key from ``secret_file`` (hex); None = random per start, shared by the workers."""
    rotate: float = 3600.0
    """Seconds each derived secret is used; the previous one is still accepted for as long."""


@dataclass(frozen=True, slots=True)
class DNSFrontConfig:
    """The DNS tier's process settings."""

    listen: tuple[ListenAddress, ...] = (ListenAddress("0.0.0.0", 53), ListenAddress("::", 53))
    """UDP and TCP listen addresses."""
    status_listen: ListenAddress = ListenAddress("127.0.0.1", 8053)
    """aiohttp /healthz, /status, /metrics."""
    workers: int = 1
    """Processes sharing each port with SO_REUSEPORT."""
    tcp_idle_timeout: float = 10.0
    """Seconds an idle TCP connection is kept (RFC 7766 6.2.3)."""
    tcp_max_connections: int = 1024
    """Open TCP connections per worker; beyond it new ones are closed at once."""
    udp_payload: int = 1232
    """EDNS UDP payload size we advertise and cap at (DNS flag day 2020)."""
    tcp_max_per_source: int = 32
    """Open TCP connections per client address per worker; beyond it new ones are closed at once."""
    rrl: RRLConfig = RRLConfig()
    cookies: CookieConfig = CookieConfig()


@dataclass(frozen=True, slots=True)
class SOA:
    mname: str
    rname: str
    serial: int = 1
    refresh: int = 3600
    retry: int = 900
    expire: int = 1209600
    minimum: int = 30
    """Negative-caching TTL (RFC 2308)."""
    ttl: int = 3600

    @property
    def negative_ttl(self) -> int:
        """TTL of the SOA in negative answers: min(SOA TTL, MINIMUM) (RFC 2308 3)."""
        return min(self.ttl, self.minimum)


@dataclass(frozen=True, slots=True)
class NameServer:
    name: str
    glue: tuple[IPAddress, ...] = ()
    """Addresses served as A/AAAA when the NS name is inside the zone."""


@dataclass(frozen=True, slots=True)
class StaticRecord:
    name: str
    rtype: str
    value: str
    """Presentation format (zone-file syntax) of the RDATA, validated at load."""
    ttl: int


@dataclass(frozen=True, slots=True)
class Zone:
    apex: str
    soa: SOA
    nameservers: tuple[NameServer, ...]
    records: tuple[StaticRecord, ...] = ()
    ttl: int = 3600
    """Default TTL of static records and NS."""

    def contains(self, name: str) -> bool:
        return name == self.apex or name.endswith("." + self.apex)


@dataclass(frozen=True, slots=True)
class PoolMember:
    site: str
    weight: int = 100
    """Share of answers relative to the other members (0 = only when all others are down)."""
    priority: int = 1
    """Failover group: the lowest group with a healthy member is used."""


@dataclass(frozen=True, slots=True)
class LBName:
    """A load-balanced name: answered with the VIPs of the best member site now."""

    name: str
    service: str
    """The site service whose VIPs are answered."""
    members: tuple[PoolMember, ...]
    policy: str = "weighted"
    ttl: int = 30
    degraded_ttl: int = 10
    """TTL while the pool is degraded (a member down or below full capacity)."""
    answers: int = 1
    """Addresses per answer, for client-side fallback."""
    all_down: str = "fail-open"
    fallback: tuple[IPAddress, ...] = ()
    """Sorry addresses answered when every member is down and all_down = fallback."""


@dataclass(frozen=True, slots=True)
class VIP:
    address: IPAddress
    port: int
    protocol: str

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """How a director decides a real server is fit (gdnsd/keepalived-style rise/fall).

    The fields every check type shares. Each type is a subclass below with its
    own fields and its own reader (``_own``), found by name in ``CHECKS``; the
    director's probe for it is found by the same name (``director.control.probes.PROBES``).
    """

    type: ClassVar[str] = ""
    port: int | None = None
    """Port probed; None = the real server's port."""
    interval: float = 1.0
    timeout: float = 0.5
    rise: int = 2
    """Consecutive successes that bring a down server up."""
    fall: int = 3
    """Consecutive failures that take an up server down."""
    initial: str = "down"
    """State before the first verdict: 'down' (prove it first) or 'up'."""
    start_jitter: float = 1.0
    """Probes start at a random offset in [0, start_jitter) s so they do not fire in lockstep."""

    @classmethod
    def _own(cls, ctx: _Context, m: _Map) -> dict[str, Any]:
        """This type's own fields read from ``m`` (problems recorded in ``ctx``)."""
        return {}


@dataclass(frozen=True, slots=True)
class TcpCheck(HealthCheck):
    """A TCP connect [keepalived TCP_CHECK]."""

    type: ClassVar[str] = "tcp"


@dataclass(frozen=True, slots=True)
class HttpCheck(HealthCheck):
    """One HTTP request; the status must be expected and the body may have to hold a string."""

    type: ClassVar[str] = "http"
    method: str = "GET"
    path: str = "/"
    host: str | None = None
    """Host header (and the TLS SNI name for https)."""
    expect_status: tuple[int, ...] = (200,)
    expect_body: str | None = None
    tls_verify: bool = True
    """Verify the real server's certificate (https; accepted for http so one block serves both)."""

    @classmethod
    def _own(cls, ctx: _Context, m: _Map) -> dict[str, Any]:
        d = cls()
        return dict(
            method=m.get("method", lambda v: _str(v).upper(), d.method),
            path=m.get("path", _http_path, d.path),
            host=m.get("host", _str, d.host),
            expect_status=_list(ctx, m, "expect_status", _int(100, 599)) or d.expect_status,
            expect_body=m.get("expect_body", _str, d.expect_body),
            tls_verify=m.get("tls_verify", _bool, d.tls_verify),
        )


@dataclass(frozen=True, slots=True)
class HttpsCheck(HttpCheck):
    """HTTP over TLS."""

    type: ClassVar[str] = "https"


_RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")


# The types with a field that has no sensible default take keyword arguments
# only, so that field can be required (the shared fields all have defaults).


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsCheck(HealthCheck):
    """One UDP query; the reply's rcode must be the expected one."""

    type: ClassVar[str] = "dns"
    query_name: str
    query_type: str = "A"
    expect_rcode: str = "NOERROR"

    @classmethod
    def _own(cls, ctx: _Context, m: _Map) -> dict[str, Any]:
        rcode = m.get("expect_rcode", _choice("rcode", [r.lower() for r in _RCODES]), "NOERROR")
        return dict(
            query_name=m.get("query_name", _domain, required_msg="required for dns checks"),
            query_type=m.get("query_type", _query_type, "A"),
            expect_rcode=rcode.upper() if isinstance(rcode, str) else rcode,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpCheck(HealthCheck):
    """Send a payload; a reply is required and must hold ``expect`` if set."""

    type: ClassVar[str] = "udp"
    send: str
    expect: str | None = None

    @classmethod
    def _own(cls, ctx: _Context, m: _Map) -> dict[str, Any]:
        return dict(
            send=m.get("send", _str, required_msg="required for udp checks"),
            expect=m.get("expect", _str, None),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecCheck(HealthCheck):
    """Run a command; exit status 0 means fit."""

    type: ClassVar[str] = "exec"
    command: tuple[str, ...]
    """argv; ``{address}`` and ``{port}`` are replaced."""

    @classmethod
    def _own(cls, ctx: _Context, m: _Map) -> dict[str, Any]:
        command = _list(ctx, m, "command", _str)
        if not command:
            ctx.error(m.at("command"), "required for exec checks")
        return dict(command=command)


CHECKS: dict[str, type[HealthCheck]] = {c.type: c for c in (TcpCheck, HttpCheck, HttpsCheck, DnsCheck, UdpCheck, ExecCheck)}
"""Health-check types by name. A new type is a subclass above plus an entry
here and in ``director.control.probes.PROBES`` (a test holds the two to the same names)."""
CHECK_TYPES = tuple(CHECKS)


@dataclass(frozen=True, slots=True)
class RealServer:
    address: IPAddress
    port: int | None = None
    """Destination port (None = the VIP's port; only NAT may change it: VIP:80 -> RS:8080)."""
    weight: int = 1


@dataclass(frozen=True, slots=True)
class Persistence:
    timeout: float = 300.0
    netmask: int = 32
    """Client IPv4 prefix length that shares a persistence entry."""
    netmask6: int = 128


@dataclass(frozen=True, slots=True)
class Spill:
    """Cross-site spill (docs/director.md): new connections go to another site's real servers."""

    to: tuple[str, ...]
    """Sites to spill to, in order of preference: the first that can take them does."""
    when: str = "all_down"
    """The trigger (director/control/spill.py TRIGGERS): ``all_down`` (no local
    server takes new connections) or ``below_quorum`` (the service is not up)."""
    after: float = 0.0
    """Seconds the trigger must hold before spill starts (health dampening already filters flaps)."""
    recover_after: float = 2.0
    """Seconds the trigger must be clear before new connections stay home again."""


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    vips: tuple[VIP, ...]
    real_servers: tuple[RealServer, ...]
    forwarding: str = "dr"
    scheduler: str = "wlc"
    mh_table_size: int = 65537
    persistence: Persistence | None = None
    on_server_down: str = "keep"
    """What a down or removed server's established flows do: 'keep' them until
    they time out (IPVS's default) or 'reschedule' them at once."""
    quorum: float = 0.0
    """Minimum healthy capacity fraction below which the service counts as down."""
    sorry_server: IPAddress | None = None
    health_check: HealthCheck = TcpCheck()
    spill: Spill | None = None
    """None: new connections never leave the site."""


@dataclass(frozen=True, slots=True)
class ConnectionTableConfig:
    max_entries: int = 1_000_000
    tcp_established: float = 900.0
    tcp_fin_wait: float = 120.0
    tcp_close: float = 10.0
    udp: float = 300.0


@dataclass(frozen=True, slots=True)
class PacketPathConfig:
    """How the director's userspace packet path runs (docs/packet-path.md)."""

    workers: int = 1
    """Packet worker processes, one per core to give it; they share the
    interface in a fanout group that keeps each client on one worker (its
    own connection table), and count connections together for lc/wlc."""
    busy_poll: bool = False
    """Workers spin on their ring instead of sleeping: lowest latency, a
    whole core each, always."""
    ring_frames: int = 1024
    """RX ring slots per worker (64 KiB each, so a GSO frame fits)."""
    dataplane: str = "auto"
    """Who forwards established DR/TUN flows: ``kernel`` (the eBPF program at
    tc ingress; the engine schedules new flows and takes everything else),
    ``userspace`` (the engine alone), ``auto`` (kernel where the program loads
    and attaches, else userspace with one warning). The kernel data plane
    needs ``workers: 1``."""
    bpf_pin_root: str = "/sys/fs/bpf/glb"
    """Where the kernel data plane pins its maps, in ``<root>/<site>-<director id>/``
    (a bpffs), so a restarted director keeps forwarding established flows;
    "" = no pinning. Not on a bpffs: not pinned, with one log line."""


@dataclass(frozen=True, slots=True)
class PairMember:
    """One director of an active/standby pair (docs/ha.md)."""

    id: str
    """What ``glb director --id`` names; published with the site's snapshots."""
    address: IPAddress
    """Its own IPv4 address on the LAN: the VRRP advertisements' source and the sync peer address."""
    priority: int
    """VRRP priority 1..254; the highest live member is master (and owns every VIP of the site, IPv6 too)."""


@dataclass(frozen=True, slots=True)
class SyncConfig:
    """Connection-table sync from the master to the backups (the IPVS sync daemon's role)."""

    enabled: bool = True
    port: int = 8848
    """UDP port (IPVS's)."""
    group: IPAddress = ipaddress.IPv4Address("224.0.0.81")
    """Multicast group (IPVS's); with ``unicast`` the members' addresses instead."""
    max_rate: int = 20_000
    """Connection changes sent per second at most; beyond it changes wait (newest state wins)."""
    mtu: int = 1500
    """Of the LAN: a datagram never exceeds it, so sync is never fragmented."""


@dataclass(frozen=True, slots=True)
class PairConfig:
    """A site run by two or more directors that elect a master with VRRPv3 (RFC 5798)."""

    virtual_router_id: int
    members: tuple[PairMember, ...]
    advert_interval: float = 0.1
    """Seconds between the master's advertisements (VRRP counts centiseconds); keepalived's default is 1."""
    preempt: bool = True
    """A recovered higher-priority member takes the VIPs back; false: it stays backup until the master fails."""
    preempt_delay: float = 0.0
    """Seconds a higher-priority backup waits before preempting (its health checks settle first)."""
    unicast: bool = False
    """Advertise and sync to the other members' addresses, for LANs without multicast."""
    sync: SyncConfig = SyncConfig()
    garp_master_delay: float = 5.0
    """Seconds after taking the VIPs when the gratuitous ARP / unsolicited NA burst goes out again (keepalived's)."""
    garp_master_repeat: int = 5
    """Announcements per VIP in each burst (keepalived's)."""

    def member(self, member_id: str) -> PairMember | None:
        return next((m for m in self.members if m.id == member_id), None)

    def peers(self, member_id: str) -> tuple[PairMember, ...]:
        """The other members."""
        return tuple(m for m in self.members if m.id != member_id)


@dataclass(frozen=True, slots=True)
class LanConfig:
    """The director's side towards NAT real servers (the classic LVS-NAT's private network)."""

    interface: str | None = None
    """Where the real servers are; None = ``director.interface`` (one interface for both sides)."""
    address: IPInterface | None = None
    """The director's IPv4 address there with its prefix (``10.0.2.1/24``): the real servers'
    gateway; the prefix is the directly connected network NAT real servers must be on."""
    address6: IPInterface | None = None
    """The same for IPv6."""

    def network(self, version: int) -> IPNetwork | None:
        a = self.address if version == 4 else self.address6
        return a.network if isinstance(a, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)) else None


@dataclass(frozen=True, slots=True)
class DirectorConfig:
    interface: str
    id: str | None = None
    """Director id published with snapshots; None = the host name."""
    address: IPAddress | None = None
    """The director's own IPv4 address: the outer source of IP-in-IP packets."""
    address6: IPAddress | None = None
    """The director's own IPv6 address: the outer source of IPv6-in-IPv6 packets."""
    status_listen: ListenAddress = ListenAddress("127.0.0.1", 9100)
    heartbeat: float = 1.0
    """Seconds between snapshot publications (state changes publish at once too)."""
    max_probes: int = 256
    """Health probes in flight at once."""
    probe_cpus: tuple[int, ...] | None = None
    """CPUs of the control plane (health probes, publication, status): None
    (``auto``) = with a packet path on a machine of several CPUs, the last CPU,
    the packet workers on the others; () (``all``) = no pinning; a list = those
    CPUs, the packet workers on the rest (docs/director.md, "Placement")."""
    connection_table: ConnectionTableConfig = ConnectionTableConfig()
    """Per packet worker."""
    packet: PacketPathConfig = PacketPathConfig()
    pair: PairConfig | None = None
    """None: one director for the site (no VRRP)."""
    admin_listen: ListenAddress | None = None
    """The admin API (drain, undrain, weight; /status for read-only tokens), apart
    from ``status_listen``; None = no admin API on this director."""
    lan: LanConfig | None = None
    """NAT: the real servers' side (None: the site has no NAT service)."""

    @property
    def lan_interface(self) -> str:
        """The interface NAT real servers are reached on."""
        return (self.lan.interface if self.lan is not None else None) or self.interface


@dataclass(frozen=True, slots=True)
class Site:
    name: str
    director: DirectorConfig
    services: tuple[Service, ...]
    region: str | None = None
    networks: tuple[IPNetwork, ...] = ()
    """Client networks this site serves best (topology policy)."""

    def service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)

    def vip_addresses(self, service: str) -> tuple[IPAddress, ...]:
        svc = self.service(service)
        if svc is None:
            return ()
        return tuple(dict.fromkeys(v.address for v in svc.vips))


@dataclass(frozen=True, slots=True)
class Config:
    """A whole deployment, validated."""

    source: str
    zones: tuple[Zone, ...]
    names: tuple[LBName, ...]
    sites: tuple[Site, ...]
    redis: RedisConfig = RedisConfig()
    dnsfront: DNSFrontConfig = DNSFrontConfig()
    admin: AdminConfig = AdminConfig()

    def site(self, name: str) -> Site | None:
        return next((s for s in self.sites if s.name == name), None)

    def lbname(self, name: str) -> LBName | None:
        return next((n for n in self.names if n.name == name), None)

    def spilled_in_vips(self, site: str, service: str) -> tuple[VIP, ...]:
        """VIPs of the other sites that may spill ``service`` to ``site``: its real
        servers hold them too (``glb realserver setup --vip``; docs/realserver.md)."""
        return tuple(v for s in self.sites if s.name != site
                     for svc in s.services if svc.name == service and svc.spill is not None and site in svc.spill.to
                     for v in svc.vips)

    def zone_for(self, name: str) -> Zone | None:
        """The most specific zone containing ``name``."""
        best = None
        for z in self.zones:
            if z.contains(name) and (best is None or len(z.apex) > len(best.apex)):
                best = z
        return best

    def summary(self) -> str:
        services = sum(len(s.services) for s in self.sites)
        servers = sum(len(svc.real_servers) for s in self.sites for svc in s.services)
        return (
            f"{_plural(len(self.zones), 'zone')}, {_plural(len(self.names), 'load-balanced name')}, "
            f"{_plural(len(self.sites), 'site')}, {_plural(services, 'service')}, "
            f"{_plural(servers, 'real server')}"
        )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; raise ConfigError listing every problem."""
    shown = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{shown}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{shown}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    return loads(text, source=shown, base_dir=Path(path).resolve().parent)


def loads(text: str, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate config text. ``base_dir`` anchors relative paths such as token_file."""
    data = _read_yaml(text, source)
    ctx = _Context(source, base_dir or Path.cwd())
    config = _parse_config(ctx, data)
    if not ctx.problems:
        _cross_check(ctx, config)
    if ctx.problems:
        raise ConfigError(ctx.problems)
    return config


def _read_yaml(text: str, source: str) -> Any:
    # The plain subset of YAML straight from libyaml's events (~10x faster);
    # anchors, tags and every error go through the full loader, whose
    # messages say what it expected, and where.
    try:
        return yamlfast.load(text)
    except yamlfast.Unsupported:
        pass
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: YAML syntax error: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: YAML syntax error: {e}") from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML would silently merge."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            # A list or mapping used as a key ("? [a, b]: 1"): PyYAML would say so
            # too, but only after our duplicate check had crashed on it.
            raise yaml.constructor.ConstructorError(
                None, None, f"{_kind(key)} cannot be a key", key_node.start_mark
            )
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Bad(Exception):
    """A value failed a check; the message is the reason shown to the operator."""


class _Invalid:
    """Placeholder for a value that failed; its error has been recorded."""

    def __repr__(self) -> str:
        return "<invalid>"


INVALID: Any = _Invalid()


@dataclass
class _Context:
    source: str
    base_dir: Path
    problems: list[str] = field(default_factory=list)

    def error(self, path: str, reason: str) -> None:
        self.problems.append(f"{self.source}: {path}: {reason}" if path else f"{self.source}: {reason}")


class _Map:
    """A YAML mapping being read: tracks its key path and which keys were used."""

    def __init__(self, ctx: _Context, path: str, value: Any):
        self.ctx, self.path = ctx, path
        if value is None:
            value = {}
        if not isinstance(value, dict):
            ctx.error(path, f"expected a mapping, got {_kind(value)}")
            value = {}
        self.data: dict = value
        self.used: set[str] = set()

    def at(self, key: str) -> str:
        return _key_path(self.path, key)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, conv: Callable[[Any], Any], default: Any = ..., *, required_msg: str = "required") -> Any:
        """The converted value of ``key``; ``default`` when absent (``...`` = required)."""
        self.used.add(key)
        if self.data.get(key) is None:
            if default is ...:
                self.ctx.error(self.at(key), required_msg)
                return INVALID
            return default
        try:
            return conv(self.data[key])
        except _Bad as e:
            self.ctx.error(self.at(key), str(e))
            return INVALID

    def map(self, key: str) -> _Map:
        self.used.add(key)
        return _Map(self.ctx, self.at(key), self.data.get(key))

    def items(self, key: str, required: bool = False) -> list[tuple[str, Any]]:
        """(path, item) for each element of a list value."""
        self.used.add(key)
        value = self.data.get(key)
        if value is None:
            if required:
                self.ctx.error(self.at(key), "required")
            return []
        if not isinstance(value, list):
            self.ctx.error(self.at(key), f"expected a list, got {_kind(value)}")
            return []
        if required and not value:
            self.ctx.error(self.at(key), "must not be empty")
        return [(f"{self.at(key)}[{i}]", v) for i, v in enumerate(value)]

    def finish(self, allowed_elsewhere: dict[str, str] | None = None) -> None:
        """Report keys nobody asked for (typos must not be silently ignored)."""
        for key in self.data:
            if key in self.used:
                continue
            if allowed_elsewhere and key in allowed_elsewhere:
                self.ctx.error(self.at(str(key)), allowed_elsewhere[key])
            else:
                expected = ", ".join(sorted(self.used))
                self.ctx.error(self.at(str(key)), f"unknown key (expected one of {expected})")


def _key_path(parent: str, key: Any) -> str:
    """``parent.key``; a key holding dots (a domain name) is shown as ``parent[key]``."""
    key = str(key)
    if "." in key:
        return f"{parent}[{key.rstrip('.')}]"
    return f"{parent}.{key}" if parent else key


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer", float: "a number"}.get(
        type(value), type(value).__name__
    )


# ---- value converters: each raises _Bad(reason) ---------------------------


def _str(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Bad(f"expected a string, got {_kind(value)}")
    text = str(value).strip()
    if not text:
        raise _Bad("must not be empty")
    return text


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[Any], int]:
    def conv(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"expected an integer, got {_kind(value)}")
        _range(value, lo, hi)
        return value

    return conv


def _float(lo: float | None = None, hi: float | None = None, *, open_lo: bool = False) -> Callable[[Any], float]:
    def conv(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad(f"expected a number, got {_kind(value)}")
        if not math.isfinite(value):
            # YAML spells these .nan and .inf; NaN passes every range check and
            # then fails every comparison at run time (a NaN stale_after would
            # make every site stale), and no setting here means "never".
            raise _Bad(f"must be a finite number, got {value}")
        if open_lo and lo is not None and value <= lo:
            raise _Bad(f"must be greater than {lo:g}, got {value:g}")
        _range(value, lo, hi)
        return float(value)

    return conv


def _range(value: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and value < lo:
        raise _Bad(f"must be at least {lo:g}, got {value:g}")
    if hi is not None and value > hi:
        raise _Bad(f"must be at most {hi:g}, got {value:g}")


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {_kind(value)}")
    return value


def _choice(what: str, options: Iterable[str]) -> Callable[[Any], str]:
    options = tuple(options)

    def conv(value: Any) -> str:
        text = _str(value).lower()
        if text not in options:
            raise _Bad(f"unknown {what} {str(value)!r} (expected one of {', '.join(options)})")
        return text

    return conv


def _ip(value: Any) -> IPAddress:
    text = _str(value)
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise _Bad(f"not an IP address: {text!r}") from None


def _ipv(version: int) -> Callable[[Any], IPAddress]:
    def conv(value: Any) -> IPAddress:
        addr = _ip(value)
        if addr.version != version:
            raise _Bad(f"not an IPv{version} address: {str(value)!r}")
        return addr

    return conv


def _ipinterface(version: int) -> Callable[[Any], IPInterface]:
    def conv(value: Any) -> IPInterface:
        text = _str(value)
        if "/" not in text:
            raise _Bad(f"expected an address with its prefix length (e.g. {'10.0.2.1/24' if version == 4 else 'fd00:2::1/64'}), got {text!r}")
        try:
            iface = ipaddress.ip_interface(text)
        except ValueError:
            raise _Bad(f"not an address with a prefix length: {text!r}") from None
        if iface.version != version:
            raise _Bad(f"not an IPv{version} address: {text!r}")
        return iface

    return conv


def _network(value: Any) -> IPNetwork:
    text = _str(value)
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise _Bad(f"not a network: {text!r} ({e})") from None


_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$|^\*$")


def _domain(value: Any) -> str:
    """An absolute, lower-case domain name with a trailing dot."""
    text = _str(value).lower()
    if text == ".":
        return "."
    labels = text.rstrip(".").split(".")
    if any(not _LABEL.match(label) for label in labels):
        raise _Bad(f"not a valid domain name: {str(value)!r}")
    if len(text.rstrip(".")) > 253:
        raise _Bad("domain name longer than 253 characters")
    return ".".join(labels) + "."


def _ttl(value: Any) -> int:
    return _int(0, MAX_TTL)(value)


def _port(value: Any) -> int:
    return _int(1, 65535)(value)


def _hostport(default_port: int | None = None) -> Callable[[Any], ListenAddress]:
    def conv(value: Any) -> ListenAddress:
        text = _str(value)
        m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", text)
        if not m:
            raise _Bad(f"expected HOST:PORT or [IPV6]:PORT, got {text!r}")
        host = m.group(1) or m.group(3)
        port_text = m.group(2) or m.group(4)
        if port_text is None:
            if default_port is None:
                raise _Bad(f"missing port in {text!r}")
            port = default_port
        else:
            port = int(port_text)
            if not 1 <= port <= 65535:
                raise _Bad(f"port out of range in {text!r}")
        if m.group(1):
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise _Bad(f"not an IPv6 address in {text!r}") from None
        return ListenAddress(host, port)

    return conv


def _vip(value: Any) -> VIP:
    text = _str(value)
    m = re.fullmatch(r"(?:\[([0-9a-fA-F:.]+)\]|([0-9.]+)):(\d+)/(tcp|udp)", text, re.IGNORECASE)
    if not m:
        raise _Bad(f"expected ADDRESS:PORT/tcp|udp (IPv6 as [ADDR]:PORT/tcp), got {text!r}")
    try:
        addr = ipaddress.ip_address(m.group(1) or m.group(2))
    except ValueError:
        raise _Bad(f"not an IP address in {text!r}") from None
    port = int(m.group(3))
    if not 1 <= port <= 65535:
        raise _Bad(f"port out of range in {text!r}")
    return VIP(addr, port, m.group(4).lower())


def _list(ctx: _Context, m: _Map, key: str, conv: Callable[[Any], Any], required: bool = False) -> tuple:
    """A list of scalars, each converted; a lone scalar counts as a list of one."""
    value = m.data.get(key)
    if value is not None and not isinstance(value, list):
        m.data = {**m.data, key: [value]}
    out = []
    for path, item in m.items(key, required=required):
        try:
            out.append(conv(item))
        except _Bad as e:
            ctx.error(path, str(e))
            out.append(INVALID)
    return tuple(out)


# ---- sections -------------------------------------------------------------


def _parse_config(ctx: _Context, data: Any) -> Config:
    if data is None:
        ctx.error("", "the file is empty")
        data = {}
    root = _Map(ctx, "", data)
    redis = _parse_redis(ctx, root.map("redis"))
    admin = _parse_admin(ctx, root.map("admin"))
    dnsfront = _parse_dnsfront(ctx, root.map("dnsfront"))
    zones = tuple(_parse_zone(ctx, _Map(ctx, p, z)) for p, z in root.items("zones", required=True))
    sites_map = root.map("sites")
    sites = tuple(_parse_site(ctx, str(name), _Map(ctx, sites_map.at(str(name)), v)) for name, v in sites_map.data.items())
    if root.data.get("sites") is not None and not sites_map.data:
        ctx.error("sites", "must not be empty")
    elif root.data.get("sites") is None:
        ctx.error("sites", "required")
    names_map = root.map("names")
    names = tuple(_parse_lbname(ctx, str(n), _Map(ctx, names_map.at(str(n)), v)) for n, v in names_map.data.items())
    root.finish()
    return Config(ctx.source, zones, names, sites, redis, dnsfront, admin)


def _parse_redis(ctx: _Context, m: _Map) -> RedisConfig:
    d = RedisConfig()
    url = m.get("url", _str, d.url)
    if url is not INVALID and not re.match(r"^(rediss?|unix)://", url):
        ctx.error(m.at("url"), f"expected a redis://, rediss:// or unix:// URL, got {url!r}")
    sentinel = None
    if m.has("sentinel"):
        s = m.map("sentinel")
        service = s.get("service", _str)
        addresses = tuple(
            (a.host, a.port) if isinstance(a, ListenAddress) else INVALID
            for a in _list(ctx, s, "addresses", _hostport(26379), required=True)
        )
        s.finish()
        sentinel = SentinelConfig(service, addresses)
    else:
        m.used.add("sentinel")
    prefix = m.get("prefix", _str, d.prefix)
    stale_after = m.get("stale_after", _float(0, open_lo=True), d.stale_after)
    resync = m.get("resync_interval", _float(0, open_lo=True), d.resync_interval)
    timeout = m.get("timeout", _float(0, open_lo=True), d.timeout)
    m.finish()
    return RedisConfig(url, sentinel, prefix, stale_after, resync, timeout)


def _parse_admin(ctx: _Context, m: _Map) -> AdminConfig:
    token = m.get("token", _str, None)
    token_file = m.get("token_file", _str, None)
    paths = {key: _abs_path(ctx, m.get(key, _str, None)) for key in ("tokens_file", "tls_cert", "tls_key", "ca_file")}
    tls_verify = m.get("tls_verify", _bool, True)
    m.finish()
    if INVALID in paths.values() or tls_verify is INVALID:
        return AdminConfig()
    if (paths["tls_cert"] is None) != (paths["tls_key"] is None):
        ctx.error(m.at("tls_key" if paths["tls_cert"] else "tls_cert"), "tls_cert and tls_key go together")
    extra = dict(paths, tls_verify=tls_verify)
    if token is INVALID or token_file is INVALID:
        return AdminConfig(**extra)
    if token and token_file:
        ctx.error(m.at("token_file"), "give token or token_file, not both")
        return AdminConfig(**extra)
    if token_file:
        path = Path(token_file)
        if not path.is_absolute():
            path = ctx.base_dir / path
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            ctx.error(m.at("token_file"), f"cannot read {str(path)!r}: {e.strerror or e}")
            return AdminConfig(**extra)
        if not token:
            ctx.error(m.at("token_file"), f"{str(path)!r} is empty")
            return AdminConfig(**extra)
    if token is not None and len(token) < 16:
        ctx.error(m.at("token_file" if token_file else "token"), "token must be at least 16 characters")
    return AdminConfig(token, **extra)


def _abs_path(ctx: _Context, text: Any) -> Any:
    """A path from the config, anchored at the config's directory (files are read later, by who needs them)."""
    if text is None or text is INVALID:
        return text
    path = Path(text)
    return str(path if path.is_absolute() else ctx.base_dir / path)


def _parse_dnsfront(ctx: _Context, m: _Map) -> DNSFrontConfig:
    d = DNSFrontConfig()
    listen = _list(ctx, m, "listen", _hostport(53)) if m.has("listen") else d.listen
    if m.has("listen") and not listen:
        ctx.error(m.at("listen"), "must not be empty")
    m.used.add("listen")
    cfg = DNSFrontConfig(
        listen=listen,
        status_listen=m.get("status_listen", _hostport(), d.status_listen),
        workers=m.get("workers", _int(1, 256), d.workers),
        tcp_idle_timeout=m.get("tcp_idle_timeout", _float(0, open_lo=True), d.tcp_idle_timeout),
        tcp_max_connections=m.get("tcp_max_connections", _int(1), d.tcp_max_connections),
        udp_payload=m.get("udp_payload", _int(512, 65535), d.udp_payload),
        tcp_max_per_source=m.get("tcp_max_per_source", _int(1), d.tcp_max_per_source),
        rrl=_parse_rrl(ctx, m.map("rrl")),
        cookies=_parse_cookies(ctx, m.map("cookies")),
    )
    m.finish()
    return cfg


def _parse_rrl(ctx: _Context, m: _Map) -> RRLConfig:
    d = RRLConfig()
    rate = m.get("responses_per_second", _int(1), d.responses_per_second)
    cfg = RRLConfig(
        enabled=m.get("enabled", _bool, d.enabled),
        responses_per_second=rate,
        # NXDOMAIN and errors default to the answers' rate, as in BIND.
        nxdomains_per_second=m.get("nxdomains_per_second", _int(1), rate),
        errors_per_second=m.get("errors_per_second", _int(1), rate),
        window=m.get("window", _int(1, 3600), d.window),
        slip=m.get("slip", _int(0, 10), d.slip),
        ipv4_prefix_length=m.get("ipv4_prefix_length", _int(0, 32), d.ipv4_prefix_length),
        ipv6_prefix_length=m.get("ipv6_prefix_length", _int(0, 128), d.ipv6_prefix_length),
        allow=_list(ctx, m, "allow", _network),
        table_size=m.get("table_size", _int(2), d.table_size),
    )
    m.finish()
    return cfg


def _parse_cookies(ctx: _Context, m: _Map) -> CookieConfig:
    d = CookieConfig()
    enabled = m.get("enabled", _bool, d.enabled)
    rotate = m.get("rotate", _float(60, 86400), d.rotate)
    secret_file = m.get("secret_file", _str, None)
    m.finish()
    secret = None
    if isinstance(secret_file, str):
        path = Path(secret_file)
        if not path.is_absolute():
            path = ctx.base_dir / path
        try:
            secret = bytes.fromhex(path.read_text(encoding="utf-8").strip())
        except OSError as e:
            ctx.error(m.at("secret_file"), f"cannot read {str(path)!r}: {e.strerror or e}")
        except ValueError:
            ctx.error(m.at("secret_file"), f"{str(path)!r} must hold 32 hex digits (a 16-byte secret)")
        if secret is not None and len(secret) != 16:
            ctx.error(m.at("secret_file"), f"{str(path)!r} must hold 32 hex digits (a 16-byte secret)")
            secret = None
    return CookieConfig(enabled, secret, rotate)


def _parse_zone(ctx: _Context, m: _Map) -> Zone:
    apex = m.get("apex", _domain)
    ttl = m.get("ttl", _ttl, 3600)
    s = m.map("soa")
    if not m.has("soa"):
        ctx.error(m.at("soa"), "required")
    sd = SOA("x.", "x.")
    soa = SOA(
        mname=s.get("mname", _domain),
        rname=s.get("rname", _rname),
        serial=s.get("serial", _int(0, 2**32 - 1), sd.serial),
        refresh=s.get("refresh", _ttl, sd.refresh),
        retry=s.get("retry", _ttl, sd.retry),
        expire=s.get("expire", _ttl, sd.expire),
        minimum=s.get("minimum", _ttl, sd.minimum),
        ttl=s.get("ttl", _ttl, sd.ttl),
    )
    s.finish()
    nameservers = []
    for path, item in m.items("ns", required=True):
        if isinstance(item, str):
            item = {"name": item}
        n = _Map(ctx, path, item)
        nameservers.append(NameServer(n.get("name", _domain), _list(ctx, n, "addresses", _ip)))
        n.finish()
    records = []
    for path, item in m.items("records"):
        records.append(_parse_record(ctx, _Map(ctx, path, item), apex, ttl))
    m.finish()
    return Zone(apex, soa, tuple(nameservers), tuple(r for rs in records for r in rs), ttl)


def _rname(value: Any) -> str:
    """SOA RNAME: accept hostmaster@example.net as well as hostmaster.example.net."""
    text = _str(value)
    if "@" in text:
        local, _, domain = text.partition("@")
        if "." in local:
            raise _Bad(f"a mailbox with a dot before '@' needs zone-file escaping; write it as a name: {text!r}")
        text = f"{local}.{domain}"
    return _domain(text)


def _parse_record(ctx: _Context, m: _Map, apex: Any, zone_ttl: Any) -> list[StaticRecord]:
    rtype = m.get("type", _choice("record type", [t.lower() for t in STATIC_TYPES]))
    raw_name = m.get("name", _str)
    ttl = m.get("ttl", _ttl, zone_ttl)
    if m.has("value") and m.has("values"):
        ctx.error(m.at("values"), "give value or values, not both")
    key = "values" if m.has("values") else "value"
    values = _list(ctx, m, key, _str, required=True)
    m.used.update(("value", "values"))
    m.finish()
    if INVALID in (rtype, raw_name, apex) or isinstance(zone_ttl, _Invalid):
        return []
    name = _qualify(ctx, m.at("name"), raw_name, apex)
    if name is INVALID:
        return []
    rtype = rtype.upper()
    out = []
    for i, value in enumerate(values):
        if value is INVALID:
            continue
        path = m.at(key) + (f"[{i}]" if key == "values" else "")
        try:
            out.append(StaticRecord(name, rtype, _rdata(rtype, value, apex), ttl))
        except _Bad as e:
            ctx.error(path, str(e))
    return out


def _qualify(ctx: _Context, path: str, raw: str, apex: str) -> Any:
    """Zone-file name rules: '@' is the apex, a trailing dot is absolute, else relative."""
    try:
        if raw == "@":
            return apex
        name = _domain(raw) if raw.endswith(".") else _domain(f"{raw}.{apex}")
    except _Bad as e:
        ctx.error(path, str(e))
        return INVALID
    if not (name == apex or name.endswith("." + apex)):
        ctx.error(path, f"{name} is outside the zone {apex}")
        return INVALID
    return name


def _target(value: str, apex: str) -> str:
    return apex if value == "@" else _domain(value if value.endswith(".") else f"{value}.{apex}")


def _rdata(rtype: str, value: str, apex: str) -> str:
    """Validate RDATA in presentation format and return it normalised."""
    if rtype == "A":
        return str(_ipv(4)(value))
    if rtype == "AAAA":
        return str(_ipv(6)(value))
    if rtype in ("CNAME", "PTR"):
        return _target(value, apex)
    if rtype == "MX":
        parts = value.split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) > 65535:
            raise _Bad(f"MX value must be 'PREFERENCE EXCHANGE', got {value!r}")
        return f"{int(parts[0])} {_target(parts[1], apex)}"
    if rtype == "SRV":
        parts = value.split()
        if len(parts) != 4 or not all(p.isdigit() and int(p) <= 65535 for p in parts[:3]):
            raise _Bad(f"SRV value must be 'PRIORITY WEIGHT PORT TARGET', got {value!r}")
        return f"{int(parts[0])} {int(parts[1])} {int(parts[2])} {_target(parts[3], apex)}"
    if rtype == "CAA":
        m = re.fullmatch(r'(\d+)\s+([A-Za-z0-9]+)\s+"([^"]*)"', value)
        if not m or int(m.group(1)) > 255:
            raise _Bad(f"CAA value must be 'FLAGS TAG \"VALUE\"', got {value!r}")
        return f'{int(m.group(1))} {m.group(2).lower()} "{m.group(3)}"'
    if rtype == "TXT":
        if len(value.encode("utf-8")) > 4000:
            raise _Bad("TXT value longer than 4000 bytes")
        return value
    raise _Bad(f"unsupported record type {rtype}")  # unreachable: _choice checked it


# Made once: a config can have tens of thousands of members.
_MEMBER_WEIGHT = _int(0, 1_000_000)
_MEMBER_PRIORITY = _int(0, 1000)


def _parse_lbname(ctx: _Context, raw_name: str, m: _Map) -> LBName:
    try:
        # Always absolute here (a trailing dot is optional): there is no zone to be relative to.
        name = _domain(raw_name)
    except _Bad as e:
        ctx.error(m.path, str(e))
        name = INVALID
    d = LBName("x.", "x", ())
    members = []
    for path, item in m.items("members", required=True):
        if isinstance(item, str):
            item = {"site": item}
        p = _Map(ctx, path, item)
        members.append(
            PoolMember(
                site=p.get("site", _str),
                weight=p.get("weight", _MEMBER_WEIGHT, 100),
                priority=p.get("priority", _MEMBER_PRIORITY, 1),
            )
        )
        p.finish()
    policy = m.get("policy", _choice("policy", POLICIES), d.policy)
    ttl = m.get("ttl", _ttl, d.ttl)
    degraded = m.get("degraded_ttl", _ttl, None)
    all_down = m.get("all_down", _choice("all_down action", ALL_DOWN), d.all_down)
    fallback = _list(ctx, m, "fallback", _ip)
    lb = LBName(
        name=name,
        service=m.get("service", _str),
        members=tuple(members),
        policy=policy,
        ttl=ttl,
        degraded_ttl=degraded if degraded is not None else (min(d.degraded_ttl, ttl) if isinstance(ttl, int) else ttl),
        answers=m.get("answers", _int(1, 16), d.answers),
        all_down=all_down,
        fallback=fallback,
    )
    m.finish()
    if all_down == "fallback" and not fallback:
        ctx.error(m.at("fallback"), "required when all_down is fallback")
    if fallback and all_down not in ("fallback", INVALID):
        ctx.error(m.at("fallback"), "only used when all_down is fallback")
    if isinstance(ttl, int) and isinstance(degraded, int) and degraded > ttl:
        ctx.error(m.at("degraded_ttl"), f"must not exceed ttl ({ttl}), got {degraded}")
    return lb


@functools.cache  # one per check type; asked for every health check parsed
def _check_keys(cls: type[HealthCheck]) -> frozenset[str]:
    """The YAML keys of a check type beyond the shared ones."""
    return frozenset({f.name for f in fields(cls)} - {f.name for f in fields(HealthCheck)})


def _parse_health(ctx: _Context, m: _Map) -> HealthCheck:
    ctype = m.get("type", _choice("check type", CHECK_TYPES), TcpCheck.type)
    cls = CHECKS.get(ctype, TcpCheck)
    d = HealthCheck()
    interval = m.get("interval", _float(0.05, open_lo=False), d.interval)
    timeout = m.get("timeout", _float(0, open_lo=True), min(d.timeout, interval) if isinstance(interval, float) else d.timeout)
    shared = dict(
        port=m.get("port", _port, None),
        interval=interval,
        timeout=timeout,
        rise=m.get("rise", _int(1, 1000), d.rise),
        fall=m.get("fall", _int(1, 1000), d.fall),
        initial=m.get("initial", _choice("initial state", ("down", "up")), d.initial),
        start_jitter=m.get("start_jitter", _float(0), min(d.start_jitter, interval) if isinstance(interval, float) else d.start_jitter),
    )
    hc = cls(**shared, **cls._own(ctx, m))
    if isinstance(interval, float) and isinstance(timeout, float) and timeout > interval:
        ctx.error(m.at("timeout"), f"must not exceed interval ({interval:g}), got {timeout:g}")
    # A key of another type is a mistake worth naming (a dns key on an http
    # check), not just an unknown key; with an invalid type nothing more is said.
    elsewhere = {}
    for key in set().union(*(_check_keys(c) for c in CHECKS.values())) - _check_keys(cls):
        owners = "/".join(t for t, c in CHECKS.items() if key in _check_keys(c))
        elsewhere[key] = f"only applies to {owners} checks, this one is {ctype}"
        if ctype is INVALID:
            m.used.add(key)
    m.finish(elsewhere)
    return hc


def _query_type(value: Any) -> str:
    """A query type the dns check can send: a type name dnslib knows, or TYPEnnn (RFC 3597).

    The probe builds its query with dnslib; a name it does not know would only
    show at run time, as every probe failing and the servers going down.
    """
    text = _str(value).upper()
    try:
        code = getattr(dnslib.QTYPE, text)
    except Exception:  # noqa: BLE001 - dnslib raises its DNSError (and others for odd names)
        code = None
    if isinstance(code, bool) or not isinstance(code, int) or not 0 < code <= 65535:
        raise _Bad(f"unknown DNS query type {str(value)!r} (a type name such as A, AAAA, MX or SOA, or TYPEnnn)")
    return text


def _http_path(value: Any) -> str:
    text = _str(value)
    if not text.startswith("/"):
        raise _Bad(f"must start with '/', got {text!r}")
    return text


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _name(what: str) -> Callable[[Any], str]:
    """Site and service names: they appear in Redis keys and override targets."""

    def conv(value: Any) -> str:
        text = _str(value)
        if not _NAME.fullmatch(text):
            raise _Bad(f"{what} name {text!r} must be 1-63 letters, digits, '.', '_' or '-'")
        return text

    return conv


def _parse_site(ctx: _Context, name: str, m: _Map) -> Site:
    try:
        _name("site")(name)
    except _Bad as e:
        ctx.error(m.path, str(e))
    dm = m.map("director")
    if not m.has("director"):
        ctx.error(m.at("director"), "required (every site's state comes from its director)")
    dd = DirectorConfig("x")
    ct = dm.map("connection_table")
    cd = ConnectionTableConfig()
    conn = ConnectionTableConfig(
        max_entries=ct.get("max_entries", _int(1024, 1 << 30), cd.max_entries),
        tcp_established=ct.get("tcp_established", _float(0, open_lo=True), cd.tcp_established),
        tcp_fin_wait=ct.get("tcp_fin_wait", _float(0, open_lo=True), cd.tcp_fin_wait),
        tcp_close=ct.get("tcp_close", _float(0, open_lo=True), cd.tcp_close),
        udp=ct.get("udp", _float(0, open_lo=True), cd.udp),
    )
    ct.finish()
    pm = dm.map("packet")
    pd = PacketPathConfig()
    packet = PacketPathConfig(
        workers=pm.get("workers", _int(1, 64), pd.workers),
        busy_poll=pm.get("busy_poll", _bool, pd.busy_poll),
        ring_frames=pm.get("ring_frames", _int(16, 1 << 16), pd.ring_frames),
        dataplane=pm.get("dataplane", _choice("dataplane", DATAPLANES), pd.dataplane),
        bpf_pin_root=pm.get("bpf_pin_root", lambda v: "" if v == "" else _str(v), pd.bpf_pin_root),
    )
    if packet.dataplane == "kernel" and packet.workers > 1:
        ctx.error(pm.at("dataplane"), "the kernel data plane runs with workers: 1 (its flows are installed by one "
                                      "worker); use dataplane: auto or userspace with more workers")
    pm.finish()
    pair = _parse_pair(ctx, dm.map("pair")) if dm.has("pair") else None
    lan = _parse_lan(dm.map("lan")) if dm.has("lan") else None
    director = DirectorConfig(
        interface=dm.get("interface", _str) if m.has("director") else INVALID,
        id=dm.get("id", _str, dd.id),
        address=dm.get("address", _ipv(4), dd.address),
        address6=dm.get("address6", _ipv(6), dd.address6),
        status_listen=dm.get("status_listen", _hostport(), dd.status_listen),
        heartbeat=dm.get("heartbeat", _float(0.05), dd.heartbeat),
        max_probes=dm.get("max_probes", _int(1, 100_000), dd.max_probes),
        probe_cpus=dm.get("probe_cpus", _cpus, dd.probe_cpus),
        connection_table=conn,
        packet=packet,
        pair=pair,
        admin_listen=dm.get("admin_listen", _hostport(), dd.admin_listen),
        lan=lan,
    )
    dm.finish()
    if pair is not None and isinstance(director.id, str) and not any(mb.id == director.id for mb in pair.members):
        ctx.error(dm.at("id"), f"{director.id!r} is not a member of the pair ({', '.join(mb.id for mb in pair.members)})")
    services = tuple(_parse_service(ctx, _Map(ctx, p, s)) for p, s in m.items("services", required=True))
    site = Site(
        name=name,
        director=director,
        services=services,
        region=m.get("region", _str, None),
        networks=_list(ctx, m, "networks", _network),
    )
    m.finish()
    return site


def _cpus(value: Any) -> tuple[int, ...] | None:
    """``auto`` (None), ``all`` (()) or a list of CPU numbers."""
    if isinstance(value, str) and value.lower() in ("auto", "all"):
        return None if value.lower() == "auto" else ()
    if not isinstance(value, list):
        raise _Bad(f"expected auto, all or a list of CPU numbers, got {_kind(value)}")
    if not value:
        raise _Bad("expected at least one CPU number (or auto, or all)")
    return tuple(sorted({_int(0, 4095)(v) for v in value}))


def _parse_lan(m: _Map) -> LanConfig:
    """``director.lan``: where the director meets its NAT real servers."""
    lan = LanConfig(
        interface=m.get("interface", _str, None),
        address=m.get("address", _ipinterface(4), None),
        address6=m.get("address6", _ipinterface(6), None),
    )
    m.finish()
    return lan


def _centiseconds(value: Any) -> float:
    seconds = _float(0.01, 40.95)(value)
    if abs(seconds * 100 - round(seconds * 100)) > 1e-6:
        raise _Bad(f"must be a multiple of 0.01 s (VRRP counts centiseconds), got {seconds:g}")
    return seconds


def _parse_pair(ctx: _Context, m: _Map) -> PairConfig:
    """``director.pair``: the members, their VRRP virtual router and connection sync."""
    dflt = PairConfig(0, ())
    members: list[PairMember] = []
    for path, raw in m.items("members", required=True):
        mm = _Map(ctx, path, raw)
        members.append(PairMember(
            id=mm.get("id", _name("director")),
            address=mm.get("address", _ipv(4)),
            priority=mm.get("priority", _int(1, 254), required_msg="required (1..254; the highest live member is master)"),
        ))
        mm.finish()
    if 0 < len(members) < 2:
        ctx.error(m.at("members"), "a pair needs two or more members (remove 'pair' to run one director)")
    for key in ("id", "address"):
        seen: dict[Any, int] = {}
        for i, mb in enumerate(members):
            value = getattr(mb, key)
            if value is INVALID:
                continue
            if value in seen:
                ctx.error(f"{m.at('members')}[{i}].{key}", f"{value} is also members[{seen[value]}]'s")
            seen.setdefault(value, i)
    sm = m.map("sync")
    sd = SyncConfig()
    sync = SyncConfig(
        enabled=sm.get("enabled", _bool, sd.enabled),
        port=sm.get("port", _port, sd.port),
        group=sm.get("group", _multicast4, sd.group),
        max_rate=sm.get("max_rate", _int(100, 10_000_000), sd.max_rate),
        mtu=sm.get("mtu", _int(576, 65535), sd.mtu),
    )
    sm.finish()
    pair = PairConfig(
        virtual_router_id=m.get("virtual_router_id", _int(1, 255)),
        members=tuple(members),
        advert_interval=m.get("advert_interval", _centiseconds, dflt.advert_interval),
        preempt=m.get("preempt", _bool, dflt.preempt),
        preempt_delay=m.get("preempt_delay", _float(0, 3600), dflt.preempt_delay),
        unicast=m.get("unicast", _bool, dflt.unicast),
        sync=sync,
        garp_master_delay=m.get("garp_master_delay", _float(0, 3600), dflt.garp_master_delay),
        garp_master_repeat=m.get("garp_master_repeat", _int(1, 100), dflt.garp_master_repeat),
    )
    m.finish()
    return pair


def _multicast4(value: Any) -> IPAddress:
    addr = _ipv(4)(value)
    if not addr.is_multicast:
        raise _Bad(f"not an IPv4 multicast group: {addr}")
    return addr


def _parse_service(ctx: _Context, m: _Map) -> Service:
    d = Service("x", (), ())
    name = m.get("name", _name("service"))
    vips = _list(ctx, m, "vips", _vip, required=True)
    servers = []
    for path, item in m.items("real_servers", required=True):
        if isinstance(item, str):
            item = {"address": item}
        r = _Map(ctx, path, item)
        servers.append(RealServer(r.get("address", _ip), r.get("port", _port, None), r.get("weight", _int(0, 65535), 1)))
        r.finish()
    scheduler = m.get("scheduler", _choice("scheduler", SCHEDULERS), d.scheduler)
    table = m.get("mh_table_size", _int(7, 1 << 24), d.mh_table_size)
    if isinstance(table, int) and not is_prime(table):
        ctx.error(m.at("mh_table_size"), f"must be a prime number (Maglev), got {table}")
    persistence = None
    if m.has("persistence"):
        p = m.map("persistence")
        pd = Persistence()
        persistence = Persistence(
            timeout=p.get("timeout", _float(0, open_lo=True), pd.timeout),
            netmask=p.get("netmask", _int(0, 32), pd.netmask),
            netmask6=p.get("netmask6", _int(0, 128), pd.netmask6),
        )
        p.finish()
    else:
        m.used.add("persistence")
    health = _parse_health(ctx, m.map("health_check"))
    svc = Service(
        name=name,
        vips=vips,
        real_servers=tuple(servers),
        forwarding=m.get("forwarding", _choice("forwarding method", FORWARDING), d.forwarding),
        scheduler=scheduler,
        mh_table_size=table,
        persistence=persistence,
        on_server_down=m.get("on_server_down", _choice("on_server_down action", SERVER_DOWN_ACTIONS), d.on_server_down),
        quorum=m.get("quorum", _float(0, 1), d.quorum),
        sorry_server=m.get("sorry_server", _ip, None),
        health_check=health,
        spill=_parse_spill(ctx, m.map("spill")) if m.has("spill") else None,
    )
    m.finish()
    for i, rs in enumerate(svc.real_servers):
        if svc.forwarding == "nat":
            continue  # NAT rewrites the port: VIP:80 -> RS:8080
        if rs.port is not None and any(isinstance(v, VIP) and v.port != rs.port for v in vips):
            ctx.error(
                f"{m.at('real_servers')}[{i}].port",
                f"{rs.port} differs from the VIP port: DR and TUN forward without changing ports (NAT can)",
            )
    return svc


def _parse_spill(ctx: _Context, m: _Map) -> Spill:
    d = Spill(())
    spill = Spill(
        to=_list(ctx, m, "to", _name("site"), required=True),
        when=m.get("when", _choice("spill trigger", SPILL_TRIGGERS), d.when),
        after=m.get("after", _float(0, 3600), d.after),
        recover_after=m.get("recover_after", _float(0, 3600), d.recover_after),
    )
    m.finish()
    return spill


# ---- cross references -----------------------------------------------------


def _check_admin_listen(ctx: _Context, cfg: Config) -> None:
    """An admin listener needs credentials, and its own port."""
    for site in cfg.sites:
        listen = site.director.admin_listen
        if listen is None:
            continue
        path = f"sites.{site.name}.director.admin_listen"
        if cfg.admin.token is None and cfg.admin.tokens_file is None:
            ctx.error(path, "needs admin.tokens_file (or admin.token): an admin API nobody may use is not served")
        if listen == site.director.status_listen and listen.port != 0:
            ctx.error(path, "must differ from status_listen (the admin API has its own listener)")


def _cross_check(ctx: _Context, cfg: Config) -> None:
    _check_admin_listen(ctx, cfg)
    site_names = {s.name for s in cfg.sites}
    apexes: dict[str, int] = {}
    for zi, zone in enumerate(cfg.zones):
        if zone.apex in apexes:
            ctx.error(f"zones[{zi}].apex", f"zone {zone.apex} is already defined at zones[{apexes[zone.apex]}]")
        apexes[zone.apex] = zi
        for ni, ns in enumerate(zone.nameservers):
            if zone.contains(ns.name) and not ns.glue:
                ctx.error(f"zones[{zi}].ns[{ni}].addresses", f"{ns.name} is inside the zone and needs glue addresses")
        _check_cname_conflicts(ctx, zi, zone)

    # Indexed, so checking N names of M members costs N x M lookups, not scans.
    static_names = {(r.name) for z in cfg.zones for r in z.records}
    sites_by_name = {s.name: s for s in cfg.sites}
    for lb in cfg.names:
        path = _key_path("names", lb.name)
        if _zone_of(lb.name, apexes) is None:
            ctx.error(path, f"{lb.name} is outside every zone ({', '.join(z.apex for z in cfg.zones)})")
        if lb.name in static_names:
            ctx.error(path, f"{lb.name} also has static records; a load-balanced name must own its name")
        seen: set[str] = set()
        for mi, member in enumerate(lb.members):
            mpath = f"{path}.members[{mi}].site"
            if member.site not in site_names:
                ctx.error(mpath, f"unknown site {member.site!r} (sites: {', '.join(sorted(site_names))})")
                continue
            if member.site in seen:
                ctx.error(mpath, f"site {member.site!r} is listed twice")
            seen.add(member.site)
            if sites_by_name[member.site].service(lb.service) is None:
                ctx.error(mpath, f"site {member.site!r} has no service {lb.service!r} whose VIPs could be answered")

    owners: dict[IPAddress, str] = {}
    vips_seen: dict[VIP, str] = {}
    for site in cfg.sites:
        names_seen: set[str] = set()
        for si, svc in enumerate(site.services):
            path = f"sites.{site.name}.services[{si}]"
            if svc.name in names_seen:
                ctx.error(f"{path}.name", f"service {svc.name!r} is defined twice in site {site.name}")
            names_seen.add(svc.name)
            for vi, vip in enumerate(svc.vips):
                vpath = f"{path}.vips[{vi}]"
                if vip in vips_seen:
                    ctx.error(vpath, f"duplicate VIP {vip} (also at {vips_seen[vip]})")
                vips_seen.setdefault(vip, vpath)
                owner = owners.setdefault(vip.address, site.name)
                if owner != site.name:
                    ctx.error(vpath, f"VIP address {vip.address} is already owned by site {owner}")
                if svc.forwarding == "tun":
                    need = "address" if vip.address.version == 4 else "address6"
                    if getattr(site.director, need) is None and not _member_sources(site, vip.address.version):
                        ctx.error(
                            f"sites.{site.name}.director.{need}",
                            f"required: service {svc.name} tunnels IPv{vip.address.version} ({vip}) and needs the outer source address",
                        )
            families = {v.address.version for v in svc.vips}
            if svc.forwarding == "nat":
                _check_nat(ctx, site, svc, path, families)
            for ri, rs in enumerate(svc.real_servers):
                if svc.forwarding in ("dr", "nat") and rs.address.version not in families:
                    ctx.error(
                        f"{path}.real_servers[{ri}].address",
                        f"IPv{rs.address.version} real server for a service with only IPv{'/'.join(map(str, sorted(families)))} VIPs",
                    )
            # First index of each address: list.index per server was quadratic
            # (5,000 real servers took seconds to load).
            first: dict[Any, int] = {}
            for ri, rs in enumerate(svc.real_servers):
                if first.setdefault(rs.address, ri) != ri:
                    ctx.error(f"{path}.real_servers[{ri}].address", f"real server {rs.address} is listed twice")
            if svc.spill is not None:
                _check_spill(ctx, f"{path}.spill", site, svc, sites_by_name)


def _member_sources(site: Site, version: int) -> bool:
    """Whether each member of the site's director pair has its own address of this IP version, the
    outer source it tunnels from when ``director.address`` is not set (director.control.main)."""
    pair = site.director.pair
    return pair is not None and all(m.address.version == version for m in pair.members)


def _spills_to(sites: Mapping[str, Site], site: str, service: str) -> tuple[str, ...]:
    svc = sites[site].service(service) if site in sites else None
    return svc.spill.to if svc is not None and svc.spill is not None else ()


def _check_spill(ctx: _Context, path: str, site: Site, svc: Service, sites: Mapping[str, Site]) -> None:
    """A service's ``spill``: real targets running the service by TUN on its ports, no loop, an outer source."""
    assert svc.spill is not None
    for ti, name in enumerate(svc.spill.to):
        tpath = f"{path}.to[{ti}]"
        if name is INVALID:
            continue
        other = sites.get(name)
        if other is None:
            ctx.error(tpath, f"unknown site {name!r} (sites: {', '.join(sorted(sites))})")
            continue
        if svc.spill.to.index(name) != ti:
            ctx.error(tpath, f"site {name!r} is listed twice")
            continue
        if name == site.name:
            ctx.error(tpath, f"site {name!r} is this service's own site (a loop)")
            continue
        theirs = other.service(svc.name)
        if theirs is None:
            ctx.error(tpath, f"site {name!r} has no service {svc.name!r} to spill to")
            continue
        if theirs.forwarding != "tun":
            ctx.error(tpath, f"site {name!r} forwards service {svc.name!r} by {theirs.forwarding}: spilled "
                             f"connections arrive by IP-in-IP, so its real servers must be set up for tun")
        ports = {(v.port, v.protocol) for v in theirs.vips}
        for v in svc.vips:
            if (v.port, v.protocol) not in ports:
                ctx.error(tpath, f"site {name!r} serves {svc.name!r} on no {v.port}/{v.protocol} VIP "
                                 f"(spilled connections keep the port of {v})")
                break
        # A path back to this site through the targets' own spill lists is a loop.
        seen, todo = {name}, list(_spills_to(sites, name, svc.name))
        while todo:
            nxt = todo.pop()
            if nxt == site.name:
                ctx.error(tpath, f"site {name!r} spills service {svc.name!r} back to {site.name!r} (a loop)")
                break
            if nxt not in seen:
                seen.add(nxt)
                todo.extend(_spills_to(sites, nxt, svc.name))
    for version, need in ((4, "address"), (6, "address6")):
        vip = next((v for v in svc.vips if v.address.version == version), None)
        if (vip is not None and getattr(site.director, need) is None and not _member_sources(site, version)
                and svc.forwarding != "tun"):  # tun says it
            ctx.error(f"sites.{site.name}.director.{need}",
                      f"required: service {svc.name} spills IPv{version} ({vip}) by IP-in-IP and needs the outer source address")


def _check_nat(ctx: _Context, site: Site, svc: Service, path: str, families: set[int]) -> None:
    """A NAT service's real servers are on a network the director is directly connected to
    (they use it as their gateway), which ``director.lan`` names."""
    lan = site.director.lan
    dpath = f"sites.{site.name}.director.lan"
    if lan is None:
        ctx.error(dpath, f"required: service {svc.name} forwards by NAT and needs the director's address "
                         f"on its real servers' network")
        return
    targets = [(f"{path}.real_servers[{ri}].address", rs.address) for ri, rs in enumerate(svc.real_servers)]
    if svc.sorry_server is not None:
        targets.append((f"{path}.sorry_server", svc.sorry_server))
    missing: set[int] = set()
    for where, addr in targets:
        if addr is INVALID or addr.version not in families:
            continue  # reported elsewhere
        net = lan.network(addr.version)
        if (lan.address if addr.version == 4 else lan.address6) is INVALID:
            continue  # reported where it was read
        if net is None:
            if addr.version not in missing:
                missing.add(addr.version)
                key = "address" if addr.version == 4 else "address6"
                ctx.error(f"{dpath}.{key}", f"required: service {svc.name} has IPv{addr.version} NAT real servers "
                                            f"and needs the director's address on their network")
        elif addr not in net:
            ctx.error(where, f"{addr} is not on {net}, the network the director is directly connected to "
                             f"({dpath}): a NAT real server must use the director as its gateway")


def _zone_of(name: str, apexes: Mapping[str, int]) -> int | None:
    """Index of the most specific zone holding ``name`` (absolute, lower case), by
    walking up its labels: as cheap with a thousand zones as with one."""
    while True:
        if name in apexes:
            return apexes[name]
        if name == ".":
            return None
        _, _, name = name.partition(".")
        name = name or "."


def _check_cname_conflicts(ctx: _Context, zi: int, zone: Zone) -> None:
    by_name: dict[str, list[str]] = {}
    for r in zone.records:
        by_name.setdefault(r.name, []).append(r.rtype)
    for name, types in by_name.items():
        if "CNAME" in types and len(types) > 1:
            ctx.error(f"zones[{zi}].records", f"{name} has a CNAME and other records (RFC 1034 3.6.2)")
        if "CNAME" in types and name == zone.apex:
            ctx.error(f"zones[{zi}].records", f"CNAME at the zone apex {name} is not allowed")
