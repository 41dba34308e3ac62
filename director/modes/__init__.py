"""Forwarding modes: one module per mode, one registry.

Each mode (a :class:`~director.modes.base.Mode`) owns what is specific to
it: the per-server transmit object and the packet actions it makes, whether
the engine must read virtio_net_hdr, its extra packet-filter matches, and
the real server's preparation. Adding a mode: docs/architecture.md,
"Adding a forwarding mode".
"""

from __future__ import annotations

from director.modes import dr, nat, tun
from director.modes.base import Mode

MODES: dict[str, Mode] = {m.name: m for m in (dr.MODE, tun.MODE, nat.MODE)}
"""Name (the config's ``forwarding``) -> mode. glb.config.FORWARDING lists the same names (a test checks)."""
