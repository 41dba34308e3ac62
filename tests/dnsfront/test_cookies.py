"""DNS cookies: RFC 9018 vectors, validity and rotation, and golden tests on
the engine with dnspython as the client (COOKIE as a generic EDNS option)."""

from __future__ import annotations

import ipaddress
import random

import dns.edns
import dns.message
import dns.rcode
import pytest
from siphashc import siphash

from dnsfront import cookies
from dnsfront.answers import Engine
from dnsfront.cookies import CookieJar, server_cookie

ADDR = ("198.51.100.100", 5353)
IP = ipaddress.ip_address(ADDR[0]).packed
CLIENT = bytes.fromhex("2464c4abcf10c957")
NOW = 1559731985.0


def test_siphash_reference_vector():
    # SipHash-2-4 paper, appendix A: key 00..0f, empty message.
    assert siphash(bytes(range(16)), b"") == 0x726FDB47DD0E0E31


@pytest.mark.parametrize("secret,client,ip,stamp,want", [
    # RFC 9018 appendix A.1 and A.2 (IPv4), A.4 (IPv6, before and after a secret rollover).
    ("e5e973e5a6b2a43f48e7dc849e37bfcf", "2464c4abcf10c957", "198.51.100.100", 1559731985,
     "010000005cf79f111f8130c3eee29480"),
    ("e5e973e5a6b2a43f48e7dc849e37bfcf", "2464c4abcf10c957", "198.51.100.100", 1559734385,
     "010000005cf7a871d4a564a1442aca77"),
    ("dd3bdf9344b678b185a6f5cb60fca715", "22681ab97d52c298", "2001:db8:220:1:59de:d0f4:8769:82b8", 1559741817,
     "010000005cf7c57926556bd0934c72f8"),
    ("445536bcd2513298075a5d379663c962", "22681ab97d52c298", "2001:db8:220:1:59de:d0f4:8769:82b8", 1559741961,
     "010000005cf7c609a6bb79d16625507a"),
])
def test_rfc9018_vectors(secret, client, ip, stamp, want):
    got = server_cookie(bytes.fromhex(secret), bytes.fromhex(client), ipaddress.ip_address(ip).packed, stamp)
    assert got.hex() == want


def jar(rotate: float = 3600.0) -> CookieJar:
    return CookieJar(b"m" * 16, rotate)


def test_made_cookie_is_valid_for_its_client_only():
    j = jar()
    value = CLIENT + j.make(CLIENT, IP, NOW)
    assert j.valid(value, IP, NOW)
    assert not j.valid(value, ipaddress.ip_address("198.51.100.101").packed, NOW)
    assert not j.valid(bytes(8) + value[8:], IP, NOW)  # another client cookie
    assert not CookieJar(b"n" * 16, 3600).valid(value, IP, NOW)  # another secret


def test_age_limits():
    j = jar(rotate=86400)
    value = CLIENT + j.make(CLIENT, IP, NOW)
    assert j.valid(value, IP, NOW + 3600)
    assert not j.valid(value, IP, NOW + 3601)  # older than an hour
    assert j.valid(value, IP, NOW - 300)  # 5 minutes of clock skew
    assert not j.valid(value, IP, NOW - 301)


def test_rotation_keeps_the_previous_secret():
    j = jar(rotate=600)
    start = 600 * 1000.0
    value = CLIENT + j.make(CLIENT, IP, start)
    assert j.valid(value, IP, start + 599)  # same period
    assert j.valid(value, IP, start + 1199)  # next period: previous secret still accepted
    assert not j.valid(value, IP, start + 1200 + 1)  # two periods on: gone (and the key changed)
    assert j.make(CLIENT, IP, start)[8:] != j.make(CLIENT, IP, start + 600)[8:]  # the key did rotate


def test_two_jars_with_one_master_agree():
    # What the workers do: same master, same derived keys, no messages between them.
    a, b = CookieJar(b"k" * 16, 3600), CookieJar(b"k" * 16, 3600)
    assert b.valid(CLIENT + a.make(CLIENT, IP, NOW), IP, NOW + 10)


def test_reply_reuses_young_cookie_and_renews_old_one():
    j = jar(rotate=86400)
    value = CLIENT + j.make(CLIENT, IP, NOW)
    assert j.reply(value, ADDR, NOW + 60)[4:] == value
    renewed = j.reply(value, ADDR, NOW + 1801)[4:]
    assert renewed != value and renewed[:8] == CLIENT and j.valid(renewed, IP, NOW + 1801)


@pytest.mark.parametrize("n,ok", [(0, False), (7, False), (8, True), (9, False), (15, False), (16, True),
                                  (40, True), (41, False)])
def test_well_formed_lengths(n, ok):
    assert cookies.well_formed(bytes(n)) is ok


# ---------------------------------------------------------------------------
# The engine, with dnspython as the client


@pytest.fixture
def engine(config, st):
    e = Engine(config, rng=random.Random(3), cookies=CookieJar(b"s" * 16, 3600), clock=lambda: NOW)
    e.update(st.all_up(), st.NOW)
    return e


def ask(engine, name, data: bytes | None, *, rtype="A", ecs=None, addr=ADDR):
    options = [] if data is None else [dns.edns.GenericOption(10, data)]
    if ecs is not None:
        options.append(dns.edns.ECSOption(ecs, 24))
    q = dns.message.make_query(name, rtype, use_edns=0, options=options)
    wire = q.to_wire()
    return dns.message.from_wire(engine.handle(wire, addr, False)), wire


def cookie_of(r) -> bytes | None:
    return next((o.to_wire() for o in r.options if o.otype == 10), None)


@pytest.mark.parametrize("name", ["app.example.net", "mail.example.net", "nope.example.net", "near.example.net"])
def test_client_cookie_gets_server_cookie_on_both_paths(engine, name):
    for _ in range(2):  # first may be slow path, second fast path
        r, wire = ask(engine, name, CLIENT)
        got = cookie_of(r)
        assert got is not None and got[:8] == CLIENT and len(got) == 24
        assert engine.cookies.valid(got, IP, NOW)
        assert r.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
    slow = dns.message.from_wire(engine.answer_slow(wire, ADDR, False))
    assert cookie_of(slow) == got
    assert engine.counters()["fast"] > 0


def test_cookie_with_ecs(engine):
    r, _ = ask(engine, "near.example.net", CLIENT, ecs="198.51.100.0")
    assert cookie_of(r)[:8] == CLIENT
    assert next(o for o in r.options if o.otype == 8).scopelen == 24


def test_valid_server_cookie_comes_back_unchanged(engine):
    r, _ = ask(engine, "app.example.net", CLIENT)
    full = cookie_of(r)
    r2, _ = ask(engine, "app.example.net", full)
    assert cookie_of(r2) == full


def test_invalid_server_cookie_is_answered_with_a_new_one(engine):
    forged = CLIENT + b"\x01\x00\x00\x00" + bytes(12)
    r, _ = ask(engine, "app.example.net", forged)
    assert r.rcode() == dns.rcode.NOERROR and r.answer
    got = cookie_of(r)
    assert got != forged and engine.cookies.valid(got, IP, NOW)


@pytest.mark.parametrize("n", [0, 7, 9, 15, 41])
def test_malformed_cookie_is_formerr(engine, n):
    for _ in range(2):
        r, _ = ask(engine, "app.example.net", bytes(n))
        assert r.rcode() == dns.rcode.FORMERR
        assert cookie_of(r) is None


def test_two_cookie_options_are_formerr(engine):
    q = dns.message.make_query("app.example.net", "A", use_edns=0,
                               options=[dns.edns.GenericOption(10, CLIENT), dns.edns.GenericOption(10, CLIENT)])
    assert dns.message.from_wire(engine.handle(q.to_wire(), ADDR, False)).rcode() == dns.rcode.FORMERR


def test_cookies_off_ignores_the_option(config, st):
    e = Engine(config, rng=random.Random(3))
    e.update(st.all_up(), st.NOW)
    r, _ = ask(e, "app.example.net", bytes(5))  # even a malformed one
    assert r.rcode() == dns.rcode.NOERROR and cookie_of(r) is None


def test_badcookie_answer_carries_the_new_cookie(engine):
    _, wire = ask(engine, "app.example.net", CLIENT)
    resp = engine.handle(wire, ADDR, False)
    r = dns.message.from_wire(cookies.badcookie(resp, 1232))
    assert r.rcode() == dns.rcode.BADCOOKIE
    assert not r.answer and r.question[0].name.to_text() == "app.example.net."
    assert cookie_of(r) == resp[-24:]
