"""`glb status` against a real redis-server: sites, freshness and what DNS would answer."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from glb import config
from glb.state import Override, ServiceState, SiteSnapshot, site_target
from glb.store import RedisStore
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def _config_for(redis_url: str, tmp_path: Path) -> Path:
    data = yaml.safe_load((ROOT / "deploy/examples/glb.yaml").read_text())
    data["redis"]["url"] = redis_url
    # The snapshots are published with the real clock before `glb status` starts; under a loaded
    # machine its start-up alone can outlast the example's 3 s, and freshness is not what these test.
    data["redis"]["stale_after"] = 600.0
    path = tmp_path / "glb.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _glb(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glb.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def _snapshot(site: str, fraction: float) -> SiteSnapshot:
    vips = {"dc1": ("192.0.2.10:80/tcp", "[2001:db8:10::10]:80/tcp"), "dc2": ("192.0.2.140:80/tcp",)}[site]
    return SiteSnapshot(site, f"{site}-director", time.time(), (ServiceState("web", vips, fraction, fraction > 0),))


async def _publish(redis_url: str, *snapshots: SiteSnapshot, override: Override | None = None) -> None:
    store = RedisStore(config.RedisConfig(url=redis_url))
    try:
        for snap in snapshots:
            await store.publish(snap)
        if override is not None:
            await store.set_override(override)
    finally:
        await store.close()


def test_status_shows_sites_and_dns_choice(redis_url, tmp_path):
    path = _config_for(redis_url, tmp_path)
    asyncio.run(_publish(redis_url, _snapshot("dc1", 1.0), _snapshot("dc2", 0.5)))
    r = _glb("status", "--config", str(path), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    states = {s["site"]: s["state"] for s in report["sites"]}
    assert states == {"dc1": "up", "dc2": "up"}
    app_a = next(n for n in report["names"] if n["name"] == "app.example.net." and n["type"] == "A")
    shares = {m["site"]: m["share"] for m in app_a["members"]}
    assert shares == {"dc1": round(2 / 3, 3), "dc2": round(1 / 3, 3)}  # 100x1.0 vs 100x0.5
    api_a = next(n for n in report["names"] if n["name"] == "api.example.net." and n["type"] == "A")
    assert {m["site"]: m["share"] for m in api_a["members"]} == {"dc1": 1.0, "dc2": 0.0}  # failover: dc1 only
    app_aaaa = next(n for n in report["names"] if n["name"] == "app.example.net." and n["type"] == "AAAA")
    assert [m["site"] for m in app_aaaa["members"]] == ["dc1"]  # only dc1 has an IPv6 VIP

    r = _glb("status", "--config", str(path))
    assert r.returncode == 0, r.stderr
    assert "dc1" in r.stdout and "app.example.net." in r.stdout and "67%" in r.stdout


def test_status_drained_site_is_not_answered(redis_url, tmp_path):
    path = _config_for(redis_url, tmp_path)
    drain = Override(site_target("dc1"), drain=True, who="alice", why="maintenance")
    asyncio.run(_publish(redis_url, _snapshot("dc1", 1.0), _snapshot("dc2", 1.0), override=drain))
    report = json.loads(_glb("status", "--config", str(path), "--json").stdout)
    assert {s["site"]: s["state"] for s in report["sites"]} == {"dc1": "drained", "dc2": "up"}
    api = next(n for n in report["names"] if n["name"] == "api.example.net." and n["type"] == "A")
    assert [(m["site"], m["live"]) for m in api["members"]] == [("dc1", False), ("dc2", True)]


def test_status_without_snapshots_says_so(redis_url, tmp_path):
    path = _config_for(redis_url, tmp_path)
    report = json.loads(_glb("status", "--config", str(path), "--json").stdout)
    assert {s["state"] for s in report["sites"]} == {"no snapshot"}


def test_status_unreachable_redis_is_one_line(tmp_path):
    path = _config_for(f"redis://127.0.0.1:{free_port()}/0", tmp_path)  # a port nothing listens on
    r = _glb("status", "--config", str(path))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glb: error: redis at redis://127.0.0.1:"), lines
    assert "Traceback" not in r.stderr


def test_status_names_the_active_director_and_its_standby():
    from glb.overview import build_report, render
    from glb.state import DeploymentState, PairMemberState

    cfg = config.load(ROOT / "deploy/examples/glb.yaml")
    now = time.time()
    snap = SiteSnapshot("dc1", "dc1-b", now, _snapshot("dc1", 1.0).services, published_at=now, pair=(
        PairMemberState("dc1-a", "backup", True, False, now - 1), PairMemberState("dc1-b", "master", True, True, now)))
    report = build_report(cfg, DeploymentState(sites={"dc1": snap}), now)
    dc1 = next(s for s in report["sites"] if s["site"] == "dc1")
    assert dc1["director"] == "dc1-b" and dc1["pair"][0]["role"] == "backup" and dc1["pair"][0]["heard_ago"] == 1.0
    assert "dc1-b (dc1-a backup NOT HEALTHY)" in render(report)
