"""The kernel data plane's maps on a real kernel: batched writes and reads, and pinning across a restart.

director/dataplane/libbpf.py's batch calls (BPF_MAP_UPDATE/DELETE/LOOKUP_BATCH)
against the one-by-one calls, and director/dataplane/kernel.py's pinning: maps
pinned on a bpffs are reused by the next load when their layout is the same
(the flows are still there), a group of maps at a time, rebuilt empty when it is not.

Needs root and BPF: skipped otherwise, failed under CI=true.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from director.dataplane import codec
from director.dataplane import kernelmaps as km
from director.dataplane.conntable import ESTABLISHED
from director.dataplane.kernel import KernelTables, bpffs, prepare_pins
from tests.environment import bpf_unavailable, require
from tests.netns import private_bpffs

TIMEOUTS = [60.0] * 12
VIP = ipaddress.ip_address("192.0.2.10").packed


def key(i: int) -> bytes:
    return codec.flow_key(6, ipaddress.ip_address(f"198.51.{i >> 8}.{i & 255}").packed, VIP, 40000 + i, 80)


def load(entries: int = 4096, pin_dir: Path | None = None):
    from director.dataplane.libbpf import LibBpf

    return LibBpf(max_entries={"conns": entries}, sizes=km.MAPS, pin_dir=pin_dir)


@pytest.fixture
def pin_root(tmp_path):
    """A bpffs of the test's own (a new instance: nothing else's pins, and none on a host that mounts none at
    /sys/fs/bpf), unmounted after, pins and all."""
    require(bpf_unavailable())
    with private_bpffs(tmp_path / "bpf") as root:
        assert bpffs(root)
        yield root / "glb" / "site-director"


def test_batched_writes_and_reads_match_one_by_one():
    require(bpf_unavailable())
    bpf = load()
    try:
        t = KernelTables(bpf, TIMEOUTS)
        flows = {t.kernel_key(key(i)): km.flow_value(i % 7, ESTABLISHED, 1000.0 + i) for i in range(300)}
        t.write_flows(flows)
        assert dict(bpf.items("conns")) == flows  # more than one bucket's worth, fewer than a batch
        got, token = bpf.items_batch("conns", None, 64)  # resumable: every entry once, in pieces
        while token is not None:
            more, token = bpf.items_batch("conns", token, 64)
            got += more
        assert len(got) == len(flows) and dict(got) == flows
        assert {k: bpf.lookup("conns", k) for k in flows} == flows
        doomed = list(flows)[:100] + [t.kernel_key(key(999))]  # one never installed: skipped, not an error
        assert bpf.delete_batch("conns", doomed) == 100
        assert len(bpf.items("conns")) == 200 and bpf.lookup("conns", doomed[0]) is None
        t.write_flows({k: None for k in list(flows)[100:]})
        assert bpf.items("conns") == []
        assert len(bpf.items("route_ids")) == km.MAX_ROUTES  # arrays: every slot, in batches of BATCH
    finally:
        bpf.close()


def _loaded(pin_root: Path, entries: int = 4096, versions: dict[str, int] | None = None):
    """Load over the pins and record the layout, as KernelDataplane does."""
    bpf = load(entries, pin_dir=pin_root)
    bpf.update_batch("layout", km.layout_items(km.group_ids(entries, versions)))
    return bpf


ROUTE3 = b"\x01" * km.ROUTE.size
TEMPLATE = (km.template_key(7, (4, 0xC6336400)), km.template_value(5, 500.0))


def test_pinned_maps_outlive_the_loader_and_are_rebuilt_a_group_at_a_time(pin_root):
    assert prepare_pins(pin_root, 4096).state == "new"
    first = _loaded(pin_root)
    t = KernelTables(first, TIMEOUTS)
    t.set_vips([VIP])
    t.install(key(1), 3, ESTABLISHED, 500.0)
    first.update("routes", km.U32.pack(3), ROUTE3)
    first.update("templates", *TEMPLATE)
    first.close()  # the director stopped: the pins hold the maps
    assert {p.name for p in pin_root.iterdir()} >= {"conns", "routes", "vips", "route_ids", "layout", "templates"}

    pins = prepare_pins(pin_root, 4096)  # the same release again: everything
    assert pins.state == "reused" and set(pins.kept) == set(km.GROUPS)
    assert pins.note(pin_root) == f"reusing the maps pinned in {pin_root} (established flows kept)"
    second = _loaded(pin_root)
    try:
        again = KernelTables(second, TIMEOUTS)
        assert again.flows() == [key(1)] and again.flow(key(1), 400.0)[:2] == (3, ESTABLISHED)
        assert again.vip_id(VIP) == t.vip_id(VIP)
        assert second.lookup("routes", km.U32.pack(3)) == ROUTE3
    finally:
        second.close()

    # A release that changed a map the plan rewrites: the flows and templates stay, the plan's maps are new.
    pins = prepare_pins(pin_root, 4096, {"plan": 99})
    assert (pins.state, pins.kept, pins.rebuilt) == ("partly", ("flows", "templates"), ("plan",))
    assert "established flows kept; rebuilt empty, another layout: plan" in pins.note(pin_root)
    third = _loaded(pin_root, versions={"plan": 99})
    try:
        again = KernelTables(third, TIMEOUTS)
        assert again.flows() == [key(1)] and again.flow(key(1), 400.0)[:2] == (3, ESTABLISHED)
        assert again.vip_id(VIP) == t.vip_id(VIP)
        assert third.lookup("routes", km.U32.pack(3)) == bytes(km.ROUTE.size)  # the first plan writes it
        assert third.lookup("templates", TEMPLATE[0]) == TEMPLATE[1]
    finally:
        third.close()

    # connection_table.max_entries changed: the maps sized to it are rebuilt (libbpf could not reuse them).
    pins = prepare_pins(pin_root, 8192, {"plan": 99})
    assert (pins.state, pins.kept, set(pins.rebuilt)) == ("partly", ("plan",), {"flows", "templates"})
    assert pins.note(pin_root).endswith("rebuilt empty (kept: plan)")
    assert not (pin_root / "conns").exists() and (pin_root / "routes").exists()
    fourth = _loaded(pin_root, 8192, {"plan": 99})
    try:
        assert KernelTables(fourth, TIMEOUTS).flows() == []
        # What a GLB before the groups left: one id for every map, at key 0.
        fourth.update_batch("layout", [(km.ZERO, km.U64.pack(0x1234567 | 1))] +
                            [(km.U32.pack(i), km.U64.pack(0)) for i in range(1, len(km.GROUPS))])
    finally:
        fourth.close()
    pins = prepare_pins(pin_root, 8192, {"plan": 99})
    assert pins.state == "rebuilt" and list(pin_root.iterdir()) == []


def test_a_directory_off_bpffs_is_not_taken_for_one(tmp_path):
    assert not bpffs(tmp_path / "glb")
