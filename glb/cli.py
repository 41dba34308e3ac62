"""`glb`: the operator's command line.

Every failure an operator can cause (a bad flag, a missing file, an invalid
config, an unreachable Redis) ends in one clear line on stderr and a non-zero
exit; tracebacks are for bugs only, and only with --debug.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn, Sequence

from glb import __version__
from glb.errors import ConfigError, GLBError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


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

    return p


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
