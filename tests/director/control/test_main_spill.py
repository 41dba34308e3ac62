"""A running director spills (issue 16): it follows the target site's snapshots in a real Redis,
decides, publishes ``spilling_to``, shows it on /status and /metrics, and stops when its servers
are back (control plane only, on lo; the packet path's part is tests/director/test_e2e_spill.py)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import yaml

from director.control.main import Director
from director.control.probes import ProbeResult
from director.control.spill import RemoteServer, Spill, spilling
from glb import config
from glb.config import RedisConfig
from glb.state import RealServerState, ServiceState, SiteSnapshot
from glb.store import RedisStore
from tests.director.control.test_main import free_port, read_site, wait_for, write_config


class Switch:
    """A probe whose verdict the test sets."""

    def __init__(self) -> None:
        self.ok = False

    async def __call__(self, check, address, port) -> ProbeResult:
        return ProbeResult(self.ok, "ok" if self.ok else "refused", 0.001)


def write(tmp_path, redis_url: str, port: int):
    """test_main's one-site config, plus a spill to a dc2 that runs web by TUN."""
    web = ('- {name: web, vips: ["192.0.2.10:80/tcp"], real_servers: [10.1.0.11], spill: {to: [dc2], recover_after: 0.3},'
           ' health_check: {type: tcp, interval: 0.05, timeout: 0.05, rise: 1, fall: 1, start_jitter: 0.01}}')
    path = write_config(tmp_path / "glb.yaml", redis_url, port, "      " + web, token=None)
    data = yaml.safe_load(path.read_text())
    data["redis"]["stale_after"] = 1.0
    data["sites"]["dc1"]["director"]["address"] = "10.1.0.2"
    data["sites"]["dc2"] = {"director": {"interface": "lo", "address": "192.0.2.130"}, "services": [
        {"name": "web", "vips": ["192.0.2.140:80/tcp"], "forwarding": "tun", "real_servers": ["10.2.0.11", "10.2.0.12"]}]}
    path.write_text(yaml.safe_dump(data))
    return config.load(path)


def dc2_snapshot(spilling_to: str | None = None) -> SiteSnapshot:
    rs = (RealServerState("10.2.0.11", 0, "up", 3), RealServerState("10.2.0.12", 0, "down", 1))
    return SiteSnapshot("dc2", "d2", time.time(),
                        (ServiceState("web", ("192.0.2.140:80/tcp",), 0.75, True, rs, spilling_to=spilling_to),))


async def test_director_spills_to_a_fresh_target_and_comes_home(tmp_path, redis_url):
    port = free_port()
    cfg = write(tmp_path, redis_url, port)
    probe = Switch()
    store = RedisStore(RedisConfig(url=redis_url, timeout=0.5))
    beat = {"spilling_to": None, "on": True}

    async def heartbeat():  # dc2's director, as far as dc1 can tell
        while True:
            if beat["on"]:
                await store.publish(dc2_snapshot(beat["spilling_to"]))
            await asyncio.sleep(0.1)

    hb = asyncio.create_task(heartbeat())
    d = Director(cfg, "dc1", probe=probe)
    await d.start()
    try:
        want = Spill("web", "dc2", (RemoteServer("10.2.0.11", 0, 3),))

        async def spilling_published():
            snap = await read_site(redis_url)
            return snap is not None and snap.service("web").spilling_to == "dc2" and d.spilling["web"] == want
        await wait_for(spilling_published)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/status") as r:
                doc = (await r.json())["services"][0]["spill"]
            assert doc["spilling_to"] == "dc2" and doc["triggered"] and doc["to"] == ["dc2"]
            assert [(s["site"], s["address"], s["weight"]) for s in doc["servers"]] == [("dc2", "10.2.0.11", 3)]
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                metrics = await r.text()
        assert 'glb_director_service_spilling{service="web",site="dc2"} 1.0' in metrics

        # The target starts spilling itself: never chain.
        beat["spilling_to"] = "dc3"
        await wait_for(lambda: _true(spilling(d.spilling["web"]) is None and d.spills.triggered("web")))
        beat["spilling_to"] = None
        await wait_for(lambda: _true(d.spilling["web"] == want))
        # The target goes silent: stale after 1 s, no spill.
        beat["on"] = False
        await wait_for(lambda: _true(spilling(d.spilling["web"]) is None))
        beat["on"] = True
        await wait_for(lambda: _true(d.spilling["web"] == want))

        # Local servers back: spill ends after recover_after, and the snapshot says so.
        probe.ok = True

        async def home():
            snap = await read_site(redis_url)
            return snap is not None and snap.service("web").spilling_to is None and spilling(d.spilling["web"]) is None
        await wait_for(home)
    finally:
        await d.stop()
        hb.cancel()
        await asyncio.gather(hb, return_exceptions=True)
        await store.close()


async def _true(value: bool) -> bool:
    return value


def _spill_doc(spilling_to, triggered=True, servers=()):
    rows = [{"site": site, "address": a, "port": 0, "weight": w, "active_conns": act, "inactive_conns": 1,
             "packets": 9, "bytes": 900, "new_conns_per_s": 1.5, "packets_per_s": 10.0, "bytes_per_s": 1000.0}
            for site, a, w, act in servers]
    return {"to": ["dc2", "dc3"], "when": "all_down", "after": 0.0, "recover_after": 2.0, "triggered": triggered,
            "spilling_to": spilling_to, "conns": sum(r["active_conns"] + 1 for r in rows), "servers": rows}


@pytest.mark.parametrize("spill, line", [
    (_spill_doc("dc2", servers=[("dc2", "10.2.0.11", 3, 12)]),
     "  SPILLING to dc2: new connections go to its real servers (13 spilled conns)"),
    (_spill_doc(None, servers=[("dc2", "10.2.0.11", 0, 12)]),
     "  SPILL WANTED (all_down) but no site of [dc2, dc3] can take it: new connections are dropped (13 spilled conns)"),
    (_spill_doc(None, triggered=False), "  spill to [dc2, dc3] when all_down: not now (0 spilled conns)"),
])
def test_director_list_shows_the_spill_and_the_servers_holding_spilled_conns(spill, line):
    from director.control.listing import render
    from tests.director.control.test_listing import _doc, list_rows

    doc = _doc()
    doc["services"][0]["spill"] = spill
    text = render(doc)
    assert line in text.splitlines()
    if spill["servers"]:
        weight = str(spill["servers"][0]["weight"])
        assert list_rows(text)["10.2.0.11:*"] == ["Tunnel", weight, "@dc2", "12", "1", "1.5", "10", "1000", "spilled"]
