"""IP-in-IP tunnelling (LVS-TUN): the packet goes to the real server inside an outer IP header.

Director: the transmit object is a :class:`TunnelTransmit` (an
``codec.Tunnel`` towards the server's next hop, from ``director.address`` /
``address6``). Per packet it builds the outer header; the engine sends it
with the inner packet straight from the ring (an
:data:`~director.dataplane.actions.Encap`). It reads each frame's
virtio_net_hdr: a GSO frame goes out as a GSO frame of the tunnel
(``codec.vnet_for_tun``), a partial checksum is completed before IPv4
fragmentation. A packet too big for the tunnel: IPv4 without DF is
fragmented before it enters the tunnel, each fragment in an outer packet of
its own (``Tunnel.fragments``), anything else gets ICMP "too big" back.

Real server: decapsulates (kernel ipip/ip6tnl, the tc-BPF program or the
userspace decapsulator), loose rp_filter, TCP MSS clamped (see director/realserver/).
"""

from __future__ import annotations

from director.dataplane import codec
from director.dataplane.codec import FLOW, VNET_HDR_LEN, VNET_NONE, Drop
from director.modes.base import Mode
from director.realserver import plan as rsplan
from director.realserver.steps import NFT_FAMILY, NFT_TABLE, BpfDecap, NftTable, StartDecap, conf_key
from glb.errors import RealServerError


class TunnelTransmit(codec.Tunnel):
    """The tunnel towards one real server, and what TUN does with each packet for it."""

    __slots__ = ()

    def fast(self, fwd, buf, start: int, total: int, family: int, route):
        if family != self.family or total > self.max_inner or buf[start - VNET_HDR_LEN:start] != VNET_NONE:
            return None  # too big, or a partial checksum: slow() knows what to do
        fwd.ident = ident = (fwd.ident + 1) & 0xFFFF
        route.packets += 1
        route.bytes += total
        return (VNET_NONE, self.header_at(buf, start + 14, total, ident), total)

    def slow(self, fwd, frame, p, vnet, route):
        if self.family != p.family:
            fwd.drops[Drop.NO_DESTINATION] += 1
            return None
        h = None
        if vnet is not None:
            h = codec.parse_vnet(vnet)
            if h.__class__ is Drop:
                fwd.drops[h] += 1
                return None
        if self.fits(p):
            out_vnet = None
            if h is not None:
                out_vnet = codec.vnet_for_tun(h, self.overhead)
                if out_vnet.__class__ is Drop:
                    fwd.drops[out_vnet] += 1
                    return None
            fwd.ident = ident = (fwd.ident + 1) & 0xFFFF
            route.packets += 1
            route.bytes += p.length
            return (out_vnet, self.header(frame, p, ident), p.length)
        if p.family == 4 and not codec.is_df(frame, p) and p.kind == FLOW:
            # IPv4 without DF: fragmented into the tunnel (the real server's stack reassembles).
            if h is not None and h.gso_type != codec.VIRTIO_NET_HDR_GSO_NONE:
                fwd.drops[Drop.GSO_UNSUPPORTED] += 1
                return None
            if h is not None and h.flags & codec.VIRTIO_NET_HDR_F_NEEDS_CSUM:
                bad = codec.complete_checksum(frame, h.csum_start, h.csum_offset, p.l3 + p.length)
                if bad is not None:
                    fwd.drops[bad] += 1
                    return None
            fwd.ident = ident = (fwd.ident + 1) & 0xFFFF
            route.packets += 1
            route.bytes += p.length
            frames = self.fragments(frame, p, ident)
            fwd.ident = (ident + len(frames) - 1) & 0xFFFF
            return frames
        fwd.drops[Drop.TOO_BIG] += 1
        reply = codec.too_big(frame, p, self.max_inner)
        if reply.__class__ is Drop:
            return None
        fwd.replies += 1
        return [reply]


class Tunnelling(Mode):
    name = "tun"
    label = "Tunnel"
    mac_rewrite = False
    needs_vnet = True
    realserver_facts = frozenset({"kernel_tunnels", "nft_table", "bpf_decap"})

    def transmit(self, server, plan):
        if server.mac is None:
            return None
        src = plan.source4 if len(server.address) == 4 else plan.source6
        if src is None:
            return None
        return TunnelTransmit(src, server.address, server.mac, plan.mac, server.mtu)

    def realserver_sysctls(self, req):
        if 4 not in req.families:
            return []
        return [conf_key(4, dev, "rp_filter") for dev in ("all", "default", rsplan.KERNEL_TUNNELS[4][1])]

    def realserver_devices(self, req, facts, *, notes):
        decap, why = rsplan.choose_decap(req, facts)
        notes.append(f"TUN decapsulation: {decap} ({why})")
        device = {f: DECAP_DEVICE[decap](req, facts, f) for f in req.families}
        if req.mss != 0 and not facts.nft:
            raise RealServerError("TUN mode clamps TCP MSS with nftables but 'nft' is not installed: install "
                                  "nftables, or pass --mss 0 to skip the clamp")
        return device, decap

    def realserver_steps(self, req, facts, device, *, new_tun, daemon, stats_file, log_file, notes):
        decap, _ = rsplan.choose_decap(req, facts)
        steps = []
        if 4 in req.families:
            if decap == "bpf":  # the VIPs on lo, packets in by the uplinks: lo answers no ARP, the uplinks loose
                steps += rsplan.arp_steps(facts, ["lo"], notes=notes)
                rps = [rsplan.rp_filter_step(facts, dev, new_device=False, notes=notes)
                       for dev in rsplan.decap_interfaces(req, facts)]
            else:
                steps += rsplan.arp_steps(facts, [], notes=notes)  # a TUN device never does ARP
                rps = [rsplan.rp_filter_step(facts, device[4], new_device=new_tun, notes=notes)]
            steps += [rp for rp in rps if rp]
        mss = rsplan.mss_values(req, facts)
        if mss:
            if facts.nft_table:
                notes.append(f"nftables table {NFT_FAMILY} {NFT_TABLE} exists already (a leftover?): it is replaced")
            steps.append(NftTable(rsplan.nft_script(req.vips, mss), mss))
        else:
            notes.append("MSS clamping is off (--mss 0): clients may need a fragmentation round trip")
        if new_tun and daemon:
            steps.append(StartDecap(req.tun_device, tuple(str(v) for v in req.vips), stats_file, log_file))
        if decap == "bpf":  # last: packets are unwrapped only once everything else is ready
            steps.append(BpfDecap(tuple(str(v) for v in req.vips), rsplan.decap_interfaces(req, facts),
                                  rsplan.decap_pin_dir(stats_file)))
        return steps


DECAP_DEVICE = {
    "kernel": lambda req, facts, family: facts.kernel_tunnels[family],
    "bpf": lambda req, facts, family: "lo",
    "userspace": lambda req, facts, family: req.tun_device,
}
"""Decapsulation -> the device that holds the VIPs of a family: the driver's fallback device, lo (the
tc program hands the inner packet to the stack of the interface it came in on), the TUN device."""


MODE = Tunnelling()
