"""The engine's packet loop (director/dataplane/engine.py Worker.drain) over a fake ring, no privileges.

The ring is an anonymous mmap laid out as a TPACKET_V2 ring (tpacket2_hdr,
virtio_net_hdr, frame); the "interface" is one end of an AF_UNIX datagram
socketpair, so what sendmmsg sends is read back from the other end, frame
by frame, in order.
"""

from __future__ import annotations

import ipaddress
import logging
import mmap
import multiprocessing
import socket
import struct

import pytest

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers.inet import IP, TCP  # noqa: E402
from scapy.layers.l2 import ARP, Ether  # noqa: E402

from director.dataplane import codec  # noqa: E402
from director.dataplane.engine import FRAME_SIZE, TP_STATUS_USER, EngineConfig, Worker  # noqa: E402
from director.dataplane.forwarder import Plan, ServerPlan, ServicePlan, VipPlan  # noqa: E402
from director.control.health import ServerKey  # noqa: E402

DIR_MAC, GW_MAC, RS_MAC = "02:00:00:00:00:d1", "02:00:00:00:00:aa", "02:00:00:00:01:01"
VIP, CLIENT, RS = "192.0.2.10", "198.51.100.7", "10.2.0.11"
MAC_OFF = 90  # where the kernel puts an Ethernet frame in a V2 slot with PACKET_VNET_HDR
_HDR = struct.Struct("=IIIH")


class FakeSocket:
    """What Worker needs of PacketSocket."""

    def __init__(self, frames: int) -> None:
        self.frames = frames
        self.ring = mmap.mmap(-1, FRAME_SIZE * frames)
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.rx = self.sock
        self.peer.setblocking(False)
        self.mac = codec.mac_bytes(DIR_MAC)
        self.filters: list[frozenset] = []

    def set_filter(self, vips, extra=()) -> None:
        self.filters.append(frozenset(vips))

    def statistics(self) -> tuple[int, int]:
        return 0, 0

    def close(self) -> None:
        self.sock.close()
        self.peer.close()

    def put(self, slot: int, frame: bytes, wire_len: int | None = None) -> None:
        off = slot * FRAME_SIZE
        self.ring[off + MAC_OFF - 10:off + MAC_OFF + len(frame)] = bytes(10) + frame
        _HDR.pack_into(self.ring, off, TP_STATUS_USER, wire_len or len(frame), len(frame), MAC_OFF)

    def status(self, slot: int) -> int:
        return struct.unpack_from("=I", self.ring, slot * FRAME_SIZE)[0]

    def sent(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.peer.recv(70000))
            except BlockingIOError:
                return out


def packed(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def tcp(sport: int, flags: str) -> bytes:
    return bytes(Ether(dst=DIR_MAC, src=GW_MAC) / IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=80, flags=flags))


def make_worker(announce=(), **cfg):
    ps = FakeSocket(frames=8)
    server = ServerPlan(ServerKey("web", RS, 0), packed(RS), 1, True, False, codec.mac_bytes(RS_MAC))
    svc = ServicePlan("web", "dr", "rr", (VipPlan(packed(VIP), 80, 6, f"{VIP}:80/tcp"),), (server,))
    parent, child = multiprocessing.Pipe()
    w = Worker(EngineConfig("fake0", announce=announce, **cfg), Plan(ps.mac, (svc,)), child, ps=ps)
    return w, ps, (parent, child)


@pytest.fixture
def worker():
    w, ps, pipe = make_worker()
    yield w, ps
    w.close()
    for end in pipe:
        end.close()


def test_drain_forwards_in_order_across_the_ring_end_and_gives_every_slot_back(worker):
    w, ps = worker
    w.idx = 5  # three slots before the end of an 8-slot ring, then round
    arp = bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=GW_MAC) / ARP(op=1, psrc=CLIENT, pdst=VIP, hwsrc=GW_MAC))
    frames = [tcp(40000, "S"), tcp(40000, "A"), tcp(40000, "PA"), arp, tcp(40000, "PA"), b"\x00" * 20]
    for i, f in enumerate(frames):
        ps.put((5 + i) % 8, f)
    big = bytes(Ether(dst=DIR_MAC, src=GW_MAC) / IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="PA")
                / (b"x" * 3000))
    ps.put((5 + len(frames)) % 8, big[:100], wire_len=len(big))  # longer than its slot: the kernel cut it
    assert w.drain() == 7
    assert [ps.status(s) for s in range(8)] == [0] * 8  # every slot is the kernel's again
    assert w.idx == 4
    out = ps.sent()
    dr = bytes(10) + codec.mac_bytes(RS_MAC) + codec.mac_bytes(DIR_MAC)
    # Everything in ring order: a DR run is sent before whatever ends it (the ring's end, the ARP
    # answer, the dropped frame), so frames never overtake each other.
    reply = bytes(10) + codec.arp_reply(arp, codec.parse(arp, {packed(VIP)}), ps.mac)
    assert out == [dr + frames[0][12:], dr + frames[1][12:], dr + frames[2][12:], reply, dr + frames[4][12:]]
    st = w.stats
    assert (st.rx_frames, st.truncated) == (7, 1)
    assert w.fwd.drops[codec.Drop.UNSUPPORTED_ETHERTYPE] == 1  # the 20 zero bytes
    assert w.drain() == 0  # nothing new: nothing handled, nothing sent
    assert ps.sent() == []


def test_established_packets_take_the_fast_path(worker, monkeypatch):
    w, ps = worker
    for i, flags in enumerate(("S", "A")):
        ps.put(i, tcp(40001, flags))
    w.drain()
    ps.sent()
    calls = []
    monkeypatch.setattr(w.fwd, "forward", lambda *a: calls.append(a))
    for i in range(2, 8):
        ps.put(i, tcp(40001, "PA"))
    assert w.drain() == 6
    assert calls == [] and len(ps.sent()) == 6


def test_a_worker_without_vip_ownership_answers_and_forwards_nothing_and_announces_on_return():
    from director.dataplane.packetpath import without_vips

    w, ps, pipe = make_worker(announce=(0.0,))
    try:
        owned = w.fwd.plan
        assert len(w.announcer.due(1e12)) == 1  # the start's gratuitous ARP
        ps.put(0, tcp(40002, "S"))
        w.drain()
        assert len(ps.sent()) == 1

        w.apply(without_vips(owned), 10.0)  # VIP ownership switched off
        assert ps.filters[-1] == frozenset()  # the kernel filter lets nothing in
        arp = bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=GW_MAC) / ARP(op=1, psrc=CLIENT, pdst=VIP, hwsrc=GW_MAC))
        ps.put(1, arp)
        ps.put(2, tcp(40002, "A"))
        assert w.drain() == 2 and ps.sent() == []
        assert w.announcer.due(20.0) == []

        w.apply(owned, 30.0)  # and on again
        assert ps.filters[-1] == {packed(VIP)}
        assert [Ether(f)[ARP].psrc for f in w.announcer.due(30.0)] == [VIP]
        ps.put(3, tcp(40002, "A"))  # the flow survived
        assert w.drain() == 1
        assert [f[10:22] for f in ps.sent()] == [codec.mac_bytes(RS_MAC) + codec.mac_bytes(DIR_MAC)]
    finally:
        w.close()
        for end in pipe:
            end.close()



def test_a_worker_told_to_announce_again_announces_the_vips_of_its_plan():
    from director.dataplane.announce import RECLAIM_SETTLE

    w, ps, (parent, child) = make_worker(announce=(0.0, 1.0))
    try:
        assert len(w.announcer.due(1e9)) == 2  # the start's
        parent.send(("announce",))  # VRRP: another member took the VIPs for a moment
        w.control(2e9)
        assert [Ether(f)[ARP].psrc for f in w.announcer.due(2e9)] == [VIP]
        # Again once the other member, whose own announcements raced ours, surely let them go.
        assert [Ether(f)[ARP].psrc for f in w.announcer.due(2e9 + RECLAIM_SETTLE)] == [VIP]
        assert [Ether(f)[ARP].psrc for f in w.announcer.due(2e9 + RECLAIM_SETTLE + 1)] == [VIP] * 2
        assert w.announcer.due(3e9) == []
    finally:
        w.close()
        parent.close()
        child.close()


def test_a_sync_flush_sends_up_every_flow_filed_at_once_then_says_so():
    """A master stopping cleanly asks its workers for what they filed for connection sync: all of it
    comes up the pipe at once (not at the next ticks), then the mark, so the director knows it has it all."""
    w, ps, (parent, child) = make_worker(sync_id=51)
    try:
        w.sync.send(True)
        for i, port in enumerate((40011, 40012, 40013)):
            ps.put(2 * i, tcp(port, "S"))
            ps.put(2 * i + 1, tcp(port, "A"))  # the handshake's end confirms it: filed for sync
        assert w.drain() == 6
        assert not parent.poll()  # nothing went up yet: that waits for the tick
        parent.send(("sync_flush", 7))
        w.control(1.0)
        got = []
        while parent.poll():
            got.append(parent.recv())
        assert got[-1] == ("sync_flushed", 7)
        assert all(kind == "sync" for kind, _ in got[:-1])
        ports = sorted(int.from_bytes(r.key[9:11], "big") for _, records in got[:-1] for r in records)
        assert ports == [40011, 40012, 40013]
        assert w.sync.pending == 0
    finally:
        w.close()
        parent.close()
        child.close()
