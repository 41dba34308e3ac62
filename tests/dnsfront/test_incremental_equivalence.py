"""An engine fed a random sequence of states incrementally answers exactly as
an engine built from scratch on the last one (hypothesis)."""

from __future__ import annotations

import random

import dns.message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as stb

from glb.state import DeploymentState, Override

from dnsfront.answers import Engine

SITES = ("dc1", "dc2", "dc3")
QUERIES = [dns.message.make_query(n, t, use_edns=e).to_wire()
           for n in ("app.example.net", "www.example.net", "fo.example.net", "near.example.net",
                     "stick.example.net", "sf.example.net", "multi.example.net")
           for t in ("A", "AAAA") for e in (None, 0)]

# Mostly healthy sites and no overrides: a name answers with its normal TTL
# only when every member is live, and that is the state a missed change shows in.
site_step = stb.one_of(
    stb.just(("keep",)),
    stb.just(("heartbeat",)),
    stb.just(("remove",)),
    stb.tuples(stb.just("publish"), stb.sampled_from([False, False, False, True]),
               stb.sampled_from([True, True, True, False]), stb.sampled_from([1.0, 1.0, 0.5, 0.0]),
               stb.sampled_from([0.0, 0.0, 1.5, 2.5, 4.0])),  # withdrawn, up, healthy fraction, age at publish
)
override_step = stb.sampled_from([None, None, None, None, "drain", 0, 50, 300])
step = stb.fixed_dictionaries({
    "dt": stb.sampled_from([0.0, 0.3, 1.0, 2.05, 3.5, 10.0]),
    "sites": stb.tuples(*(site_step for _ in SITES)),
    "overrides": stb.tuples(*(override_step for _ in SITES)),
    "server_override": stb.booleans(),
    "offset": stb.sampled_from([0.0, 0.0, 0.7]),
    "frozen": stb.sampled_from([None, None, None, 0.5]),
    "none": stb.integers(0, 15),  # 0: no state at all (before the first load)
    "build": stb.integers(0, 4),  # names rebuilt before the next state (None = all)
    "queries": stb.lists(stb.integers(0, len(QUERIES) - 1), max_size=4),
})


def plan_view(p):
    sel = p.selector
    return (p.kind, p.degraded, tuple((c.sites, c.addresses, c.ttl) for c in p.choices), type(sel).__name__,
            bytes(sel.slot_table(len(p.choices))) if p.choices else b"", getattr(sel, "weights", None),
            tuple(sorted(getattr(sel, "index_of", {}).items())), getattr(sel, "nets", None))


def view(engine):
    """What the engine answers with, minus counters and texts that carry an age."""
    engine.build_pending()
    plans = {(n, f): plan_view(engine.plan(n, f)) for n in engine.names for f in (4, 6)}
    tables = {}
    for tname, table in (("plain", engine.plain), ("edns", engine.edns)):
        for key, e in table.items():
            tables[(tname, key)] = (e.parts, e.rcodes, e.sites, e.label, e.slots is None, e.choose is None)
    return plans, tables


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=stb.lists(step, min_size=1, max_size=12))
def test_incremental_rebuilds_answer_like_a_full_rebuild(config, st, steps):
    inc = Engine(config, rng=random.Random(1))
    now = st.NOW
    snaps = {}
    version = 0
    for s in steps:
        now += s["dt"]
        for site, change in zip(SITES, s["sites"]):
            held = snaps.get(site)
            version += 1
            if change[0] == "remove":
                snaps.pop(site, None)
            elif change[0] == "heartbeat" and held is not None:
                snaps[site] = st.snapshot(site, at=now, hf=held.services[0].healthy_fraction,
                                          up=held.services[0].up, withdrawn=held.withdrawn, version=version)
            elif change[0] == "publish":
                _, withdrawn, up, hf, age = change
                snaps[site] = st.snapshot(site, at=now - age, hf=hf, up=up, withdrawn=withdrawn, version=version)
        overrides = {}
        for site, ov in zip(SITES, s["overrides"]):
            if ov is not None:
                o = Override(f"site:{site}", drain=True, who="t") if ov == "drain" else Override(
                    f"site:{site}", weight=ov, who="t")
                overrides[o.target] = o
        if s["server_override"]:
            o = Override("server:dc1/web/10.1.0.1:0", drain=True, who="t")
            overrides[o.target] = o
        frozen = None if s["frozen"] is None else now - s["frozen"]
        state = None if s["none"] == 0 else DeploymentState(
            dict(snaps), overrides, version, s["offset"], frozen)

        inc.apply(state, now)
        for q in s["queries"]:  # a query of an out-of-date name builds it on the spot
            inc.handle(QUERIES[q], ("198.51.100.7", 5300))
        inc.build_pending(s["build"] if s["build"] < 4 else None)

        full = Engine(config, rng=random.Random(1))
        full.update(state, now)
        assert view(inc) == view(full)
