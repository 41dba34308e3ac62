"""What setting up a real server changes, decided from the request and a snapshot of the system. Pure.

:func:`parse_request` validates what the operator asked for;
:func:`plan_setup` takes that request and a :class:`Facts` snapshot (current
sysctls, links, addresses, kernel tunnel support, tools) and returns a
:class:`Plan`: an ordered list of small steps (director/realserver/steps.py)
that each carry what they need to be undone. What a forwarding mode needs
(which device holds the VIPs, ARP and rp_filter settings, the MSS clamp,
the decapsulator) is the mode's own (``Mode.realserver_devices`` and
``Mode.realserver_steps`` in director/modes/); the helpers they share are
here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

from director import modes
from director.realserver.steps import NFT_FAMILY, NFT_TABLE, AddAddress, CreateTun, LinkUp, SetSysctl, Step, conf_key, display_key
from glb.errors import RealServerError

DECAP_CHOICES = ("auto", "kernel", "bpf", "userspace")
DECAP_PREFERENCE = ("kernel", "bpf", "userspace")
"""What ``--decap auto`` takes, best first: the tunnel driver, the tc-BPF program (director/realserver/bpfdecap.py;
the same kernel path without the driver), the userspace decapsulator (raw sockets -> TUN, every packet copied twice)."""

TUN_DEVICE = "glbtun0"
# family -> (rtnetlink kind, the fallback device the driver creates in each namespace)
KERNEL_TUNNELS = {4: ("ipip", "tunl0"), 6: ("ip6tnl", "ip6tnl0")}
# Per VIP family: bytes the director's encapsulation adds (outer IPv4 / IPv6
# header), and the inner IP + TCP headers the MSS does not count.
TUNNEL_OVERHEAD = {4: 20, 6: 40}
TCP_IP_HEADERS = {4: 40, 6: 60}
DEFAULT_MTU = 1500
MIN_MSS = 536
MAX_MSS = 65495

# Wanted values for sysctls with "stricter is larger" semantics: raised, never lowered.
ARP_IGNORE = "1"  # reply only for addresses configured on the interface the request came in on
ARP_ANNOUNCE = "2"  # always use the best local address of the outgoing interface as ARP source
RP_FILTER_LOOSE = "2"


IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


# ---------------------------------------------------------------------------
# Request
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A validated setup request."""

    vips: tuple[IPAddress, ...]
    """The VIPs, deduplicated, in the order given."""
    mode: str
    """A forwarding mode's name (director.modes.MODES)."""
    decap: str = "auto"
    """TUN only: ``kernel`` (ipip/ip6tnl driver), ``bpf`` (tc program, director.realserver.bpfdecap), ``userspace``
    (director.realserver.decap) or ``auto`` (the first of DECAP_PREFERENCE this host can do)."""
    mss: int | None = None
    """TUN only: TCP MSS for IPv4 VIPs (IPv6 VIPs get 40 less); 0 = no clamp; None = derived from the uplink MTU."""
    tun_device: str = TUN_DEVICE
    """Name of the TUN device the userspace decapsulator writes into."""
    gateways: tuple[IPAddress, ...] = ()
    """NAT only: the director's address on this network, one per IP version (the new default route)."""
    policy_ports: tuple[int, ...] = ()
    """NAT only: route only what leaves from these ports (the services' replies) through the director,
    by policy routing, and leave the default route alone; () = replace the default route."""

    @property
    def families(self) -> frozenset[int]:
        return frozenset(v.version for v in self.vips)


def parse_vip(text: str) -> IPAddress:
    """One VIP: an address, or an address with /32 (IPv4) or /128 (IPv6)."""
    raw = str(text).strip()
    try:
        if "/" in raw:
            iface = ipaddress.ip_interface(raw)
            if iface.network.prefixlen != iface.max_prefixlen:
                raise RealServerError(f"bad VIP {text!r}: a VIP is one address (/{iface.max_prefixlen}), not a network")
            addr = iface.ip
        else:
            addr = ipaddress.ip_address(raw)
    except ValueError:
        raise RealServerError(f"bad VIP {text!r}: expected an IPv4 or IPv6 address such as 192.0.2.10 or 2001:db8::10") from None
    bad = (
        "unspecified" if addr.is_unspecified else
        "loopback" if addr.is_loopback else
        "multicast" if addr.is_multicast else
        "link-local" if addr.is_link_local else
        "reserved" if addr.version == 4 and addr.is_reserved else None
    )
    if bad:
        raise RealServerError(f"bad VIP {text!r}: a {bad} address cannot be a VIP")
    if addr.version == 6 and addr.ipv4_mapped is not None:
        raise RealServerError(f"bad VIP {text!r}: use the IPv4 address {addr.ipv4_mapped} instead of the mapped form")
    return addr


def parse_request(vips: Iterable[str], mode: str, *, decap: str = "auto", mss: int | None = None,
                  tun_device: str = TUN_DEVICE, gateways: Iterable[str] = (),
                  policy_ports: Iterable[int] = ()) -> Request:
    """Validate what the operator asked for; RealServerError (one line) on any mistake."""
    if mode not in modes.MODES:
        raise RealServerError(f"unknown mode {mode!r}: expected one of {', '.join(modes.MODES)}")
    gws = _parse_gateways(gateways)
    if modes.MODES[mode].holds_vips and gws:
        raise RealServerError(f"--gateway is for NAT mode (the director as this host's gateway), not {mode}")
    ports = _parse_ports(policy_ports)
    if modes.MODES[mode].holds_vips and ports:
        raise RealServerError(f"--policy-route is for NAT mode (replies through the director), not {mode}")
    if not modes.MODES[mode].holds_vips:
        if not gws:
            raise RealServerError(f"{mode} mode needs --gateway ADDR: the director's address on this network")
        if vips:
            raise RealServerError(f"{mode} mode holds no VIP here (the director rewrites the destination): "
                                  f"leave out --vip")
        return Request(vips=(), mode=mode, gateways=gws, policy_ports=ports)
    if decap not in DECAP_CHOICES:
        raise RealServerError(f"unknown decapsulation {decap!r}: expected one of {', '.join(DECAP_CHOICES)}")
    if isinstance(vips, str):
        vips = [vips]
    parsed: list[IPAddress] = []
    for v in vips:
        a = parse_vip(v)
        if a not in parsed:
            parsed.append(a)
    if not parsed:
        raise RealServerError("no VIP given: pass --vip ADDR at least once")
    if mss is not None:
        if isinstance(mss, bool) or not isinstance(mss, int):
            raise RealServerError(f"bad MSS {mss!r}: expected a whole number")
        if mss != 0 and not MIN_MSS <= mss <= MAX_MSS:
            raise RealServerError(f"bad MSS {mss}: expected 0 (no clamp) or {MIN_MSS}..{MAX_MSS}")
        if mss and 6 in {a.version for a in parsed} and mss - 40 < 1220:
            raise RealServerError(f"bad MSS {mss}: IPv6 VIPs get MSS - 40 = {mss - 40}, below the IPv6 minimum 1220")
    if not tun_device or len(tun_device) > 15 or "/" in tun_device or any(c.isspace() for c in tun_device):
        raise RealServerError(f"bad TUN device name {tun_device!r}: 1 to 15 characters, no '/' or spaces")
    return Request(vips=tuple(parsed), mode=mode, decap=decap, mss=mss, tun_device=tun_device)


def _parse_ports(ports: Iterable[int]) -> tuple[int, ...]:
    out: list[int] = []
    for p in ports or ():
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
            raise RealServerError(f"bad --policy-route port {p!r}: expected a port, 1..65535 (the real server's "
                                  f"service port)")
        if p not in out:
            out.append(p)
    return tuple(out)


def _parse_gateways(gateways: Iterable[str]) -> tuple[IPAddress, ...]:
    out: list[IPAddress] = []
    for g in gateways or ():
        try:
            addr = ipaddress.ip_address(str(g).strip())
        except ValueError:
            raise RealServerError(f"bad gateway {g!r}: not an IP address") from None
        if any(a.version == addr.version for a in out):
            raise RealServerError(f"bad gateway {g!r}: one --gateway per IP version")
        out.append(addr)
    return tuple(out)


# ---------------------------------------------------------------------------
# Facts: what the adapter reports about the system
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    name: str
    up: bool
    mtu: int


@dataclass(frozen=True)
class Facts:
    """A snapshot of everything the planner looks at."""

    privileged: bool = True
    """CAP_NET_ADMIN (and CAP_NET_RAW) in the effective set."""
    links: Mapping[str, Link] = field(default_factory=dict)
    addresses: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Interface name -> its addresses (compressed text, no prefix length)."""
    sysctls: Mapping[str, str] = field(default_factory=dict)
    """``net/ipv4/conf/all/arp_ignore``-style keys (relative to /proc/sys) -> current value; absent = no such sysctl."""
    kernel_tunnels: Mapping[int, str | None] = field(default_factory=dict)
    """IP version -> the kernel's fallback tunnel device if the kernel decapsulates that family, else None."""
    uplink_mtu: int = DEFAULT_MTU
    """MTU of the device(s) holding the default route(s): the path the tunnel arrives on."""
    nft: bool = True
    """The ``nft`` tool is installed."""
    nft_table: bool = False
    """Table ``inet glb_realserver`` exists already (a leftover: it is replaced)."""
    tun: bool = True
    """``/dev/net/tun`` is usable."""
    default_routes: Mapping[int, tuple[str | None, str | None]] = field(default_factory=dict)
    """IP version -> (gateway, device) of the main table's default route; absent = none."""
    bpf_decap: str | None = "not probed"
    """None if the tc-BPF decapsulator loads on this kernel, else why not (one line)."""


def sysctl_keys(req: Request) -> list[str]:
    """The sysctls :func:`plan_setup` may read for this request (the adapter reads exactly these)."""
    keys: list[str] = []
    if 4 in req.families:
        for dev in ("all", "lo"):
            keys += [conf_key(4, dev, "arp_ignore"), conf_key(4, dev, "arp_announce")]
    return keys + modes.MODES[req.mode].realserver_sysctls(req)



def choose_decap(req: Request, facts: Facts) -> tuple[str, str]:
    """(how TUN packets are decapsulated, a line saying why): what ``--decap`` names, or with ``auto`` the
    first of DECAP_PREFERENCE this host can do. RealServerError when the one named cannot be done."""
    missing = [KERNEL_TUNNELS[f][0] for f in sorted(req.families) if not facts.kernel_tunnels.get(f)]
    why_not = {
        "kernel": f"this kernel cannot decapsulate in the kernel (no {', '.join(missing)} driver)" if missing else None,
        "bpf": facts.bpf_decap,
        "userspace": "userspace decapsulation needs /dev/net/tun: load the tun module (modprobe tun)"
                     if not facts.tun else None,
    }
    if req.decap != "auto":
        if why_not[req.decap]:
            others = [d for d in DECAP_PREFERENCE if d != req.decap and not why_not[d]] + ["auto"]
            raise RealServerError(f"{why_not[req.decap]}: use --decap {' or '.join(others)}")
        return req.decap, "--decap " + req.decap
    for name in DECAP_PREFERENCE:
        if why_not[name] is None:
            passed = [f"not {n}: {why_not[n]}" for n in DECAP_PREFERENCE[:DECAP_PREFERENCE.index(name)]]
            return name, "; ".join(["--decap auto", *passed])
    raise RealServerError(why_not["userspace"])


def decap_interfaces(req: Request, facts: Facts) -> tuple[str, ...]:
    """Where the tc-BPF decapsulator listens: every interface that is up and holds an address, but lo and
    tunnel devices (the director's tunnelled packets arrive on one of them)."""
    skip = {"lo", req.tun_device, *(dev for _, dev in KERNEL_TUNNELS.values())}
    found = tuple(sorted(n for n, link in facts.links.items() if link.up and n not in skip and facts.addresses.get(n)))
    if not found:
        raise RealServerError("no interface is up with an address: nowhere to attach the BPF decapsulator")
    return found


def decap_pin_dir(stats_file: str) -> str:
    """Where the tc-BPF decapsulator's maps are pinned: one directory per state file, so several set-ups
    (one per namespace in the tests) never share maps."""
    import hashlib

    return "/sys/fs/bpf/glb-realserver-" + hashlib.sha1(stats_file.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Plan:
    """What setup will do, in order."""

    mode: str
    decap: str | None
    """``kernel`` / ``bpf`` / ``userspace`` for TUN, None for DR."""
    vips: tuple[str, ...]
    device: dict[int, str]
    """IP version -> the interface that holds that family's VIPs."""
    steps: tuple[Step, ...]
    notes: tuple[str, ...] = ()
    """Things the operator should know (settings already right, leftovers replaced)."""

    def describe(self) -> list[str]:
        return [s.describe() for s in self.steps]


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return default


def _raise_sysctl(facts: Facts, key: str, wanted: str, why: str, *, notes: list[str]) -> SetSysctl | None:
    """A step raising ``key`` to ``wanted`` if it is lower now; these sysctls are "larger is stricter" and never lowered."""
    current = facts.sysctls.get(key)
    if current is None:
        notes.append(f"{display_key(key)} does not exist here; not set")
        return None
    if _int(current) >= _int(wanted):
        notes.append(f"{display_key(key)} is already {current.strip()}; left alone")
        return None
    return SetSysctl(key, wanted, current.strip(), why)


def arp_steps(facts: Facts, devices: Sequence[str], *, notes: list[str]) -> list[SetSysctl]:
    """arp_ignore/arp_announce on ``all`` and ``devices`` (the kernel uses the larger of all and the interface's)."""
    steps = []
    for dev in ("all", *devices):
        for name, wanted, why in (
            ("arp_ignore", ARP_IGNORE, "answer ARP only for addresses of the receiving interface, never for the VIP"),
            ("arp_announce", ARP_ANNOUNCE, "never use the VIP as the source of ARP requests"),
        ):
            step = _raise_sysctl(facts, conf_key(4, dev, name), wanted, why, notes=notes)
            if step:
                steps.append(step)
    return steps


def rp_filter_step(facts: Facts, device: str, *, new_device: bool, notes: list[str]) -> SetSysctl | None:
    """Make reverse-path filtering on ``device`` loose if its effective value (max of all and device) is strict."""
    key = conf_key(4, device, "rp_filter")
    current = facts.sysctls.get(conf_key(4, "default", "rp_filter") if new_device else key)
    effective = max(_int(facts.sysctls.get(conf_key(4, "all", "rp_filter"))), _int(current))
    if effective != 1:
        notes.append(f"rp_filter on {device} is effectively {effective}: decapsulated packets pass as they are")
        return None
    return SetSysctl(key, RP_FILTER_LOOSE, None if new_device else (current or "0").strip(),
                     "loose reverse-path filter: decapsulated packets come in here but replies leave by the uplink")


def mss_values(req: Request, facts: Facts) -> tuple[tuple[int, int], ...]:
    """(IP version, MSS) for each VIP family; empty when clamping is off."""
    if req.mss == 0:
        return ()
    out = []
    for fam in sorted(req.families):
        if req.mss is not None:
            out.append((fam, req.mss if fam == 4 else req.mss - 40))
        else:
            out.append((fam, facts.uplink_mtu - TUNNEL_OVERHEAD[fam] - TCP_IP_HEADERS[fam]))
    return tuple(out)


def nft_script(vips: Sequence[IPAddress], mss: Sequence[tuple[int, int]]) -> str:
    """The nftables ruleset: (re)create the table, clamp MSS on SYN and SYN-ACK from the VIPs."""
    rules = []
    for fam, value in mss:
        sel = "ip saddr" if fam == 4 else "ip6 saddr"
        addrs = ", ".join(str(v) for v in vips if v.version == fam)
        rules.append(
            f"    {sel} {{ {addrs} }} tcp flags & (syn | rst) == syn "
            f"tcp option maxseg size > {value} tcp option maxseg size set {value} "
            f'comment "glb: tunnelled IPv{fam} VIPs"'
        )
    return (
        f"table {NFT_FAMILY} {NFT_TABLE}\n"
        f"delete table {NFT_FAMILY} {NFT_TABLE}\n"
        f"table {NFT_FAMILY} {NFT_TABLE} {{\n"
        f"  chain mss_clamp {{\n"
        f"    type filter hook output priority mangle; policy accept;\n"
        + "\n".join(rules) + "\n"
        f"  }}\n"
        f"}}\n"
    )


def plan_setup(req: Request, facts: Facts, *, daemon: bool = True, stats_file: str = "", log_file: str = "") -> Plan:
    """Decide every change setup makes, from the request and the facts; pure.

    ``daemon``: start the userspace decapsulator as a separate process
    (a :class:`StartDecap` step); False when the caller runs it itself.
    """
    notes: list[str] = []
    if not facts.privileged:
        raise RealServerError("glb realserver setup needs root (CAP_NET_ADMIN and CAP_NET_RAW): run it as root")
    mode = modes.MODES[req.mode]
    device, decap = mode.realserver_devices(req, facts, notes=notes)

    # A VIP held by another interface (say eth0) would be answered for and routed there: refuse.
    for vip in req.vips if mode.holds_vips else ():
        text = str(vip)
        for ifname, addrs in sorted(facts.addresses.items()):
            if text in addrs and ifname != device[vip.version] and not (decap == "userspace" and ifname == req.tun_device):
                raise RealServerError(
                    f"VIP {vip} is already configured on {ifname}: remove it there first "
                    f"(a real server holds the VIP only on {device[vip.version]})"
                )

    steps: list[Step] = []
    new_tun = decap == "userspace"
    if new_tun:
        if req.tun_device in facts.links:
            notes.append(f"{req.tun_device} exists already (a leftover?): it is replaced")
        steps.append(CreateTun(req.tun_device))
    else:
        for dev in sorted(set(device.values())):
            link = facts.links.get(dev)
            if link is None:
                raise RealServerError(f"interface {dev} does not exist")
            if not link.up:
                steps.append(LinkUp(dev))
    for vip in req.vips if mode.holds_vips else ():
        dev = device[vip.version]
        if not new_tun and str(vip) in facts.addresses.get(dev, frozenset()):
            notes.append(f"{vip} is already on {dev}; kept as it is")
            continue
        steps.append(AddAddress(dev, str(vip), vip.max_prefixlen))
    steps += mode.realserver_steps(req, facts, device, new_tun=new_tun, daemon=daemon, stats_file=stats_file,
                                   log_file=log_file, notes=notes)
    return Plan(req.mode, decap, tuple(str(v) for v in req.vips), device, tuple(steps), tuple(notes))
