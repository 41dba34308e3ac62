"""Direct routing (LVS-DR): the frame goes to the real server unchanged but for its MAC addresses.

Director: the transmit object is the action itself, a
:data:`~director.dataplane.actions.MacRewrite` (the real server's MAC +
the director's), the same for every packet to that server, so established
flows take the C loop (_fastpath.c) and the frame leaves from the RX ring
with its own virtio_net_hdr: GSO frames and partial checksums pass as they
are. The real server must be on the director's link (config: a DR real
server shares a family with the service's VIPs).

Real server: the VIPs on ``lo`` and ARP kept quiet about them (see
director/realserver/).
"""

from __future__ import annotations

from director.modes.base import Mode
from director.realserver import plan as rsplan


class DirectRouting(Mode):
    name = "dr"
    label = "Route"
    mac_rewrite = True
    needs_vnet = False

    def transmit(self, server, plan):
        if server.mac is None:
            return None
        return server.mac + plan.mac

    def realserver_devices(self, req, facts, *, notes):
        if req.mss is not None or req.decap != "auto":
            notes.append("--mss and --decap apply to TUN mode only; ignored for DR")
        return {f: "lo" for f in req.families}, None

    def realserver_steps(self, req, facts, device, *, new_tun, daemon, stats_file, log_file, notes):
        # lo as well as all, as the LVS documentation has it.
        return rsplan.arp_steps(facts, ["lo"], notes=notes) if 4 in req.families else []


MODE = DirectRouting()
