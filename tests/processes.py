"""Ending a process a test started: SIGTERM (the graceful shutdown under test), SIGKILL if it hangs."""

from __future__ import annotations

import signal
import subprocess


def terminate(proc: subprocess.Popen, grace: float = 15.0) -> int:
    """SIGTERM ``proc``, wait ``grace`` seconds, then SIGKILL; returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode
