"""glb realserver setup --mode nat: the default route through the director, and back on teardown."""

from __future__ import annotations

import json

import pytest

from director.realserver import cli as rs
from director.realserver.plan import parse_request, plan_setup
from director.realserver.steps import DefaultRoute, PolicyRoute
from glb.errors import RealServerError
from tests.director.director_lab import GLB, ROOT
from tests.director.realserver.test_realserver import FakeSystem, host_facts
from tests.netns import Lab, lab_unavailable
from tests.environment import require


class RoutingFakeSystem(FakeSystem):
    """FakeSystem with a main table of default routes."""

    def __init__(self, facts, fail=None):
        super().__init__(facts, fail)
        self.routes = dict(facts.default_routes)
        self.policy = {}

    def facts(self, req):
        import dataclasses

        return dataclasses.replace(super().facts(req), default_routes=dict(self.routes))

    def set_default_route(self, version, gateway, device):
        self._maybe_fail("set_default_route")
        self.routes[version] = (gateway, device)

    def delete_default_route(self, version, gateway):
        assert self.routes[version][0] == gateway
        del self.routes[version]

    def add_policy_route(self, version, gateway, ports):
        self._maybe_fail("add_policy_route")
        self.policy[version] = (gateway, ports)

    def delete_policy_route(self, version, gateway, ports):
        assert self.policy.pop(version) == (gateway, ports)

    def snapshot(self):
        return (*super().snapshot(), dict(self.routes), dict(self.policy))


def test_nat_plan_points_the_default_route_at_the_director_and_holds_no_vip():
    req = parse_request([], "nat", gateways=["10.2.0.1", "fd00:2::1"])
    plan = plan_setup(req, host_facts(default_routes={4: ("10.0.0.1", "eth0")}))
    assert plan.steps == (DefaultRoute(4, "10.2.0.1", "10.0.0.1", "eth0"), DefaultRoute(6, "fd00:2::1", None, None))
    assert plan.vips == () and plan.device == {}
    again = plan_setup(req, host_facts(default_routes={4: ("10.2.0.1", "eth0")}))
    assert [s.version for s in again.steps] == [6]
    assert "the IPv4 default route is via 10.2.0.1 already; left alone" in again.notes


def test_a_policy_route_leaves_the_default_route_alone():
    req = parse_request([], "nat", gateways=["10.2.0.1", "fd00:2::1"], policy_ports=[8080, 8081, 8080])
    plan = plan_setup(req, host_facts(default_routes={4: ("10.0.0.1", "eth0")}))
    assert plan.steps == (PolicyRoute(4, "10.2.0.1", (8080, 8081)), PolicyRoute(6, "fd00:2::1", (8080, 8081)))


@pytest.mark.parametrize("ports, mode, message", [
    ([0], "nat", "bad --policy-route port 0: expected a port, 1..65535 (the real server's service port)"),
    ([65536], "nat", "bad --policy-route port 65536: expected a port, 1..65535 (the real server's service port)"),
    ([8080], "dr", "--policy-route is for NAT mode (replies through the director), not dr"),
])
def test_bad_policy_routes_are_one_line_errors(ports, mode, message):
    with pytest.raises(RealServerError) as info:
        parse_request(["192.0.2.10"] if mode == "dr" else [], mode, gateways=["10.2.0.1"] if mode == "nat" else [],
                      policy_ports=ports)
    assert str(info.value) == message


def test_policy_route_setup_then_teardown_restores_everything(tmp_path):
    system = RoutingFakeSystem(host_facts(default_routes={4: ("10.0.0.1", "eth0")}))
    snap = system.snapshot()
    state = tmp_path / "rs.json"
    assert rs.setup([], "nat", state_file=state, system=system, gateways=["10.2.0.1"], policy_ports=[8080]) == 0
    assert system.routes[4] == ("10.0.0.1", "eth0") and system.policy[4] == ("10.2.0.1", (8080,))
    assert rs.teardown(state, system=system) == 0  # the steps read back from the state file
    assert system.snapshot() == snap


@pytest.mark.parametrize("vips, mode, gateways, message", [
    ([], "nat", [], "nat mode needs --gateway ADDR: the director's address on this network"),
    (["192.0.2.10"], "nat", ["10.2.0.1"], "nat mode holds no VIP here (the director rewrites the destination): "
                                          "leave out --vip"),
    (["192.0.2.10"], "dr", ["10.2.0.1"], "--gateway is for NAT mode (the director as this host's gateway), not dr"),
    ([], "nat", ["10.2.0.1", "10.3.0.1"], "bad gateway '10.3.0.1': one --gateway per IP version"),
    ([], "nat", ["director"], "bad gateway 'director': not an IP address"),
])
def test_bad_nat_requests_are_one_line_errors(vips, mode, gateways, message):
    with pytest.raises(RealServerError) as info:
        parse_request(vips, mode, gateways=gateways)
    assert str(info.value) == message


@pytest.mark.parametrize("before", [{4: ("10.0.0.1", "eth0")}, {}], ids=["replaced", "none-before"])
def test_nat_setup_then_teardown_restores_the_route(tmp_path, before):
    system = RoutingFakeSystem(host_facts(default_routes=before))
    snap = system.snapshot()
    state = tmp_path / "rs.json"
    assert rs.setup([], "nat", state_file=state, system=system, gateways=["10.2.0.1"]) == 0
    assert system.routes[4] == ("10.2.0.1", None)
    assert json.loads(state.read_text())["mode"] == "nat"
    assert rs.teardown(state, system=system) == 0
    assert system.snapshot() == snap


@pytest.mark.netns
def test_nat_setup_and_teardown_in_a_namespace(tmp_path):
    require(lab_unavailable())
    with Lab("rsnat") as lab:
        host, director = lab.netns("rs"), lab.netns("dir")
        lab.veth(host, director, "10.2.0.11/24", "10.2.0.1/24", a_name="eth0", b_name="eth0")
        host.ip("addr", "add", "10.2.0.12/24", "dev", "eth0")
        host.ip("route", "add", "default", "via", "10.2.0.12")  # some other gateway before
        host.ip("route", "add", "198.51.100.0/24", "via", "10.2.0.12")  # and a route setup must leave alone
        state = tmp_path / "rs.json"
        res = host.run([GLB, "realserver", "setup", "--mode", "nat", "--gateway", "10.2.0.1",
                        "--state-file", str(state)], check=False, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        routes = host.ip("route", "show").stdout
        assert "default via 10.2.0.1 dev eth0" in routes and "198.51.100.0/24 via 10.2.0.12" in routes
        res = host.run([GLB, "realserver", "teardown", "--state-file", str(state)], check=False, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        routes = host.ip("route", "show").stdout
        assert "default via 10.2.0.12 dev eth0" in routes and "10.2.0.1 " not in routes
        assert "198.51.100.0/24 via 10.2.0.12" in routes
        res = host.run([GLB, "realserver", "setup", "--mode", "nat", "--vip", "192.0.2.10", "--gateway", "10.2.0.1",
                        "--state-file", str(state)], check=False, cwd=ROOT)
        assert res.returncode == 1
        assert res.stderr.strip().splitlines()[-1] == ("glb: error: nat mode holds no VIP here (the director "
                                                       "rewrites the destination): leave out --vip")


@pytest.mark.netns
def test_policy_route_setup_and_teardown_in_a_namespace(tmp_path):
    """Only replies from the service port go via the director; the rest keeps the old default route."""
    require(lab_unavailable())
    with Lab("rspol") as lab:
        host, director = lab.netns("rs"), lab.netns("dir")
        lab.veth(host, director, ["10.2.0.11/24", "fd00:2::11/64"], ["10.2.0.1/24", "fd00:2::1/64"],
                 a_name="eth0", b_name="eth0")
        host.ip("route", "add", "default", "via", "10.2.0.12")
        state = tmp_path / "rs.json"
        rules_before = host.ip("rule", "show").stdout
        res = host.run([GLB, "realserver", "setup", "--mode", "nat", "--gateway", "10.2.0.1", "--gateway", "fd00:2::1",
                        "--policy-route", "8080", "--state-file", str(state)], check=False, cwd=ROOT)
        assert res.returncode == 0, res.stderr

        def via(*args: str) -> str:
            return host.ip("route", "get", *args).stdout

        assert "via 10.2.0.1 " in via("198.51.100.7", "from", "10.2.0.11", "ipproto", "tcp", "sport", "8080")
        assert "via 10.2.0.1 " in via("198.51.100.7", "from", "10.2.0.11", "ipproto", "udp", "sport", "8080")
        assert "via fd00:2::1 " in via("2001:db8::7", "from", "fd00:2::11", "ipproto", "tcp", "sport", "8080")
        assert "via 10.2.0.12 " in via("198.51.100.7", "from", "10.2.0.11", "ipproto", "tcp", "sport", "22")
        assert "via" not in via("10.2.0.5", "ipproto", "tcp", "sport", "8080")  # on-link stays on-link
        assert "default via 10.2.0.12 dev eth0" in host.ip("route", "show").stdout
        res = host.run([GLB, "realserver", "teardown", "--state-file", str(state)], check=False, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        assert host.ip("rule", "show").stdout == rules_before
        assert "via 10.2.0.12 " in via("198.51.100.7", "from", "10.2.0.11", "ipproto", "tcp", "sport", "8080")
