"""Response rate limiting: the pure core driven with explicit time."""

from __future__ import annotations

import ipaddress

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from dnsfront import cookies
from dnsfront.rrl import RateLimiter
from glb.config import RRLConfig

VICTIM = ("192.0.2.10", 53000)
NEIGHBOUR = ("192.0.2.200", 53001)  # same /24
OTHER = ("192.0.3.10", 53002)


def pair(name: str = "app.example.net", rcode: int = dns.rcode.NOERROR, rtype: str = "A",
         options=None) -> tuple[bytes, bytes]:
    q = dns.message.make_query(name, rtype, use_edns=0 if options else None, options=options or [])
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    if rcode == dns.rcode.NOERROR:
        r.answer.append(dns.rrset.from_text(name + ".", 20, "IN", "A", *[f"192.0.2.{i}" for i in range(1, 30)]))
    return q.to_wire(), r.to_wire()


def limiter(**kw) -> RateLimiter:
    return RateLimiter(RRLConfig(enabled=True, **{"responses_per_second": 5, "nxdomains_per_second": 5,
                                                  "errors_per_second": 5, "slip": 0, **kw}))


def check(lim, q, r, addr, now=100.0):
    lim.tick(now)
    return lim.check(q, r, addr, None)


def run(lim, n, q_r=None, addr=VICTIM, now=100.0):
    q, r = q_r or pair()
    return [check(lim, q, r, addr, now) for _ in range(n)]


def test_within_rate_everything_passes_then_excess_is_dropped():
    lim = limiter()
    q, r = pair()
    out = run(lim, 8, (q, r))
    assert out[:5] == [r] * 5  # one second's burst
    assert out[5:] == [None] * 3
    assert lim.counters.limited == 3 and lim.counters.slipped == 0


def test_each_second_brings_the_rate_again():
    lim = limiter()
    run(lim, 5, now=100.0)
    assert run(lim, 1, now=100.9) == [None]  # same second: over (and it counts: debt 1)
    assert [o is not None for o in run(lim, 5, now=101.0)] == [True] * 4 + [False]  # 5 new, less the debt


def test_window_bounds_the_debt():
    lim = limiter(window=2)
    run(lim, 10_000, now=100.0)  # a long flood: the debt is capped at window x rate = 10
    assert run(lim, 1, now=101.0)[0] is None  # 10 - 5 paid + 1 > 5
    assert run(lim, 1, now=102.0)[0] is not None  # quiet (nearly) for the window: served again


def test_slip_answers_every_nth_limited_response_truncated():
    lim = limiter(slip=2)
    q, r = pair()
    out = run(lim, 5 + 10, (q, r))[5:]
    slipped = [o for o in out if o is not None]
    assert len(slipped) == 5 and out[0] is None and out[1] is not None
    m = dns.message.from_wire(slipped[0])
    assert m.flags & dns.flags.TC and not m.answer and m.id == dns.message.from_wire(q).id
    assert len(slipped[0]) <= len(q)  # never bigger than what asked: no amplification
    assert lim.counters.limited == 10 and lim.counters.slipped == 5


def test_slip_one_answers_every_limited_response_truncated():
    lim = limiter(slip=1)
    assert all(o is not None and o[2] & 0x02 for o in run(lim, 10)[5:])


def test_kinds_have_separate_buckets():
    lim = limiter(nxdomains_per_second=2, errors_per_second=3)
    run(lim, 5)  # name A exhausted
    assert run(lim, 1)[0] is None
    assert run(lim, 1, pair(rtype="AAAA"))[0] is not None  # another type: its own bucket
    assert run(lim, 1, pair(name="mail.example.net"))[0] is not None
    nx = [check(lim, *pair(f"n{i}.example.net", dns.rcode.NXDOMAIN), VICTIM) for i in range(3)]
    assert [o is not None for o in nx] == [True, True, False]  # every NXDOMAIN name together, 2/s
    err = [check(lim, *pair(f"e{i}.example.net", dns.rcode.REFUSED), VICTIM) for i in range(4)]
    assert [o is not None for o in err] == [True, True, True, False]


def test_question_case_is_folded():
    lim = limiter()
    run(lim, 5)
    assert run(lim, 1, pair("ApP.eXaMpLe.NeT"))[0] is None  # 0x20 randomisation does not escape


def test_network_prefix_groups_clients():
    lim = limiter()
    run(lim, 5, addr=VICTIM)
    assert run(lim, 1, addr=NEIGHBOUR)[0] is None  # same /24
    assert run(lim, 1, addr=OTHER)[0] is not None
    wide = limiter(ipv4_prefix_length=32)
    run(wide, 5, addr=VICTIM)
    assert run(wide, 1, addr=NEIGHBOUR)[0] is not None


def test_ipv6_prefix():
    lim = limiter()
    run(lim, 5, addr=("2001:db8:1:100::1", 1))
    assert run(lim, 1, addr=("2001:db8:1:1ff::9", 1))[0] is None  # same /56
    assert run(lim, 1, addr=("2001:db8:1:200::1", 1))[0] is not None


def test_allow_list_is_never_limited():
    lim = limiter(allow=(ipaddress.ip_network("192.0.2.0/25"),))
    assert None not in run(lim, 100, addr=VICTIM)
    assert None in run(lim, 100, addr=NEIGHBOUR)  # .200 is outside the /25


def test_table_is_bounded_and_keeps_hot_buckets():
    lim = limiter(table_size=100)
    q, r = pair()
    run(lim, 5, (q, r))
    for i in range(1000):  # a flood from many networks
        check(lim, q, r, (f"10.{i // 256}.{i % 256}.1", 1))
        assert check(lim, q, r, VICTIM) is None  # still limited: its bucket stays
    assert len(lim) <= 100


def test_idle_bucket_forgotten_loses_nothing():
    lim = limiter(table_size=4)
    q, r = pair()
    run(lim, 5, (q, r))
    for i in range(10):
        check(lim, q, r, (f"10.0.{i}.1", 1))
    # Evicted, and 15 s (the window) later it would have had full credit anyway.
    assert run(lim, 5, (q, r), now=115.0) == [r] * 5


def test_valid_server_cookie_is_exempt_and_client_cookie_gets_badcookie_on_slip():
    jar = cookies.CookieJar(b"c" * 16, 3600)
    now_wall = 1_700_000_000.0
    client = b"\x11" * 8
    ip = ipaddress.ip_address(VICTIM[0]).packed
    good = client + jar.make(client, ip, now_wall)
    lim = RateLimiter(RRLConfig(enabled=True, responses_per_second=5, slip=1),
                      cookie_valid=lambda q, a: cookies.presents_valid(jar, q, a, now_wall),
                      badcookie=lambda resp: cookies.badcookie(resp, 1232))

    def with_cookie(value):
        q, r = pair(options=[dns.edns.GenericOption(10, value)])
        # Our responses end with the COOKIE option carrying a fresh server cookie.
        return q, r[:-2] + b"\x00\x1c" + b"\x00\x0a\x00\x18" + client + jar.make(client, ip, now_wall)

    run(lim, 5, with_cookie(good))
    assert None not in run(lim, 20, with_cookie(good))
    assert lim.counters.exempt_cookie == 20 and lim.counters.limited == 0
    out = run(lim, 3, with_cookie(client))  # client cookie only: not proven
    assert lim.counters.limited == 3
    m = dns.message.from_wire(out[0])
    assert m.rcode() == dns.rcode.BADCOOKIE
    assert next(o for o in m.options if o.otype == 10).to_wire()[:8] == client
    plain = run(lim, 1, pair())[0]  # same bucket, no cookie: TC
    assert dns.message.from_wire(plain).flags & dns.flags.TC


@pytest.mark.parametrize("slip", [0, 1, 2, 3])
def test_bytes_out_never_exceed_bytes_in_past_the_limit(slip):
    lim = limiter(slip=slip)
    q, r = pair()
    out = run(lim, 10_000, (q, r))
    sent = sum(len(o) for o in out[5:] if o is not None)
    assert sent <= len(q) * len(out[5:])


# ---------------------------------------------------------------------------
# In the engine: the fast path and the slow path count alike; TCP never


@pytest.fixture
def limited_engine(config, st):
    import random

    from dnsfront.answers import Engine

    e = Engine(config, rng=random.Random(3))
    e.update(st.all_up(), st.NOW)
    lim = limiter()
    lim.tick(100.0)
    e.limit = lim.check
    return e, lim


@pytest.mark.parametrize("name,edns", [("mail.example.net", None), ("app.example.net", 0), ("ApP.example.net", 0),
                                       ("nope.example.net", None)])
def test_engine_limits_udp_on_both_paths(limited_engine, name, edns):
    e, lim = limited_engine
    q = dns.message.make_query(name, "A", use_edns=edns).to_wire()
    out = [e.handle(q, VICTIM, False) for _ in range(8)]
    assert [o is not None for o in out] == [True] * 5 + [False] * 3
    if name.startswith("nope"):
        assert e.slow == 1 and e.counters()["fast"] == 7  # first the slow path, then fast: one bucket
    assert all(e.handle(q, VICTIM, True) is not None for _ in range(20))  # TCP: never limited


def test_engine_nxdomain_names_share_a_bucket(limited_engine):
    e, lim = limited_engine
    out = [e.handle(dns.message.make_query(f"x{i}.example.net", "A").to_wire(), VICTIM, False) for i in range(8)]
    assert sum(o is not None for o in out) == 5
    assert dns.message.from_wire(out[0]).rcode() == dns.rcode.NXDOMAIN
