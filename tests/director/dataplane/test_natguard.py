"""The NAT guard: which real-server packets the director's kernel must drop, and nft taking the table."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import pytest

from director.control.health import ServerKey
from director.dataplane.forwarder import Plan, ServerPlan, ServicePlan, VipPlan
from director.dataplane.ownership import NAT_TABLE, NatGuard, nat_script
from director.dataplane.packetpath import nat_sources
from tests.environment import require
from tests.netns import Lab, lab_unavailable

ROOT = Path(__file__).resolve().parents[3]


def P(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def test_nat_sources_are_each_real_servers_port_per_vip_protocol():
    vips = (VipPlan(P("192.0.2.10"), 80, 6, "192.0.2.10:80/tcp"), VipPlan(P("192.0.2.10"), 53, 17, "192.0.2.10:53/udp"))
    nat = ServicePlan("web", "nat", "rr", vips, (
        ServerPlan(ServerKey("web", "10.2.0.11", 8080), P("10.2.0.11"), 1, True),
        ServerPlan(ServerKey("web", "10.2.0.12", 0), P("10.2.0.12"), 1, True)))
    dr = ServicePlan("dns", "dr", "rr", (VipPlan(P("192.0.2.11"), 53, 17, "192.0.2.11:53/udp"),),
                     (ServerPlan(ServerKey("dns", "10.1.0.1", 0), P("10.1.0.1"), 1, True),))
    assert nat_sources(Plan(b"\0" * 6, (nat, dr))) == {
        (6, P("10.2.0.11"), 8080), (17, P("10.2.0.11"), 8080), (6, P("10.2.0.12"), 80), (17, P("10.2.0.12"), 53)}


@pytest.mark.netns
def test_nft_loads_the_nat_guard_and_it_goes_away():
    require(lab_unavailable())
    with Lab("natguard") as lab:
        ns = lab.netns("dir")
        script = nat_script({(6, P("10.2.0.11"), 8080), (17, P("fd00:2::11"), 53)})
        ns.run(["nft", "-f", "-"], input=script)
        listed = ns.run(["nft", "list", "table", "inet", NAT_TABLE]).stdout
        assert "10.2.0.11 . tcp . 8080" in listed and "fd00:2::11 . udp . 53" in listed
        code = ("from director.dataplane.ownership import NatGuard; g = NatGuard(); "
                "g.installed = frozenset({1}); g.remove()")
        ns.run([sys.executable, "-c", code], cwd=ROOT)
        assert ns.run(["nft", "list", "table", "inet", NAT_TABLE], check=False).returncode != 0


def test_an_empty_nat_guard_installs_nothing():
    g = NatGuard(nft="/nonexistent/nft")
    g.install(())  # no NAT service: no table, and nft is never run
    assert g.installed == frozenset()
