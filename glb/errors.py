"""The one exception tree of GLB.

Adapters translate third-party failures (redis, sockets, pyroute2, YAML) into
these, so callers and the CLI only ever catch ``GLBError``. Every message is
one line an operator can act on.
"""

from __future__ import annotations


class GLBError(Exception):
    """Base of every error GLB raises on purpose."""


class ConfigError(GLBError):
    """The configuration is invalid; ``problems`` holds every problem found.

    Each problem is one line ``FILE: KEY.PATH: reason``.
    """

    def __init__(self, problems: list[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))


class StateError(GLBError):
    """A state document (snapshot, override) is malformed or inconsistent."""


class StoreError(GLBError):
    """The shared store (Redis) failed or is unreachable."""


class StoreUnavailable(StoreError):
    """The store cannot be reached at all (connection refused, timeout)."""


class DNSFrontError(GLBError):
    """dnsfront could not start or serve (bind failure, bad zone data)."""


class DirectorError(GLBError):
    """The director could not start or run its packet path."""


class EngineError(DirectorError):
    """The packet engine's workers could not start or take a plan."""


class GuardError(DirectorError):
    """The nftables table that keeps the kernel off VIP traffic could not be changed."""


class NftError(GLBError):
    """nft could not be run, overran its timeout, or refused a command (glb.nft)."""


class SchedulerError(DirectorError):
    """A scheduler, destination or persistence table was asked for something impossible
    (an unknown name, a Maglev table size that is not prime, a bad address or netmask)."""


class RealServerError(GLBError):
    """Preparing or restoring a real server failed (privileges, netlink)."""


class AdminError(GLBError):
    """An admin API call was refused or failed."""


class DashboardError(GLBError):
    """``glb dashboard`` could not start (bind failure) or read a dnsfront's metrics."""


class HAError(GLBError):
    """A director-pair protocol (VRRP, connection sync) refused a packet or could not run.

    ``reason`` is a short stable name (``ttl``, ``checksum``, ``version``...):
    the drop counter the packet is charged to.
    """

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


class SupervisorError(GLBError):
    """A worker process could not start (it reported why, died or did not answer in time)."""


class KernelDataplaneError(DirectorError):
    """The kernel data plane (the tc program and its maps) cannot be loaded, attached or updated.

    The director then runs the userspace engine alone (``packet.dataplane: auto``)."""
