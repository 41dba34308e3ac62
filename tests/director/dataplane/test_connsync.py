"""Connection sync between two packet workers' forwarders (director/dataplane/connsync.py), pure.

A master forwarder schedules flows; what its table's changes turn into goes
through the wire format to a backup forwarder whose plan has its VIPs
parked (packetpath.without_vips). When the backup's plan gets the VIPs, a
mid-stream packet of every synced flow goes to the server the master chose,
with every scheduler, persistence too; a lone SYN is never sent.
"""

from __future__ import annotations

import pytest

from director.control import sync
from director.dataplane.connsync import ConnSync
from director.dataplane.conntable import ESTABLISHED, ConnTable
from director.dataplane.forwarder import Forwarder
from director.dataplane.packetpath import without_vips
from tests.director.dataplane.test_forwarder import CLIENT4, RS, dr_owner, fwd, plan, server, syn

VRID = 51


def pair(scheduler: str, **kw):
    p = plan(server(RS[0]), server(RS[1]), server(RS[2]), scheduler=scheduler, **kw)
    master, backup = Forwarder(), Forwarder()
    master.apply(p)
    backup.apply(without_vips(p))
    ms, bs = ConnSync(master, VRID), ConnSync(backup, VRID)
    ms.send(True)
    return p, master, backup, ms, bs


def ship(ms: ConnSync, bs: ConnSync, now: float) -> list:
    records = ms.records(now)
    if records:
        bs.apply(sync.encode(records, VRID, 1), now)
    return records


@pytest.mark.parametrize("scheduler", ["wlc", "lc", "rr", "sh", "mh"])
@pytest.mark.parametrize("persistent", [False, True])
def test_synced_flows_keep_their_server_after_takeover(scheduler, persistent):
    kw = {"persistence": (300.0, 24, 64)} if persistent else {}
    p, master, backup, ms, bs = pair(scheduler, **kw)
    owners = {}
    for i in range(30):
        client = f"198.51.{i}.{i + 1}"  # 30 client networks (/24): 30 templates
        fwd(master, syn(41000 + i, src=client))
        owners[(client, 41000 + i)] = dr_owner(fwd(master, syn(41000 + i, src=client, flags="A"), 0.1))
    ship(ms, bs, 0.2)
    assert len(backup.table) == 30 and all(c.state == ESTABLISHED for c in backup.table)
    assert bs.receiver.counters["conns"] == 30 and not bs.receiver.counters["unknown_dest"]
    if persistent:
        assert bs.receiver.counters["templates"] == 30
    # The backup forwarded nothing meanwhile (no VIP): now it takes over.
    assert fwd(backup, syn(41000, src="198.51.0.1", flags="A"), 0.3) is None
    backup.apply(p)
    for (client, port), owner in owners.items():
        assert dr_owner(fwd(backup, syn(port, src=client, flags="PA"), 1.0)) == owner
    stats = backup.stats()
    assert sum(v[0] for v in stats.servers.values()) == 30  # counted active, as wlc/lc read them
    if persistent:  # a new connection of a known client sticks to the same server
        client, port = next(iter(owners))
        fwd(backup, syn(50000, src=client), 2.0)
        assert dr_owner(fwd(backup, syn(50000, src=client, flags="A"), 2.1)) == owners[(client, port)]


def test_a_lone_syn_costs_the_lan_nothing_and_changes_are_coalesced():
    _, master, _, ms, bs = pair("wlc")
    fwd(master, syn(40000))
    assert ms.records(0.0) == []
    fwd(master, syn(40000, flags="A"), 0.1)
    fwd(master, syn(40000, flags="FA"), 0.2)  # ESTABLISHED then FIN_WAIT within one tick: one record
    records = ms.records(0.3)
    assert len(records) == 1 and records[0].state != ESTABLISHED


def test_a_sweep_resends_a_flow_whose_expiry_moved_on():
    table = ConnTable(tcp_established=10.0)
    master = Forwarder(table)
    master.apply(plan(server(RS[0])))
    ms = ConnSync(master, VRID)
    ms.send(True)
    fwd(master, syn(40000))
    fwd(master, syn(40000, flags="A"), 0.1)
    assert len(ms.records(0.1)) == 1
    fwd(master, syn(40000, flags="A"), 8.0)  # the hot path: refresh, nothing told
    assert ms.records(8.0) == []
    master.sweep(12.0)  # its first expiry passed, it lives on: a backup's copy must too
    (r,) = ms.records(12.0)
    assert r.timeout == pytest.approx(6.0)


def test_not_sending_tells_nothing():
    _, master, _, ms, _ = pair("rr")
    ms.send(False)
    fwd(master, syn(40000))
    fwd(master, syn(40000, flags="A"), 0.1)
    assert ms.records(0.2) == []


def test_each_worker_keeps_only_the_clients_the_fanout_gives_it():
    from director.dataplane import fanout

    p, master, _, ms, _ = pair("rr")
    for i in range(40):
        fwd(master, syn(41000 + i, src=f"198.51.100.{i + 1}"))
        fwd(master, syn(41000 + i, src=f"198.51.100.{i + 1}", flags="A"), 0.1)
    datagram = sync.encode(ms.records(0.2), VRID, 1)
    workers = []
    for index in range(2):
        b = Forwarder()
        b.apply(without_vips(p))
        s = ConnSync(b, VRID, workers=2, index=index)
        s.apply(datagram, 0.2)
        workers.append(b)
    assert len(workers[0].table) + len(workers[1].table) == 40 and all(len(w.table) for w in workers)
    for index, w in enumerate(workers):
        assert all(fanout.bucket(c.key[1:5], 2) == index for c in w.table)


def test_flows_of_unknown_servers_are_counted_not_applied():
    master = Forwarder()
    master.apply(plan(server(RS[0])))
    ms = ConnSync(master, VRID)
    ms.send(True)
    fwd(master, syn(40000, src=CLIENT4))
    fwd(master, syn(40000, src=CLIENT4, flags="A"), 0.1)
    other = Forwarder()
    other.apply(without_vips(plan(server(RS[1]))))  # a config without the master's server
    s = ConnSync(other, VRID)
    s.apply(sync.encode(ms.records(0.2), VRID, 1), 0.2)
    assert s.receiver.counters["unknown_dest"] == 1 and len(other.table) == 0


def test_a_dump_tells_every_flow_again_for_a_backup_that_just_joined():
    p, master, _, ms, _ = pair("wlc", persistence=(300.0, 32, 128))
    for i in range(10):
        fwd(master, syn(41000 + i, src=f"198.51.100.{i + 1}"))
        fwd(master, syn(41000 + i, src=f"198.51.100.{i + 1}", flags="A"), 0.1)
    ms.records(0.2)  # sent long ago; a backup that starts now knows none of them
    late = Forwarder()
    late.apply(without_vips(p))
    ls = ConnSync(late, VRID)
    ms.dump()
    ship(ms, ls, 5.0)
    assert len(late.table) == 10 and ls.receiver.counters["templates"] == 10


def test_a_large_dump_goes_up_a_bounded_batch_per_call():
    _, master, _, ms, _ = pair("rr")
    for i in range(25):
        fwd(master, syn(41000 + i, src=f"198.51.100.{i + 1}"))
        fwd(master, syn(41000 + i, src=f"198.51.100.{i + 1}", flags="A"), 0.1)
    ms.records(0.2)
    ms.dump()
    sizes = []
    while True:
        got = ms.records(0.3, limit=10)
        if not got:
            break
        sizes.append(len(got))
    assert sizes == [10, 10, 5]


def test_a_flow_spilled_on_the_flag_reaches_a_backup_whose_target_is_still_standby():
    from director.dataplane.spillflags import NOT_ARMED
    from tests.director.dataplane.test_forwarder_spill import REMOTE, remote, tunnelled_to
    from director.dataplane.forwarder import SpillPlan

    standby = SpillPlan("dc2", tuple(remote(a) for a in REMOTE), active=False, flag=0)
    p = plan(server(RS[0]), scheduler="rr", spill=standby)
    master, backup = Forwarder(spill_flags=[1.0]), Forwarder(spill_flags=[NOT_ARMED])
    master.apply(p)
    backup.apply(without_vips(p))
    ms, bs = ConnSync(master, VRID), ConnSync(backup, VRID)
    ms.send(True)
    fwd(master, syn(41000), 1.0)
    assert tunnelled_to(fwd(master, syn(41000, flags="A"), 1.1)) == REMOTE[0]
    ship(ms, bs, 1.2)
    assert bs.receiver.counters["conns"] == 1 and not bs.receiver.counters["unknown_dest"]
    backup.apply(p)  # it takes over, its plan still standby and its flag not armed: the flow stays
    assert tunnelled_to(fwd(backup, syn(41000, flags="PA"), 1.3)) == REMOTE[0]
    assert backup.stats().servers[remote(REMOTE[0]).key][0] == 1
