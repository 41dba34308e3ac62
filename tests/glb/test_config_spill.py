"""``spill`` on a service: the model, and each misconfiguration's exact one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from glb import config
from tests.glb.test_config import load_dict as load, problems_of as problems

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "deploy" / "examples" / "lab.yaml"


def lab() -> dict:
    return yaml.safe_load(LAB.read_text())


def web(d: dict, site: str) -> dict:
    return d["sites"][site]["services"][0]


def test_lab_spills_dc1_to_dc2_with_named_defaults():
    cfg = config.load(LAB)
    spill = cfg.site("dc1").service("web").spill
    assert spill == config.Spill(to=("dc2",), when="all_down", after=0.0, recover_after=2.0)
    assert cfg.site("dc2").service("web").spill is None
    assert [str(v) for v in cfg.spilled_in_vips("dc2", "web")] == ["192.0.2.10:80/tcp"]
    assert cfg.spilled_in_vips("dc1", "web") == ()


def test_every_field(tmp_path):
    d = lab()
    web(d, "dc1")["spill"] = {"to": "dc2", "when": "below_quorum", "after": 0.5, "recover_after": 5}
    spill = load(d, tmp_path).site("dc1").service("web").spill
    assert spill == config.Spill(("dc2",), "below_quorum", 0.5, 5.0)


def _add_dc3(d: dict, forwarding: str = "tun", port: int = 80) -> None:
    d["sites"]["dc3"] = {
        "director": {"interface": "eth0", "address": "192.0.2.190"},
        "services": [{"name": "web", "vips": [f"192.0.2.150:{port}/tcp"], "forwarding": forwarding,
                      "real_servers": ["10.3.0.11"]}],
    }


BROKEN = [
    (lambda d: web(d, "dc1").update(spill={"to": ["dc9"]}),
     ["sites.dc1.services[0].spill.to[0]: unknown site 'dc9' (sites: dc1, dc2)"]),
    (lambda d: web(d, "dc1").update(spill={"to": ["dc1"]}),
     ["sites.dc1.services[0].spill.to[0]: site 'dc1' is this service's own site (a loop)"]),
    (lambda d: web(d, "dc1").update(spill={"to": ["dc2", "dc2"]}),
     ["sites.dc1.services[0].spill.to[1]: site 'dc2' is listed twice"]),
    (lambda d: web(d, "dc2").update(spill={"to": ["dc1"]}),
     ["sites.dc1.services[0].spill.to[0]: site 'dc2' spills service 'web' back to 'dc1' (a loop)",
      "sites.dc2.services[0].spill.to[0]: site 'dc1' forwards service 'web' by dr: spilled connections arrive "
      "by IP-in-IP, so its real servers must be set up for tun",
      "sites.dc2.services[0].spill.to[0]: site 'dc1' spills service 'web' back to 'dc2' (a loop)"]),
    (lambda d: (web(d, "dc2").update(name="api"), d["names"].clear()),
     ["sites.dc1.services[0].spill.to[0]: site 'dc2' has no service 'web' to spill to"]),
    (lambda d: (_add_dc3(d, forwarding="dr"), web(d, "dc1").update(spill={"to": ["dc3"]})),
     ["sites.dc1.services[0].spill.to[0]: site 'dc3' forwards service 'web' by dr: spilled connections arrive "
      "by IP-in-IP, so its real servers must be set up for tun"]),
    (lambda d: (_add_dc3(d, port=8080), web(d, "dc1").update(spill={"to": ["dc3"]})),
     ["sites.dc1.services[0].spill.to[0]: site 'dc3' serves 'web' on no 80/tcp VIP (spilled connections keep "
      "the port of 192.0.2.10:80/tcp)"]),
    (lambda d: (_add_dc3(d), web(d, "dc2").update(spill={"to": ["dc3"]}),
                d["sites"]["dc3"]["services"][0].update(spill={"to": ["dc1"]})),
     ["sites.dc1.services[0].spill.to[0]: site 'dc2' spills service 'web' back to 'dc1' (a loop)",
      "sites.dc2.services[0].spill.to[0]: site 'dc3' spills service 'web' back to 'dc2' (a loop)",
      "sites.dc3.services[0].spill.to[0]: site 'dc1' forwards service 'web' by dr: spilled connections arrive "
      "by IP-in-IP, so its real servers must be set up for tun",
      "sites.dc3.services[0].spill.to[0]: site 'dc1' spills service 'web' back to 'dc3' (a loop)"]),
    # The lab's dc1 is a pair: each member tunnels from its own address; one director needs director.address.
    (lambda d: d["sites"]["dc1"]["director"].pop("pair"),
     ["sites.dc1.director.address: required: service web spills IPv4 (192.0.2.10:80/tcp) by IP-in-IP and "
      "needs the outer source address"]),
    (lambda d: web(d, "dc1").update(spill={"to": ["dc2"], "when": "sometimes"}),
     ["sites.dc1.services[0].spill.when: unknown spill trigger 'sometimes' (expected one of all_down, below_quorum)"]),
    (lambda d: web(d, "dc1").update(spill={"when": "all_down"}),
     ["sites.dc1.services[0].spill.to: required"]),
    (lambda d: web(d, "dc1").update(spill={"to": ["dc2"], "recover_after": -1, "until": 3}),
     ["sites.dc1.services[0].spill.recover_after: must be at least 0, got -1",
      "sites.dc1.services[0].spill.until: unknown key (expected one of after, recover_after, to, when)"]),
]


@pytest.mark.parametrize("mutate, expected", BROKEN, ids=[str(i) for i in range(len(BROKEN))])
def test_misconfigured_spill_names_the_key(mutate, expected, tmp_path):
    d = lab()
    mutate(d)
    assert problems(d, tmp_path) == expected
