"""`glb dashboard` without a browser: the pure model (view, samples, rates, timeline), the action
parser, and the HTTP rules (security headers, loopback Host, CSRF, Origin, token) against the real
app on a real Redis. The page itself is tested in chromium: tests/glb/test_dashboard_browser.py."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from glb import config as configmod
from glb.dashboard import actions, model, server
from glb.errors import AdminError
from glb.overview import build_report
from glb.state import DeploymentState, Override, RealServerState, ServiceState, SiteSnapshot, server_target
from tests.configs import app_name, head

SITES = """sites:
  ams:
    director:
      interface: lo
      status_listen: "127.0.0.1:3"
      admin_listen: "127.0.0.1:1"
      pair: {virtual_router_id: 7, members: [{id: lb1, address: 10.0.0.1, priority: 200},
                                             {id: lb2, address: 10.0.0.2, priority: 100}]}
    services:
      - name: web
        vips: ["192.0.2.10:80/tcp"]
        real_servers: [{address: 10.1.0.1, weight: 3}, 10.1.0.2]
        health_check: {type: tcp}
  fra:
    director: {interface: lo, status_listen: "127.0.0.1:2"}
    services:
      - name: web
        vips: ["192.0.2.20:80/tcp"]
        real_servers: [10.2.0.1]
        health_check: {type: tcp}
"""


def config_text(redis: str = "redis://127.0.0.1:1/0") -> str:
    return head(redis, "admin: {token: dashboard-test-token-0123456789}") + app_name("ams", "fra") + SITES


def cfg(redis: str = "redis://127.0.0.1:1/0") -> configmod.Config:
    return configmod.loads(config_text(redis))


def snap(site: str, director: str, states: dict[str, str], *, at: float = 1000.0, version: int = 1) -> SiteSnapshot:
    servers = tuple(RealServerState(a, 0, st, 1, active_conns=2, packets_per_s=5.0, last_result="timeout"
                                    if st == "down" else "connected") for a, st in states.items())
    up = sum(1 for s in servers if s.state == "up")
    svc = ServiceState("web", ("192.0.2.10:80/tcp",), up / len(servers), up > 0, servers,
                       active_conns=2 * len(servers), packets_per_s=5.0 * len(servers))
    return SiteSnapshot(site, director, at, (svc,), version=version, published_at=at)


def state(*snaps: SiteSnapshot, overrides: tuple[Override, ...] = ()) -> DeploymentState:
    return DeploymentState.build(snaps, overrides)


REDIS_OK = {"connected": True, "synced": True, "last_error": None, "frozen_at": None}


# --------------------------------------------------------------------------
# The model


def test_standby_directors_are_shown_as_the_active_one_last_heard_them():
    from dataclasses import replace

    from glb.state import PairMemberState

    pair = (PairMemberState("lb1", "master", True, True, 999.0), PairMemberState("lb2", "backup", False, False))
    st = state(replace(snap("ams", "lb1", {"10.1.0.1": "up"}), pair=pair))
    ams = model.build_view(cfg(), st, 1001.0, redis=REDIS_OK)["sites"][0]
    assert ams["directors"] == {"active": "lb1", "standby": ["lb2 (not heard)"]}


def test_view_uses_the_status_report_and_adds_directors_servers_capacity_and_load():
    c = cfg()
    weight = Override(server_target("ams", "web", "10.1.0.1", 0), weight=7, who="bob", when=999.0, why="big box")
    st = state(snap("ams", "lb1", {"10.1.0.1": "up", "10.1.0.2": "down"}), overrides=(weight,))
    view = model.build_view(c, st, 1001.0, redis=REDIS_OK)
    report = build_report(c, st, 1001.0)
    assert view["names"] == report["names"]  # the same policy code as `glb status`, not a copy
    ams, fra = view["sites"]
    assert (ams["state"], ams["age"], fra["state"]) == ("up", 1.0, "no snapshot")
    assert ams["directors"] == {"active": "lb1", "standby": ["lb2"]}
    assert fra["directors"] == {"active": None, "standby": []}
    assert ams["capacity"] == {"servers_up": 1, "servers": 2, "healthy_fraction": 0.5}
    assert ams["load"] == {"active_conns": 4, "new_conns_per_s": 0.0, "packets_per_s": 10.0}
    rows = {r["key"]: r for r in ams["services"][0]["real_servers"]}
    assert rows["ams/web/10.1.0.2"]["state"] == "down" and rows["ams/web/10.1.0.2"]["last_result"] == "timeout"
    assert rows["ams/web/10.1.0.1"]["override"] == {"drain": False, "weight": 7, "who": "bob", "why": "big box",
                                                    "when": 999.0}
    assert rows["ams/web/10.1.0.2"]["override"] is None
    # Configured but unpublished servers are shown as unknown, not left out.
    assert [(r["key"], r["state"], r["weight"]) for r in fra["services"][0]["real_servers"]] \
        == [("fra/web/10.2.0.1", "unknown", 1)]


def test_samples_keep_fifteen_minutes_in_columns():
    s = model.Samples()
    for t in range(model.HISTORY + 10):
        s.add(float(t), {"a": t} if t % 2 else {"a": t, "b": 1.0})
    cols = s.columns()
    assert len(s) == model.HISTORY == len(cols["t"]) and cols["t"][0] == 10.0
    assert cols["series"]["a"][-1] == model.HISTORY + 9
    assert cols["series"]["b"][:2] == [1.0, None]


def test_sample_values_name_one_series_per_site_server_name_and_dnsfront():
    view = model.build_view(cfg(), state(snap("ams", "lb1", {"10.1.0.1": "up", "10.1.0.2": "up"})), 1000.0,
                            redis=REDIS_OK)
    values = model.sample_values(view, {"127.0.0.1:8053": 12.5})
    assert values["dns:127.0.0.1:8053"] == 12.5
    assert values["site_conns:ams"] == 4 and values["site_pps:ams"] == 10.0
    assert values["server_conns:ams/web/10.1.0.1"] == 2 and values["server_pps:ams/web/10.1.0.2"] == 5.0
    assert values["share:app.example.net. A ams"] == 1.0 and values["share:app.example.net. A fra"] == 0.0


def test_rate_meter_skips_the_first_sample_and_a_counter_reset():
    m = model.RateMeter()
    assert m.rate("d", 100, 10.0) is None
    assert m.rate("d", 150, 12.0) == 25.0
    assert m.rate("d", 3, 13.0) is None  # dnsfront restarted
    assert m.rate("d", 13, 14.0) == 10.0


def test_dns_responses_total_sums_every_qtype_and_rcode():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily

    class Responses:  # as dnsfront/status.py exposes them
        def collect(self):
            q = CounterMetricFamily("dnsfront_responses", "DNS responses sent", labels=["qtype", "rcode"])
            q.add_metric(["A", "NOERROR"], 7)
            q.add_metric(["AAAA", "NXDOMAIN"], 3)
            yield q

    registry = CollectorRegistry()
    registry.register(Responses())
    assert model.dns_responses_total(generate_latest(registry).decode()) == 10.0
    with pytest.raises(ValueError, match="is a dnsfront listening there"):
        model.dns_responses_total("# nothing\nfoo 1\n")


def test_timeline_events_from_state_differences():
    c = cfg()
    tl = model.Timeline()

    def at(st: DeploymentState, now: float) -> list[dict]:
        return tl.observe(model.build_view(c, st, now, redis=REDIS_OK), st, now)

    drain = Override(server_target("ams", "web", "10.1.0.2", 0), drain=True, who="alice", when=990.0, why="disk")
    # The first look: only the overrides already held, with their own who/when/why.
    first = at(state(snap("ams", "lb1", {"10.1.0.1": "up", "10.1.0.2": "up"}), overrides=(drain,)), 1000.0)
    assert [(e["kind"], e["t"], e["who"], e["why"]) for e in first] == [("override_set", 990.0, "alice", "disk")]
    assert at(state(snap("ams", "lb1", {"10.1.0.1": "up", "10.1.0.2": "up"}, at=1001), overrides=(drain,)),
              1001.0) == []
    events = at(state(snap("ams", "lb2", {"10.1.0.1": "up", "10.1.0.2": "down"}, at=1002)), 1002.0)
    assert [(e["kind"], e["text"]) for e in events] == [
        ("takeover", "site ams: director lb2 took over from lb1"),
        ("server_down", "ams/web/10.1.0.2: up -> down (last check: timeout)"),
        ("override_cleared", "server ams/web/10.1.0.2: override cleared"),
    ]
    # Staleness is time: the same state, judged later, turns the site stale.
    stale = at(state(snap("ams", "lb2", {"10.1.0.1": "up", "10.1.0.2": "down"}, at=1002)), 1010.0)
    assert [(e["kind"], e["text"]) for e in stale] == [("site_stale", "site ams: up -> stale")]


# --------------------------------------------------------------------------
# Actions


def test_parse_action_validates_and_resolves_the_server():
    c = cfg()
    req = actions.parse_action(c, {"action": "drain", "site": "ams", "service": "web", "server": "10.1.0.1:80",
                                   "who": "alice", "why": "disk\nswap"})
    assert (req.address, req.port, req.why) == ("10.1.0.1", 0, "disk swap")  # the VIP's port is key port 0
    assert actions.describe(req) == "drained server ams/web/10.1.0.1"
    weight = actions.parse_action(c, {"action": "weight", "site": "ams", "service": "web", "server": "10.1.0.2",
                                      "weight": None, "who": "a", "why": "b"})
    assert actions.describe(weight) == "server ams/web/10.1.0.2: weight override cleared"
    site = actions.parse_action(c, {"action": "drain_site", "site": "fra", "who": "a", "why": "b"})
    assert actions.describe(site) == "drained site fra"


@pytest.mark.parametrize("body, reason", [
    ([], "expected a JSON object"),
    ({"action": "reboot"}, "action: expected one of drain, undrain, weight, drain_site, undrain_site"),
    ({"action": "drain_site", "site": "lon", "who": "a", "why": "b"}, "no site 'lon'"),
    ({"action": "drain_site", "site": "ams", "who": "a"}, "why: required"),
    ({"action": "drain", "site": "ams", "service": "mail", "server": "10.1.0.1", "who": "a", "why": "b"},
     "site ams has no service 'mail'"),
    ({"action": "drain", "site": "ams", "service": "web", "server": "web1", "who": "a", "why": "b"},
     "server: not an IP address"),
    ({"action": "weight", "site": "ams", "service": "web", "server": "10.1.0.1", "weight": 70000, "who": "a",
      "why": "b"}, "weight: expected 0..65535"),
    ({"action": "drain_site", "site": "ams", "who": "a", "why": "x" * 201}, "why: at most 200 characters"),
])
def test_parse_action_refuses_with_one_line(body, reason):
    with pytest.raises(AdminError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        actions.parse_action(cfg(), body)


# --------------------------------------------------------------------------
# HTTP: the real app, on a real Redis


@pytest.fixture
async def served(redis_url):
    dash, app = await server.start(cfg(redis_url), configmod.ListenAddress("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{app.port}"
    finally:
        await dash.close()
        await app.close()


async def test_headers_csp_and_the_csrf_cookie(served):
    async with aiohttp.ClientSession() as s:
        async with s.get(served + "/") as r:
            page = await r.text()
            csp = r.headers["Content-Security-Policy"]
            cookie = r.cookies[server.CSRF_COOKIE]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert cookie["httponly"] and cookie["samesite"] == "Strict"
    assert f'<meta name="glb-csrf" content="{cookie.value}">' in page
    assert "<script>" not in page and " style=" not in page  # nothing inline for the CSP to forbid


async def test_reads_need_no_token_but_a_loopback_host(served):
    async with aiohttp.ClientSession() as s:
        async with s.get(served + "/api/state") as r:
            doc = await r.json()
        assert r.status == 200 and [x["site"] for x in doc["view"]["sites"]] == ["ams", "fra"]
        async with s.get(served + "/api/state", headers={"Host": "rebound.example.com"}) as r:
            assert r.status == 421  # a DNS-rebinding page cannot read us


async def _post(served: str, *, origin: str | None = "same", csrf: str | None = "match",
                token: str | None = "t" * 20) -> tuple[int, dict]:
    # unsafe: aiohttp keeps no cookies of an IP address (127.0.0.1) otherwise; browsers do.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.get(served + "/") as r:
            cookie = r.cookies[server.CSRF_COOKIE].value
        headers = {}
        if origin is not None:
            headers["Origin"] = served if origin == "same" else origin
        if csrf is not None:
            headers[server.CSRF_HEADER] = cookie if csrf == "match" else csrf
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        body = {"action": "drain_site", "site": "ams", "who": "alice", "why": "test"}
        async with s.post(served + "/api/action", json=body, headers=headers) as r:
            return r.status, await r.json()


@pytest.mark.parametrize("kw, status, error", [
    ({"origin": "http://evil.example"}, 403, "cross-origin request from http://evil.example refused"),
    ({"csrf": None}, 403, "missing or wrong CSRF token: reload the page"),
    ({"csrf": "guessed"}, 403, "missing or wrong CSRF token: reload the page"),
    ({"token": None}, 401, "actions need the admin token: sign in first"),
])
async def test_actions_need_same_origin_csrf_and_a_token(served, kw, status, error):
    assert await _post(served, **kw) == (status, {"error": error})


async def test_an_unreachable_director_is_one_line_and_in_the_timeline(served):
    status, doc = await _post(served)
    assert status == 403
    assert doc["error"].startswith("director of site ams at 127.0.0.1:1 is not reachable: connection refused")
    async with aiohttp.ClientSession() as s:
        async with s.get(served + "/api/state") as r:
            events = (await r.json())["events"]
    assert [(e["kind"], e["who"], e["why"]) for e in events] == [("action_refused", "alice", "test")]


def test_cli_help_and_one_line_errors(tmp_path):
    def glb(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "glb.cli", *args], capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).resolve().parents[2])

    r = glb("dashboard", "--help")
    assert r.returncode == 0 and "--listen ADDR" in r.stdout and "127.0.0.1:9180" in r.stdout
    r = glb("dashboard", "--config", str(tmp_path / "none.yaml"), "--listen", "a:b:c")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "expected HOST:PORT" in r.stderr
    path = tmp_path / "glb.yaml"
    path.write_text(config_text())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = glb("dashboard", "--config", str(path), "--listen", f"127.0.0.1:{busy.getsockname()[1]}")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("for the dashboard: address already in use")
