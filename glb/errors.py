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


class RealServerError(GLBError):
    """Preparing or restoring a real server failed (privileges, netlink)."""


class AdminError(GLBError):
    """An admin API call was refused or failed."""


class KernelDataplaneError(DirectorError):
    """The kernel data plane (the tc program and its maps) cannot be loaded, attached or updated.

    The director then runs the userspace engine alone (``packet.dataplane: auto``)."""
