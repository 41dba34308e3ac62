"""The snapshot's spill fields (issue 16): published, optional for older writers, validated."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from glb.errors import StateError
from glb.state import RealServerState, ServiceState, SiteSnapshot, answer_digest, decode_snapshot, encode_snapshot


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
