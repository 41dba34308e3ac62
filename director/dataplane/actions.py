"""What the forwarder tells the engine to do with a frame: the action types, declared once.

:meth:`Forwarder.forward` and :meth:`Forwarder.fast` return one of these (or
None: dropped, the reason counted); the engine performs it. The forwarding
modes (director/modes/) build them; the engine knows only these four ways to
send, so a new mode reuses them (or adds one here and its case in
``Worker.drain``).

They are names for builtin types, not subclasses: the engine dispatches on
``action.__class__ is ...`` per frame, the C loop (_fastpath.c) checks a
:data:`MacRewrite` with ``PyBytes_CheckExact``, and building a tuple subclass
costs a TUN packet about 0.1 us more than a plain tuple.
"""

from __future__ import annotations

MacRewrite = bytes
"""12 bytes (next-hop MAC, director MAC): write them over the frame's MAC
addresses and send the frame as it came, with its virtio_net_hdr. Checksums
and GSO stay valid because the IP packet is untouched. Constant per real
server, so it is the server's transmit object itself (DR)."""

Encap = tuple
"""``(vnet, header, length)``: send ``vnet`` (None: a header saying nothing),
then ``header`` (Ethernet + outer IP), then the inner IP packet
``frame[14:14 + length]`` straight from the ring (TUN)."""

Frames = list
"""Complete new frames, each sent as it is: ARP/NDP answers, ICMP "too big"
to a client, the tunnelled fragments of a packet too big for the tunnel."""

Crossed = bytearray
"""virtio_net_hdr (10 bytes) + a rewritten frame, sent on the *other* side
from the one it came in on (NAT: a client's packet towards the real
servers' interface, a reply towards the clients'); with one interface for
both, the same one."""
