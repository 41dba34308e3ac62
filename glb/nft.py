"""Running ``nft``: the one place GLB starts the nftables tool.

Every run has a timeout: a wedged netlink socket or a huge ruleset must cost
a one-line error, not a director or real-server setup that hangs. Failures
come back as ``NftError`` with nft's own first line of complaint (nft prints
the failing script line and a row of carets after it; those help nobody in
a log line). Callers that own a narrower error wrap it (``GuardError``,
``RealServerError``).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

from glb.errors import NftError

TIMEOUT = 10.0
"""Seconds one nft command may take."""


def binary() -> str | None:
    """The nft executable on PATH, or None if nftables is not installed."""
    return shutil.which("nft")


def run(args: Sequence[str], *, script: str | None = None, timeout: float = TIMEOUT,
        nft: str | None = None) -> subprocess.CompletedProcess[str]:
    """``nft ARGS`` with ``script`` on stdin; the finished process, whatever its exit status.

    NftError if nft cannot be started or overruns ``timeout``.
    """
    argv = [nft or binary() or "nft", *args]
    try:
        return subprocess.run(argv, input=script, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise NftError(f"nft {' '.join(args)} did not finish within {timeout:g}s") from None
    except OSError as e:
        raise NftError(f"cannot run {argv[0]}: {e.strerror or e}") from None


def reason(res: subprocess.CompletedProcess[str]) -> str:
    """nft's first line of complaint, or its exit status when it said nothing."""
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else f"exit status {res.returncode}"


def load(script: str, *, timeout: float = TIMEOUT, nft: str | None = None) -> None:
    """``nft -f -`` with ``script`` (atomic: all of it or nothing); NftError if nft refuses it."""
    res = run(["-f", "-"], script=script, timeout=timeout, nft=nft)
    if res.returncode != 0:
        raise NftError(reason(res))
