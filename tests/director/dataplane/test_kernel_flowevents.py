"""The tc program's flow events (glb_tc.bpf.c tell(), director/dataplane/flowevents.py), through BPF_PROG_TEST_RUN.

A new flow the program schedules (mh here) and each TCP state change it
applies to a flow of a service it schedules (ROUTE_TRACK) put one record on
the ``flow_events`` ring: the ``conns`` key and value after the packet.
Python takes them as the sweep would (KernelSync.events -> Forwarder.take),
so the flow is in the connection table, and told to connection sync, at
once. A full ring costs the packet nothing: it is forwarded, the event
counted lost, and the flow found by the sweep as before.

Needs root and BPF: skipped otherwise, failed under CI=true.
"""

from __future__ import annotations

import logging
import time

import pytest

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers.inet import IP, TCP, UDP  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from director.dataplane import codec  # noqa: E402
from director.dataplane import kernelmaps as km  # noqa: E402
from director.dataplane.conntable import ESTABLISHED, FIN_WAIT, SYN_RECV, UDP as S_UDP  # noqa: E402
from tests.director.dataplane.test_codec import VIP4, frame, packed  # noqa: E402
from tests.director.dataplane.test_kernel_newflows import ADDRS, Director, _plan  # noqa: E402
from tests.environment import bpf_unavailable, require  # noqa: E402

CLIENT = "198.51.100.7"


def _load(ring_bytes: int | None = None):
    require(bpf_unavailable())
    from director.dataplane.flowevents import FlowEvents
    from director.dataplane.libbpf import LibBpf

    sizes = {"conns": 1 << 16}
    if ring_bytes is not None:
        sizes["flow_events"] = ring_bytes
    b = LibBpf(max_entries=sizes, sizes=km.MAPS)
    return b, FlowEvents(b.map_fd("flow_events"))


@pytest.fixture
def bpf():
    b, events = _load()
    b.events = events
    yield b
    events.close()
    b.close()


@pytest.fixture
def small_ring():
    b, events = _load(4096)  # one page: 102 records of 40 bytes (32 + the ring's 8-byte header)
    b.events = events
    yield b
    events.close()
    b.close()


def _syn(sport: int, client: str = CLIENT) -> bytes:
    return frame(IP(src=client, dst=VIP4) / TCP(sport=sport, dport=80, flags="S"))


def test_a_new_mh_flow_is_one_record(bpf):
    d = Director(bpf, _plan("mh"))
    assert bpf.events.drain() == []
    t0 = time.monotonic()
    rc, _, reasons = d.run(_syn(4000))
    t1 = time.monotonic()
    assert rc == km.TC_ACT_REDIRECT and reasons == {"new_flow": 1, "forwarded_dr": 1}
    records = bpf.events.drain()
    assert len(records) == 1 and len(records[0]) == km.FLOW_EVENT.size == 32
    key, value = km.FLOW_EVENT.unpack(records[0])
    assert d.tables.vip_id(packed(VIP4)) == 0  # the first VIP of a fresh program's plan
    # proto 6, family 4, VIP id 0, ports 4000 and 80 (network order), the client in 16 bytes
    assert key == bytes.fromhex("0604" "0000" "0fa0" "0050" "c6336407" + "00" * 12)
    route, state, flags, expires = km.FLOW_VALUE.unpack(value)
    kkey = codec.flow_key(6, packed(CLIENT), packed(VIP4), 4000, 80)
    assert key == d.tables.kernel_key(kkey) and value == bpf.lookup("conns", key)
    assert route == d.tables.flow(kkey, t1)[0]
    assert (state, flags) == (SYN_RECV, km.FLOW_KERNEL)
    timeout = d.f.table.timeouts[SYN_RECV]
    # The program's clock is the coarse one: up to a timer tick behind time.monotonic, never ahead.
    assert km.ticks(t0 - km.CLOCK_LAG + timeout) - 1 <= expires <= km.ticks(t1 + timeout)
    assert bpf.events.received == 1 and d.tables.events_lost() == 0
    # Python's path for it: in the table at once, unconfirmed, on the kernel's server
    d.sync.events(records, t1, d.f.take)
    c = d.f.table.get(kkey)
    assert c is not None and c.state == SYN_RECV and not c.confirmed
    assert d.sync._routes[route][1] is c.dest


def test_state_changes_the_kernel_applies_are_told_and_reach_sync(bpf):
    d = Director(bpf, _plan("mh"))
    synced = []
    d.f.table.changed = synced.append
    ip = IP(src=CLIENT, dst=VIP4)
    kkey = codec.flow_key(6, packed(CLIENT), packed(VIP4), 4000, 80)
    d.run(_syn(4000))
    assert d.run(frame(ip / TCP(sport=4000, dport=80, flags="A")))[2] == {"state_tracked": 1, "forwarded_dr": 1}
    for _ in range(3):  # no change of state: nothing to tell
        d.run(frame(ip / TCP(sport=4000, dport=80, flags="A") / Raw(b"x")))
    records = bpf.events.drain()
    assert [km.FLOW_VALUE.unpack(r[24:])[1] for r in records] == [SYN_RECV, ESTABLISHED]
    d.sync.events(records, time.monotonic(), d.f.take)  # both in one batch, as a wake-up drains them
    c = d.f.table.get(kkey)
    assert c.state == ESTABLISHED and c.confirmed and c.dest.counts.active == 1 and synced == [c]
    d.run(frame(ip / TCP(sport=4000, dport=80, flags="FA")))
    d.sync.events(bpf.events.drain(), time.monotonic(), d.f.take)
    assert c.state == FIN_WAIT and c.dest.counts.active == 0 and synced == [c, c]
    # UDP: its packets never come to Python; the event confirms it at once
    d.run(frame(ip / UDP(sport=5000, dport=53) / Raw(b"q")))
    d.sync.events(bpf.events.drain(), time.monotonic(), d.f.take)
    u = d.f.table.get(codec.flow_key(17, packed(CLIENT), packed(VIP4), 5000, 53))
    assert u is not None and u.state == S_UDP and u.confirmed and synced[-1] is u


def test_a_flow_python_scheduled_is_not_told(bpf):
    """Only what the program itself does: a SYN left to Python (its slot's server drained) makes no record."""
    d = Director(bpf, _plan("mh", weights=(0, 0, 0, 0, 0)))
    assert d.run(_syn(4000))[2] == {"pass_no_flow": 1}
    assert bpf.events.drain() == []


def test_a_full_ring_loses_events_not_packets(small_ring):
    bpf = small_ring
    d = Director(bpf, _plan("mh", table_size=251))
    n = 150
    for i in range(n):
        rc, _, reasons = d.run(_syn(10000 + i))
        assert rc == km.TC_ACT_REDIRECT and reasons == {"new_flow": 1, "forwarded_dr": 1}, i
    lost = d.tables.events_lost()
    records = bpf.events.drain()
    assert lost == n - len(records) and 0 < lost < n
    assert len(records) == 4096 // 40  # what one page holds
    now = time.monotonic()
    d.sync.events(records, now, d.f.take)
    assert len(d.f.table) == len(records)
    # the lost ones wait for the sweep, as every kernel flow did before
    d.sync.sweep(now, d.f.table.__contains__, budget=1 << 16, take=d.f.take)
    assert len(d.f.table) == n
    # drained, the ring takes events again
    d.run(_syn(20000))
    assert len(bpf.events.drain()) == 1 and d.tables.events_lost() == lost


def test_the_servers_get_every_kernel_flow_at_once(bpf):
    """/status counts: each kernel-made flow on the server the kernel chose, with no sweep."""
    d = Director(bpf, _plan("mh"))
    for i in range(40):
        d.run(_syn(30000 + i, client=f"203.0.113.{i + 1}"))
    d.sync.events(bpf.events.drain(), time.monotonic(), d.f.take)
    assert len(d.f.table) == 40
    inactive = {str(dest.key.address): dest.counts.inactive for dest in d.f.dests() if dest.counts.inactive}
    assert sum(inactive.values()) == 40 and set(inactive) <= set(ADDRS)
