"""The forwarding-mode registry against the config and the packet path's expectations."""

from __future__ import annotations

from director.dataplane.actions import MacRewrite
from director.dataplane.forwarder import Plan, ServerPlan
from director.control.health import ServerKey
from director.modes import MODES
from glb import config


def test_the_config_accepts_exactly_the_registered_modes():
    assert set(config.FORWARDING) == set(MODES)


def test_each_mode_is_registered_under_its_own_name():
    assert all(name == mode.name for name, mode in MODES.items())


def _server(mac: bytes | None, address: bytes = bytes([10, 0, 0, 1])) -> ServerPlan:
    return ServerPlan(ServerKey("web", "10.0.0.1", 0), address, 1, True, mac=mac)


PLAN = Plan(b"\x02" * 6, (), source4=bytes([10, 0, 0, 9]))


def test_a_server_without_a_known_mac_is_unreachable_in_every_mode():
    assert all(mode.transmit(_server(None), PLAN) is None for mode in MODES.values())


def test_modes_whose_transmit_is_a_mac_rewrite_say_so_for_the_c_loop():
    for mode in MODES.values():
        tx = mode.transmit(_server(b"\x04" * 6), PLAN)
        assert (tx.__class__ is MacRewrite) == mode.mac_rewrite, mode


def test_tunnelling_needs_an_outer_source_of_the_server_family():
    tun = MODES["tun"]
    assert tun.transmit(_server(b"\x04" * 6, bytes(16)), PLAN) is None  # no source6
    assert tun.transmit(_server(b"\x04" * 6), PLAN).dst == bytes([10, 0, 0, 1])


def test_every_mode_plans_a_real_server_that_holds_the_vips_or_not():
    from tests.director.realserver.test_realserver import host_facts

    from director.realserver.plan import parse_request, plan_setup
    from director.realserver.steps import AddAddress

    for name, mode in MODES.items():
        req = parse_request(["192.0.2.10"], name) if mode.holds_vips else parse_request([], name, gateways=["10.0.0.1"])
        plan = plan_setup(req, host_facts())
        assert plan.mode == name
        held = [s.address for s in plan.steps if isinstance(s, AddAddress)]
        assert held == (["192.0.2.10"] if mode.holds_vips else []), name
