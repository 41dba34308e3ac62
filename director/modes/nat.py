"""Network address translation (LVS-NAT): the director rewrites both directions of each flow.

Director: the transmit object is a :class:`NatTransmit` (the real server's
address and port, its MAC and the director's LAN-side MAC). A client packet
to VIP:vport leaves towards RIP:rport (the port of ``real_servers[].port``,
else the VIP's); the real server, whose gateway is the director, replies
from RIP:rport, and the reply leaves towards the client from VIP:vport, to
the MAC the client's packets came from (learnt per connection, in
``Conn.peer``). The rewriting and checksums are director/dataplane/nat.py's;
the connection table indexes NAT flows by the real server's key too and
follows IPVS's two-way TCP state table (director/dataplane/conntable.py).
Both directions are counted (``Route.out_packets``: ipvsadm's OutPkts).
Frames it sends cross sides: the engine sends a NAT action (a
``bytearray``: virtio_net_hdr + frame) on the other interface when
``director.lan.interface`` differs from ``director.interface``.

Real server: its route for the clients' traffic (the default route) points
at the director's LAN address (``glb realserver setup --mode nat --gateway``);
it holds no VIP.
"""

from __future__ import annotations

from director.dataplane import nat
from director.dataplane.bpf import Match
from director.dataplane.codec import ETH_P_IP, ETH_P_IPV6, FLOW, REPLY, Drop
from director.modes.base import Mode
from director.realserver.steps import DefaultRoute, PolicyRoute


class NatTransmit:
    """Towards one real server, and back from it."""

    __slots__ = ("address", "port", "family", "eth")

    def __init__(self, address: bytes, port: int, server_mac: bytes, lan_mac: bytes) -> None:
        self.address = address
        self.port = port
        """The real server's port; 0 = the VIP's."""
        self.family = 4 if len(address) == 4 else 6
        self.eth = server_mac + lan_mac

    def fast(self, fwd, buf, start, total, family, route):
        return None  # every NAT packet is rewritten by slow()

    def slow(self, fwd, frame, p, vnet, route):
        """A client's packet (or an ICMP error from the client's side about a reply)."""
        if p.family != self.family:
            fwd.drops[Drop.NO_DESTINATION] += 1
            return None
        c = fwd.conn
        if c.peer is None:
            c.peer = bytes(frame[6:12]) + bytes(frame[0:6])  # where replies go: back the way it came
            if fwd.kernel is not None:
                fwd.kernel.flow(c)  # a synced flow: the kernel could not take it without the MAC
        port = self.port or p.dport
        if p.kind == FLOW:
            out = nat.translate(frame, p, self.eth, self.address, port, True, vnet)
        else:
            out = nat.translate_icmp(frame, p, self.eth, self.address, True, self.address, port, True)
        if out.__class__ is Drop:
            fwd.drops[out] += 1
            return None
        route.packets += 1
        route.bytes += p.length
        return out

    def reply(self, fwd, frame, p, vnet, c):
        """The real server's packet (or an ICMP error from its side about a client's packet)."""
        if c.peer is None:  # an entry from connection sync: no client packet seen here yet
            fwd.drops[Drop.NO_NEIGHBOUR] += 1
            return None
        vip, vport = nat.vip_of(c.key)
        if p.kind == REPLY:
            out = nat.translate(frame, p, c.peer, vip, vport, False, vnet)
        else:
            out = nat.translate_icmp(frame, p, c.peer, vip, False, vip, vport, False)
        if out.__class__ is Drop:
            fwd.drops[out] += 1
            return None
        r = c.tag
        r.out_packets += 1
        r.out_bytes += p.length
        return out


class Nat(Mode):
    name = "nat"
    label = "Masq"
    mac_rewrite = False
    needs_vnet = True
    two_way = True
    holds_vips = False

    def transmit(self, server, plan):
        if server.mac is None:
            return None
        return NatTransmit(server.address, server.key.port, server.mac, plan.lan_mac or plan.mac)

    def filter_matches(self, service):
        """The real servers' packets (replies, ICMP errors they send): IPv4 source at 26, IPv6 at 22."""
        out = []
        for s in (*service.servers, *((service.sorry,) if service.sorry is not None else ())):
            if len(s.address) == 4:
                out.append(Match(ETH_P_IP, 26, s.address))
            else:
                out.append(Match(ETH_P_IPV6, 22, s.address))
        return tuple(out)

    def realserver_devices(self, req, facts, *, notes):
        return {}, None  # no VIP on the real server: the director rewrites the destination

    def realserver_steps(self, req, facts, device, *, new_tun, daemon, stats_file, log_file, notes):
        """The default route of each family given by ``--gateway`` points at the director (nothing removed);
        with ``--policy-route PORT`` only the replies from those ports do, by policy routing."""
        if req.policy_ports:
            return [PolicyRoute(gw.version, str(gw), req.policy_ports) for gw in req.gateways]
        steps = []
        for gw in req.gateways:
            now = facts.default_routes.get(gw.version)
            if now is not None and now[0] == str(gw):
                notes.append(f"the IPv{gw.version} default route is via {gw} already; left alone")
                continue
            prev_gw, prev_dev = now if now is not None else (None, None)
            steps.append(DefaultRoute(gw.version, str(gw), prev_gw, prev_dev))
        return steps


MODE = Nat()
