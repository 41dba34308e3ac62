"""The snapshot's spill fields (issue 16): published, optional for older writers, validated, shown by `glb status`."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from glb import config, overview
from glb.errors import StateError
from glb.state import (
    DeploymentState, RealServerState, ServiceState, SiteSnapshot, answer_digest, decode_snapshot, encode_snapshot,
)


def snapshot(**spill) -> SiteSnapshot:
    svc = ServiceState("web", ("192.0.2.10:80/tcp",), 0.0, False, (RealServerState("10.1.0.11", 0, "down", 100),),
                       **spill)
    return SiteSnapshot("dc1", "d1", 1.0, (svc,), version=3, published_at=2.0)


def test_spill_fields_round_trip():
    s = snapshot(spilling_to="dc2", spilled_conns=7)
    doc = json.loads(encode_snapshot(s))
    assert (doc["services"][0]["spilling_to"], doc["services"][0]["spilled_conns"]) == ("dc2", 7)
    assert decode_snapshot(encode_snapshot(s)) == s


def test_a_document_without_them_reads_as_not_spilling():
    doc = json.loads(encode_snapshot(snapshot(spilling_to="dc2", spilled_conns=7)))
    del doc["services"][0]["spilling_to"], doc["services"][0]["spilled_conns"]
    svc = decode_snapshot(json.dumps(doc)).services[0]
    assert (svc.spilling_to, svc.spilled_conns) == (None, 0)


@pytest.mark.parametrize("field, value, message", [
    ("spilling_to", "d c2", "snapshot: services[0].spilling_to: expected a name"),
    ("spilling_to", 3, "snapshot: services[0].spilling_to: expected a name"),
    ("spilled_conns", -1, "snapshot: services[0].spilled_conns: -1 out of range (>= 0)"),
    ("spilled_conns", True, "snapshot: services[0].spilled_conns: expected an integer, got True"),
])
def test_bad_spill_fields_are_rejected(field, value, message):
    doc = json.loads(encode_snapshot(snapshot()))
    doc["services"][0][field] = value
    with pytest.raises(StateError) as info:
        decode_snapshot(json.dumps(doc))
    assert str(info.value).startswith(message)


def test_spilling_does_not_change_what_dns_answers():
    # dnsfront skips fetching heartbeats by this digest; spill is the directors' business.
    s = snapshot()
    assert answer_digest(replace(s, services=(replace(s.services[0], spilling_to="dc2", spilled_conns=4),))) \
        == answer_digest(s)


def test_glb_status_shows_a_spilling_service_and_its_spilled_conns():
    cfg = config.load(Path(__file__).resolve().parents[2] / "deploy" / "examples" / "glb.yaml")
    now = time.time()
    dc1 = SiteSnapshot("dc1", "d1", now, (ServiceState("web", (), 0.0, False, spilling_to="dc2", spilled_conns=3),
                                          ServiceState("dns", (), 1.0, True, spilled_conns=2)), published_at=now)
    report = overview.build_report(cfg, DeploymentState.build([dc1]), now)
    web, dns = report["sites"][0]["services"]
    assert (web["spilling_to"], web["spilled_conns"], dns["spilling_to"], dns["spilled_conns"]) == ("dc2", 3, None, 2)
    line = next(x for x in overview.render(report).splitlines() if x.strip().startswith("dc1"))
    assert "web DOWN 0% (0/3 servers) SPILLING to dc2 (3 conns)" in line
    assert "dns up 100% (0/2 servers) (2 spilled conns)" in line
