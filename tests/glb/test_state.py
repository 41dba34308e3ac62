"""Pure unit tests of the state contract: no Redis, no sleeping, time passed in."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from glb.errors import StateError
from glb.state import (
    SCHEMA,
    Change,
    DeploymentState,
    Keys,
    Override,
    RealServerState,
    ServiceState,
    SiteSnapshot,
    Target,
    answer_digest,
    decode_override,
    decode_snapshot,
    encode_override,
    encode_snapshot,
    merge_override,
    format_vip,
    parse_change,
    parse_target,
    parse_vip,
    server_target,
    site_target,
)


def make_snapshot(site: str = "ams", version: int = 0, published_at: float = 0.0, **kw) -> SiteSnapshot:
    rs = (
        RealServerState("10.0.0.1", 80, "up", 100, active_conns=3, inactive_conns=1,
                        last_check=1700000000.5, last_result="ok",
                        new_conns_per_s=12.5, packets_per_s=1000.0, bytes_per_s=1.5e6),
        RealServerState("2001:db8::2", 80, "draining", 50),
    )
    svc = ServiceState(
        "web", ("192.0.2.10:80/tcp", "[2001:db8::10]:80/tcp"), 0.75, True, rs,
        active_conns=3, new_conns_per_s=12.5, packets_per_s=1000.0, bytes_per_s=1.5e6,
    )
    return SiteSnapshot(site, "dir-1", 1700000001.25, (svc,), version=version, published_at=published_at, **kw)


def doc(**changes) -> str:
    """A valid snapshot document with top-level or nested edits applied."""
    d = json.loads(encode_snapshot(make_snapshot(version=3, published_at=100.0)))
    for path, value in changes.items():
        target = d
        keys = path.split("__")
        for k in keys[:-1]:
            target = target[int(k)] if k.isdigit() else target[k]
        if value is DELETE:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    return json.dumps(d)


DELETE = object()


# -- encoding


def test_snapshot_round_trip() -> None:
    s = make_snapshot(version=7, published_at=1700000002.123456)
    assert decode_snapshot(encode_snapshot(s)) == s
    assert decode_snapshot(encode_snapshot(s).encode()) == s


def test_unstamped_encoding_leaves_out_version() -> None:
    s = make_snapshot(version=7, published_at=5.0)
    d = json.loads(encode_snapshot(s, stamp=False))
    assert "version" not in d and "published_at" not in d and d["schema"] == SCHEMA
    assert decode_snapshot(encode_snapshot(s, stamp=False)) == replace(s, version=0, published_at=0.0)


def test_override_round_trip() -> None:
    o = Override(server_target("ams", "web", "10.0.0.1", 80), weight=0, who="alice", when=5.5, why="disk")
    assert decode_override(encode_override(o)) == o


SERVER = server_target("ams", "web", "10.0.0.1", 80)


def test_merge_drain_keeps_the_held_weight_and_takes_the_new_who() -> None:
    held = Override(SERVER, weight=5, who="alice", when=5.5, why="disk")
    assert merge_override(held, SERVER, drain=True, who="bob", why="reboot") == Override(
        SERVER, drain=True, weight=5, who="bob", why="reboot"
    )


def test_merge_weight_keeps_the_held_drain() -> None:
    held = Override(SERVER, drain=True, who="alice")
    assert merge_override(held, SERVER, weight=0, who="bob", why="") == Override(SERVER, drain=True, weight=0, who="bob")


def test_merge_with_nothing_held_sets_only_what_was_asked() -> None:
    assert merge_override(None, SERVER, drain=True, who="bob", why="") == Override(SERVER, drain=True, who="bob")
    assert merge_override(None, SERVER, weight=7, who="bob", why="") == Override(SERVER, weight=7, who="bob")


@pytest.mark.parametrize(
    "held, change",
    [
        (None, {"drain": False}),  # undrain what was never drained
        (None, {"weight": None}),  # remove a weight that was never set
        (Override(SERVER, drain=True), {"drain": False}),  # undrain, no weight held
        (Override(SERVER, weight=3), {"weight": None}),  # remove the weight, not drained
    ],
)
def test_merge_that_leaves_nothing_means_clear(held, change) -> None:
    assert merge_override(held, SERVER, **change, who="bob", why="") is None


def test_merge_undrain_keeps_a_weight_and_removing_the_weight_keeps_a_drain() -> None:
    both = Override(SERVER, drain=True, weight=3, who="alice")
    assert merge_override(both, SERVER, drain=False, who="bob", why="") == Override(SERVER, weight=3, who="bob")
    assert merge_override(both, SERVER, weight=None, who="bob", why="") == Override(SERVER, drain=True, who="bob")


def test_merge_site_drain_keeps_a_site_weight() -> None:
    site = site_target("ams")
    held = Override(site, weight=2, who="alice")
    assert merge_override(held, site, drain=True, who="bob", why="") == Override(site, drain=True, weight=2, who="bob")


def test_unknown_fields_are_ignored() -> None:
    d = json.loads(doc())
    d["future_field"] = {"x": 1}
    d["services"][0]["future"] = 1
    d["services"][0]["real_servers"][0]["future"] = [1]
    assert decode_snapshot(json.dumps(d)) == make_snapshot(version=3, published_at=100.0)


def test_integers_accepted_where_floats_expected() -> None:
    s = decode_snapshot(doc(heartbeat=17, services__0__healthy_fraction=1))
    assert s.heartbeat == 17.0 and isinstance(s.heartbeat, float)
    assert isinstance(s.services[0].healthy_fraction, float)


MALFORMED = [
    ("not json", "{nope", "not valid JSON"),
    ("not utf-8", b"\xff\xfe", "not UTF-8"),
    ("not an object", "[1, 2]", "expected a JSON object"),
    ("NaN literal", doc().replace('"heartbeat": 1700000001.25', '"heartbeat":NaN'), "not valid JSON"),
    ("deep nesting", "[" * 100000 + "]" * 100000, "not valid JSON"),
    ("no schema", doc(schema=DELETE), "unsupported schema"),
    ("newer schema", doc(schema=2), "unsupported schema"),
    ("schema true", doc(schema=True), "unsupported schema"),
    ("missing site", doc(site=DELETE), "missing field 'site'"),
    ("missing services", doc(services=DELETE), "missing field 'services'"),
    ("site not a string", doc(site=5), "site"),
    ("site with space", doc(site="a b"), "site"),
    ("site with slash", doc(site="a/b"), "site"),
    ("empty director", doc(director_id=""), "director_id"),
    ("heartbeat string", doc(heartbeat="now"), "heartbeat"),
    ("withdrawn int", doc(withdrawn=1), "withdrawn"),
    ("services not list", doc(services={}), "services"),
    ("service not object", doc(services=[1]), "services[0]"),
    ("duplicate service", doc(services=json.loads(doc())["services"] * 2), "duplicate service"),
    ("vips not list", doc(services__0__vips="1.2.3.4:80/tcp"), "vips"),
    ("bad vip proto", doc(services__0__vips=["192.0.2.1:80/icmp"]), "vips[0]"),
    ("bad vip port", doc(services__0__vips=["192.0.2.1:99999/tcp"]), "vips[0]"),
    ("unbracketed v6 vip", doc(services__0__vips=["2001:db8::1:80/tcp"]), "vips[0]"),
    ("vip hostname", doc(services__0__vips=["www.example.com:80/tcp"]), "vips[0]"),
    ("fraction > 1", doc(services__0__healthy_fraction=1.5), "healthy_fraction"),
    ("fraction < 0", doc(services__0__healthy_fraction=-0.1), "healthy_fraction"),
    ("up not bool", doc(services__0__up="yes"), "up"),
    ("negative rate", doc(services__0__bytes_per_s=-1), "bytes_per_s"),
    ("huge float", doc().replace('"heartbeat": 1700000001.25', '"heartbeat":1e999'), "heartbeat"),
    ("rs missing state", doc(services__0__real_servers__0__state=DELETE), "missing field 'state'"),
    ("rs bad state", doc(services__0__real_servers__0__state="sleepy"), "state"),
    ("rs bad address", doc(services__0__real_servers__0__address="db1"), "address"),
    ("rs port range", doc(services__0__real_servers__0__port=70000), "port"),
    ("rs port bool", doc(services__0__real_servers__0__port=True), "port"),
    ("rs weight negative", doc(services__0__real_servers__0__weight=-1), "weight"),
    ("rs weight float", doc(services__0__real_servers__0__weight=1.5), "weight"),
    ("rs conns negative", doc(services__0__real_servers__0__active_conns=-3), "active_conns"),
    ("rs negative rate", doc(services__0__real_servers__0__packets_per_s=-1), "packets_per_s"),
    ("rs rate string", doc(services__0__real_servers__0__new_conns_per_s="fast"), "new_conns_per_s"),
    ("rs last_result int", doc(services__0__real_servers__0__last_result=3), "last_result"),
    ("rs duplicate", doc(services__0__real_servers__1__address="10.0.0.1"), "duplicate"),
    ("version negative", doc(version=-1), "version"),
]


@pytest.mark.parametrize("text,needle", [(t, n) for _, t, n in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_snapshot_raises_state_error(text: str | bytes, needle: str) -> None:
    with pytest.raises(StateError) as info:
        decode_snapshot(text)
    message = str(info.value)
    assert "\n" not in message and needle in message
    assert message.startswith("snapshot")


def test_real_server_rates_are_published_and_optional() -> None:
    # Issue 5 C: each real server's new connections/s, packets/s and bytes/s
    # are part of the snapshot, not only the service's sums.
    d = json.loads(doc())
    rs = d["services"][0]["real_servers"][0]
    assert (rs["new_conns_per_s"], rs["packets_per_s"], rs["bytes_per_s"]) == (12.5, 1000.0, 1.5e6)
    # A document without them (an older director) still decodes: they read 0.
    old = doc(services__0__real_servers__0__new_conns_per_s=DELETE, services__0__real_servers__0__packets_per_s=DELETE,
              services__0__real_servers__0__bytes_per_s=DELETE)
    got = decode_snapshot(old).services[0].real_servers[0]
    assert (got.new_conns_per_s, got.packets_per_s, got.bytes_per_s) == (0.0, 0.0, 0.0)


def test_error_names_the_path() -> None:
    with pytest.raises(StateError, match=r"services\[0\]\.real_servers\[0\]\.port"):
        decode_snapshot(doc(services__0__real_servers__0__port="80"))


MALFORMED_OVERRIDES = [
    ("bad target", {"schema": 1, "target": "rack:1", "drain": True}, "target"),
    ("missing target", {"schema": 1, "drain": True}, "missing field 'target'"),
    ("no effect", {"schema": 1, "target": "site:ams"}, "neither drain nor weight"),
    ("weight too big", {"schema": 1, "target": "site:ams", "weight": 70000}, "weight"),
    ("drain string", {"schema": 1, "target": "site:ams", "drain": "yes"}, "drain"),
    ("who not string", {"schema": 1, "target": "site:ams", "drain": True, "who": 1}, "who"),
    ("schema 0", {"schema": 0, "target": "site:ams", "drain": True}, "schema"),
]


@pytest.mark.parametrize("d,needle", [(d, n) for _, d, n in MALFORMED_OVERRIDES], ids=[m[0] for m in MALFORMED_OVERRIDES])
def test_malformed_override_raises_state_error(d: dict, needle: str) -> None:
    with pytest.raises(StateError, match=needle):
        decode_override(json.dumps(d))


def test_constructors_validate_too() -> None:
    with pytest.raises(StateError):
        RealServerState("10.0.0.1", 80, "up", -5)
    with pytest.raises(StateError):
        ServiceState("web", ["192.0.2.1:80/tcp"], 1.0, True)  # type: ignore[arg-type]
    with pytest.raises(StateError):
        SiteSnapshot("ams", "d", float("nan"), ())


# -- VIPs, targets, keys, change messages


def test_vip_format() -> None:
    assert format_vip("192.0.2.1", 53, "udp") == "192.0.2.1:53/udp"
    assert format_vip("2001:db8::1", 443, "tcp") == "[2001:db8::1]:443/tcp"
    assert parse_vip("[2001:db8::1]:443/tcp") == ("2001:db8::1", 443, "tcp")
    with pytest.raises(StateError):
        parse_vip("[192.0.2.1]:80/tcp")


def test_target_parsing() -> None:
    assert site_target("ams") == "site:ams"
    assert parse_target("site:ams") == Target("site", "ams")
    t = server_target("ams", "web", "10.0.0.1", 8080)
    assert t == "server:ams/web/10.0.0.1:8080"
    assert parse_target(t) == Target("server", "ams", "web", "10.0.0.1", 8080)
    v6 = server_target("ams", "web", "2001:0db8::0001", 80)
    assert v6 == "server:ams/web/[2001:db8::1]:80"
    assert parse_target("server:ams/web/[2001:0db8::1]:80") == Target("server", "ams", "web", "2001:db8::1", 80)
    # Overrides store the canonical spelling.
    assert Override("server:ams/web/[2001:0db8::1]:80", drain=True).target == v6


@pytest.mark.parametrize("bad", [
    "", "ams", "site:", "site:a b", "site:a/b", "rack:1", "server:ams/web", "server:ams/web/10.0.0.1",
    "server:ams/web/10.0.0.1:x", "server:ams/web/10.0.0.1:70000", "server:ams/web/2001:db8::1:80",
    "server:ams/web/db1:80", "server:/web/10.0.0.1:80", "server:ams/web/x/10.0.0.1:80", "SITE:ams",
])
def test_bad_targets_rejected(bad: str) -> None:
    with pytest.raises(StateError):
        parse_target(bad)


def test_keys() -> None:
    k = Keys()
    assert (k.sites, k.site("ams"), k.version, k.overrides, k.channel) == (
        "{glb}:sites", "{glb}:site:ams", "{glb}:version", "{glb}:overrides", "{glb}:changes")
    assert Keys("{t}").site("x") == "{t}:site:x"


def test_parse_change() -> None:
    assert parse_change("site ams 12") == Change("site", "ams", 12)
    assert parse_change(b"override server:ams/web/10.0.0.1:80 13") == Change(
        "override", "server:ams/web/10.0.0.1:80", 13)
    for bad in ["", "site ams", "site ams x", "site ams -1", "flood ams 1", "override rack:1 3",
                "site a b 3", "site  3"]:
        with pytest.raises(StateError):
            parse_change(bad)
    # The current site format: stamps and answer digest (see docs/state.md).
    assert parse_change("site ams 12 1700000000.000123 0123456789abcdef") == Change(
        "site", "ams", 12, 1700000000.000123, "0123456789abcdef")
    for bad in ["site ams 12 1700000000.5", "site ams 12 x 0123456789abcdef", "site ams 12 nan 0123456789abcdef",
                "site ams 12 -1 0123456789abcdef", "site ams 12 1.5 0123456789ABCDEF", "site ams 12 1.5 0123",
                "override site:ams 13 1.5 0123456789abcdef"]:
        with pytest.raises(StateError):
            parse_change(bad)


def test_answer_digest_covers_exactly_what_answers_read() -> None:
    rs = RealServerState("10.0.0.1", 80, "up", 100)
    svc = ServiceState("web", ("192.0.2.10:80/tcp",), 1.0, True, (rs,))
    base = SiteSnapshot("ams", "dir-1", 1.0, (svc,))
    d = answer_digest(base)
    assert len(d) == 16 and int(d, 16) >= 0
    # A heartbeat: stamps, counters, rates, real servers, director: same digest.
    beat = replace(base, heartbeat=2.0, version=9, published_at=5.0, director_id="dir-2", services=(
        replace(svc, active_conns=7, new_conns_per_s=3.0, packets_per_s=1.0, bytes_per_s=2.0,
                real_servers=(replace(rs, active_conns=4, state="down"),)),))
    assert answer_digest(beat) == d
    # Anything sitewatch's condition reads: a new digest.
    changed = [
        replace(base, withdrawn=True),
        replace(base, services=(replace(svc, up=False),)),
        replace(base, services=(replace(svc, healthy_fraction=0.5),)),
        replace(base, services=(replace(svc, name="api"),)),
        replace(base, services=()),
    ]
    assert len({answer_digest(s) for s in changed} | {d}) == len(changed) + 1


# -- DeploymentState


def test_with_site_ignores_older_versions() -> None:
    st = DeploymentState().with_site(make_snapshot(version=5, published_at=10.0))
    older = make_snapshot(version=4, published_at=9.0, withdrawn=True)
    assert st.with_site(older) is st
    newer = make_snapshot(version=6, published_at=11.0)
    st2 = st.with_site(newer)
    assert st2.sites["ams"] is newer and st2.version == 6
    assert st.sites["ams"].version == 5  # the old state is untouched


def test_state_is_immutable() -> None:
    st = DeploymentState.build([make_snapshot()])
    with pytest.raises(TypeError):
        st.sites["x"] = make_snapshot("x")  # type: ignore[index]
    with pytest.raises(AttributeError):
        st.version = 3  # type: ignore[misc]


def test_without_site_respects_versions() -> None:
    st = DeploymentState().with_site(make_snapshot(version=5))
    assert st.without_site("ams", 4) is st  # removal older than what we hold
    assert "ams" not in st.without_site("ams", 6).sites


def test_staleness_with_explicit_now_and_clock_offset() -> None:
    # Redis clock is 100 s ahead of ours: offset = redis - local = +100.
    st = DeploymentState(clock_offset=100.0).with_site(make_snapshot(version=1, published_at=1100.0))
    assert st.site_age("ams", now=1001.0) == pytest.approx(1.0)
    assert st.site_is_up("ams", now=1002.9, stale_after=3.0)
    assert not st.site_is_up("ams", now=1003.1, stale_after=3.0)
    assert st.site_age("nowhere", 0.0) is None
    assert not st.site_is_up("nowhere", 1000.0, 3.0)


def test_withdrawn_site_is_down_at_once() -> None:
    st = DeploymentState().with_site(make_snapshot(version=1, published_at=100.0, withdrawn=True))
    assert not st.site_is_up("ams", now=100.0, stale_after=3.0)


def test_frozen_state_judges_staleness_at_freeze_time() -> None:
    st = DeploymentState().with_site(make_snapshot(version=1, published_at=100.0)).frozen(101.0)
    assert st.site_is_up("ams", now=500.0, stale_after=3.0)  # store outage: keep last good state
    assert st.site_age("ams", now=500.0) == pytest.approx(1.0)


def test_an_outage_does_not_age_what_was_published_before_it() -> None:
    """Reconnected after an outage (a Sentinel failover) from 101 to 104: a
    snapshot of 100 has not aged by those 3 s; one published during it ages
    from its end, one published after it as usual."""
    frozen = DeploymentState().with_site(make_snapshot(version=1, published_at=100.0)).frozen(101.0)
    loaded = DeploymentState.build([make_snapshot(version=1, published_at=100.0),
                                    make_snapshot(site="fra", version=2, published_at=103.5)])
    st = loaded.resumed(frozen, now=104.0)
    assert st.paused == (101.0, 3.0) and st.frozen_at is None
    assert st.site_age("ams", now=104.0) == pytest.approx(1.0)  # as at the freeze
    assert st.site_is_up("ams", now=104.0, stale_after=3.0)
    assert st.site_age("fra", now=104.0) == pytest.approx(0.0)  # published during the outage
    assert st.site_age("fra", now=104.5) == pytest.approx(0.5)
    assert st.with_site(make_snapshot(site="fra", version=3, published_at=104.2)).site_age("fra", 104.5) == \
        pytest.approx(0.3)  # published after it
    # A director that died with the master: stale once stale_after passed, outage not counted.
    assert st.site_is_up("ams", now=105.9, stale_after=3.0) and not st.site_is_up("ams", now=106.1, stale_after=3.0)
    # Later loads keep the pause; loads with no outage before them start none.
    assert DeploymentState.build([make_snapshot(version=3, published_at=100.0)]).resumed(st, 110.0).paused == st.paused
    assert loaded.resumed(DeploymentState(), now=104.0) is loaded
    assert loaded.site_age("ams", now=104.0) == pytest.approx(4.0)


def test_an_outage_has_no_edge_at_its_start() -> None:
    """The outage's start is the last message heard (local clock); the snapshots
    on a promoted replica were stamped on the Redis clock, some a few ms after
    it (a message lost with the master, or the clock offset measured that far
    off). Their ages must not jump by the whole outage across that instant:
    the flap of the Sentinel failover test (issue 15 C)."""
    frozen = DeploymentState().with_site(make_snapshot(version=1, published_at=100.0)).frozen(101.0)
    ages = {}
    for at in (100.999, 101.0, 101.001, 101.003, 102.5):
        loaded = DeploymentState.build([make_snapshot(version=2, published_at=at)])
        ages[at] = loaded.resumed(frozen, now=104.2).site_age("ams", now=104.2)
    assert ages[100.999] == pytest.approx(0.001) and ages[101.0] == pytest.approx(0.0)
    assert ages[101.001] == ages[101.003] == ages[102.5] == pytest.approx(0.0)
    assert all(DeploymentState.build([make_snapshot(version=2, published_at=at)]).resumed(frozen, 104.2)
               .site_is_up("ams", now=104.2 + 2.9, stale_after=3.0) for at in ages)


def test_drain_override_makes_site_down() -> None:
    st = DeploymentState().with_site(make_snapshot(version=1, published_at=100.0))
    assert st.site_is_up("ams", 100.5, 3.0)
    ov = Override(site_target("ams"), drain=True, who="bob", when=1.0, why="maintenance")
    drained = st.with_override(ov, version=2)
    assert drained.is_drained("ams") and not drained.site_is_up("ams", 100.5, 3.0)
    assert drained.version == 2
    undrained = drained.without_override("site:ams", version=3)
    assert undrained.site_is_up("ams", 100.5, 3.0) and undrained.version == 3
    # A weight-only override does not take the site down.
    weighted = st.with_override(Override("site:ams", weight=10))
    assert weighted.site_is_up("ams", 100.5, 3.0) and weighted.site_override("ams").weight == 10


def test_server_override_lookup() -> None:
    ov = Override(server_target("ams", "web", "2001:db8::2", 80), drain=True)
    st = DeploymentState.build([make_snapshot()], [ov])
    assert st.server_override("ams", "web", "2001:0db8:0::2", 80) == ov
    assert st.server_override("ams", "web", "10.0.0.1", 80) is None
    assert st.server_override("ams", "web", "not-an-ip", 80) is None


def test_snapshot_service_lookup() -> None:
    s = make_snapshot()
    assert s.service("web") is s.services[0]
    assert s.service("mail") is None
    assert s.services[0].real_server("10.0.0.1", 80).weight == 100


def test_state_module_imports_no_io() -> None:
    code = (
        "import sys, glb.state; "
        "bad = [m for m in ('redis', 'asyncio', 'socket') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
