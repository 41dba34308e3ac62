"""forwarding: nat: port mapping, director.lan, and one exact line per mistake."""

from __future__ import annotations

import ipaddress

import pytest

from glb import config
from tests.glb.test_config import example, load_dict, problems_of

A = ipaddress.ip_address


def with_nat(lan=None, **service) -> dict:
    """dc2's web service forwarded by NAT, its real servers on 10.2.0.0/24 behind director.lan."""
    data = example()
    web = data["sites"]["dc2"]["services"][0]
    web["forwarding"] = "nat"
    web["real_servers"] = [{"address": "10.2.0.11", "port": 8080}, {"address": "10.2.0.12", "port": 8080}]
    web.update(service)
    d = data["sites"]["dc2"]["director"]
    d["lan"] = {"interface": "eth1", "address": "10.2.0.1/24"} if lan is None else lan
    if d["lan"] == "delete":
        del d["lan"]
    return data


def test_nat_service_maps_ports_and_names_its_lan(tmp_path):
    site = load_dict(with_nat(), tmp_path).site("dc2")
    web = site.service("web")
    assert web.forwarding == "nat"
    assert [(str(rs.address), rs.port) for rs in web.real_servers] == [("10.2.0.11", 8080), ("10.2.0.12", 8080)]
    assert site.director.lan == config.LanConfig("eth1", ipaddress.ip_interface("10.2.0.1/24"), None)
    assert site.director.lan_interface == "eth1"


def test_one_interface_for_both_sides(tmp_path):
    site = load_dict(with_nat(lan={"address": "10.2.0.1/24"}), tmp_path).site("dc2")
    assert site.director.lan_interface == site.director.interface == "eth0"
    assert load_dict(example(), tmp_path).site("dc1").director.lan is None


BROKEN = [
    (with_nat(lan="delete"),
     ["sites.dc2.director.lan: required: service web forwards by NAT and needs the director's address on its "
      "real servers' network"]),
    (with_nat(real_servers=[{"address": "10.9.0.11", "port": 8080}]),
     ["sites.dc2.services[0].real_servers[0].address: 10.9.0.11 is not on 10.2.0.0/24, the network the director "
      "is directly connected to (sites.dc2.director.lan): a NAT real server must use the director as its gateway"]),
    (with_nat(sorry_server="10.3.0.99"),
     ["sites.dc2.services[0].sorry_server: 10.3.0.99 is not on 10.2.0.0/24, the network the director is directly "
      "connected to (sites.dc2.director.lan): a NAT real server must use the director as its gateway"]),
    (with_nat(lan={"address": "10.2.0.1"}),
     ["sites.dc2.director.lan.address: expected an address with its prefix length (e.g. 10.0.2.1/24), got '10.2.0.1'"]),
    (with_nat(lan={"address6": "fd00::1/64"}),
     ["sites.dc2.director.lan.address: required: service web has IPv4 NAT real servers and needs the director's "
      "address on their network"]),
    (with_nat(lan={"address": "fd00::1/64"}),
     ["sites.dc2.director.lan.address: not an IPv4 address: 'fd00::1/64'"]),
    (with_nat(lan={"address": "10.2.0.1/24", "iface": "eth1"}),
     ["sites.dc2.director.lan.iface: unknown key (expected one of address, address6, interface)"]),
    (with_nat(real_servers=["2001:db8::11"], lan={"address": "10.2.0.1/24", "address6": "2001:db8::1/64"}),
     ["sites.dc2.services[0].real_servers[0].address: IPv6 real server for a service with only IPv4 VIPs"]),
]


@pytest.mark.parametrize("data, expected", BROKEN, ids=[str(i) for i in range(len(BROKEN))])
def test_broken_nat_config_names_key_path(data, expected, tmp_path):
    assert problems_of(data, tmp_path) == expected


def test_dr_still_refuses_a_port_of_its_own(tmp_path):
    data = example()
    data["sites"]["dc1"]["services"][0]["real_servers"][0]["port"] = 8080
    assert problems_of(data, tmp_path) == [
        "sites.dc1.services[0].real_servers[0].port: 8080 differs from the VIP port: DR and TUN forward without "
        "changing ports (NAT can)"]
