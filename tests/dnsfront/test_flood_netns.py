"""A spoofed-source flood against dnsfront across namespaces (issue 15 A).

Four namespaces on one bridge: dnsfront (10.15.0.53), an attacker that sends
queries for the largest answer with the victim's address as source (raw
socket), the victim (10.15.2.1, which only receives), and real clients in
another /24 (10.15.3.1) that behave like a resolver (retry over TCP on TC).
With RRL on, the bytes reaching the victim must not exceed the bytes the
attacker sent (no amplification), and the real clients keep >= 99 % answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.environment import require
from tests.netns import Lab, netns_unavailable

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
TOOLS = [sys.executable, "-m", "tests.dnsfront.flood_tools"]
FLOOD_QPS, SECONDS = 2000, 6

CONFIG = """
redis: {{url: "redis://127.0.0.1:1/0"}}
dnsfront:
  listen: ["10.15.0.53:53"]
  status_listen: 127.0.0.1:8053
  rrl: {{enabled: {rrl}, responses_per_second: 20, slip: 2}}
zones:
  - apex: example.net
    soa: {{mname: ns.other.org, rname: hostmaster@example.net}}
    ns: [ns.other.org]
    records:
      - {{name: big, type: A, values: [{big}], ttl: 300}}
{names}
sites:
  dc1:
    director: {{interface: eth0}}
    services: [{{name: web, vips: ["192.0.2.10:80/tcp"], real_servers: [10.1.0.1]}}]
"""
NAMES = [f"n{i}.example.net" for i in range(10)]


def config(rrl: bool) -> str:
    big = ", ".join(f"192.0.2.{100 + i}" for i in range(60))  # ~1 KB: the largest answer under 1232
    names = "names:\n" + "".join(f"  {n}: {{service: web, members: [dc1]}}\n" for n in NAMES)
    return textwrap.dedent(CONFIG).format(rrl=str(rrl).lower(), big=big, names=names)


def rx_bytes(ns, ifname: str) -> int:
    return ns.link_stats(ifname)["rx_bytes"]


def attack(lab, tmp_path, rrl: bool, seconds: float) -> dict:
    """One run: dnsfront (RRL on or off) under the flood while the real clients ask; what each side saw."""
    path = tmp_path / f"glb-{rrl}.yaml"
    path.write_text(config(rrl=rrl))
    sw = lab.netns("sw")
    lab.bridge(sw)
    dnsns, attacker, victim, clients = (lab.netns(r) for r in ("dns", "attacker", "victim", "clients"))
    lab.port(sw, "br0", dnsns, "10.15.0.53/16")
    a_if, _ = lab.port(sw, "br0", attacker, "10.15.1.1/16")
    v_if, _ = lab.port(sw, "br0", victim, "10.15.2.1/16")
    lab.port(sw, "br0", clients, "10.15.3.1/16")
    code = "import sys; from dnsfront.main import run; sys.exit(run(sys.argv[1], 1, 'warning'))"
    server = dnsns.popen([sys.executable, "-c", code, str(path)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lab.wait_for(lambda: json.loads(clients.run([*TOOLS, "clients", "10.15.0.53", "n0.example.net", "10", "0.1"],
                                                cwd=ROOT, check=False).stdout or '{"answered": 0}')["answered"],
                 timeout=30, what="dnsfront to answer")
    # The victim's address must resolve on the bridge before the flood (ARP), like any live host.
    victim.run(["ping", "-c", "1", "-W", "2", "10.15.0.53"], check=False)
    v0, a0 = rx_bytes(victim, v_if), attacker.link_stats(a_if)["tx_bytes"]
    flood = attacker.popen([*TOOLS, "flood", "10.15.2.1", "10.15.0.53", "big.example.net", str(FLOOD_QPS),
                            str(seconds)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    real = clients.run([*TOOLS, "clients", "10.15.0.53", ",".join(NAMES), "50", str(seconds)], cwd=ROOT,
                       timeout=seconds + 60)
    flood_out, _ = flood.communicate(timeout=seconds + 60)
    metrics = dnsns.run([sys.executable, "-c", "import urllib.request; print(urllib.request.urlopen("
                         "'http://127.0.0.1:8053/metrics', timeout=5).read().decode())"]).stdout
    out = {"flood": json.loads(flood_out), "clients": json.loads(real.stdout),
           "to_victim": rx_bytes(victim, v_if) - v0, "from_attacker": attacker.link_stats(a_if)["tx_bytes"] - a0,
           "limited": next(float(line.split()[1]) for line in metrics.splitlines()
                           if line.startswith("dnsfront_rrl_limited_total"))}
    server.terminate()
    server.wait(15)
    f, c = out["flood"], out["clients"]
    print(f"RRL {'on' if rrl else 'off'}: flood of {f['sent']} queries ({f['query_bytes']} B of DNS each): "
          f"{out['from_attacker']} B of frames sent by the attacker, {out['to_victim']} B reached the victim "
          f"({out['to_victim'] / max(1, out['from_attacker']):.2f} x); limited {out['limited']:.0f}; "
          f"real clients: {c['answered']}/{c['asked']} answered ({c['over_tcp']} over TCP)")
    return out


@pytest.mark.timeout(240)
def test_spoofed_flood_is_not_amplified_and_real_clients_are_answered(tmp_path):
    require(netns_unavailable())
    # Without RRL the same flood is amplified: what the check below would catch.
    with Lab("flood0") as lab:
        off = attack(lab, tmp_path, rrl=False, seconds=2)
    assert off["to_victim"] > 2 * off["from_attacker"]
    with Lab("flood1") as lab:
        on = attack(lab, tmp_path, rrl=True, seconds=SECONDS)
    assert on["flood"]["sent"] >= FLOOD_QPS * SECONDS * 0.25  # the flood did happen (a loaded machine sends less)
    assert on["limited"] >= on["flood"]["sent"] * 0.5
    assert on["to_victim"] <= on["from_attacker"]
    assert on["clients"]["answered"] >= 0.99 * on["clients"]["asked"], on["clients"]
