"""`glb`: the operator's command line.

Every failure an operator can cause (a bad flag, a missing file, an invalid
config, an unreachable Redis) ends in one clear line on stderr and a non-zero
exit; tracebacks are for bugs only, and only with --debug. A reader that
goes away (``glb status | head``) ends the command quietly with 141.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from glb import __version__
from glb.config import FORWARDING
from glb.errors import ConfigError, GLBError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_PIPE = 128 + 13
"""Our reader went away (``glb status | head``): what a shell reports for a
command that SIGPIPE ended, so ``set -o pipefail`` scripts see what they see
with any other tool."""
_RS_STATE = Path("/run/glb/realserver.json")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="glb",
        description="GLB: a global load balancer. An authoritative DNS tier (dnsfront) answers "
        "load-balanced names with the VIP of the best site now; an LVS-style director per "
        "datacenter forwards to real servers; they share state in Redis.",
    )
    p.add_argument("--version", action="version", version=f"glb {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log verbosity (default info)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    config = sub.add_parser("config", help="work with configuration files")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", parser_class=_Parser)
    config_sub.required = True
    check = config_sub.add_parser("check", help="validate a config file: prints OK and a summary, or every error (exit 1)")
    check.add_argument("file", metavar="FILE", help="the deployment's YAML file")
    check.set_defaults(func=_cmd_config_check)

    dns = sub.add_parser("dnsfront", help="run the authoritative DNS tier")
    dns.add_argument("--config", required=True, metavar="FILE", help="the deployment's YAML file")
    dns.add_argument("--workers", type=_positive_int, metavar="N", help="processes sharing the DNS port (default: dnsfront.workers)")
    dns.set_defaults(func=_cmd_dnsfront)

    director = sub.add_parser("director", help="run a site's director, or show its table ('list')")
    director.add_argument("action", nargs="?", choices=["run", "list"], default="run", help="run (default) or list")
    director.add_argument("--config", required=True, metavar="FILE", help="the deployment's YAML file")
    director.add_argument("--site", required=True, metavar="NAME", help="the site this director serves")
    director.add_argument("--id", metavar="MEMBER", help="which member of the site's director pair this is "
                                                        "(default: the site's director.id)")
    director.set_defaults(func=_cmd_director)

    rs = sub.add_parser("realserver", help="prepare this host as a real server behind a director (root)")
    rs_sub = rs.add_subparsers(dest="rs_command", metavar="ACTION", parser_class=_Parser)
    rs_sub.required = True
    setup = rs_sub.add_parser("setup", help="hold the VIPs for DR (on lo, ARP silenced) or TUN (tunnel device or userspace "
                                            "decapsulator); NAT: route replies through the director")
    setup.add_argument("--vip", action="append", default=[], metavar="ADDR", help="DR/TUN: a VIP this server serves (repeatable)")
    setup.add_argument("--gateway", action="append", default=[], metavar="ADDR",
                       help="NAT: the director's address on this network, the new default route (one per IP version)")
    setup.add_argument("--policy-route", action="append", default=[], type=int, metavar="PORT",
                       help="NAT: leave the default route alone; route only what leaves from PORT (this server's "
                            "service port: the replies) via --gateway, by policy routing (repeatable)")
    setup.add_argument("--mode", required=True, choices=FORWARDING, help="the director's forwarding method")
    setup.add_argument("--decap", default="auto", choices=["auto", "kernel", "bpf", "userspace"],
                       help="TUN: kernel ipip/ip6tnl device, tc-BPF program, userspace decapsulator, or auto "
                            "(the first of these that works here)")
    setup.add_argument("--mss", type=int, metavar="N", help="TUN: clamp TCP MSS of replies to N (IPv6 gets N-40; 0 = off; default 1440)")
    setup.add_argument("--foreground", action="store_true", help="TUN userspace: run the decapsulator in this process until SIGTERM, then restore")
    setup.add_argument("--dry-run", action="store_true", help="print what would change and change nothing")
    setup.add_argument("--state-file", type=Path, default=_RS_STATE, metavar="PATH", help=f"where setup records what it changed (default {_RS_STATE})")
    setup.set_defaults(func=_cmd_realserver)
    teardown = rs_sub.add_parser("teardown", help="restore everything setup changed")
    teardown.add_argument("--state-file", type=Path, default=_RS_STATE, metavar="PATH")
    teardown.set_defaults(func=_cmd_realserver)
    rstatus = rs_sub.add_parser("status", help="what setup changed, and the decapsulator's counters")
    rstatus.add_argument("--state-file", type=Path, default=_RS_STATE, metavar="PATH")
    rstatus.add_argument("--json", action="store_true")
    rstatus.set_defaults(func=_cmd_realserver)

    for name, undo in (("drain", False), ("undrain", True)):
        what = "end the drain of" if undo else "drain (no new connections)"
        # No abbreviations: ``--token SECRET`` must not pass for ``--token-file``.
        d = sub.add_parser(name, help=f"{what} a real server, or the whole site without --server (admin API)",
                           allow_abbrev=False)
        _admin_args(d)
        d.add_argument("--server", type=_server, metavar="ADDR[:PORT]",
                       help="the real server (needs --service); without it the whole site is "
                       + ("undrained" if undo else "drained: DNS stops answering it"))
        d.add_argument("--service", metavar="NAME", help="the service of --server")
        d.set_defaults(func=_cmd_drain, undo=undo, parser=d)

    weight = sub.add_parser("weight", help="override a real server's weight, or 'clear' the override (admin API)",
                            allow_abbrev=False)
    _admin_args(weight)
    weight.add_argument("--service", required=True, metavar="NAME", help="the service of --server")
    weight.add_argument("--server", required=True, type=_server, metavar="ADDR[:PORT]", help="the real server")
    weight.add_argument("weight", type=_weight, metavar="WEIGHT",
                        help="0..65535 (0 quiesces: no new connections), or 'clear' for the configured weight")
    weight.set_defaults(func=_cmd_weight)

    dash = sub.add_parser("dashboard", help="serve a live web page of the deployment, with drain/weight actions",
                          description="Serve a live page of every site, service, real server and load-balanced "
                          "name from Redis, with 15-minute charts, an event timeline and drain/weight actions "
                          "(admin token asked in the page). See docs/dashboard.md.")
    dash.add_argument("--config", required=True, metavar="FILE", help="the deployment's YAML file")
    dash.add_argument("--listen", type=_listen, metavar="ADDR", help="HOST[:PORT] to serve on (default 127.0.0.1:9180; "
                      "keep it on loopback or behind an authenticating proxy: reading needs no token)")
    dash.add_argument("--dnsfront", action="append", default=[], metavar="HOST:PORT",
                      help="a dnsfront status listener to chart (repeatable; default: dnsfront.status_listen)")
    dash.add_argument("--director", action="append", default=[], type=_director, metavar="SITE=HOST:PORT",
                      help="where to reach SITE's director for actions when its status_listen is a wildcard "
                      "bind on another host (repeatable)")
    dash.set_defaults(func=_cmd_dashboard)

    status = sub.add_parser("status", help="print every site's state from Redis and what DNS would answer now")
    status.add_argument("--config", required=True, metavar="FILE", help="the deployment's YAML file")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_cmd_status)
    return p


def _admin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="the deployment's YAML file (admin.token, the site's director)")
    p.add_argument("--site", required=True, metavar="NAME", help="the site whose director records it")
    p.add_argument("--reason", default="", metavar="TEXT", help="why, recorded with the override")
    p.add_argument("--who", metavar="NAME", help="who, recorded with the override (default $SUDO_USER or $USER @ this host)")
    p.add_argument("--token-file", metavar="FILE", help="your admin token (default $GLB_ADMIN_TOKEN_FILE, "
                   "$GLB_ADMIN_TOKEN, then admin.token of the config); never give a token itself as an argument")
    p.add_argument("--ca-file", metavar="FILE", help="the CA of the directors' admin certificates (default admin.ca_file)")
    p.add_argument("--direct", action="store_true",
                   help="write the override to Redis yourself, for a site whose director is down (Redis credentials: "
                   "$GLB_REDIS_URL, else redis.url of the config; no token)")


def _server(text: str) -> tuple[str, int | None]:
    from glb.admin import parse_server

    try:
        return parse_server(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _weight(text: str) -> int | None:
    from glb.state import MAX_WEIGHT

    if text.lower() == "clear":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 0..{MAX_WEIGHT} or 'clear', got {text!r}") from None
    if not 0 <= value <= MAX_WEIGHT:
        raise argparse.ArgumentTypeError(f"must be 0..{MAX_WEIGHT}, got {value}")
    return value


def _listen(text: str):
    from glb.dashboard.server import parse_listen

    try:
        return parse_listen(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _director(text: str):
    from glb.dashboard.server import parse_director

    try:
        return parse_director(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _cmd_dnsfront(args: argparse.Namespace) -> int:
    from dnsfront.main import run

    return run(args.config, workers=args.workers, log_level=args.log_level)


def _cmd_director(args: argparse.Namespace) -> int:
    if args.action == "list":
        from director.control.listing import list_site

        return list_site(args.config, args.site)
    from director.control.main import run

    return run(args.config, args.site, log_level=args.log_level, member=args.id)


def _cmd_realserver(args: argparse.Namespace) -> int:
    from director.realserver import cli as realserver

    if args.rs_command == "setup":
        return realserver.setup(args.vip, args.mode, state_file=args.state_file, mss=args.mss,
                                foreground=args.foreground, decap=args.decap, dry_run=args.dry_run,
                                gateways=args.gateway, policy_ports=args.policy_route)
    if args.rs_command == "teardown":
        return realserver.teardown(args.state_file)
    return realserver.status(args.state_file, as_json=args.json)


def _cmd_drain(args: argparse.Namespace) -> int:
    if (args.server is None) != (args.service is None):
        args.parser.error("--server and --service go together (without both, the whole site is meant)")
    from glb.admin import drain

    return drain(args.config, args.site, service=args.service, server=args.server, undo=args.undo,
                 why=args.reason, who=args.who, token_file=args.token_file, ca_file=args.ca_file,
                 direct=args.direct)


def _cmd_weight(args: argparse.Namespace) -> int:
    from glb.admin import set_weight

    return set_weight(args.config, args.site, service=args.service, server=args.server, weight=args.weight,
                      why=args.reason, who=args.who, token_file=args.token_file, ca_file=args.ca_file,
                      direct=args.direct)


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from glb.dashboard.server import DEFAULT_LISTEN, run

    return run(args.config, args.listen or DEFAULT_LISTEN, tuple(args.dnsfront), dict(args.director))


def _cmd_status(args: argparse.Namespace) -> int:
    from glb.overview import print_status

    return print_status(args.config, as_json=args.json)


def _cmd_config_check(args: argparse.Namespace) -> int:
    from glb import config

    cfg = config.load(args.file)
    print(f"OK: {args.file}: {cfg.summary()}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code = int(args.func(args) or 0)
        # Flush here, not at interpreter exit: a closed pipe must surface
        # below as BrokenPipeError, not as Python's own noise after main().
        sys.stdout.flush()
        return code
    except BrokenPipeError as e:
        if not _stdout_gone():  # a socket of ours, not our reader: a bug, reported below
            return _internal_error(args, e)
        # Not a failure worth a message; point stdout at /dev/null so the
        # interpreter's final flush of what is left stays quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return EXIT_ERROR
    except GLBError as e:
        print(f"glb: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug: say so in one line, traceback on request
        return _internal_error(args, e)


def _internal_error(args: argparse.Namespace, e: Exception) -> int:
    if args.debug:
        raise e
    print(f"glb: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
    return EXIT_ERROR


def _stdout_gone() -> bool:
    """Whether stdout's reader has gone (the kernel flags the pipe or socket with POLLERR)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no fd (replaced stdout), or no poll()
        return False


if __name__ == "__main__":
    sys.exit(main())
