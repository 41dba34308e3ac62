"""director.dataplane.counters: one set of connection counts for all packet workers."""

from __future__ import annotations

from array import array

import pytest

from director.control.health import ServerKey
from director.dataplane.counters import CountTable, SlotAllocator
from director.dataplane.forwarder import Forwarder
from director.dataplane.scheduler import Dest, make_scheduler
from tests.director.dataplane.test_forwarder import RS, dr_owner, fwd, plan, server, syn


def cells(slots: int, workers: int) -> array:
    return array("q", bytes(8 * CountTable.size(slots, workers)))


def test_reads_sum_every_worker_and_writes_touch_only_ones_own_cells():
    mem = cells(4, 3)
    t0, t2 = CountTable(mem, 3, 0), CountTable(mem, 3, 2)
    a, b = t0.counts(1), t2.counts(1)
    a.add(0, 2)
    b.add(1, 0)
    b.add(1, -1)
    assert (a.active, a.inactive) == (b.active, b.inactive) == (2, 1)
    assert a.own() == (0, 2) and b.own() == (2, -1)
    assert t0.counts(0).own() == (0, 0) and not t0.in_use(0) and t0.in_use(1)
    t2.reset()  # worker 2 restarted: its connections died with it
    assert (a.active, a.inactive) == (0, 2)
    with pytest.raises(IndexError):
        t0.counts(4)


def test_wlc_in_one_worker_sees_the_connections_of_another():
    mem = cells(4, 2)
    w0, w1 = CountTable(mem, 2, 0), CountTable(mem, 2, 1)
    rows = [(w0.counts(i), w1.counts(i)) for i in range(2)]
    ds0 = [Dest(bytes([10, 0, 0, i + 1]), counts=rows[i][0]) for i in range(2)]
    ds1 = [Dest(bytes([10, 0, 0, i + 1]), counts=rows[i][1]) for i in range(2)]
    ds0[0].counts.add(1, 3)  # worker 0 holds four connections on the first server
    s1 = make_scheduler("wlc", ds1)
    assert s1.schedule(b"\x01\x02\x03\x04", 1, b"\x05\x06\x07\x08", 80, 0) is ds1[1]


def test_forwarders_of_two_workers_schedule_on_the_sum_and_report_their_own_share():
    mem = cells(8, 2)
    p, unplaced = SlotAllocator(8).assign(plan(server(RS[0]), server(RS[1]), scheduler="wlc"), lambda s: False)
    assert unplaced == [] and [s.slot for s in p.services[0].servers] == [0, 1]
    f0, f1 = Forwarder(counts=CountTable(mem, 2, 0)), Forwarder(counts=CountTable(mem, 2, 1))
    f0.apply(p)
    f1.apply(p)
    # Worker 0 takes three new connections: wlc puts two on RS[0] (first on ties), one on RS[1].
    assert [dr_owner(fwd(f0, syn(40000 + i))) for i in range(3)] == [RS[0], RS[1], RS[0]]
    # Worker 1 sees them: its first connection goes to the less loaded server.
    assert dr_owner(fwd(f1, syn(41000, src="198.51.100.8"))) == RS[1]
    a, b = f0.stats(), f1.stats()
    k0, k1 = ServerKey("web", RS[0], 0), ServerKey("web", RS[1], 0)
    assert a.servers[k0][:2] == (0, 2) and b.servers[k1][:2] == (0, 1)  # each reports its own
    merged = a.merge(b)
    assert merged.servers[k0][:2] == (0, 2) and merged.servers[k1][:2] == (0, 2)


def test_slots_are_stable_and_reused_only_when_free_and_gone():
    alloc = SlotAllocator(2)
    both = plan(server(RS[0]), server(RS[1]))
    p, _ = alloc.assign(both, lambda s: False)
    again, _ = alloc.assign(plan(server(RS[1]), server(RS[0])), lambda s: False)
    assert {s.key.address: s.slot for s in again.services[0].servers} == \
        {s.key.address: s.slot for s in p.services[0].servers}
    slot0 = p.services[0].servers[0].slot
    # Full; RS[0] left the plan but its row still counts connections: no room for RS[2].
    p2, unplaced = alloc.assign(plan(server(RS[1]), server(RS[2])), lambda s: s == slot0)
    assert unplaced == [ServerKey("web", RS[2], 0)] and p2.services[0].servers[1].slot == -1
    # Once its connections are gone, RS[2] takes the row.
    p3, unplaced = alloc.assign(plan(server(RS[1]), server(RS[2])), lambda s: False)
    assert unplaced == [] and p3.services[0].servers[1].slot == slot0
