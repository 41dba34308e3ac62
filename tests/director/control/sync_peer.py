"""One end of a connection-sync test across namespaces: ``python -m tests.director.control.sync_peer send|receive ...``.

send ADDR DST COUNT: queue COUNT connection records and send them to DST (the group or the peer), then exit.
receive ADDR GROUP|- COUNT: apply what arrives until COUNT flows are in the table (or 20 s), print a JSON summary.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
import time

from director.control.sync import ConnRecord, SyncReceiver, SyncSender
from director.control.sync_socket import SyncLink, UDPChannel
from director.dataplane.codec import flow_key
from director.dataplane.conntable import ESTABLISHED, ConnTable
from director.dataplane.scheduler import Dest

A = ipaddress.ip_address
PORT, VRID = 8848, 51
RS = A("10.1.0.11").packed


class AnyDest:
    def __init__(self):
        self.dests: dict = {}

    def conn_dest(self, key, addr, port):
        return self.dests.setdefault((addr, port), Dest(addr, 1, port=port)), None

    def template_dest(self, service, addr, port):
        return None


async def send(addr: str, dst: str, count: int) -> None:
    dst_ip = A(dst)
    ch = UDPChannel("eth0", A(addr), PORT, dst_ip if dst_ip.is_multicast else None)
    link = SyncLink(SyncSender(VRID, max_rate=5000), SyncReceiver(ConnTable(), AnyDest(), VRID), ch, (dst_ip,))
    task = asyncio.ensure_future(link.run())
    for i in range(count):
        key = flow_key(6, A("10.0.0.1").packed, A("192.0.2.10").packed, 1024 + i, 80)
        link.sender.change(ConnRecord(key, ESTABLISHED, 900.0, RS, 80), time.monotonic())
    link.poke()
    while len(link.sender):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    task.cancel()
    ch.close()
    print(json.dumps(dict(link.sender.counters)))


async def receive(addr: str, group: str, count: int) -> None:
    ch = UDPChannel("eth0", A(addr), PORT, None if group == "-" else A(group))
    table = ConnTable()
    link = SyncLink(SyncSender(VRID), SyncReceiver(table, AnyDest(), VRID), ch, ())
    link.accepting = True
    task = asyncio.ensure_future(link.run())
    print("ready", flush=True)
    deadline = time.monotonic() + 20
    while len(table) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    task.cancel()
    ch.close()
    print(json.dumps({"flows": len(table), **link.receiver.counters}), flush=True)


if __name__ == "__main__":
    role, addr, other, n = sys.argv[1:5]
    asyncio.run((send if role == "send" else receive)(addr, other, int(n)))
