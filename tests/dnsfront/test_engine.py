"""The engine on bytes: fast path == slow path, patching, truncation, ECS, caching."""

from __future__ import annotations

import random

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from dnsfront.answers import Engine

ADDR = ("127.0.0.1", 40000)


@pytest.fixture
def engine(config, st):
    e = Engine(config, rng=random.Random(3))
    e.update(st.all_up(), st.NOW)
    return e


def ask(engine, q, addr=ADDR, tcp=False):
    out = engine.handle(q.to_wire() if hasattr(q, "to_wire") else q, addr, tcp)
    return None if out is None else dns.message.from_wire(out)


STATIC = [
    ("mail.example.net", "A"), ("example.net", "NS"), ("example.net", "SOA"), ("nope.example.net", "A"),
    ("mail.example.net", "TXT"), ("www.example.net", "CNAME"), ("_http._tcp.app.example.net", "SRV"),
    ("example.net", "CAA"), ("example.net", "MX"), ("fo.example.net", "A"),
]


@pytest.mark.parametrize("name,rtype", STATIC)
@pytest.mark.parametrize("edns", [None, 0])
@pytest.mark.parametrize("flags", [0, dns.flags.RD, dns.flags.CD, dns.flags.RD | dns.flags.CD])
def test_fast_path_matches_slow_path(engine, name, rtype, edns, flags):
    qname = name.upper() if flags & dns.flags.RD else name
    q = dns.message.make_query(qname, rtype, use_edns=edns)
    q.flags = flags
    wire_q = q.to_wire()
    engine.handle(wire_q, ADDR)  # the first miss may add a dynamic entry
    fast = engine.handle(wire_q, ADDR)
    slow = engine.answer_slow(wire_q, ADDR, False)
    r = dns.message.from_wire(fast)
    if qname == name:
        assert fast == slow
    else:
        # Names compressed against the question take the client's case in the
        # fast path; equal as DNS names (case-insensitive), not as bytes.
        assert r == dns.message.from_wire(slow)
        assert r.question[0].name.to_text() == qname + "."
    assert r.id == q.id and r.flags & dns.flags.RD == flags & dns.flags.RD
    assert r.flags & dns.flags.CD == flags & dns.flags.CD


def test_hot_names_take_the_fast_path(engine):
    before = engine.counters()["fast"]
    for name in ("app.example.net", "www.example.net", "near.example.net", "mail.example.net"):
        for edns in (None, 0):
            ask(engine, dns.message.make_query(name, "A", use_edns=edns))
    assert engine.counters()["fast"] - before == 8
    assert engine.slow == 0


def test_do_bit_copied(engine):
    r = ask(engine, dns.message.make_query("mail.example.net", "A", want_dnssec=True))
    assert r.ednsflags & dns.flags.DO
    r = ask(engine, dns.message.make_query("mail.example.net", "A", use_edns=0))
    assert not r.ednsflags & dns.flags.DO


def test_question_case_echoed_in_question_and_owner(engine):
    r = ask(engine, dns.message.make_query("ApP.ExAmPlE.nEt", "A"))
    assert r.question[0].name.to_text() == "ApP.ExAmPlE.nEt."
    assert r.answer[0].name.to_text() == "ApP.ExAmPlE.nEt."


def test_truncation_without_and_with_edns(engine):
    r = ask(engine, dns.message.make_query("big.example.net", "A"))
    assert r.flags & dns.flags.TC and not r.answer and r.edns < 0
    r = ask(engine, dns.message.make_query("big.example.net", "A", use_edns=0, payload=512))
    assert r.flags & dns.flags.TC and r.edns == 0  # OPT kept in a truncated reply
    r = ask(engine, dns.message.make_query("big.example.net", "A", use_edns=0, payload=4096))
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == 40
    # Our own limit (udp_payload 1232) caps a bigger client size.
    assert len(engine.handle(dns.message.make_query("big.example.net", "A", use_edns=0, payload=65000).to_wire(), ADDR)) <= 1232
    r = ask(engine, dns.message.make_query("big.example.net", "A"), tcp=True)
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == 40


def ecs_query(name, subnet, bits, scope=0):
    opt = dns.edns.ECSOption(subnet, bits, scope)
    return dns.message.make_query(name, "A", use_edns=0, options=[opt])


def test_ecs_topology_on_the_fast_path(engine):
    for _ in range(2):
        r = ask(engine, ecs_query("near.example.net", "203.0.113.0", 24))
        assert r.answer[0][0].address == "192.0.2.20"
        ecs = [o for o in r.options if o.otype == dns.edns.ECS][0]
        assert (ecs.address, ecs.srclen, ecs.scopelen) == ("203.0.113.0", 24, 24)
    assert engine.slow == 0
    # A non-topology name echoes ECS with scope 0 (the answer does not depend on it).
    r = ask(engine, ecs_query("app.example.net", "203.0.113.0", 24))
    assert [o.scopelen for o in r.options if o.otype == dns.edns.ECS] == [0]
    # Without ECS the resolver's own address decides.
    r = ask(engine, dns.message.make_query("near.example.net", "A"), addr=("10.9.3.3", 53))
    assert r.answer[0][0].address == "192.0.2.30"


def test_ecs_scope_zero_when_only_one_answer_is_possible(engine):
    # near.example.net is topology, but only dc1 has an IPv6 VIP: the AAAA
    # answer is the same for every client, on the fast and the slow path.
    q = dns.message.make_query("near.example.net", "AAAA", use_edns=0,
                               options=[dns.edns.ECSOption("198.51.100.0", 24)]).to_wire()
    for out in (engine.answer_slow(q, ADDR, False), engine.handle(q, ADDR)):
        r = dns.message.from_wire(out)
        assert r.answer[0][0].address == "2001:db8:10::10"
        assert [(o.srclen, o.scopelen) for o in r.options if o.otype == dns.edns.ECS] == [(24, 0)]


def test_malformed_ecs_is_formerr(engine):
    q = dns.message.make_query("near.example.net", "A", use_edns=0,
                               options=[dns.edns.GenericOption(8, b"\x00\x01\x18\x00\xc6\x33")])
    r = ask(engine, q)
    assert r.rcode() == dns.rcode.FORMERR
    assert engine.malformed == 1


def test_unknown_options_ignored_on_fast_path(engine):
    q = dns.message.make_query("app.example.net", "A", use_edns=0,
                               options=[dns.edns.GenericOption(10, b"12345678"), dns.edns.GenericOption(65001, b"")])
    r = ask(engine, q)
    assert r.rcode() == dns.rcode.NOERROR and r.answer and not r.options
    assert engine.slow == 0


def test_weighted_distribution_on_fast_path(engine):
    from collections import Counter

    c = Counter()
    q = dns.message.make_query("app.example.net", "A").to_wire()
    for _ in range(8000):
        c[dns.message.from_wire(engine.handle(q, ADDR)).answer[0][0].address] += 1
    assert c["192.0.2.10"] / 8000 == pytest.approx(0.75, abs=0.03)
    sites = engine.counters()["site_answers"]
    assert sites[("app.example.net.", "dc1")] == c["192.0.2.10"]


def test_state_update_changes_fast_answers(engine, st):
    q = dns.message.make_query("fo.example.net", "A")
    assert ask(engine, q).answer[0][0].address == "192.0.2.10"
    engine.update(st.state(st.snapshot("dc2")), st.NOW)
    r = ask(engine, q)
    assert r.answer[0][0].address == "192.0.2.20" and r.answer[0].ttl == 10
    engine.update(st.state(), st.NOW)
    assert ask(engine, q).answer[0][0].address == "192.0.2.99"
    # Staleness is time: the same state later is all-down.
    engine.update(st.state(st.snapshot("dc1"), st.snapshot("dc2")), st.NOW + 10)
    assert ask(engine, q).answer[0][0].address == "192.0.2.99"


def test_servfail_policy(engine, st):
    engine.update(st.state(st.snapshot("dc1")), st.NOW)
    r = ask(engine, dns.message.make_query("sf.example.net", "A"))
    assert r.rcode() == dns.rcode.SERVFAIL and not r.flags & dns.flags.AA


def test_negative_answers_are_cached_into_the_table(engine):
    q = dns.message.make_query("random-label.example.net", "A").to_wire()
    engine.handle(q, ADDR)
    slow = engine.slow
    engine.handle(q, ADDR)
    assert engine.slow == slow


def test_internal_error_is_servfail_not_a_crash(engine, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("bug")

    monkeypatch.setattr(engine.zones, "resolve", boom)
    r = ask(engine, dns.message.make_query("nothing-cached.example.net", "TXT"))
    assert r.rcode() == dns.rcode.SERVFAIL and engine.internal_errors == 1


def test_counters_survive_state_updates(engine, st):
    static = dns.message.make_query("mail.example.net", "A").to_wire()
    lb = dns.message.make_query("fo.example.net", "A").to_wire()
    for i in range(3):
        for _ in range(5):
            engine.handle(static, ADDR)
            engine.handle(lb, ADDR)
        engine.update(st.all_up(at=st.NOW + i), st.NOW + i)
    c = engine.counters()
    assert c["responses"][(1, 0)] == 30
    assert c["site_answers"][("fo.example.net.", "dc1")] == 15
    assert c["fast"] == 30


def test_answers_are_counted_under_the_load_balanced_name_on_both_paths(engine, st):
    # www is a CNAME to app: the fast and the slow path count app's answers.
    q = dns.message.make_query("www.example.net", "A").to_wire()
    engine.handle(q, ADDR)
    engine.answer_slow(q, ADDR, False)
    c = engine.counters()
    assert c["fast"] == 1
    assert {name for name, _ in c["site_answers"]} == {"app.example.net."}
    assert sum(c["site_answers"].values()) == 2
    # Every member down: the sorry address is counted as "fallback" on both paths.
    engine.update(st.state(), st.NOW)
    q = dns.message.make_query("fo.example.net", "A").to_wire()
    engine.handle(q, ADDR)
    engine.answer_slow(q, ADDR, False)
    assert engine.counters()["site_answers"][("fo.example.net.", "fallback")] == 2


def test_badvers_is_counted_as_badvers_not_noerror(engine):
    # BADVERS (16) is header RCODE 0 plus extended RCODE 1 in the OPT.
    r = ask(engine, dns.message.make_query("mail.example.net", "A", use_edns=1))
    assert r.rcode() == dns.rcode.BADVERS
    responses = engine.counters()["responses"]
    assert responses[(1, 16)] == 1 and responses[(1, 0)] == 0
