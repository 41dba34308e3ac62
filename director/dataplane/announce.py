"""When to announce the VIPs: gratuitous ARP (IPv4) and unsolicited neighbour advertisements (IPv6). Pure.

A director that takes a VIP (start, a reload that adds one, VIP ownership
switched on) announces it at ``EngineConfig.announce`` offsets, so caches
that pointed at a previous owner move at once (docs/packet-path.md, VIP
ownership). One engine worker runs an :class:`Announcer` and sends what
:meth:`Announcer.due` returns.
"""

from __future__ import annotations

from collections.abc import Iterable

from director.dataplane import codec

RECLAIM_SETTLE = 0.5
"""Seconds after a reclaim's announcements when they go out once more: the member that took the VIPs
for a moment announced them too, racing ours; it has let them go by then (it yields at the master's
advertisement, sent with the reclaim)."""


class Announcer:
    """When to send gratuitous ARP / unsolicited NA for each VIP (pure; time passed in)."""

    def __init__(self, offsets: Iterable[float] = (0.0, 1.0, 2.0)) -> None:
        self.offsets = tuple(sorted(offsets))
        self._owned: frozenset[bytes] = frozenset()
        self._pending: list[tuple[float, bytes, bytes]] = []  # (when, vip, mac)

    def update(self, vips: Iterable[bytes], mac: bytes, now: float, *, again: bool = False) -> None:
        """Adopt the VIP set; newly taken VIPs (all of them with ``again``) get announced."""
        vips = frozenset(vips)
        new = vips if again else vips - self._owned
        self._owned = vips
        self._pending = [p for p in self._pending if p[1] in vips]
        for vip in sorted(new):
            for off in self.offsets:
                self._pending.append((now + off, vip, mac))
        self._pending.sort()

    def reclaim(self, vips: Iterable[bytes], mac: bytes, now: float) -> None:
        """Announce ``vips`` again, now and :data:`RECLAIM_SETTLE` later (each at every offset):
        another member took them for a moment (director/control/vrrp.py Reclaim)."""
        for at in (now, now + RECLAIM_SETTLE):
            self.update(vips, mac, at, again=True)

    def due(self, now: float) -> list[bytes]:
        """Frames to send now."""
        out = []
        while self._pending and self._pending[0][0] <= now:
            _, vip, mac = self._pending.pop(0)
            out.append(codec.gratuitous_arp(vip, mac) if len(vip) == 4 else codec.unsolicited_na(vip, mac))
        return out
