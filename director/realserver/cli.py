"""Prepare a real server for a GLB director (DR or TUN) and restore it afterwards.

``glb realserver setup --vip ADDR [--vip ...] --mode dr|tun`` calls
:func:`setup`; ``glb realserver teardown`` calls :func:`teardown`;
``glb realserver status`` calls :func:`status`. See docs/realserver.md.

The package, in layers, so the decisions are testable without root:

* **Planning (pure)**, ``plan.py``: the request and a snapshot of the
  system in, an ordered list of steps out; what each forwarding mode needs
  is its module's in director/modes/.
* **Steps and execution**, ``steps.py``: each step applies and undoes
  itself; ``apply_plan`` records every applied step in the state file,
  ``undo_steps`` undoes a record (teardown).
* **The Linux adapter**, ``linux.py``: ``LinuxSystem`` reads the facts and
  performs the steps.
* **This module**: the three commands, the foreground mode and the state
  file's location.

What setup changes:

* DR: each VIP as /32 (/128) on ``lo`` (``lo`` brought up if it was
  down); for IPv4 VIPs ``arp_ignore=1`` and ``arp_announce=2`` on ``all``
  and ``lo`` (raised to those values, never lowered), so the host neither
  answers ARP for the VIP nor uses it as an ARP source.
* TUN with the kernel's tunnel driver (``ipip``/``ip6_tunnel``): the VIPs on
  the fallback device ``tunl0``/``ip6tnl0`` (brought up), its rp_filter made
  loose, the same ARP settings, and the MSS clamp.
* TUN without it, with the tc-BPF decapsulator (``--decap bpf``, what ``auto``
  takes where the program loads): the VIPs on ``lo`` with the DR ARP settings,
  rp_filter loose on the interfaces it listens on, the MSS clamp, and the
  program at their tc ingress (:mod:`director.realserver.bpfdecap`).
* TUN with the userspace decapsulator: a persistent TUN device ``glbtun0`` holding
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
import json
import logging
import os
import signal
from pathlib import Path

from director.realserver.linux import LinuxSystem, has_privileges, stop_process
from director.realserver.plan import Plan, Request, parse_request, plan_setup
from director.realserver.steps import System, apply_plan, proc_start_time, read_state, step_from_dict, undo_steps, write_state
from glb.errors import RealServerError

log = logging.getLogger("glb.realserver")

DEFAULT_STATE_FILE = Path("/run/glb/realserver.json")


def _side_files(state_file: Path) -> tuple[Path, Path]:
    stem = state_file.with_suffix("")
    return stem.with_name(stem.name + "-decap.json"), stem.with_name(stem.name + "-decap.log")


def setup(vips: list[str], mode: str, *, state_file: Path = DEFAULT_STATE_FILE, mss: int | None = None,
          foreground: bool = False, decap: str = "auto", dry_run: bool = False,
          system: System | None = None, gateways: list[str] | None = None,
          policy_ports: list[int] | None = None) -> int:
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
    req = parse_request(vips, mode, decap=decap, mss=mss, gateways=gateways or (), policy_ports=policy_ports or ())
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
        write_state(state_file, doc)
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
    if owner and owner != os.getpid() and proc_start_time(owner) is not None and proc_start_time(owner) == owner_start:
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
            decap = {"pid": rt.get("pid"), "running": proc_start_time(rt.get("pid") or 0) == rt.get("start_time")}
    stats = read_stats(stats_file) if doc.get("decap") == "userspace" else None
    if doc.get("decap") == "bpf":
        from director.realserver.bpfdecap import read_counters

        pins = [(rec.get("runtime") or {}).get("pin_dir") for rec in doc["steps"] if rec["step"].get("kind") == "bpf_decap"]
        counters = read_counters(pins[0]) if pins else None
        stats = {"counters": counters} if counters is not None else None
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
    elif doc.get("decap") == "bpf":
        print("  counters: not readable (the BPF decapsulator's maps are pinned only where a bpffs is mounted)")
    return 0
