"""The end-to-end lab for tests/e2e: one lab (deploy/lab) per test session.

Namespaces are named ``glbe2e-<pytest pid>-<role>`` and the lab's state lives
in a temporary directory, so a run never touches a lab someone built with
``python -m deploy.lab up`` (``glb-lab-*``) nor another run. Leftovers of a
run that was killed (its PID is gone) are removed first. The lab is torn
down at the end of the session, also when tests fail.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from tests.environment import binary_unavailable, require
from tests.netns import lab_unavailable

REQUIRED = (("redis-server", "redis-server"), ("unbound", "unbound"), ("nsd", "nsd"))
PREFIX_RE = re.compile(r"^glbe2e-(\d+)-")


def unavailable() -> str | None:
    missing = [r for name, package in REQUIRED if (r := binary_unavailable(name, package))]
    return lab_unavailable() or (missing[0] if missing else None)


def _remove_leftovers() -> None:
    from deploy.lab import net
    from deploy.lab.lab import Lab

    pids = {int(m.group(1)) for n in net.namespaces("glbe2e-") if (m := PREFIX_RE.match(n))}
    for pid in pids:
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            Lab(prefix=f"glbe2e-{pid}-", state_dir=f"/tmp/glbe2e-gone-{pid}").down()


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    require(unavailable())
    from deploy.lab.lab import Lab

    _remove_leftovers()
    lines = []
    lab = Lab(prefix=f"glbe2e-{os.getpid()}-", state_dir=tmp_path_factory.mktemp("lab"),
              log=lambda m: lines.append(m))
    t0 = time.monotonic()
    try:
        lab.up(check_vips=False)
        print(f"\nlab up in {time.monotonic() - t0:.1f} s")
        yield lab
    finally:
        lab.down()


@pytest.fixture
def fresh(lab):
    """The lab as built: every process running, no drain, DNS answering both sites; restored after the test."""
    lab.restore()
    yield lab
    lab.restore()
