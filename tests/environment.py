"""What a test needs from the machine, and what happens when the machine lacks it.

Outside CI a missing capability (root, network namespaces, nftables, IPv6
loopback, a tool from apt, the C loop, BPF) skips the test with its reason, so a
laptop without root still runs everything else. Under ``CI=true`` the same
test FAILS with that reason: the namespace tests are the only real tests of
the packet path, and a CI run that skipped them would pass without testing
it. ``scripts/setup`` installs what the tests need, so in CI a missing piece
is a broken set-up, not a reason to pass.

Every environment skip in ``tests/`` goes through here::

    from tests.environment import needs, require

    require(netns_unavailable())            # in a fixture or a test
    @needs(ipv6_loopback_unavailable())     # as a mark, reason computed at import
    pytestmark = needs(binary_unavailable("unbound"))

A reason is a string (what is missing and how to get it) or None (nothing
missing).
"""

from __future__ import annotations

import functools
import os
import shutil
import socket

import pytest


def in_ci() -> bool:
    """True where missing capabilities are failures (``CI=true``, as GitHub Actions, GitLab and most CIs set)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require(*reasons: str | None) -> None:
    """Skip the running test for the first reason given (fail instead under CI=true); nothing if all are None."""
    for reason in reasons:
        if reason:
            if in_ci():
                pytest.fail(f"CI=true and this test cannot run: {reason}", pytrace=False)
            pytest.skip(reason)


def needs(reason: str | None) -> pytest.MarkDecorator:
    """A mark doing :func:`require` before the test's fixtures are set up (tests/conftest.py applies it)."""
    return pytest.mark.needs(reason)


def binary_unavailable(name: str, package: str | None = None) -> str | None:
    if shutil.which(name):
        return None
    return f"needs {name} (apt package {package or name}; bash scripts/setup installs it)"


def ipv6_loopback_unavailable() -> str | None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError as e:
        return f"no IPv6 loopback (::1): {e.strerror or e}"
    return None


@functools.cache
def tcx_unavailable() -> str | None:
    """Why programs cannot attach at tcx ingress here (kernel before 6.6: the clsact fallback is used), or None.

    Asks the kernel (a BPF_PROG_QUERY of loopback's tcx ingress), not the version string."""
    import errno

    from director.dataplane.libbpf import tcx_programs
    from glb.errors import KernelDataplaneError

    try:
        tcx_programs(socket.if_nametoindex("lo"))
    except KernelDataplaneError as e:  # no libbpf
        return f"needs tcx: {e}"
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return "needs tcx (kernel 6.6+); the clsact fallback is what runs here"
        return f"needs tcx: {e}"
    return None


def bpf_unavailable() -> str | None:
    """Why the kernel data plane's tc program cannot be loaded here (root, libbpf, the built object), or None.

    Loads it for real, as the director would: anything less (a file check) would
    let a test start a director that then fails for a reason the probe knew.
    """
    if os.geteuid() != 0:
        return "needs root (loading a BPF program)"
    from director.dataplane import kernelmaps
    from director.dataplane.libbpf import LibBpf
    from glb.errors import KernelDataplaneError

    try:
        LibBpf(max_entries={"conns": 16}, sizes=kernelmaps.MAPS).close()
    except KernelDataplaneError as e:
        return f"the kernel data plane cannot load: {e}"
    return None
