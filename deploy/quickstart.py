"""The quickstart demo: GLB's control loop end to end, on loopback.

Starts a private Redis, four HTTP real servers, the directors of dc1 and dc2
and dnsfront, all from deploy/examples/demo.yaml through the real `glb`
commands. Then it prints a timeline of DNS answers while every real server of
dc1 stops (DNS must move to dc2 within seconds) and comes back. Every process
it starts is stopped by PID on exit, including on Ctrl-C and on failure.

Run it with `.venv/bin/python deploy/quickstart.py` after `bash scripts/setup`;
it needs no root. (`bash scripts/demo` runs the namespace lab instead.)
"""

from __future__ import annotations

import argparse
import collections
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype

from glb import config as configmod

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "examples" / "demo.yaml"
GLB = [sys.executable, "-m", "glb.cli", "--log-level", "warning"]


class Processes:
    """Children by name; stop() kills each by PID and waits for it."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> None:
        log = open(self.logdir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.logdir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
                raise SystemExit(f"demo: {name} exited with status {proc.returncode}: {' | '.join(tail)}")

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hold", type=float, default=None, help="keep everything running this many seconds at the end "
                    "(default: until Ctrl-C when run from a terminal, else 0)")
    args = ap.parse_args()
    cfg = configmod.load(CONFIG)
    run_dir = Path(tempfile.mkdtemp(prefix="glb-demo-"))
    procs = Processes(run_dir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return demo(cfg, procs, run_dir, args.hold)
    except KeyboardInterrupt:
        print("\nstopping")
        return 0
    finally:
        procs.stop_all()
        print(f"stopped every process; logs are in {run_dir}")


def demo(cfg: configmod.Config, procs: Processes, run_dir: Path, hold: float | None) -> int:
    redis_host, redis_port = cfg.redis.url.split("//")[1].split("/")[0].split(":")
    listen = cfg.dnsfront.listen[0]
    vip_site = {str(a): s.name for s in cfg.sites for a in s.vip_addresses("web")}
    servers = {str(rs.address): s.name for s in cfg.sites for rs in s.services[0].real_servers}

    step(f"starting redis-server on {redis_host}:{redis_port}")
    procs.start("redis", ["redis-server", "--bind", redis_host, "--port", redis_port, "--save", "",
                          "--appendonly", "no", "--dir", str(run_dir)])
    step(f"starting real servers {', '.join(servers)} (HTTP on port 8080)")
    for addr, site in servers.items():
        start_real_server(procs, run_dir, addr, site)
    for site in cfg.sites:
        step(f"starting the director of {site.name}: glb director --config {CONFIG.relative_to(ROOT)} --site {site.name}")
        procs.start(f"director-{site.name}", GLB + ["director", "--config", str(CONFIG), "--site", site.name])
    step(f"starting dnsfront on {listen}: glb dnsfront --config {CONFIG.relative_to(ROOT)}")
    procs.start("dnsfront", GLB + ["dnsfront", "--config", str(CONFIG)])

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        procs.check()
        counts, _ = sample(listen, vip_site, 10)
        if len(counts) == 2:
            break
        time.sleep(0.3)
    else:
        raise SystemExit("demo: dnsfront did not answer with both sites within 30 s (logs: %s)" % run_dir)

    t0 = time.monotonic()
    print("\n  time   answers for app.example.net (40 queries)      ttl")
    timeline(procs, listen, vip_site, t0, 3.0)

    event(t0, "stopping every real server of dc1")
    for addr, site in servers.items():
        if site == "dc1":
            procs.stop(f"rs-{addr}")
    fault = time.monotonic()
    moved = timeline(procs, listen, vip_site, t0, 15.0, until=lambda c: c and "dc1" not in c, settle=2.0)
    if moved is None:
        raise SystemExit("demo: DNS still answered dc1 15 s after its servers stopped")
    event(t0, f"DNS stopped answering dc1 {moved - fault:.2f} s after its servers stopped")

    event(t0, "starting dc1's real servers again")
    for addr, site in servers.items():
        if site == "dc1":
            start_real_server(procs, run_dir, addr, site)
    back = time.monotonic()
    returned = timeline(procs, listen, vip_site, t0, 15.0, until=lambda c: "dc1" in c, settle=2.0)
    if returned is None:
        raise SystemExit("demo: dc1 did not come back within 15 s")
    event(t0, f"dc1 answered again {returned - back:.2f} s after its servers came back")

    print()
    subprocess.run(GLB + ["status", "--config", str(CONFIG)], cwd=ROOT, check=False)
    if hold is None:
        hold = float("inf") if sys.stdin.isatty() else 0.0
    if hold > 0:
        print(f"\nGLB is still running. Try:\n  dig @{listen.host} -p {listen.port} app.example.net"
              f"\n  .venv/bin/glb status --config {CONFIG.relative_to(ROOT)}"
              f"\n  curl http://{cfg.dnsfront.status_listen}/status"
              "\nCtrl-C stops everything.")
        end = time.monotonic() + hold
        while time.monotonic() < end:
            procs.check()
            time.sleep(1)
    return 0


def start_real_server(procs: Processes, run_dir: Path, addr: str, site: str) -> None:
    docroot = run_dir / f"www-{addr}"
    docroot.mkdir(exist_ok=True)
    (docroot / "index.html").write_text(f"served by {addr} in {site}\n")
    procs.start(f"rs-{addr}", [sys.executable, "-m", "http.server", "--bind", addr, "--directory", str(docroot), "8080"])


def sample(listen: configmod.ListenAddress, vip_site: dict[str, str], n: int) -> tuple[collections.Counter, set[int]]:
    """Ask dnsfront n times; count answers per site."""
    counts: collections.Counter = collections.Counter()
    ttls: set[int] = set()
    for _ in range(n):
        q = dns.message.make_query("app.example.net", dns.rdatatype.A)
        try:
            r = dns.query.udp(q, listen.host, port=listen.port, timeout=0.5)
        except Exception:  # noqa: BLE001 - a lost or refused query is a data point in the timeline
            counts["no answer"] += 1
            continue
        for rrset in r.answer:
            ttls.add(rrset.ttl)
            for rd in rrset:
                counts[vip_site.get(rd.address, rd.address)] += 1
    return counts, ttls


def timeline(procs, listen, vip_site, t0: float, duration: float, until=None, settle: float = 0.0) -> float | None:
    """Print a line per sample; with ``until``, return when it first held (after ``settle`` more seconds)."""
    end = time.monotonic() + duration
    hit = None
    while time.monotonic() < end:
        procs.check()
        counts, ttls = sample(listen, vip_site, 40)
        now = time.monotonic()
        shares = "  ".join(f"{site} {n * 100 // 40:3d}%" for site, n in sorted(counts.items()))
        print(f"  {now - t0:5.1f}s {shares:<45} {','.join(map(str, sorted(ttls)))}")
        if until is not None and hit is None and until(counts):
            hit = now
            end = min(end, now + settle)
        time.sleep(0.25)
    return hit if until is not None else end


def step(text: str) -> None:
    print(f"- {text}")


def event(t0: float, text: str) -> None:
    print(f"  {time.monotonic() - t0:5.1f}s  >>> {text}")


if __name__ == "__main__":
    sys.exit(main())
