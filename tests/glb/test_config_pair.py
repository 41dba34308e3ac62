"""director.pair: an active/standby pair's config, its defaults, and one exact line per mistake."""

from __future__ import annotations

import copy
import ipaddress

import pytest

from glb import config
from tests.glb.test_config import example, load_dict, problems_of

A = ipaddress.ip_address
PAIR = {
    "virtual_router_id": 51,
    "members": [
        {"id": "dc1-a", "address": "10.0.0.2", "priority": 200},
        {"id": "dc1-b", "address": "10.0.0.3", "priority": 100},
    ],
}


def with_pair(**changes) -> dict:
    data = example()
    pair = copy.deepcopy(PAIR)
    pair.update(changes)
    data["sites"]["dc1"]["director"]["pair"] = pair
    data["sites"]["dc1"]["director"].pop("id", None)
    return data


def test_one_director_sites_are_unchanged(tmp_path):
    cfg = load_dict(example(), tmp_path)
    assert cfg.site("dc1").director.pair is None and cfg.site("dc2").director.pair is None


def test_a_pair_with_defaults(tmp_path):
    pair = load_dict(with_pair(), tmp_path).site("dc1").director.pair
    assert pair == config.PairConfig(
        virtual_router_id=51,
        members=(config.PairMember("dc1-a", A("10.0.0.2"), 200), config.PairMember("dc1-b", A("10.0.0.3"), 100)),
        advert_interval=0.1, preempt=True, preempt_delay=0.0, unicast=False,
        sync=config.SyncConfig(enabled=True, port=8848, group=A("224.0.0.81"), max_rate=20_000, mtu=1500),
    )
    assert pair.member("dc1-b").priority == 100 and pair.member("dc1-c") is None
    assert [m.id for m in pair.peers("dc1-a")] == ["dc1-b"]


def test_a_pair_with_everything_set(tmp_path):
    data = with_pair(advert_interval=0.25, preempt=False, preempt_delay=30, unicast=True,
                     sync={"enabled": False, "port": 9000, "group": "239.1.2.3", "max_rate": 500, "mtu": 9000})
    data["sites"]["dc1"]["director"]["pair"]["members"].append({"id": "dc1-c", "address": "10.0.0.4", "priority": 50})
    data["sites"]["dc1"]["director"]["id"] = "dc1-b"
    cfg = load_dict(data, tmp_path)
    pair = cfg.site("dc1").director.pair
    assert (pair.advert_interval, pair.preempt, pair.preempt_delay, pair.unicast) == (0.25, False, 30.0, True)
    assert pair.sync == config.SyncConfig(False, 9000, A("239.1.2.3"), 500, 9000)
    assert len(pair.members) == 3 and cfg.site("dc1").director.id == "dc1-b"


P = "sites.dc1.director.pair"

BROKEN = [
    (dict(virtual_router_id=None), [f"{P}.virtual_router_id: required"]),
    (dict(virtual_router_id=0), [f"{P}.virtual_router_id: must be at least 1, got 0"]),
    (dict(virtual_router_id=256), [f"{P}.virtual_router_id: must be at most 255, got 256"]),
    (dict(members=None), [f"{P}.members: required"]),
    (dict(members=[PAIR["members"][0]]),
     [f"{P}.members: a pair needs two or more members (remove 'pair' to run one director)"]),
    (dict(members=[PAIR["members"][0], {**PAIR["members"][1], "id": "dc1-a"}]),
     [f"{P}.members[1].id: dc1-a is also members[0]'s"]),
    (dict(members=[PAIR["members"][0], {**PAIR["members"][1], "address": "10.0.0.2"}]),
     [f"{P}.members[1].address: 10.0.0.2 is also members[0]'s"]),
    (dict(members=[PAIR["members"][0], {"id": "dc1-b", "address": "10.0.0.3"}]),
     [f"{P}.members[1].priority: required (1..254; the highest live member is master)"]),
    (dict(members=[PAIR["members"][0], {**PAIR["members"][1], "priority": 255}]),
     [f"{P}.members[1].priority: must be at most 254, got 255"]),
    (dict(members=[PAIR["members"][0], {**PAIR["members"][1], "address": "fe80::3"}]),
     [f"{P}.members[1].address: not an IPv4 address: 'fe80::3'"]),
    (dict(members=[PAIR["members"][0], {**PAIR["members"][1], "prio": 5}]),
     [f"{P}.members[1].prio: unknown key (expected one of address, id, priority)"]),
    (dict(advert_interval=0.015), [f"{P}.advert_interval: must be a multiple of 0.01 s (VRRP counts centiseconds), got 0.015"]),
    (dict(advert_interval=0), [f"{P}.advert_interval: must be at least 0.01, got 0"]),
    (dict(advert_interval=41), [f"{P}.advert_interval: must be at most 40.95, got 41"]),
    (dict(preempt="yes"), [f"{P}.preempt: expected true or false, got a string"]),
    (dict(preempt_delay=-1), [f"{P}.preempt_delay: must be at least 0, got -1"]),
    (dict(sync={"group": "10.0.0.1"}), [f"{P}.sync.group: not an IPv4 multicast group: 10.0.0.1"]),
    (dict(sync={"mtu": 100}), [f"{P}.sync.mtu: must be at least 576, got 100"]),
    (dict(sync={"port": 0}), [f"{P}.sync.port: must be at least 1, got 0"]),
    (dict(sync={"rate": 5}), [f"{P}.sync.rate: unknown key (expected one of enabled, group, max_rate, mtu, port)"]),
    (dict(vrid=5), [f"{P}.vrid: unknown key (expected one of advert_interval, garp_master_delay, garp_master_repeat, "
                    "members, preempt, preempt_delay, sync, unicast, virtual_router_id)"]),
]


@pytest.mark.parametrize("changes, expected", BROKEN, ids=[str(i) for i in range(len(BROKEN))])
def test_broken_pairs_give_one_line_each(changes, expected, tmp_path):
    data = with_pair(**{k: v for k, v in changes.items() if v is not None})
    for k, v in changes.items():
        if v is None:
            del data["sites"]["dc1"]["director"]["pair"][k]
    assert problems_of(data, tmp_path) == expected


def test_the_director_id_must_be_a_member(tmp_path):
    data = with_pair()
    data["sites"]["dc1"]["director"]["id"] = "dc1-z"
    assert problems_of(data, tmp_path) == ["sites.dc1.director.id: 'dc1-z' is not a member of the pair (dc1-a, dc1-b)"]


def test_a_pair_tunnels_from_each_members_own_address(tmp_path):
    """TUN over IPv4 needs an outer source: a pair member without director.address uses its own."""
    from director.control.main import Director

    data = with_pair()
    web = data["sites"]["dc1"]["services"][0]
    web["forwarding"] = "tun"
    web["vips"] = ["192.0.2.10:80/tcp"]
    data["sites"]["dc1"]["director"].pop("address", None)
    cfg = load_dict(data, tmp_path)
    for member, address in (("dc1-a", "10.0.0.2"), ("dc1-b", "10.0.0.3")):
        site = Director(cfg, "dc1", member=member)._forwarding_site()
        assert site.director.address == A(address) and site.service("web").forwarding == "tun"


def test_a_tun_service_without_an_outer_source_is_refused(tmp_path):
    data = example()
    web = data["sites"]["dc1"]["services"][0]
    web["forwarding"] = "tun"
    web["vips"] = ["192.0.2.10:80/tcp"]
    data["sites"]["dc1"]["director"].pop("address", None)
    assert any("sites.dc1.director.address: required: service web tunnels IPv4" in p
               for p in problems_of(data, tmp_path))
