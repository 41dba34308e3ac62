"""`python -m deploy.lab`: build, inspect and remove the GLB lab (root).

    python -m deploy.lab up          build the lab and leave it running
    python -m deploy.lab status      namespaces, processes, DNS answers, VIP reachability
    python -m deploy.lab glb ARGS    run `glb ARGS` on the lab's ops host (e.g. `glb status`)
    python -m deploy.lab exec ROLE CMD...   run a command on a lab host (e.g. client curl ...)
    python -m deploy.lab demo        build (if needed) and run the failover demo
    python -m deploy.lab down        remove every namespace and process of the lab

`bash scripts/demo` installs what is needed and runs `demo`;
`bash scripts/demo down` runs `down`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from deploy.lab import topology as topo
from deploy.lab.lab import CONFIG, DASHBOARD_PORT, DEFAULT_PREFIX, DEFAULT_STATE_DIR, Lab, glb_command
from deploy.lab.net import LabError, exec_argv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.lab", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_hosts())
    ap.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"namespace name prefix (default {DEFAULT_PREFIX})")
    ap.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help=f"state, configs, logs (default {DEFAULT_STATE_DIR})")
    ap.add_argument("--config", type=Path, default=CONFIG, help="the GLB config (default deploy/examples/lab.yaml)")
    ap.add_argument("--dashboard-port", type=int, default=DASHBOARD_PORT, metavar="PORT",
                    help=f"the dashboard's port on this host's loopback (default {DASHBOARD_PORT})")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("up", help="build the lab and leave it running")
    sub.add_parser("down", help="remove every namespace and process of the lab")
    st = sub.add_parser("status", help="what is running, DNS answers, VIP reachability")
    st.add_argument("--json", action="store_true")
    demo = sub.add_parser("demo", help="build the lab and run the failover demo")
    demo.add_argument("--hold", type=float, default=None,
                      help="keep the lab up this many seconds after the demo (default: until Ctrl-C when stdin is a "
                           "terminal, else 0 and tear down)")
    demo.add_argument("--keep", action="store_true", help="leave the lab up when the demo ends")
    g = sub.add_parser("glb", help="run `glb ARGS` in the lab (the lab's config is added): drain/undrain/weight/"
                       "director list --site S on S's director host, the rest on the ops host")
    g.add_argument("args", nargs=argparse.REMAINDER)
    ex = sub.add_parser("exec", help="run a command on a lab host")
    ex.add_argument("role", choices=list(topo.BY_ROLE))
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)

    if os.geteuid() != 0:
        print("deploy.lab: needs root (network namespaces)", file=sys.stderr)
        return 1
    # SIGTERM tears down like Ctrl-C does (the `finally` blocks of up/demo run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log = _printer()
    lab = Lab(prefix=args.prefix, state_dir=args.state_dir, config=args.config, log=log,
              dashboard_port=args.dashboard_port)
    try:
        if args.command == "up":
            summary = lab.up()
            log(f"lab up in {summary['seconds']} s; explore with 'bash scripts/demo status', 'bash scripts/demo glb "
                "status', 'bash scripts/demo exec client curl -s http://app.example.net/'; remove it with "
                "'bash scripts/demo down'")
            return 0
        if args.command == "down":
            removed = lab.down()
            n_ns = sum(r.startswith("namespace") for r in removed)
            log(f"lab down: {n_ns} namespaces and {len(removed) - n_ns} processes removed" if removed
                else "nothing to remove")
            return 0
        if args.command == "status":
            return _status(lab, args.json)
        if args.command == "demo":
            from deploy.lab.demo import run_demo

            return run_demo(lab, hold=args.hold, keep=args.keep)
        if args.command == "glb":
            return _glb(lab, [a for a in args.args if a != "--"])
        if args.command == "exec":
            return _exec(lab, args.role, [a for a in args.cmd if a != "--"] or ["bash"])
    except LabError as e:
        print(f"deploy.lab: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... status | head`
        return 0
    return 2


SITE_COMMANDS = ("drain", "undrain", "weight", "director")


def _glb(lab: Lab, rest: list[str]) -> int:
    """`glb ARGS` where an operator would run it: commands that talk to a director's admin API on that
    director's host (they reach it at its status_listen), everything else on the ops host; the lab's
    config is added when the command takes one and none is given."""
    role = "ops"
    if rest[:1] and rest[0] in SITE_COMMANDS and "--site" in rest:
        site = rest[rest.index("--site") + 1] if rest.index("--site") + 1 < len(rest) else ""
        if f"{site}-director" in topo.BY_ROLE:
            role = f"{site}-director"
    if rest[:1] and rest[0] in SITE_COMMANDS + ("status",) and "--config" not in rest:
        rest = rest + ["--config", str(lab.config_path)]
    return _exec(lab, role, glb_command() + rest)


def _exec(lab: Lab, role: str, argv: list[str]) -> int:
    if not lab.is_up():
        raise LabError("the lab is not up: run 'python -m deploy.lab up' first")
    os.execvpe(exec_argv(lab.ns(role), [])[0], exec_argv(lab.ns(role), argv), dict(os.environ))


def _status(lab: Lab, as_json: bool) -> int:
    st = lab.status()
    if as_json:
        print(json.dumps(st, indent=2))
        return 0 if st["up"] else 3
    if not st["up"]:
        print("the lab is not up")
        return 3
    missing = [n for n, ok in st["namespaces"].items() if not ok]
    print(f"lab: {len(st['namespaces']) - len(missing)}/{len(st['namespaces'])} namespaces, phase {st['phase']}, "
          f"state {st['state_file']}, logs {st['logs']}")
    for name, p in st["processes"].items():
        print(f"  {name:<18} pid {p['pid']:<8} {'running' if p['running'] else 'STOPPED':<8} in {p['namespace']}")
    for k, v in st.get("dns", {}).items():
        print(f"  DNS app.{topo.ZONE} via {k:<9} {v}")
    for k, v in st.get("vip_path", {}).items():
        print(f"  fetch through {k}'s VIP: {v}")
    print(f"  dashboard: {lab.dashboard_url} (in a browser on this host)")
    print()
    print(lab.glb_status())
    return 0


def _hosts() -> str:
    lines = ["lab hosts (ROLE: what, address):"]
    for h in topo.HOSTS:
        addr = ", ".join(a.address for a in h.attachments) or "-"
        lines.append(f"  {h.role:<13} {addr:<18} {h.what}")
    return "\n".join(lines)


def _printer():
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:5.1f}s] {msg}", flush=True)

    return log


if __name__ == "__main__":
    sys.exit(main())
