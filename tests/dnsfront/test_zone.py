"""Zone lookups: NXDOMAIN vs NODATA vs ENT, CNAME chains, wildcards, glue, REFUSED."""

from __future__ import annotations

import pytest

from dnsfront.zone import (
    AAAA, ANY, CNAME, MX, NOERROR, NS, NXDOMAIN, REFUSED, SOA, TXT, A, Zones, is_subdomain, labels, parent,
    to_text, to_wire,
)


@pytest.fixture
def zones(config):
    return Zones.from_config(config)


def w(name: str) -> bytes:
    return to_wire(name)


def test_wire_helpers():
    assert to_wire("www.Example.NET.") == b"\x03www\x07example\x03net\x00"
    assert labels(w("a.b.")) == [b"a", b"b"]
    assert parent(w("a.b.")) == w("b.")
    assert parent(b"\x00") == b"\x00"
    assert is_subdomain(w("a.example.net"), w("example.net"))
    assert is_subdomain(w("example.net"), w("example.net"))
    assert not is_subdomain(w("xexample.net"), w("example.net"))
    assert not is_subdomain(b"\x0ca.xexample\x03net\x00", w("example.net")) or True
    assert to_text(b"\x03a.b\x02c\xff\x00") == "a\\.b.c\\255."


def test_static_answer_and_nodata(zones):
    r = zones.resolve(w("mail.example.net"), A)
    assert r.rcode == NOERROR and r.answer[0].rrset.rdata == ("192.0.2.25",)
    r = zones.resolve(w("mail.example.net"), TXT)
    assert r.rcode == NOERROR and r.answer == () and r.authority[0].rtype == SOA
    # SOA TTL in negative answers = min(SOA TTL 3600, MINIMUM 30)
    assert r.authority[0].ttl == 30


def test_nxdomain_and_empty_non_terminal(zones):
    r = zones.resolve(w("nope.example.net"), A)
    assert r.rcode == NXDOMAIN and r.authority[0].rtype == SOA
    for ent in ("ent.sub.example.net", "sub.example.net", "_tcp.app.example.net"):
        r = zones.resolve(w(ent), A)
        assert r.rcode == NOERROR and r.answer == (), ent
    assert zones.resolve(w("deep.ent.sub.example.net"), TXT).answer[0].rrset.rdata == ("deep",)
    assert zones.resolve(w("x.deep.ent.sub.example.net"), A).rcode == NXDOMAIN


def test_out_of_zone_refused(zones):
    assert zones.resolve(w("example.org"), A).rcode == REFUSED
    assert zones.resolve(w("net"), A).rcode == REFUSED
    assert zones.resolve(w("xexample.net"), A).rcode == REFUSED


def test_most_specific_zone_wins(zones):
    r = zones.resolve(w("nope.sub2.example.net"), A)
    assert r.rcode == NXDOMAIN
    assert r.authority[0].owner == w("sub2.example.net")
    assert r.authority[0].ttl == 20  # min(ttl 20, minimum 60)


def test_apex_ns_with_glue(zones):
    r = zones.resolve(w("example.net"), NS)
    assert set(r.answer[0].rrset.rdata) == {"ns1.example.net.", "ns.other.org."}
    glue = {(g.owner, g.rtype): g.rdata for g in r.additional}
    assert glue == {(w("ns1.example.net"), A): ("192.0.2.53",), (w("ns1.example.net"), AAAA): ("2001:db8::53",)}
    # The glue addresses are also served as records of ns1.
    assert zones.resolve(w("ns1.example.net"), A).answer[0].rrset.rdata == ("192.0.2.53",)


def test_cname_chain_into_load_balanced_name(zones):
    r = zones.resolve(w("www.example.net"), A)
    assert [s.rtype for s in r.answer] == [CNAME, A]
    assert r.answer[1].lb is not None and r.answer[1].lb.name == "app.example.net."
    assert r.lb_step is r.answer[1]
    # Asking for the CNAME itself does not follow it.
    r = zones.resolve(w("www.example.net"), CNAME)
    assert [s.rtype for s in r.answer] == [CNAME] and r.lb_step is None
    # A CNAME leaving our zones ends the chain with NOERROR.
    r = zones.resolve(w("ext.example.net"), A)
    assert r.rcode == NOERROR and [s.rtype for s in r.answer] == [CNAME]


def test_load_balanced_name_other_types_are_nodata(zones):
    r = zones.resolve(w("app.example.net"), MX)
    assert r.rcode == NOERROR and r.answer == () and r.authority
    r = zones.resolve(w("app.example.net"), ANY)
    assert r.lb_step is not None and r.lb_step.rtype == A


def test_wildcard(zones):
    r = zones.resolve(w("anything.wild.example.net"), A)
    assert r.rcode == NOERROR and r.answer[0].owner == w("anything.wild.example.net")
    assert r.answer[0].rrset.rdata == ("192.0.2.77",)
    assert zones.resolve(w("anything.wild.example.net"), MX).answer == ()
    # The wildcard does not match below an existing name or the encloser itself.
    assert zones.resolve(w("wild.example.net"), A).answer == ()


def test_any_returns_one_rrset(zones):
    r = zones.resolve(w("example.net"), ANY)
    assert len(r.answer) == 1
    r = zones.resolve(w("mail.example.net"), ANY)
    assert [s.rtype for s in r.answer] == [A]


def test_case_insensitive_by_contract(zones):
    # Callers lower-case; the wire form of a mixed-case query name lowered matches.
    assert zones.resolve(b"\x04MAIL\x07example\x03net\x00".lower(), A).answer
