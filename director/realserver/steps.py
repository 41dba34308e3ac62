"""The real server's changes as steps: each knows how to apply and undo itself, and the state file records them.

A :class:`~director.realserver.plan.Plan` is an ordered list of steps
(:class:`SetSysctl`, :class:`AddAddress`, ...). Each carries what it needs
to be undone (a sysctl's previous value) and performs itself through a
:class:`System` (``linux.LinuxSystem``, or a fake in tests).
:func:`apply_plan` performs a plan and rewrites the state file after each
step, so a crash half-way still leaves an exact record; a failing step
rolls back the ones before it. :func:`undo_steps` undoes a record in
reverse order (teardown). A new kind of step is one class here and its
entry in :data:`STEP_KINDS`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Union

from glb.errors import RealServerError

if TYPE_CHECKING:
    from director.realserver.plan import Facts, Plan as RealServerPlan, Request

log = logging.getLogger("glb.realserver")

STATE_VERSION = 1
NFT_FAMILY = "inet"
NFT_TABLE = "glb_realserver"


def conf_key(version: int, device: str, name: str) -> str:
    return f"net/ipv{version}/conf/{device}/{name}"


def display_key(key: str) -> str:
    """``net/ipv4/conf/all/arp_ignore`` -> ``net.ipv4.conf.all.arp_ignore`` (what sysctl(8) prints)."""
    return ".".join(part.replace(".", "/") for part in key.split("/"))



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
    def start_bpf_decap(self, step: BpfDecap) -> dict: ...
    def stop_bpf_decap(self, runtime: Mapping) -> None: ...
    def set_default_route(self, version: int, gateway: str | None, device: str | None) -> None: ...
    def delete_default_route(self, version: int, gateway: str) -> None: ...
    def add_policy_route(self, version: int, gateway: str, ports: tuple[int, ...]) -> None: ...
    def delete_policy_route(self, version: int, gateway: str, ports: tuple[int, ...]) -> None: ...


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

    def apply(self, system: System) -> dict:
        system.set_sysctl(self.key, self.value)
        return {}

    def undo(self, system: System, runtime: Mapping) -> None:
        if self.previous is None:
            return
        now = system.get_sysctl(self.key)
        if now is None:
            log.warning("%s is gone; nothing to restore", display_key(self.key))
            return
        if now != self.value:
            log.warning("%s was changed to %s since setup; restoring %s anyway", display_key(self.key), now, self.previous)
        system.set_sysctl(self.key, self.previous)


@dataclass(frozen=True)
class LinkUp:
    """Bring an existing interface up; undo brings it down again."""

    ifname: str
    kind = "link_up"

    def describe(self) -> str:
        return f"bring {self.ifname} up (it was down)"

    def apply(self, system: System) -> dict:
        system.link_up(self.ifname, True)
        return {}

    def undo(self, system: System, runtime: Mapping) -> None:
        system.link_up(self.ifname, False)


@dataclass(frozen=True)
class CreateTun:
    """Create a persistent TUN device (up); undo deletes it."""

    ifname: str
    kind = "create_tun"

    def describe(self) -> str:
        return f"create TUN device {self.ifname} for the userspace decapsulator"

    def apply(self, system: System) -> dict:
        system.create_tun(self.ifname)
        return {}

    def undo(self, system: System, runtime: Mapping) -> None:
        system.delete_link(self.ifname)


@dataclass(frozen=True)
class AddAddress:
    """Add ``address/prefixlen`` to ``ifname``; undo removes it."""

    ifname: str
    address: str
    prefixlen: int
    kind = "address"

    def describe(self) -> str:
        return f"add {self.address}/{self.prefixlen} to {self.ifname}"

    def apply(self, system: System) -> dict:
        system.add_address(self.ifname, self.address, self.prefixlen)
        return {}

    def undo(self, system: System, runtime: Mapping) -> None:
        system.del_address(self.ifname, self.address, self.prefixlen)


@dataclass(frozen=True)
class NftTable:
    """Load ``script`` (which (re)creates table inet glb_realserver); undo deletes the table."""

    script: str
    mss: tuple[tuple[int, int], ...] = ()
    kind = "nft_table"

    def describe(self) -> str:
        what = ", ".join(f"IPv{f} MSS {m}" for f, m in self.mss)
        return f"nftables table {NFT_FAMILY} {NFT_TABLE}: clamp TCP MSS of SYN/SYN-ACKs from the VIPs ({what})"

    def apply(self, system: System) -> dict:
        system.nft_load(self.script)
        return {}

    def undo(self, system: System, runtime: Mapping) -> None:
        system.nft_delete()


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

    def apply(self, system: System) -> dict:
        return system.start_decap(self)

    def undo(self, system: System, runtime: Mapping) -> None:
        system.stop_decap(runtime)


@dataclass(frozen=True)
class BpfDecap:
    """Load the tc-BPF decapsulator with ``vips`` and attach it at ``interfaces``' ingress (maps pinned in
    ``pin_dir`` where that is on a bpffs); undo detaches it and removes the pins (director/realserver/bpfdecap.py)."""

    vips: tuple[str, ...]
    interfaces: tuple[str, ...]
    pin_dir: str
    kind = "bpf_decap"

    def describe(self) -> str:
        return (f"attach the BPF decapsulator at tc ingress of {', '.join(self.interfaces)} "
                f"(IP-in-IP to the VIPs unwrapped in the kernel; maps pinned in {self.pin_dir} if bpffs is mounted)")

    def apply(self, system: System) -> dict:
        return system.start_bpf_decap(self)

    def undo(self, system: System, runtime: Mapping) -> None:
        system.stop_bpf_decap(runtime)


@dataclass(frozen=True)
class DefaultRoute:
    """Point the IPv``version`` default route at ``gateway`` (NAT: the director); undo puts back
    the one it replaced (``previous_gateway`` / ``previous_device``), or removes ours if there was none."""

    version: int
    gateway: str
    previous_gateway: str | None = None
    previous_device: str | None = None
    kind = "default_route"

    def describe(self) -> str:
        was = self.previous_gateway or (f"dev {self.previous_device}" if self.previous_device else None)
        return (f"IPv{self.version} default route via {self.gateway} (was {was or 'none'}): "
                f"replies to clients go back through the director")

    def apply(self, system: System) -> dict:
        system.set_default_route(self.version, self.gateway, None)
        return {}

    def undo(self, system: System, runtime: Mapping) -> None:
        if self.previous_gateway is None and self.previous_device is None:
            system.delete_default_route(self.version, self.gateway)
        else:
            system.set_default_route(self.version, self.previous_gateway, self.previous_device)


@dataclass(frozen=True)
class PolicyRoute:
    """NAT without touching the default route: what leaves from ``ports`` (the services' replies,
    TCP and UDP) is routed via ``gateway`` (the director) by policy routing; the main table's more
    specific routes still win (linux.py: POLICY_TABLE, POLICY_PRIORITY). Undo removes exactly that."""

    version: int
    gateway: str
    ports: tuple[int, ...]
    kind = "policy_route"

    def describe(self) -> str:
        return (f"IPv{self.version} policy route: from port {', '.join(map(str, self.ports))} via {self.gateway} "
                f"(the default route left alone): replies to clients go back through the director")

    def apply(self, system: System) -> dict:
        system.add_policy_route(self.version, self.gateway, self.ports)
        return {}

    def undo(self, system: System, runtime: Mapping) -> None:
        system.delete_policy_route(self.version, self.gateway, self.ports)


Step = Union[SetSysctl, LinkUp, CreateTun, AddAddress, NftTable, StartDecap, BpfDecap, DefaultRoute, PolicyRoute]
STEP_KINDS = {cls.kind: cls for cls in (SetSysctl, LinkUp, CreateTun, AddAddress, NftTable, StartDecap, BpfDecap,
                                        DefaultRoute, PolicyRoute)}


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



def proc_start_time(pid: int) -> int | None:
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




def write_state(path: Path, doc: dict) -> None:
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


def undo_steps(system: System, records: Sequence[Mapping]) -> list[tuple[Mapping, str]]:
    """Undo applied ``records`` (``{"step": ..., "runtime": ...}``) in reverse order.

    Keeps going past a failure; returns the records that could not be undone with the reason.
    """
    failed: list[tuple[Mapping, str]] = []
    for rec in reversed(records):
        try:
            step = step_from_dict(rec["step"])
            step.undo(system, rec.get("runtime") or {})
            log.info("undone: %s", step.describe())
        except RealServerError as e:
            failed.append((rec, str(e)))
            log.error("could not undo %s: %s", rec.get("step"), e)
    failed.reverse()
    return failed


def apply_plan(system: System, plan: RealServerPlan, state_file: Path, *, owner_pid: int | None = None) -> dict:
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
        "owner_start_time": proc_start_time(owner_pid) if owner_pid else None,
        "steps": [],
    }
    write_state(state_file, doc)
    for step in plan.steps:
        try:
            runtime = step.apply(system)
        except RealServerError as e:
            log.error("setup failed at: %s: %s; rolling back", step.describe(), e)
            failed = undo_steps(system, doc["steps"])
            if failed:
                doc["steps"] = [r for r, _ in failed]
                write_state(state_file, doc)
                raise RealServerError(f"{e} (and {len(failed)} change(s) could not be rolled back; see 'glb realserver teardown')") from None
            state_file.unlink(missing_ok=True)
            raise
        doc["steps"].append({"step": step_to_dict(step), "runtime": runtime})
        write_state(state_file, doc)
        log.info("changed: %s", step.describe())
    return doc


