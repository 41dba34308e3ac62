"""A director pair in one process: two Directors (control plane only) elect over a MemoryLAN, publish to a real Redis.

Shown: --id picks the member (one-line errors otherwise); only the master
publishes, and its snapshot names the standby (present, healthy, last heard);
a clean stop hands over (priority 0) without the site ever being withdrawn;
the standby's health checks run all along; the pair's /status and metrics.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from pathlib import Path

import pytest

from director.control import pair as pairmod
from director.control import sync
from director.control.datagram import MemoryLAN
from director.control.main import Director, announce_offsets, pair_member_id
from director.control.probes import ProbeResult
from director.control.status import status_document
from glb import config
from glb.config import RedisConfig
from glb.errors import DirectorError
from glb.state import decode_snapshot, encode_snapshot
from glb.store import RedisStore
from tests.director.control.test_main import free_port
from tests.configs import ZONES
from tests.waiting import async_until as until


def write(path: Path, redis_url: str, port: int, **pair) -> Path:
    extra = "".join(f", {k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in pair.items())
    path.write_text(f"""
redis: {{url: "{redis_url}", timeout: 0.5}}
{ZONES}sites:
  dc1:
    director:
      interface: lo
      status_listen: "127.0.0.1:{port}"
      heartbeat: 0.2
      pair:
        virtual_router_id: 51
        members:
          - {{id: dc1-a, address: 10.0.0.2, priority: 200}}
          - {{id: dc1-b, address: 10.0.0.3, priority: 100}}
        {extra.lstrip(", ").replace(", ", chr(10) + "        ")}
    services:
      - name: web
        vips: ["192.0.2.10:80/tcp"]
        real_servers: [10.1.0.11, 10.1.0.12]
        health_check: {{type: tcp, interval: 0.1, timeout: 0.1, rise: 1, fall: 1}}
  dc2:
    director: {{interface: lo, status_listen: "127.0.0.1:{free_port()}"}}
    services:
      - name: web
        vips: ["192.0.2.20:80/tcp"]
        real_servers: [10.2.0.11]
""")
    return path


class CountingProbe:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, check, address, port):
        self.calls += 1
        return ProbeResult(True, "ok", 0.001)


class Lan:
    """One MemoryLAN for VRRP and one for sync, as the pair's channel factories."""

    def __init__(self) -> None:
        self.vrrp, self.sync = MemoryLAN(), MemoryLAN()

    def factories(self) -> dict:
        return {"vrrp_channel": lambda iface, addr: self.vrrp.channel(addr),
                "sync_channel": lambda iface, addr, port, group: self.sync.channel(addr)}


async def snapshot(redis_url: str):
    store = RedisStore(RedisConfig(url=redis_url, timeout=0.5))
    try:
        return await store.load_site("dc1")
    finally:
        await store.close()


async def eventually(check, what: str, timeout: float = 5.0) -> None:
    """async_until for a coroutine predicate (one that reads Redis)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.01)


@pytest.fixture
def hello_fast(monkeypatch):
    monkeypatch.setattr(pairmod, "HELLO", 0.1)


def test_the_member_comes_from_id_or_the_config(tmp_path, redis_url):
    cfg = config.load(write(tmp_path / "glb.yaml", redis_url, free_port()))
    site = cfg.site("dc1")
    assert pair_member_id(site, "dc1-b") == "dc1-b"
    with pytest.raises(DirectorError, match=r"^site dc1 has a director pair \(dc1-a, dc1-b\): say which member "
                                            r"this is with --id$"):
        pair_member_id(site, None)
    with pytest.raises(DirectorError, match=r"^site dc1: --id dc1-z is not a member of its director pair "
                                            r"\(dc1-a, dc1-b\)$"):
        pair_member_id(site, "dc1-z")
    assert pair_member_id(cfg.site("dc2"), None) is None  # one director: unchanged
    with pytest.raises(DirectorError, match="has one director"):
        pair_member_id(cfg.site("dc2"), "dc2-b")


def test_announcements_follow_garp_master_delay_and_repeat(tmp_path, redis_url):
    cfg = config.load(write(tmp_path / "glb.yaml", redis_url, free_port(), garp_master_delay=2, garp_master_repeat=3))
    assert announce_offsets(cfg.site("dc1").director.pair) == (0.0, 0.0, 0.0, 2.0, 2.0, 2.0)
    dflt = config.load(write(tmp_path / "d.yaml", redis_url, free_port())).site("dc1").director.pair
    assert (dflt.garp_master_delay, dflt.garp_master_repeat) == (5.0, 5)  # keepalived's


async def start(tmp_path: Path, redis_url: str, lan: Lan, member: str, **pair) -> Director:
    path = write(tmp_path / f"{member}.yaml", redis_url, free_port(), **pair)
    d = Director(config.load(path), "dc1", probe=CountingProbe(), member=member, pair_channels=lan.factories())
    await d.start()
    return d


async def test_only_the_master_publishes_and_names_its_standby(tmp_path, redis_url, hello_fast):
    lan = Lan()
    a = await start(tmp_path, redis_url, lan, "dc1-a")
    b = await start(tmp_path, redis_url, lan, "dc1-b")
    try:
        await until(lambda: a.pair.master and b.pair.role == "backup", "dc1-a elected")

        async def standby_named():
            snap = await snapshot(redis_url)
            return snap is not None and snap.director_id == "dc1-a" and any(
                m.id == "dc1-b" and m.role == "backup" and m.present and m.healthy for m in snap.pair)
        await eventually(standby_named, "the master's snapshot names a present, healthy standby")
        snap = await snapshot(redis_url)
        assert decode_snapshot(encode_snapshot(snap)).pair == snap.pair  # round trip
        assert b.publisher.published == 0  # a backup never publishes
        await until(lambda: b.checker.targets() and b._prober is None and b.table.services()[0].up,
                    "the standby checks its servers")
        assert [m["role"] for m in status_document(b, 0.0)["pair"]["members"]] == ["master", "backup"]
        metrics = a.metrics.render().decode()
        assert "glb_director_pair_master 1.0" in metrics and 'glb_director_vrrp_packets_total{counter="tx"}' in metrics
        assert "glb_director_pair_master 0.0" in b.metrics.render().decode()
    finally:
        await b.stop()
        await a.stop()


async def test_a_clean_stop_hands_over_without_withdrawing(tmp_path, redis_url, hello_fast):
    lan = Lan()
    a = await start(tmp_path, redis_url, lan, "dc1-a")
    b = await start(tmp_path, redis_url, lan, "dc1-b")
    seen: list = []
    watching = True

    async def watch():
        while watching:
            s = await snapshot(redis_url)
            if s is not None:
                seen.append((s.director_id, s.withdrawn))
            await asyncio.sleep(0.01)

    try:
        await until(lambda: a.pair.master and a.pair.standby_present(), "dc1-a master with a standby")
        watcher = asyncio.ensure_future(watch())
        await until(lambda: seen, "watching the snapshot")
        await a.stop()
        assert any(payload[2] == 0 for _, _, payload in lan.vrrp.sent)  # priority 0 went out
        await until(lambda: b.pair.master, "dc1-b took over")

        async def published_by_b():
            s = await snapshot(redis_url)
            return s is not None and s.director_id == "dc1-b"
        await eventually(published_by_b, "dc1-b publishes")
        watching = False
        await watcher
        assert not any(withdrawn for _, withdrawn in seen), "the site was withdrawn during a handover"
        me = next(m for m in (await snapshot(redis_url)).pair if m.id == "dc1-b")
        assert me.role == "master"
    finally:
        watching = False
        await b.stop()
        await a.stop()


async def test_the_last_member_stopping_withdraws(tmp_path, redis_url, hello_fast):
    lan = Lan()
    a = await start(tmp_path, redis_url, lan, "dc1-a")
    await until(lambda: a.pair.master, "alone, dc1-a becomes master after the master-down interval")

    async def published():
        s = await snapshot(redis_url)
        return s is not None and s.director_id == "dc1-a"
    await eventually(published, "dc1-a publishes")
    await a.stop()
    assert (await snapshot(redis_url)).withdrawn


class FakeEngine:
    """The packet workers as the pair sees them: sync records up (from another thread, as the
    supervisor's), datagrams down. A flush hands up what the test filed since the last one."""

    failed = None

    def __init__(self, path: "FakePath") -> None:
        self.path = path
        self.on_sync = None
        self.filed: list = []
        self.applied: list = []
        """(record, whether this member was master when its datagram reached the workers)."""
        self.member: Director | None = None
        self._mark = 0

    def sync_send(self, on: bool) -> None:
        pass

    def sync_all(self) -> None:
        pass

    def sync_flush(self) -> int:
        self._mark += 1
        records, self.filed = self.filed, []
        worker = threading.Thread(target=lambda: records and self.on_sync(records))
        worker.start()
        worker.join()
        return self._mark

    def sync_flushed(self, mark: int) -> bool:
        return mark <= self._mark

    def sync_apply(self, datagram: bytes, sender) -> None:
        self.applied += [(r, self.member.pair.master) for r in sync.decode(datagram).records]


class FakePath:
    """A packet path that forwards while owned: what a flow filed then is handed over."""

    def __init__(self) -> None:
        self.engine = FakeEngine(self)
        self.owned = False

    def set_owned(self, owned: bool) -> None:
        self.owned = owned

    def apply(self) -> None:
        pass

    def counters(self) -> dict:
        return {}

    async def stop(self) -> None:
        pass


@pytest.fixture
def fake_paths(monkeypatch):
    """Each Director started gets a FakePath instead of packet workers."""
    async def fake_packet_path(self) -> None:
        self.packet_path = FakePath()
        self.packet_path.engine.member = self
    monkeypatch.setattr(Director, "_start_packet_path", fake_packet_path)


def flow(port: int) -> sync.ConnRecord:
    key = bytes([6]) + ipaddress.ip_address("198.51.100.7").packed + ipaddress.ip_address("192.0.2.10").packed \
        + port.to_bytes(2, "big") + (80).to_bytes(2, "big")
    return sync.ConnRecord(key, 1, 900.0, ipaddress.ip_address("10.1.0.11").packed, 0)


async def test_a_clean_stop_hands_the_last_flows_to_the_standby_before_its_priority_0(tmp_path, redis_url,
                                                                                      hello_fast, fake_paths):
    """The flows a master's workers filed in its last moments (not yet sent up at their next tick,
    or queued on the rate-bounded link) reach the standby while it is still backup: stopping the
    link at once lost them, and the new master dropped their packets as unknown mid-stream ones."""
    lan = Lan()
    a = await start(tmp_path, redis_url, lan, "dc1-a")
    b = await start(tmp_path, redis_url, lan, "dc1-b")
    pa, pb = a.packet_path, b.packet_path
    try:
        await until(lambda: a.pair.master and a.pair.standby_present() and pa.owned, "dc1-a master with a standby")
        first, last = flow(40001), flow(40002)
        pa.engine.filed = [first]  # confirmed in the last tick before the stop
        owned_at_flush = []
        flush = pa.engine.sync_flush

        def flush_then_file() -> int:  # the second confirmed while the first flush was on its way
            owned_at_flush.append(pa.owned)
            mark = flush()
            if pa.owned:
                pa.engine.filed = [last]
            return mark
        pa.engine.sync_flush = flush_then_file
        await a.stop()
        await until(lambda: b.pair.master, "dc1-b took over")
        assert pb.engine.applied == [(first, False), (last, False)]  # both, while dc1-b was still backup
        assert owned_at_flush == [True, False]  # the last flush after the VIPs were released: nothing more came
    finally:
        await b.stop()
        await a.stop()


async def test_a_master_that_yields_hands_its_last_flows_to_the_new_master(tmp_path, redis_url, hello_fast,
                                                                          fake_paths):
    """dc1-b master alone; dc1-a (the higher priority) comes and preempts. The flows dc1-b's workers
    filed in its last moments go out after its VIPs are released, and dc1-a, master by then, still
    applies them (for pair.YIELD_GRACE): it used to drop them and then their packets as unknown
    mid-stream ones. Long after the change nothing from the old master is applied."""
    lan = Lan()
    b = await start(tmp_path, redis_url, lan, "dc1-b")
    pb = b.packet_path
    a = None
    try:
        await until(lambda: b.pair.master and pb.owned, "dc1-b master alone")
        last = flow(40003)
        pb.engine.filed = [last]  # confirmed in dc1-b's last tick as master
        owned_at_flush = []
        flush = pb.engine.sync_flush

        def flush_seen() -> int:
            owned_at_flush.append(pb.owned)
            return flush()
        pb.engine.sync_flush = flush_seen
        a = await start(tmp_path, redis_url, lan, "dc1-a")
        pa = a.packet_path
        await until(lambda: a.pair.master and not b.pair.master, "dc1-a preempts")
        await until(lambda: pa.engine.applied, "dc1-b's last flow reaches dc1-a")
        assert pa.engine.applied == [(last, True)]  # applied as master
        assert owned_at_flush == [False]  # after dc1-b released the VIPs: nothing more confirmed there
        assert a.pair.link.counters["late"] == 1
        # Past the grace, a record from a member that is not master is not applied by the master.
        await asyncio.sleep(pairmod.YIELD_GRACE + 0.1)
        b.pair.link.channel.send(a.pair.me.address, sync.encode([flow(40004)], 51, 7))
        await asyncio.sleep(0.1)
        assert pa.engine.applied == [(last, True)] and a.pair.link.counters["ignored"] >= 1
    finally:
        if a is not None:
            await a.stop()
        await b.stop()
