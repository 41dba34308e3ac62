"""`glb`: the operator's command line.

Every failure an operator can cause (a bad flag, a missing file, an invalid
config, an unreachable Redis) ends in one clear line on stderr and a non-zero
exit; tracebacks are for bugs only, and only with --debug.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from glb import __version__
from glb.errors import ConfigError, GLBError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
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
    director.set_defaults(func=_cmd_director)

    rs = sub.add_parser("realserver", help="prepare this host as a real server behind a director (root)")
    rs_sub = rs.add_subparsers(dest="rs_command", metavar="ACTION", parser_class=_Parser)
    rs_sub.required = True
    setup = rs_sub.add_parser("setup", help="hold the VIPs for DR (on lo, ARP silenced) or TUN (tunnel device or userspace decapsulator)")
    setup.add_argument("--vip", action="append", required=True, metavar="ADDR", help="a VIP this server serves (repeatable)")
    setup.add_argument("--mode", required=True, choices=["dr", "tun"], help="the director's forwarding method")
    setup.add_argument("--decap", default="auto", choices=["auto", "kernel", "userspace"],
                       help="TUN: kernel ipip/ip6tnl device, userspace decapsulator, or auto (kernel when it has ipip)")
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

    status = sub.add_parser("status", help="print every site's state from Redis and what DNS would answer now")
    status.add_argument("--config", required=True, metavar="FILE", help="the deployment's YAML file")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_cmd_status)
    return p


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
        from director.listing import list_site

        return list_site(args.config, args.site)
    from director.main import run

    return run(args.config, args.site, log_level=args.log_level)


def _cmd_realserver(args: argparse.Namespace) -> int:
    from director import realserver

    if args.rs_command == "setup":
        return realserver.setup(args.vip, args.mode, state_file=args.state_file, mss=args.mss,
                                foreground=args.foreground, decap=args.decap, dry_run=args.dry_run)
    if args.rs_command == "teardown":
        return realserver.teardown(args.state_file)
    return realserver.status(args.state_file, as_json=args.json)


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
        return int(args.func(args) or 0)
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
        if args.debug:
            raise
        print(f"glb: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
