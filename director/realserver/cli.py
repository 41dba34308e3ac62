"""Prepare a real server for a GLB director (DR or TUN) and restore it afterwards.

``glb realserver setup --vip ADDR [--vip ...] --mode dr|tun`` calls
:func:`setup`; ``glb realserver teardown`` calls :func:`teardown`;
``glb realserver status`` calls :func:`status`. See docs/realserver.md.

Three layers, so the decisions are testable without root:

* **Planning (pure).** :func:`parse_request` validates what the operator
  asked for; :func:`plan_setup` takes that request and a :class:`Facts`
  snapshot of the system (current sysctls, links, addresses, kernel tunnel
  support, tools) and returns a :class:`Plan`: an ordered list of small
  steps (:class:`SetSysctl`, :class:`AddAddress`, ...) that each carry what
  they need to be undone (a sysctl's previous value, whether an address was
  already there). It does no I/O.
* **The system adapter.** :class:`LinuxSystem` reads facts and performs
  steps with pyroute2 (links, addresses), ``/proc/sys`` (sysctls), the TUN
  ioctl, ``nft`` and a child process (the userspace decapsulator). Tests use
  an in-memory fake with the same methods.
* **Execution.** :func:`apply_plan` performs the steps one by one and
  rewrites the state file after each, so a crash half-way still leaves an
  exact record; a failing step rolls back the ones before it.
  :func:`undo_steps` undoes a record in reverse order (teardown).

What setup changes:

* DR: each VIP as /32 (/128) on ``lo`` (``lo`` brought up if it was
  down); for IPv4 VIPs ``arp_ignore=1`` and ``arp_announce=2`` on ``all``
  and ``lo`` (raised to those values, never lowered), so the host neither
  answers ARP for the VIP nor uses it as an ARP source.
* TUN with the kernel's tunnel driver (``ipip``/``ip6_tunnel``): the VIPs on
  the fallback device ``tunl0``/``ip6tnl0`` (brought up), its rp_filter made
  loose, the same ARP settings, and the MSS clamp.
* TUN without it (this machine): a persistent TUN device ``glbtun0`` holding
  the VIPs, rp_filter loose on it, the ARP settings, the MSS clamp, and the
  userspace decapsulator (:mod:`director.realserver.decap`) attached to the device:
  started as a daemon (default; its PID is recorded and teardown stops it)
  or run in this process with ``foreground=True`` until SIGTERM, after
  which everything is restored.
* MSS clamp (TUN): nftables table ``inet glb_realserver`` rewriting the MSS
  option of SYN/SYN-ACKs leaving from a VIP down to the uplink MTU minus
  the tunnel and header overhead (1440 for IPv4 on a 1500-byte path, 1400
  for IPv6 in IPv6), so clients never send segments that no longer fit once
  the director has encapsulated them.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, Union

from glb import nft as nftables
from glb.errors import NftError, RealServerError

log = logging.getLogger("glb.realserver")

MODES = ("dr", "tun")
DECAP_CHOICES = ("auto", "kernel", "userspace")
DEFAULT_STATE_FILE = Path("/run/glb/realserver.json")
STATE_VERSION = 1

TUN_DEVICE = "glbtun0"
NFT_FAMILY = "inet"
NFT_TABLE = "glb_realserver"
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

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13

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
    """``dr`` or ``tun``."""
    decap: str = "auto"
    """TUN only: ``kernel`` (ipip/ip6tnl driver), ``userspace`` (director.realserver.decap) or ``auto`` (kernel if it can)."""
    mss: int | None = None
    """TUN only: TCP MSS for IPv4 VIPs (IPv6 VIPs get 40 less); 0 = no clamp; None = derived from the uplink MTU."""
    tun_device: str = TUN_DEVICE
    """Name of the TUN device the userspace decapsulator writes into."""

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
                  tun_device: str = TUN_DEVICE) -> Request:
    """Validate what the operator asked for; RealServerError (one line) on any mistake."""
    if mode not in MODES:
        raise RealServerError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
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


def conf_key(version: int, device: str, name: str) -> str:
    return f"net/ipv{version}/conf/{device}/{name}"


def display_key(key: str) -> str:
    """``net/ipv4/conf/all/arp_ignore`` -> ``net.ipv4.conf.all.arp_ignore`` (what sysctl(8) prints)."""
    return ".".join(part.replace(".", "/") for part in key.split("/"))


def sysctl_keys(req: Request) -> list[str]:
    """The sysctls :func:`plan_setup` may read for this request (the adapter reads exactly these)."""
    keys: list[str] = []
    if 4 in req.families:
        for dev in ("all", "lo"):
            keys += [conf_key(4, dev, "arp_ignore"), conf_key(4, dev, "arp_announce")]
        if req.mode == "tun":
            for dev in ("all", "default", KERNEL_TUNNELS[4][1]):
                keys.append(conf_key(4, dev, "rp_filter"))
    return keys


# ---------------------------------------------------------------------------
# Steps and plans
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SetSysctl:
    """Write ``value`` to ``/proc/sys/<key>``; undo writes ``previous`` back (None: on a device setup creates, nothing to restore)."""

    key: str
    value: str
    previous: str | None
    why: str = ""
    kind = "sysctl"

    def describe(self) -> str:
        was = f" (was {self.previous})" if self.previous is not None else ""
        return f"sysctl {display_key(self.key)}={self.value}{was}" + (f": {self.why}" if self.why else "")


@dataclass(frozen=True)
class LinkUp:
    """Bring an existing interface up; undo brings it down again."""

    ifname: str
    kind = "link_up"

    def describe(self) -> str:
        return f"bring {self.ifname} up (it was down)"


@dataclass(frozen=True)
class CreateTun:
    """Create a persistent TUN device (up); undo deletes it."""

    ifname: str
    kind = "create_tun"

    def describe(self) -> str:
        return f"create TUN device {self.ifname} for the userspace decapsulator"


@dataclass(frozen=True)
class AddAddress:
    """Add ``address/prefixlen`` to ``ifname``; undo removes it."""

    ifname: str
    address: str
    prefixlen: int
    kind = "address"

    def describe(self) -> str:
        return f"add {self.address}/{self.prefixlen} to {self.ifname}"


@dataclass(frozen=True)
class NftTable:
    """Load ``script`` (which (re)creates table inet glb_realserver); undo deletes the table."""

    script: str
    mss: tuple[tuple[int, int], ...] = ()
    kind = "nft_table"

    def describe(self) -> str:
        what = ", ".join(f"IPv{f} MSS {m}" for f, m in self.mss)
        return f"nftables table {NFT_FAMILY} {NFT_TABLE}: clamp TCP MSS of SYN/SYN-ACKs from the VIPs ({what})"


@dataclass(frozen=True)
class StartDecap:
    """Start the userspace decapsulator as a daemon; undo stops it (by recorded PID and start time)."""

    tun: str
    vips: tuple[str, ...]
    stats_file: str
    log_file: str
    kind = "decap"

    def describe(self) -> str:
        return f"start the userspace decapsulator on {self.tun} (counters in {self.stats_file}, log {self.log_file})"


Step = Union[SetSysctl, LinkUp, CreateTun, AddAddress, NftTable, StartDecap]
STEP_KINDS = {cls.kind: cls for cls in (SetSysctl, LinkUp, CreateTun, AddAddress, NftTable, StartDecap)}


def step_to_dict(step: Step) -> dict:
    d = {"kind": step.kind, **asdict(step)}
    for k, v in d.items():
        if isinstance(v, tuple):
            d[k] = [list(x) if isinstance(x, tuple) else x for x in v]
    return d


def step_from_dict(d: Mapping) -> Step:
    try:
        cls = STEP_KINDS[d["kind"]]
        args = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k, v in args.items():
            if isinstance(v, list):
                args[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        return cls(**args)
    except (KeyError, TypeError) as e:
        raise RealServerError(f"unreadable step in the state file: {dict(d)!r} ({e})") from None


@dataclass(frozen=True)
class Plan:
    """What setup will do, in order."""

    mode: str
    decap: str | None
    """``kernel`` / ``userspace`` for TUN, None for DR."""
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


def _arp_steps(facts: Facts, devices: Sequence[str], *, notes: list[str]) -> list[SetSysctl]:
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


def _rp_filter_step(facts: Facts, device: str, *, new_device: bool, notes: list[str]) -> SetSysctl | None:
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
    decap: str | None = None
    if req.mode == "dr":
        device = {f: "lo" for f in req.families}
        if req.mss is not None or req.decap != "auto":
            notes.append("--mss and --decap apply to TUN mode only; ignored for DR")
    else:
        kernel_ok = all(facts.kernel_tunnels.get(f) for f in req.families)
        if req.decap == "kernel" and not kernel_ok:
            missing = ", ".join(KERNEL_TUNNELS[f][0] for f in sorted(req.families) if not facts.kernel_tunnels.get(f))
            raise RealServerError(f"this kernel cannot decapsulate in the kernel (no {missing} driver): use --decap userspace or auto")
        decap = "kernel" if (req.decap == "kernel" or (req.decap == "auto" and kernel_ok)) else "userspace"
        if decap == "kernel":
            device = {f: facts.kernel_tunnels[f] for f in req.families}
        else:
            if not facts.tun:
                raise RealServerError("userspace decapsulation needs /dev/net/tun: load the tun module (modprobe tun)")
            device = {f: req.tun_device for f in req.families}
        if req.mss != 0 and not facts.nft:
            raise RealServerError("TUN mode clamps TCP MSS with nftables but 'nft' is not installed: install nftables, or pass --mss 0 to skip the clamp")

    # A VIP held by another interface (say eth0) would be answered for and routed there: refuse.
    for vip in req.vips:
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
    for vip in req.vips:
        dev = device[vip.version]
        if not new_tun and str(vip) in facts.addresses.get(dev, frozenset()):
            notes.append(f"{vip} is already on {dev}; kept as it is")
            continue
        steps.append(AddAddress(dev, str(vip), vip.max_prefixlen))
    if 4 in req.families:
        # lo as well in DR, as the LVS documentation has it; a TUN device never does ARP.
        steps += _arp_steps(facts, ["lo"] if req.mode == "dr" else [], notes=notes)
        if req.mode == "tun":
            rp = _rp_filter_step(facts, device[4], new_device=new_tun, notes=notes)
            if rp:
                steps.append(rp)
    if req.mode == "tun":
        mss = mss_values(req, facts)
        if mss:
            if facts.nft_table:
                notes.append(f"nftables table {NFT_FAMILY} {NFT_TABLE} exists already (a leftover?): it is replaced")
            steps.append(NftTable(nft_script(req.vips, mss), mss))
        else:
            notes.append("MSS clamping is off (--mss 0): clients may need a fragmentation round trip")
        if new_tun and daemon:
            steps.append(StartDecap(req.tun_device, tuple(str(v) for v in req.vips), stats_file, log_file))
    return Plan(req.mode, decap, tuple(str(v) for v in req.vips), device, tuple(steps), tuple(notes))


# ---------------------------------------------------------------------------
# The system interface and the Linux adapter
# ---------------------------------------------------------------------------


class System(Protocol):
    """What setup/teardown need from the machine. LinuxSystem is the real one; tests use a fake."""

    def facts(self, req: Request) -> Facts: ...
    def set_sysctl(self, key: str, value: str) -> None: ...
    def get_sysctl(self, key: str) -> str | None: ...
    def link_up(self, ifname: str, up: bool) -> None: ...
    def create_tun(self, ifname: str) -> None: ...
    def delete_link(self, ifname: str) -> None: ...
    def add_address(self, ifname: str, address: str, prefixlen: int) -> None: ...
    def del_address(self, ifname: str, address: str, prefixlen: int) -> None: ...
    def nft_load(self, script: str) -> None: ...
    def nft_delete(self) -> None: ...
    def start_decap(self, step: StartDecap) -> dict: ...
    def stop_decap(self, runtime: Mapping) -> None: ...


def _capabilities() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return -1 if os.geteuid() == 0 else 0


def has_privileges() -> bool:
    caps = _capabilities()
    return bool(caps & (1 << CAP_NET_ADMIN)) and bool(caps & (1 << CAP_NET_RAW))


def _proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): tells a process from a later one with its PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        rest = stat[stat.rindex(")") + 2:].split()
        if rest[0] == "Z":
            return None  # exited, waiting to be reaped
        return int(rest[19])
    except (ValueError, IndexError):
        return None


class LinuxSystem:
    """The real adapter: pyroute2 for links and addresses, /proc/sys, the TUN ioctl, nft, a child process."""

    def __init__(self, proc_sys: Path = Path("/proc/sys")):
        self.proc_sys = proc_sys
        self._ipr = None

    # pyroute2 is imported lazily so planning and `--help` never pay for it.
    @property
    def ipr(self):
        if self._ipr is None:
            try:
                from pyroute2 import IPRoute
            except ImportError as e:
                raise RealServerError(f"pyroute2 is not installed: {e}") from None
            self._ipr = IPRoute()
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def _netlink(self, what: str, fn, *args, ok: tuple[int, ...] = (), **kw):
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            return fn(*args, **kw)
        except NetlinkError as e:
            if e.code in ok:
                return None
            if e.code == errno.EPERM:
                raise RealServerError(f"{what}: permission denied (needs root / CAP_NET_ADMIN)") from None
            raise RealServerError(f"{what}: {os.strerror(e.code) if e.code else e}") from None

    def _index(self, ifname: str) -> int | None:
        found = self.ipr.link_lookup(ifname=ifname)
        return found[0] if found else None

    # -- facts -------------------------------------------------------------

    def facts(self, req: Request) -> Facts:
        privileged = has_privileges()
        kernel: dict[int, str | None] = {}
        if req.mode == "tun" and req.decap != "userspace" and privileged:
            # First, as probing may load the driver, which creates its fallback device.
            for fam in sorted(req.families):
                kernel[fam] = self._kernel_tunnel(fam)
        links: dict[str, Link] = {}
        names: dict[int, str] = {}
        for msg in self._netlink("listing interfaces", self.ipr.get_links):
            name = msg.get_attr("IFLA_IFNAME")
            names[msg["index"]] = name
            links[name] = Link(name, bool(msg["flags"] & 1), int(msg.get_attr("IFLA_MTU") or DEFAULT_MTU))
        addresses: dict[str, set[str]] = {}
        for msg in self._netlink("listing addresses", self.ipr.get_addr):
            addr = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
            name = names.get(msg["index"])
            if addr and name:
                try:
                    addresses.setdefault(name, set()).add(str(ipaddress.ip_address(addr.split("%")[0])))
                except ValueError:
                    continue
        sysctls = {}
        for key in sysctl_keys(req):
            value = self.get_sysctl(key)
            if value is not None:
                sysctls[key] = value
        nft = nftables.binary() is not None
        nft_table = False
        if nft and req.mode == "tun" and privileged:
            nft_table = self._nft(["list", "table", NFT_FAMILY, NFT_TABLE]).returncode == 0
        return Facts(
            privileged=privileged,
            links=links,
            addresses={k: frozenset(v) for k, v in addresses.items()},
            sysctls=sysctls,
            kernel_tunnels=kernel,
            uplink_mtu=self._uplink_mtu(names, links),
            nft=nft,
            nft_table=nft_table,
            tun=os.path.exists("/dev/net/tun"),
        )

    def _kernel_tunnel(self, fam: int) -> str | None:
        """The fallback device of the kernel's tunnel driver for ``fam``, loading the driver if needed; None if absent."""
        from pyroute2.netlink.exceptions import NetlinkError

        kind, fallback = KERNEL_TUNNELS[fam]
        if self._index(fallback) is not None:
            return fallback
        probe = f"glbprobe{os.getpid() % 100000}"
        remote = {"ipip_remote": "192.0.2.1"} if fam == 4 else {"ip6tnl_remote": "2001:db8::1"}
        try:
            self.ipr.link("add", ifname=probe, kind=kind, **remote)  # autoloads the module; creates the fallback device
        except NetlinkError as e:
            if e.code != errno.EOPNOTSUPP:  # EOPNOTSUPP: "Unknown device type", no such driver
                log.info("probing the %s driver failed (%s); treating it as absent", kind, e)
            return None
        except Exception as e:  # a pyroute2 surprise must not turn into a traceback: fall back to userspace
            log.info("probing the %s driver failed (%s: %s); treating it as absent", kind, type(e).__name__, e)
            return None
        idx = self._index(probe)
        if idx is not None:
            self._netlink(f"deleting probe interface {probe}", self.ipr.link, "del", index=idx, ok=(errno.ENODEV,))
        return fallback if self._index(fallback) is not None else None

    def _uplink_mtu(self, names: Mapping[int, str], links: Mapping[str, Link]) -> int:
        mtus = []
        for fam in (socket.AF_INET, socket.AF_INET6):
            try:
                routes = self.ipr.get_routes(family=fam, table=254)
            except Exception:  # a missing family is not an error here
                continue
            for r in routes:
                if r["dst_len"] != 0 or r["type"] != 1:  # default unicast routes only
                    continue
                oif = r.get_attr("RTA_OIF")
                if oif in names and names[oif] in links:
                    mtus.append(links[names[oif]].mtu)
                for nh in r.get_attr("RTA_MULTIPATH") or ():
                    if nh["oif"] in names:
                        mtus.append(links[names[nh["oif"]]].mtu)
        return min(mtus) if mtus else DEFAULT_MTU

    # -- sysctls -----------------------------------------------------------

    def get_sysctl(self, key: str) -> str | None:
        try:
            return (self.proc_sys / key).read_text().strip()
        except OSError:
            return None

    def set_sysctl(self, key: str, value: str) -> None:
        try:
            (self.proc_sys / key).write_text(f"{value}\n")
        except PermissionError:
            raise RealServerError(f"cannot set {display_key(key)}: permission denied (needs root)") from None
        except OSError as e:
            raise RealServerError(f"cannot set {display_key(key)}={value}: {e.strerror}") from None

    # -- links and addresses -----------------------------------------------

    def link_up(self, ifname: str, up: bool) -> None:
        idx = self._index(ifname)
        if idx is None:
            if up:
                raise RealServerError(f"interface {ifname} does not exist")
            return
        self._netlink(f"setting {ifname} {'up' if up else 'down'}", self.ipr.link, "set", index=idx, state="up" if up else "down")

    def create_tun(self, ifname: str) -> None:
        import fcntl

        from director.realserver.decap import TUN_FLAGS, TUNSETIFF, TUNSETPERSIST

        if self._index(ifname) is not None:
            log.warning("replacing leftover interface %s", ifname)
            self.delete_link(ifname)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise RealServerError(f"cannot open /dev/net/tun: {e.strerror} (modprobe tun?)") from None
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), TUN_FLAGS))
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
        except OSError as e:
            raise RealServerError(f"cannot create TUN device {ifname}: {e.strerror}") from None
        finally:
            os.close(fd)
        self.link_up(ifname, True)

    def delete_link(self, ifname: str) -> None:
        idx = self._index(ifname)
        if idx is not None:
            self._netlink(f"deleting {ifname}", self.ipr.link, "del", index=idx, ok=(errno.ENODEV,))

    def add_address(self, ifname: str, address: str, prefixlen: int) -> None:
        idx = self._index(ifname)
        if idx is None:
            raise RealServerError(f"cannot add {address}: interface {ifname} does not exist")
        kw = {"flags": 0x02} if ":" in address else {}  # IFA_F_NODAD: usable at once
        self._netlink(f"adding {address}/{prefixlen} to {ifname}", self.ipr.addr, "add",
                      index=idx, address=address, prefixlen=prefixlen, ok=(errno.EEXIST,), **kw)

    def del_address(self, ifname: str, address: str, prefixlen: int) -> None:
        idx = self._index(ifname)
        if idx is None:
            return
        self._netlink(f"removing {address}/{prefixlen} from {ifname}", self.ipr.addr, "del",
                      index=idx, address=address, prefixlen=prefixlen, ok=(errno.EADDRNOTAVAIL, errno.ENODEV, errno.ESRCH))

    # -- nftables ----------------------------------------------------------

    @staticmethod
    def _nft(args: list[str], script: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return nftables.run(args, script=script)
        except NftError as e:
            raise RealServerError(str(e)) from None

    def nft_load(self, script: str) -> None:
        res = self._nft(["-f", "-"], script)
        if res.returncode != 0:
            raise RealServerError(f"nft could not load table {NFT_FAMILY} {NFT_TABLE}: {nftables.reason(res)}")

    def nft_delete(self) -> None:
        if nftables.binary() is None:
            return
        res = self._nft(["delete", "table", NFT_FAMILY, NFT_TABLE])
        if res.returncode != 0 and "No such file" not in res.stderr:
            raise RealServerError(f"nft could not delete table {NFT_FAMILY} {NFT_TABLE}: {nftables.reason(res)}")

    # -- the decapsulator daemon --------------------------------------------

    def start_decap(self, step: StartDecap, timeout: float = 10.0) -> dict:
        import director

        pkg_root = str(Path(director.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        argv = [sys.executable, "-m", "director.realserver.decap", "--tun", step.tun, "--stats-file", step.stats_file]
        for v in step.vips:
            argv += ["--vip", v]
        r, w = os.pipe()
        try:
            logf = open(step.log_file, "ab")
        except OSError as e:
            os.close(r)
            os.close(w)
            raise RealServerError(f"cannot open the decapsulator log {step.log_file}: {e.strerror}") from None
        try:
            proc = subprocess.Popen(argv + ["--ready-fd", str(w)], pass_fds=(w,), stdin=subprocess.DEVNULL,
                                    stdout=logf, stderr=logf, start_new_session=True, env=env, cwd="/")
        except OSError as e:
            os.close(r)
            raise RealServerError(f"cannot start the decapsulator: {e.strerror}") from None
        finally:
            os.close(w)
            logf.close()
        try:
            answer = b""
            deadline = time.monotonic() + timeout
            while not answer.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([r], [], [], left)[0]:
                    break
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                answer += chunk
        finally:
            os.close(r)
        text = answer.decode(errors="replace").strip()
        if text != "ready":
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            reason = text.removeprefix("error: ") if text else f"it exited or hung at start; see {step.log_file}"
            raise RealServerError(f"the userspace decapsulator did not start: {reason}")
        proc.returncode = 0  # it lives on as a daemon; keep subprocess from reporting it as lost
        return {"pid": proc.pid, "start_time": _proc_start_time(proc.pid)}

    def stop_decap(self, runtime: Mapping, timeout: float = 10.0) -> None:
        stop_process(runtime.get("pid"), runtime.get("start_time"), timeout=timeout, what="decapsulator")


def stop_process(pid: int | None, start_time: int | None, *, timeout: float = 10.0, what: str = "process") -> bool:
    """SIGTERM the process ``pid`` if it is still the one that started at ``start_time``; wait, then SIGKILL.

    Returns True if it was running. Never signals a PID that now belongs to another process.
    """
    if not pid or _proc_start_time(pid) is None or (start_time is not None and _proc_start_time(pid) != start_time):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    except PermissionError:
        raise RealServerError(f"cannot stop the {what} (PID {pid}): permission denied") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if _proc_start_time(pid) is None:
            return True
        time.sleep(0.02)
    log.warning("the %s (PID %d) ignored SIGTERM for %.0fs; killing it", what, pid, timeout)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# ---------------------------------------------------------------------------
# Execution and the state file
# ---------------------------------------------------------------------------


def _write_state(path: Path, doc: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise RealServerError(f"cannot write the state file {path}: {e.strerror}") from None


def read_state(path: Path) -> dict | None:
    """The state file's document, None if there is none; RealServerError if it is unreadable."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RealServerError(f"cannot read the state file {path}: {e.strerror}") from None
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION or not isinstance(doc.get("steps"), list):
            raise ValueError("not a GLB real-server state document")
        return doc
    except ValueError as e:
        raise RealServerError(f"the state file {path} is not valid: {e}") from None


def _apply_step(system: System, step: Step) -> dict:
    if isinstance(step, SetSysctl):
        system.set_sysctl(step.key, step.value)
    elif isinstance(step, LinkUp):
        system.link_up(step.ifname, True)
    elif isinstance(step, CreateTun):
        system.create_tun(step.ifname)
    elif isinstance(step, AddAddress):
        system.add_address(step.ifname, step.address, step.prefixlen)
    elif isinstance(step, NftTable):
        system.nft_load(step.script)
    elif isinstance(step, StartDecap):
        return system.start_decap(step)
    return {}


def _undo_step(system: System, step: Step, runtime: Mapping) -> None:
    if isinstance(step, SetSysctl):
        if step.previous is None:
            return
        now = system.get_sysctl(step.key)
        if now is None:
            log.warning("%s is gone; nothing to restore", display_key(step.key))
            return
        if now != step.value:
            log.warning("%s was changed to %s since setup; restoring %s anyway", display_key(step.key), now, step.previous)
        system.set_sysctl(step.key, step.previous)
    elif isinstance(step, LinkUp):
        system.link_up(step.ifname, False)
    elif isinstance(step, CreateTun):
        system.delete_link(step.ifname)
    elif isinstance(step, AddAddress):
        system.del_address(step.ifname, step.address, step.prefixlen)
    elif isinstance(step, NftTable):
        system.nft_delete()
    elif isinstance(step, StartDecap):
        system.stop_decap(runtime)


def undo_steps(system: System, records: Sequence[Mapping]) -> list[tuple[Mapping, str]]:
    """Undo applied ``records`` (``{"step": ..., "runtime": ...}``) in reverse order.

    Keeps going past a failure; returns the records that could not be undone with the reason.
    """
    failed: list[tuple[Mapping, str]] = []
    for rec in reversed(records):
        try:
            step = step_from_dict(rec["step"])
            _undo_step(system, step, rec.get("runtime") or {})
            log.info("undone: %s", step.describe())
        except RealServerError as e:
            failed.append((rec, str(e)))
            log.error("could not undo %s: %s", rec.get("step"), e)
    failed.reverse()
    return failed


def apply_plan(system: System, plan: Plan, state_file: Path, *, owner_pid: int | None = None) -> dict:
    """Perform ``plan``, recording each applied step in ``state_file`` as it goes.

    On a failing step, what was applied is undone and the state file removed,
    then RealServerError is raised. Returns the final state document.
    """
    doc = {
        "version": STATE_VERSION,
        "mode": plan.mode,
        "decap": plan.decap,
        "vips": list(plan.vips),
        "devices": {str(k): v for k, v in plan.device.items()},
        "created": time.time(),
        "owner_pid": owner_pid,
        "owner_start_time": _proc_start_time(owner_pid) if owner_pid else None,
        "steps": [],
    }
    _write_state(state_file, doc)
    for step in plan.steps:
        try:
            runtime = _apply_step(system, step)
        except RealServerError as e:
            log.error("setup failed at: %s: %s; rolling back", step.describe(), e)
            failed = undo_steps(system, doc["steps"])
            if failed:
                doc["steps"] = [r for r, _ in failed]
                _write_state(state_file, doc)
                raise RealServerError(f"{e} (and {len(failed)} change(s) could not be rolled back; see 'glb realserver teardown')") from None
            state_file.unlink(missing_ok=True)
            raise
        doc["steps"].append({"step": step_to_dict(step), "runtime": runtime})
        _write_state(state_file, doc)
        log.info("changed: %s", step.describe())
    return doc


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def _side_files(state_file: Path) -> tuple[Path, Path]:
    stem = state_file.with_suffix("")
    return stem.with_name(stem.name + "-decap.json"), stem.with_name(stem.name + "-decap.log")


def setup(vips: list[str], mode: str, *, state_file: Path = DEFAULT_STATE_FILE, mss: int | None = None,
          foreground: bool = False, decap: str = "auto", dry_run: bool = False,
          system: System | None = None) -> int:
    """Prepare this host as a real server for ``vips``; returns the exit status (0).

    ``foreground=False`` (default): apply and return; in TUN mode without the
    kernel driver the decapsulator runs on as a daemon (PID in the state
    file, stopped by :func:`teardown`). ``foreground=True``: apply, then stay
    (running the decapsulator in this process if one is needed) until
    SIGTERM/SIGINT, then restore everything: the shape a systemd
    ``Type=simple`` unit wants. ``dry_run``: print the plan, change nothing.
    Raises RealServerError (one line) for every operator mistake.
    """
    state_file = Path(state_file)
    req = parse_request(vips, mode, decap=decap, mss=mss)
    if not dry_run and not has_privileges() and system is None:
        raise RealServerError("glb realserver setup needs root (CAP_NET_ADMIN and CAP_NET_RAW): run it as root")
    existing = read_state(state_file)
    if existing is not None and not dry_run:
        raise RealServerError(
            f"this host is already set up ({existing.get('mode')} for {', '.join(existing.get('vips', []))}; "
            f"state in {state_file}): run 'glb realserver teardown' first"
        )
    stats_file, log_file = _side_files(state_file)
    own = system is None
    system = system or LinuxSystem()
    try:
        facts = system.facts(req)
        if dry_run:
            facts = dataclasses.replace(facts, privileged=True)
        plan = plan_setup(req, facts, daemon=not foreground, stats_file=str(stats_file), log_file=str(log_file))
        for note in plan.notes:
            log.info("note: %s", note)
        if dry_run:
            print(f"glb realserver setup would ({plan.mode}{', ' + plan.decap + ' decapsulation' if plan.decap else ''}):")
            for line in plan.describe() or ["change nothing"]:
                print(f"  {line}")
            return 0
        if not foreground:
            doc = apply_plan(system, plan, state_file)
            _log_ready(plan, doc, state_file)
            return 0
        return _run_foreground(system, req, plan, state_file, stats_file)
    finally:
        if own and isinstance(system, LinuxSystem):
            system.close()


def _log_ready(plan: Plan, doc: dict, state_file: Path) -> None:
    where = ", ".join(f"IPv{f} on {d}" for f, d in sorted(plan.device.items()))
    log.info("real server ready: %s mode%s, VIPs %s (%s); %d change(s) recorded in %s",
             plan.mode.upper(), f" ({plan.decap} decapsulation)" if plan.decap else "", ", ".join(plan.vips),
             where, len(doc["steps"]), state_file)


def _run_foreground(system: System, req: Request, plan: Plan, state_file: Path, stats_file: Path) -> int:
    """Apply, serve until SIGTERM/SIGINT, restore. Signal handlers are in place before anything changes,
    so a stop request at any moment still ends in a full restore."""
    import threading

    stopping = threading.Event()
    decap = None
    if plan.decap == "userspace":
        from director.realserver.decap import Decapsulator

        decap = Decapsulator(req.tun_device, plan.vips, stats_file=stats_file)

    def on_signal(signum, frame):
        if signum == signal.SIGHUP:
            if decap is not None:
                decap.request_dump()
            else:
                log.info("SIGHUP: nothing to reload (the VIPs come from the command line)")
            return
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stopping.set()
        if decap is not None:
            decap.stop()

    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    old = {sig: signal.signal(sig, on_signal) for sig in sigs}
    try:
        doc = apply_plan(system, plan, state_file, owner_pid=os.getpid())
        try:
            _log_ready(plan, doc, state_file)
            if decap is not None:
                try:
                    decap.open()
                    if not stopping.is_set():
                        decap.run(install_signals=False)
                finally:
                    decap.close()
            else:
                while not stopping.wait(1.0):
                    pass
        finally:
            log.info("stopping: restoring what setup changed")
            _teardown_doc(system, state_file, read_state(state_file) or doc)
        return 0
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _teardown_doc(system: System, state_file: Path, doc: dict) -> int:
    failed = undo_steps(system, doc.get("steps", []))
    if failed:
        doc["steps"] = [r for r, _ in failed]
        _write_state(state_file, doc)
        raise RealServerError(
            f"teardown could not restore {len(failed)} change(s), first: {failed[0][1]}; "
            f"the rest is restored and {state_file} lists what is left"
        )
    state_file.unlink(missing_ok=True)
    _side_files(state_file)[0].unlink(missing_ok=True)  # the decapsulator's counters; its log is kept
    log.info("real server restored: every change setup made is undone")
    return 0


def teardown(state_file: Path = DEFAULT_STATE_FILE, *, system: System | None = None) -> int:
    """Restore everything setup changed (as recorded in ``state_file``); returns 0.

    Idempotent: without a state file there is nothing to do. If a
    ``--foreground`` setup still runs, it is asked to stop (SIGTERM) and
    does the restoring itself.
    """
    state_file = Path(state_file)
    if system is None and not has_privileges():
        raise RealServerError("glb realserver teardown needs root (CAP_NET_ADMIN): run it as root")
    doc = read_state(state_file)
    if doc is None:
        log.info("nothing to tear down: no state file %s", state_file)
        return 0
    owner, owner_start = doc.get("owner_pid"), doc.get("owner_start_time")
    if owner and owner != os.getpid() and _proc_start_time(owner) is not None and _proc_start_time(owner) == owner_start:
        log.info("asking the foreground setup (PID %d) to stop and restore", owner)
        stop_process(owner, owner_start, timeout=15.0, what="foreground setup")
        doc = read_state(state_file)
        if doc is None:
            return 0
    own = system is None
    system = system or LinuxSystem()
    try:
        return _teardown_doc(system, state_file, doc)
    finally:
        if own and isinstance(system, LinuxSystem):
            system.close()


def status(state_file: Path = DEFAULT_STATE_FILE, *, as_json: bool = False) -> int:
    """Print what setup changed and the decapsulator's counters; returns 0 (1 if not set up)."""
    from director.realserver.decap import read_stats

    state_file = Path(state_file)
    doc = read_state(state_file)
    if doc is None:
        print(json.dumps({"set_up": False}) if as_json else f"not set up (no {state_file})")
        return 1
    stats_file, _ = _side_files(state_file)
    decap = None
    for rec in doc["steps"]:
        if rec["step"].get("kind") == "decap":
            rt = rec.get("runtime") or {}
            decap = {"pid": rt.get("pid"), "running": _proc_start_time(rt.get("pid") or 0) == rt.get("start_time")}
    stats = read_stats(stats_file) if doc.get("decap") == "userspace" else None
    if as_json:
        print(json.dumps({"set_up": True, **doc, "decapsulator": decap, "decap_stats": stats}, indent=2, sort_keys=True))
        return 0
    print(f"{doc['mode'].upper()} real server for {', '.join(doc['vips'])}"
          + (f" ({doc['decap']} decapsulation)" if doc.get("decap") else ""))
    for rec in doc["steps"]:
        print(f"  {step_from_dict(rec['step']).describe()}")
    if decap:
        print(f"  decapsulator PID {decap['pid']}: {'running' if decap['running'] else 'NOT RUNNING'}")
    if stats:
        c = stats.get("counters", {})
        print("  counters: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items())))
    return 0
