"""Connection sync: golden bytes, a decoder that counts what it cannot parse, the bounded sender, apply into a ConnTable."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from director.control import sync
from director.control.sync import Batch, ConnRecord, SyncReceiver, SyncSender, TemplateRecord
from director.dataplane.codec import flow_key
from director.dataplane.conntable import ESTABLISHED, SYN_RECV, TCP_ACK, TCP_SYN, UDP, ConnTable
from director.dataplane.scheduler import Dest, Persistence

P = lambda a: ipaddress.ip_address(a).packed  # noqa: E731
CLIENT, VIP, RS1, RS2 = P("10.0.0.1"), P("192.0.2.10"), P("10.1.0.11"), P("10.1.0.12")
KEY = flow_key(6, CLIENT, VIP, 40000, 80)
KEY6 = flow_key(17, P("2001:db8::1"), P("2001:db8:10::10"), 5353, 53)

CONN = ConnRecord(KEY, ESTABLISHED, 900.0, RS1, 80, confirmed=True, templated=False)
# header: version 1 | sync id 51 | 1 record | sequence 1
# record: type 1 | length 27 | ESTABLISHED | flags confirmed | 900 000 ms | port 80 | 10.1.0.11 | the flow key
CONN_BYTES = bytes.fromhex("01330001" "00000001" "011b0104" "000dbba0" "0050" "0a01000b" "06" "0a000001" "c000020a" "9c40" "0050")
TPL = TemplateRecord("web", P("10.0.0.0"), RS2, 8080, 300.0)
# type 2 | length 22 | flags 0 | 0 | 300 000 ms | port 8080 | 10.1.0.12 | 10.0.0.0 | 3 "web"
TPL_BYTES = bytes.fromhex("01330001" "00000002" "02160000" "000493e0" "1f90" "0a01000c" "0a000000" "03" "776562")


def test_golden_connection_datagram():
    assert sync.encode([CONN], 51, 1) == CONN_BYTES
    assert sync.decode(CONN_BYTES) == Batch(51, 1, [CONN])


def test_golden_template_datagram():
    assert sync.encode([TPL], 51, 2) == TPL_BYTES
    assert sync.decode(TPL_BYTES) == Batch(51, 2, [TPL])


def test_ipv6_udp_and_mixed_families_round_trip():
    recs = [
        ConnRecord(KEY6, UDP, 299.5, P("2001:db8:1::11"), 0, confirmed=False, templated=True),
        ConnRecord(KEY6, UDP, 1.25, RS1, 53),  # IPv6 VIP tunnelled to an IPv4 real server
        TemplateRecord("dns-v6", P("2001:db8::"), P("2001:db8:1::11"), 53, 3600.0),
    ]
    data = sync.encode(recs, 7, 0xFFFFFFFF)
    assert len(data) == 8 + (10 + 16 + 37) + (10 + 4 + 37) + (10 + 16 + 16 + 1 + 6)
    assert sync.decode(data) == Batch(7, 0xFFFFFFFF, recs)


def _problems(data: bytes) -> dict:
    return dict(sync.decode(data).problems)


def test_what_cannot_be_parsed_is_skipped_and_counted():
    record = CONN_BYTES[8:]
    unknown = bytes([9, 6, 1, 2, 3, 4])  # a record type from a newer sender
    assert _problems(b"\x01\x33") == {"short": 1}
    assert _problems(b"\x02" + CONN_BYTES[1:]) == {"version": 1}
    both = sync.decode(sync.encode([unknown, record], 51, 3))
    assert both.records == [CONN] and dict(both.problems) == {"unknown_type": 1}
    assert _problems(sync.encode([record[:-1]], 51, 1)) == {"truncated": 1, "count": 1}
    assert _problems(sync.encode([record[:2] + b"\x63" + record[3:]], 51, 1)) == {"bad_record": 1}  # state 99
    assert _problems(sync.encode([record[:2] + b"\x0b" + record[3:]], 51, 1)) == {"bad_record": 1}  # UDP state, TCP key
    assert _problems(sync.encode([b"\x01\x05\x01\x04\x00"], 51, 1)) == {"bad_record": 1}  # shorter than its fixed part
    assert _problems(sync.encode([record, record], 51, 1)[:8] + record) == {"count": 1}
    bad_name = sync.encode_record(TPL)[:-3] + b"\xff\xfe\xfd"
    assert _problems(sync.encode([bad_name], 51, 1)) == {"bad_record": 1}
    assert _problems(sync.encode([b"\x01\x00"], 51, 1)) == {"truncated": 1, "count": 1}  # a zero length cannot loop


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_decode_never_raises(data):
    sync.decode(data)
    sync.decode(CONN_BYTES[:8] + data)


def test_should_sync_follows_ipvs_threshold_and_period():
    sent = [n for n in range(1, 200) if sync.should_sync(n, False)]
    assert sent == [3, 53, 103, 153]
    assert sync.should_sync(1, True) and not sync.should_sync(2, False)


# ---- sender ------------------------------------------------------------------------

def conn_rec(i: int, state=ESTABLISHED) -> ConnRecord:
    return ConnRecord(flow_key(6, CLIENT, VIP, 1024 + i, 80), state, 900.0, RS1, 80)


def test_sender_coalesces_changes_to_one_flow_newest_wins_in_its_first_place():
    s = SyncSender(51, max_rate=1000)
    s.change(conn_rec(1, SYN_RECV), 0.0)
    s.change(conn_rec(2), 0.0)
    s.change(conn_rec(1, ESTABLISHED), 0.0)
    (dgram,) = s.poll(0.0)
    assert sync.decode(dgram).records == [conn_rec(1, ESTABLISHED), conn_rec(2)]
    assert s.poll(0.0) == [] and s.next_due(0.0) is None


def test_sender_datagrams_fit_the_mtu_and_carry_everything_in_order():
    s = SyncSender(51, mtu=576, max_rate=1_000_000)
    for i in range(100):
        s.change(conn_rec(i), 0.0)
    out = s.poll(0.0)
    # 576 - 20 (IP) - 8 (UDP) = 548 bytes: the 8-byte header and 20 records of 27 bytes
    assert all(len(d) <= 548 for d in out) and [len(sync.decode(d).records) for d in out] == [20] * 5
    got = [r for d in out for r in sync.decode(d).records]
    assert got == [conn_rec(i) for i in range(100)]
    assert [sync.decode(d).seq for d in out] == [1, 2, 3, 4, 5]
    assert s.counters["records"] == 100 and s.counters["datagrams"] == 5


def test_sender_rate_is_bounded_by_a_token_bucket():
    s = SyncSender(51, max_rate=100, burst=0.05)  # 100 records/s, 5 at once
    for i in range(20):
        s.change(conn_rec(i), 10.0)
    first = [r for d in s.poll(10.0) for r in sync.decode(d).records]
    assert len(first) == 5 and s.next_due(10.0) == 10.01
    assert s.poll(10.005) == []
    assert len([r for d in s.poll(10.01) for r in sync.decode(d).records]) == 1
    assert len([r for d in s.poll(60.0) for r in sync.decode(d).records]) == 5  # a long pause refills only the burst
    assert len(s) == 9


def test_sender_pending_bound_drops_the_oldest_and_counts():
    s = SyncSender(51, max_pending=3)
    for i in range(5):
        s.change(conn_rec(i), 0.0)
    assert s.counters["overflow"] == 2
    assert [r for d in s.poll(0.0) for r in sync.decode(d).records] == [conn_rec(2), conn_rec(3), conn_rec(4)]


# ---- receiver ----------------------------------------------------------------------

class Site:
    """The backup's view of its config: one service 'web' on VIP:80 with two real servers and persistence."""

    def __init__(self):
        self.dests = {(RS1, 80): Dest(RS1, 1, port=80), (RS2, 8080): Dest(RS2, 1, port=8080)}
        self.persistence = Persistence(300.0, netmask=24)

    def conn_dest(self, key, addr, port):
        d = self.dests.get((addr, port))
        return (d, self.persistence) if d is not None and key[-2:] == b"\x00\x50" else None

    def template_dest(self, service, addr, port):
        d = self.dests.get((addr, port))
        return (d, self.persistence) if d is not None and service == "web" else None


def test_receiver_installs_connections_with_their_state_and_expiry():
    table, site = ConnTable(), Site()
    rx = SyncReceiver(table, site, 51)
    rx.apply(CONN_BYTES, 100.0)
    c = table.get(KEY)
    assert c.dest is site.dests[(RS1, 80)] and c.state == ESTABLISHED and c.expires == 1000.0 and c.confirmed
    assert c.dest.active == 1 and c.dest.inactive == 0
    # a later state change replaces it; the counters follow
    rx.apply(sync.encode([ConnRecord(KEY, SYN_RECV, 60.0, RS1, 80, confirmed=False)], 51, 2), 101.0)
    assert table.get(KEY).state == SYN_RECV and c.dest.active == 0 and c.dest.inactive == 1
    assert rx.counters["conns"] == 2 and rx.counters["lost"] == 0


def test_receiver_timeouts_run_and_the_bound_holds():
    table = ConnTable(max_entries=3)
    rx = SyncReceiver(table, Site(), 51)
    rx.apply(sync.encode([ConnRecord(flow_key(6, CLIENT, VIP, 2000 + i, 80), ESTABLISHED, 5.0 + i, RS1, 80)
                          for i in range(5)], 51, 1), 0.0)
    assert len(table) == 3 and table.evicted == 2  # the oldest two went
    keys = [flow_key(6, CLIENT, VIP, 2000 + i, 80) for i in (2, 3, 4)]  # 7, 8 and 9 s left
    assert [table.peek(k, 7.5) is not None for k in keys] == [False, True, True]
    table.sweep(20.0)
    assert len(table) == 0 and table.expired == 3


def test_receiver_counts_what_it_cannot_place():
    rx = SyncReceiver(ConnTable(), Site(), 51)
    rx.apply(sync.encode([ConnRecord(KEY, ESTABLISHED, 9.0, P("10.9.9.9"), 80)], 51, 1), 0.0)
    rx.apply(sync.encode([TemplateRecord("mail", P("10.0.0.0"), RS1, 80, 9.0)], 51, 2), 0.0)
    rx.apply(sync.encode([CONN], 52, 3), 0.0)  # another pair's sync on the same group
    rx.apply(b"\x07garbage", 0.0)
    rx.apply(sync.encode([CONN], 51, 9), 0.0)  # 3..8 never arrived
    assert dict(rx.counters) == {"unknown_dest": 2, "other_sync_id": 1, "version": 1, "lost": 6, "conns": 1}


def test_failover_keeps_flows_and_persistence_on_their_servers():
    """The master's table and templates, synced, answer the backup's lookups the same way, whatever scheduler chose."""
    now = 50.0
    master_site, backup_site = Site(), Site()
    master = ConnTable()
    web1 = master_site.dests[(RS2, 8080)]
    tpl = master_site.persistence.schedule(_Fixed(web1), CLIENT, 40000, VIP, 80, now)
    c = master.add(KEY, web1, TCP_SYN, now, template=tpl)
    master.lookup(KEY, TCP_ACK, now + 0.01)  # ESTABLISHED
    tx = SyncSender(51)
    tx.change(TemplateRecord("web", P("10.0.0.0"), web1.addr, web1.port, tpl.expires - now), now)
    tx.change(ConnRecord.from_conn(c, now + 0.02), now)
    backup = ConnTable()
    rx = SyncReceiver(backup, backup_site, 51)
    for d in tx.poll(now):
        rx.apply(d, now + 0.03)
    # takeover: the established flow's next packet finds its server...
    got = backup.lookup(KEY, TCP_ACK, now + 1)
    assert got is not None and got.dest is backup_site.dests[(RS2, 8080)] and got.state == ESTABLISHED
    assert got.template is not None and got.template.controlled == 1
    # ...and the same client's new connection sticks to it through the template
    t = backup_site.persistence.get(P("10.0.0.77"), now + 2)
    assert t is not None and t.dest is backup_site.dests[(RS2, 8080)]


class _Fixed:
    """A scheduler that always picks one destination (which one the master's scheduler picked does not matter)."""

    def __init__(self, d):
        self.d, self.members = d, {d}

    def schedule(self, *args):
        return self.d
