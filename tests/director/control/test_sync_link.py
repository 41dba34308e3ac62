"""Connection sync over channels: SyncLink on the in-memory LAN, and UDPChannel on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from director.control import sync
from director.control.datagram import MemoryLAN
from director.control.sync import ConnRecord, SyncReceiver, SyncSender
from director.control.sync_socket import SyncLink, UDPChannel
from director.dataplane.codec import flow_key
from director.dataplane.conntable import ESTABLISHED, ConnTable
from director.dataplane.scheduler import Dest
from tests.waiting import async_until as until

A = ipaddress.ip_address
RS = A("10.1.0.11").packed
GROUP = A("224.0.0.81")


class OneDest:
    def __init__(self):
        self.dest = Dest(RS, 1, port=80)

    def conn_dest(self, key, addr, port):
        return (self.dest, None) if (addr, port) == (RS, 80) else None

    def template_dest(self, service, addr, port):
        return None


def rec(i: int) -> ConnRecord:
    return ConnRecord(flow_key(6, A("10.0.0.1").packed, A("192.0.2.10").packed, 1000 + i, 80), ESTABLISHED, 900.0, RS, 80)


def link(lan: MemoryLAN, addr: str, table: ConnTable) -> SyncLink:
    return SyncLink(SyncSender(51, max_rate=1000), SyncReceiver(table, OneDest(), 51), lan.channel(A(addr)), (GROUP,))


async def test_master_changes_reach_the_backup_table_and_only_while_it_accepts():
    lan = MemoryLAN()
    master_table, backup_table = ConnTable(), ConnTable()
    master, backup = link(lan, "10.0.0.2", master_table), link(lan, "10.0.0.3", backup_table)
    backup.accepting = True
    tasks = [asyncio.ensure_future(x.run()) for x in (master, backup)]
    try:
        for i in range(300):
            master.sender.change(rec(i), 0.0)
        master.poke()
        await until(lambda: len(backup_table) == 300, "300 flows synced")
        assert backup.receiver.counters["conns"] == 300 and backup.receiver.counters["lost"] == 0
        assert all(len(p) <= 1500 - 28 for _, _, p in lan.sent)  # each fits one unfragmented datagram
        assert len(master_table) == 0  # a master never applies (its loop is off and nothing came back)

        backup.accepting = False  # it became master: the other side's datagrams are ignored
        master.sender.change(rec(999), 0.0)
        master.poke()
        await until(lambda: backup.counters["ignored"] == 1, "ignored while not accepting")
        assert len(backup_table) == 300
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_udp_channel_sends_and_receives_on_loopback():
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # a free port for the channel
    ch = UDPChannel("lo", A("127.0.0.1"), port)
    try:
        payload = sync.encode([rec(1)], 51, 1)
        peer.sendto(payload, ("127.0.0.1", port))
        got = await asyncio.wait_for(ch.recv(), 10)
        assert got.payload == payload and got.src == A("127.0.0.1")

        peer.setblocking(False)
        peer_port = peer.getsockname()[1]
        ch.port = peer_port  # the pair shares one port; here the test's socket stands for the peer
        ch.send(A("127.0.0.1"), payload)
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(peer, 2048), 10)
        assert sync.decode(data).records == [rec(1)]
    finally:
        ch.close()
        peer.close()
