"""Connection sync inside a packet worker: what the master's table tells, how a backup's table takes it.

The connection table and persistence templates live in the packet workers
(director/dataplane/engine.py), the sync socket in the control plane
(director/control/sync_socket.py). This is the worker's half, pure:

* **Sending** (the master): the table's ``changed`` hook files each flow
  whose state changed, that was confirmed, or whose expiry a sweep found
  moved on; :meth:`ConnSync.records` turns what was filed since the last
  call into :class:`~director.control.sync.ConnRecord` (and, before a flow
  made through a persistence template, that template's
  :class:`~director.control.sync.TemplateRecord`), coalesced per flow. The
  engine ships them to the control plane, whose
  :class:`~director.control.sync.SyncSender` bounds the rate.
  This replaces IPVS's per-packet ``sync_threshold`` count: the C loop
  keeps no per-flow packet count, and a state change or confirmation is
  what makes a flow worth a backup's memory (a lone SYN or a scan never is).
* **Receiving** (a backup): :meth:`ConnSync.apply` runs a
  :class:`~director.control.sync.SyncReceiver` over this worker's table,
  finding each flow's service by its VIP (parked ones too: a backup's plan
  has no owned VIP) and each server by address and port; a synced flow
  counts on the same route as a flow scheduled here, so it forwards and
  counts the moment the VIPs are taken. With several workers each keeps
  only the clients the fanout program gives it.
"""

from __future__ import annotations

import ipaddress
import itertools
from typing import Any

from director.control.health import ServerKey
from director.control.sync import ConnRecord, Record, SyncReceiver, TemplateRecord
from director.dataplane import fanout
from director.dataplane.conntable import Conn
from director.dataplane.forwarder import reply_key


PER_TICK = 2000
"""Records a worker sends up per 20 ms tick at most (100,000/s: above any sane sync.max_rate)."""


def _vip_of(key: bytes) -> tuple[bytes, int, int]:
    """(VIP, VIP port, protocol) of a codec.flow_key."""
    if len(key) == 13:
        return key[5:9], int.from_bytes(key[11:13], "big"), key[0]
    return key[17:33], int.from_bytes(key[35:37], "big"), key[0]


def _client_of(key: bytes) -> bytes:
    return key[1:5] if len(key) == 13 else key[1:17]


class ConnSync:
    """One worker's side of connection sync, over its Forwarder."""

    def __init__(self, fwd: Any, sync_id: int, *, workers: int = 1, index: int = 0) -> None:
        self.fwd = fwd
        self.workers, self.index = workers, index
        self._pending: dict[bytes, Conn] = {}
        self.receiver = SyncReceiver(fwd.table, self, sync_id, owns=self._owns if workers > 1 else None,
                                     tag=self._tag, reply_key=reply_key)
        self.sending = False

    # -- the master's side

    def send(self, on: bool) -> None:
        """Start (a master) or stop (a backup) telling the table's changes."""
        self.sending = on
        self.fwd.table.changed = self._changed if on else None
        if not on:
            self._pending.clear()

    def _changed(self, c: Conn) -> None:
        self._pending[c.key] = c

    def dump(self) -> None:
        """Tell every flow and template again (a backup just joined: it knows none of the flows
        established before, which tell nothing more until they change). The sender's rate bounds it."""
        if self.sending:
            for c in self.fwd.table:
                self._pending[c.key] = c

    @property
    def pending(self) -> int:
        """Flows filed and not yet told."""
        return len(self._pending)

    def records(self, now: float, limit: int = PER_TICK) -> list[Record]:
        """Up to ``limit`` flows that changed since they were last told (oldest first), templates
        before the flows made through them. The rest wait for the next call: a dump of a large
        table must not stall the worker's packet loop nor its pipe."""
        if not self._pending:
            return []
        batch = list(itertools.islice(self._pending.values(), limit))
        out: list[Record] = []
        templates: set[int] = set()
        for c in batch:
            if c.due < 0:
                continue  # gone meanwhile: the backup's copy times out by itself
            if c.template is not None and id(c.template) not in templates:
                templates.add(id(c.template))
                t = self._template_record(c, now)
                if t is not None:
                    out.append(t)
            out.append(ConnRecord(c.key, c.state, max(0.0, c.expires - now), c.dest.addr, c.dest.key.port,
                                  c.confirmed, c.template is not None))
        if len(batch) == len(self._pending):
            self._pending.clear()
        else:
            for c in batch:
                del self._pending[c.key]
        return out

    def _template_record(self, c: Conn, now: float) -> TemplateRecord | None:
        hit = self.fwd.service_of(*_vip_of(c.key))
        if hit is None or hit[0].persistence is None:
            return None
        svc = hit[0]
        family, value = svc.persistence.key(_client_of(c.key))
        client = value.to_bytes(4 if family == 4 else 16, "big")
        return TemplateRecord(svc.plan.name, client, c.dest.addr, c.dest.key.port,
                              max(0.0, c.template.expires - now))

    # -- a backup's side

    def apply(self, datagram: bytes, now: float, sender: Any = None) -> None:
        self.receiver.apply(datagram, now, sender)

    def _dest(self, svc: Any, addr: bytes, port: int):
        key = ServerKey(svc.plan.name, str(ipaddress.ip_address(addr)), port)
        d = svc.dests.get(key)
        if d is None and svc.sorry is not None and svc.sorry.key == key:
            d = svc.sorry
        if d is None:  # a spilled flow: another site's server, keyed under the spill label
            d = next((r for k, r in svc.remote.items() if k.address == key.address and k.port == port), None)
        if d is None:  # a standby target's here: the master spilled on its flag before this member's plan
            d = next((r for k, r in svc.target.items() if k.address == key.address and k.port == port), None)
            if d is not None:
                svc.remote.setdefault(d.key, d)  # it holds a spilled flow now
        return d

    def conn_dest(self, key: bytes, addr: bytes, port: int):
        hit = self.fwd.service_of(*_vip_of(key))
        if hit is None:
            return None
        d = self._dest(hit[0], addr, port)
        return None if d is None else (d, hit[0].persistence)

    def template_dest(self, service: str, addr: bytes, port: int):
        svc = self.fwd.service(service)
        if svc is None or svc.persistence is None:
            return None
        d = self._dest(svc, addr, port)
        return None if d is None else (d, svc.persistence)

    def _tag(self, key: bytes, dest: Any) -> Any:
        hit = self.fwd.service_of(*_vip_of(key))
        return self.fwd.route(dest.key, hit[1])

    def _owns(self, r: Record) -> bool:
        """Whether the fanout program sends this record's client to this worker."""
        if isinstance(r, ConnRecord):
            vip, _, _ = _vip_of(r.key)
            bits = fanout.masks(self.fwd.plan, parked=True).get(vip)
            return fanout.bucket(_client_of(r.key), self.workers, bits) == self.index
        svc = self.fwd.service(r.service)
        if svc is None or svc.plan.persistence is None:
            return True
        _, m4, m6 = svc.plan.persistence
        return fanout.bucket(r.client, self.workers, m4 if len(r.client) == 4 else m6) == self.index
