"""The failover benchmark (run it through benchmarks/failover.sh): how fast GLB moves clients off a dead site.

Builds the lab (deploy/lab: namespaces glb-bench-*, state in /run/glb-bench),
then over N trials:

1. clients on the lab's client host send requests at a fixed rate (open loop,
   so a hanging request never slows the rate): each resolves a name through
   the resolver (unbound, which caches for the TTL) and fetches http://VIP/;
   a poller asks both dnsfront instances directly every 10 ms;
2. after a random delay (so the fault lands anywhere in the resolver's TTL),
   the fault: every real server of dc1 killed (SIGKILL), or with
   ``--fault director`` dc1's director killed;
3. measured from the fault: when dnsfront's answer lost dc1 (both
   instances); when the resolver's answer lost dc1; when the client that
   uses one address and honours TTLs (api.example.net: failover, one VIP per
   answer) was served again; the share of that client's requests that
   failed in the window after the fault; the same share for a client that
   tries the answer's second address (app.example.net, two VIPs per answer);
   with ``--fault servers``, when dc1's director marked the last of its
   servers down (the ``since`` of each on its /status, read after the
   window), and the single-address client's failures split at that moment:
   from then on dc1's director spills its new connections to dc2 (issue 16),
   so a failure after it is a spill failure. The mark is the director's
   decision (its clock as it recorded the check that made the last server
   down; it arms the packet workers' spill flag in the same call, the plan
   follows), converted to this process's monotonic clock through the
   (monotonic, wall) pair read at the fault. A request is placed by when it
   began connecting to the VIP (its SYN), not when it was scheduled: it
   resolves the name first, and the pool may start it late;
4. dc1 restored; wait until the resolver answers dc1 again.

With ``--fault director`` and a director pair at dc1 (the lab's default),
the active member is the one killed, and each trial also reports: seconds
from the kill until a new connection to dc1's VIP is served (the standby
forwarding: the start of the first successful attempt of one made every
20 ms, each given 0.5 s, less than TCP's first SYN retransmission, so an
attempt only succeeds if its first SYN got through); how many of 50
long-lived HTTP/1.1 connections opened before the kill still answer on the
same TCP connection after the window; and whether DNS changed at all.

Prints each trial and min / median / max. Without a director packet path
(fetching through a VIP impossible) it measures the DNS side only and says so.
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deploy.lab import net, probe  # noqa: E402
from deploy.lab import topology as topo  # noqa: E402
from deploy.lab.lab import Lab  # noqa: E402
from deploy.lab.net import LabError  # noqa: E402

SINGLE = f"api.{topo.ZONE}"    # failover, one VIP per answer: the client has no fallback
FALLBACK = f"app.{topo.ZONE}"  # failover, two VIPs per answer: the client tries the second


@dataclass
class Sample:
    sent: float
    ok: bool
    dc1: bool  # the request went to dc1's VIP first
    error: str = ""
    """Why it failed (the last address tried), for the failures after dc1's mark."""
    connect: float = 0.0
    """When it began connecting to its first address (its SYN), ``sent`` if it never did (DNS failed)."""


@dataclass
class Trial:
    fault: str
    fault_at: float = 0.0
    takeover: float | None = None
    """--fault director with a pair: seconds until dc1's VIP served a new connection again."""
    held: int = 0
    survived: int = 0
    """Long-lived connections opened before the fault, and those still answering after the window."""
    dnsfront: float | None = None
    resolver: float | None = None
    client_back: float | None = None
    marked: float | None = None
    """Seconds after the fault when dc1's director marked its last server down (--fault servers)."""
    ahead: int | None = None
    """New connections dc1's director spilled on its spill flag, before its plan said so (--fault servers)."""
    drops: dict = field(default_factory=dict)
    """dc1's director's packet path drops by reason, since it started (--fault servers)."""
    single: list[Sample] = field(default_factory=list)
    fallback: list[Sample] = field(default_factory=list)

    def share_failed(self, which: str, start: float, window: float) -> tuple[int, int]:
        samples = [s for s in getattr(self, which) if start <= s.sent < start + window]
        return sum(not s.ok for s in samples), len(samples)

    def split_failed(self, which: str, start: float, window: float, mark: float) -> tuple[tuple[int, int], ...]:
        """(failed, requests) of those sent in the window that began connecting before ``mark``, after it,
        and after it to dc1's VIP (spill's: the others went to dc2's VIP once the resolver's answer changed)."""
        samples = [s for s in getattr(self, which) if start <= s.sent < start + window]
        after = [s for s in samples if s.connect >= mark]
        parts = ([s for s in samples if s.connect < mark], after, [s for s in after if s.dc1])
        return tuple((sum(not s.ok for s in part), len(part)) for part in parts)


class Load:
    """Open-loop clients and the dnsfront poller, each in the client namespace (setns is per thread)."""

    def __init__(self, lab: Lab, rate: float, vip_ok: bool):
        self.lab = lab
        self.rate = rate
        self.vip_ok = vip_ok
        self.dc1 = lab.sites["dc1"].vips[0]
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=128)  # failing requests wait up to their 1 s timeout
        self.trial: Trial | None = None
        self.fault_at: float | None = None
        self.lock = threading.Lock()

    def request(self, name: str, fallback: bool, sent: float) -> None:
        with self.lab.inside("client"):
            att = probe.request(topo.RESOLVER, name, fallback=fallback, connect_timeout=1.0) if self.vip_ok \
                else probe.Attempt(sent, probe.resolve(topo.RESOLVER, name))
        first_dc1 = bool(att.answer.addresses) and att.answer.addresses[0] == self.dc1
        if self.vip_ok:
            ok = att.ok
        else:  # DNS only: count a request as failed when its answer sent it to the dead site first
            ok = att.answer.ok and not (first_dc1 and self.fault_at is not None)
        with self.lock:
            trial, fault = self.trial, self.fault_at
            if trial is None:
                return
            error = "" if ok or not att.tries else f"{att.tries[-1].address}: {att.tries[-1].error}"
            connect = att.tries[0].started if att.tries else sent
            (trial.fallback if fallback else trial.single).append(Sample(sent, ok, first_dc1, error, connect))
            if fault is None or sent < fault:
                return
            if not fallback and trial.resolver is None and att.answer.ok and self.dc1 not in att.answer.addresses:
                trial.resolver = att.at - fault  # when the query was asked (the pool may start a request late)
            if not fallback and trial.client_back is None and ok and not first_dc1 and self.vip_ok:
                trial.client_back = time.monotonic() - fault

    def clients(self) -> None:
        period = 1.0 / self.rate
        nxt = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            self.pool.submit(self.request, SINGLE, False, now)
            self.pool.submit(self.request, FALLBACK, True, now)
            nxt += period
            time.sleep(max(0.0, nxt - time.monotonic()))

    def poller(self) -> None:
        with self.lab.inside("client"):
            while not self.stop.is_set():
                answers = [probe.resolve(a, SINGLE, rd=False, timeout=0.3) for a in topo.DNSFRONTS.values()]
                now = time.monotonic()
                with self.lock:
                    t, fault = self.trial, self.fault_at
                    if t is not None and fault is not None and t.dnsfront is None and all(
                            a.ok and a.addresses and self.dc1 not in a.addresses for a in answers):
                        t.dnsfront = now - fault
                time.sleep(0.01)

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self.clients, daemon=True),
                        threading.Thread(target=self.poller, daemon=True)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        self.pool.shutdown(wait=True, cancel_futures=True)


def wait_resolver_dc1(lab: Lab, timeout: float = 30.0) -> None:
    """Until the resolver's answer for the single-address name is dc1 again (its cached dc2 answer expired)."""
    deadline = time.monotonic() + timeout
    dc1 = lab.sites["dc1"].vips[0]
    with lab.inside("client"):
        while probe.resolve(topo.RESOLVER, SINGLE).addresses != [dc1]:
            if time.monotonic() > deadline:
                raise LabError("the resolver did not return to dc1")
            time.sleep(0.2)


LONG_LIVED = 50


def synced(lab: Lab, role: str) -> int:
    """Flows in the packet path of the director on ``role`` (a backup's come from sync)."""
    return ((lab.director_status(role) or {}).get("packet_path") or {}).get("connections", 0)


def settle_pair(lab: Lab, roles: list[str], timeout: float = 30.0) -> tuple[str, str]:
    """(master, backup) once the pair has one of each, and with preempt the preferred member is master
    (a restored primary takes the VIPs back after preempt_delay: a trial must not kill it mid-handback)."""
    pair = lab.config.site("dc1").director.pair
    best = max(pair.members, key=lambda m: m.priority).id
    preferred = next(r for r, m in topo.director_roles(lab.config.site("dc1")).items() if m == best)
    deadline = time.monotonic() + timeout
    while True:
        seen = {r: lab.pair_role(r) for r in roles}
        masters = [r for r, v in seen.items() if v == "master"]
        if len(masters) == 1 and all(v == "backup" for r, v in seen.items() if r != masters[0]) and (
                not pair.preempt or masters[0] == preferred):
            return masters[0], next(r for r in roles if r != masters[0])
        if time.monotonic() > deadline:
            raise LabError(f"dc1's director pair did not settle: {seen}")
        time.sleep(0.1)


class LongLived:
    """HTTP/1.1 connections to a VIP, opened in the client namespace; ``round()`` asks on each."""

    def __init__(self, lab: Lab, vip: str, port: int, n: int) -> None:
        import http.client

        self.conns = []
        with lab.inside("client"):
            for _ in range(n):
                c = http.client.HTTPConnection(vip, port, timeout=5)
                c.connect()
                self.conns.append(c)
        self.ports = [c.sock.getsockname()[1] for c in self.conns]

    def round(self) -> int:
        """Connections that answered on their original TCP connection."""
        ok = 0
        for c, port in zip(self.conns, self.ports):
            try:
                if c.sock is None or c.sock.getsockname()[1] != port:
                    continue
                c.request("GET", "/")
                c.getresponse().read()
                ok += c.sock is not None and c.sock.getsockname()[1] == port
            except (OSError, Exception):
                c.close()
        return ok

    def close(self) -> None:
        for c in self.conns:
            c.close()


def watch_takeover(lab: Lab, vip: str, port: int, since: float, out: Trial, stop: threading.Event) -> None:
    """Start a connection attempt every 20 ms; the first that succeeds marks the standby forwarding."""
    def attempt(started: float) -> None:
        with lab.inside("client"):
            f = probe.fetch(vip, port, timeout=0.5)
        if f.ok and out.takeover is None:
            out.takeover = started - since
            stop.set()

    with ThreadPoolExecutor(max_workers=40) as pool:
        while not stop.is_set() and time.monotonic() - since < 10:
            pool.submit(attempt, time.monotonic())
            time.sleep(0.02)


def run_trial(lab: Lab, load: Load, fault: str, window: float, rng: random.Random) -> Trial:
    lab.restore()
    wait_resolver_dc1(lab)
    trial = Trial(fault)
    roles = list(topo.director_roles(lab.config.site("dc1")))
    pair = fault == "director" and len(roles) > 1
    held = None
    if pair:
        active, standby = settle_pair(lab, roles)
        site = lab.sites["dc1"]
        held = LongLived(lab, site.vips[0], site.port, LONG_LIVED)
        trial.held = held.round()
        deadline = time.monotonic() + 20
        while synced(lab, standby) < LONG_LIVED and time.monotonic() < deadline:
            time.sleep(0.1)
    with load.lock:
        load.trial, load.fault_at = trial, None
    time.sleep(1.0 + rng.uniform(0, 5.0))  # land anywhere in the resolver's 5 s TTL
    if fault == "servers":
        victims = [f"{role}-httpd" for role in lab.sites["dc1"].real_servers]
    else:
        victims = [active if pair else "dc1-director"]
    procs = [lab.state["processes"][n] for n in victims]
    at, wall = time.monotonic(), time.time()
    for p in procs:
        net.signal_pid(p["pid"], p["started"], signal.SIGKILL)
    with load.lock:
        load.fault_at = at
    trial.fault_at = at
    watcher = None
    if pair:
        stop = threading.Event()
        watcher = threading.Thread(target=watch_takeover,
                                   args=(lab, lab.sites["dc1"].vips[0], lab.sites["dc1"].port, at, trial, stop),
                                   daemon=True)
        watcher.start()
    time.sleep(window + 1.5)  # requests sent in the window get up to their timeout to finish
    with load.lock:
        load.trial = None
    if fault == "servers":
        doc = dc1_status(lab)
        marked = marked_down_at(doc)
        trial.marked = marked - wall if marked is not None else None
        trial.ahead = ((doc or {}).get("packet_path") or {}).get("spilled_ahead")
        trial.drops = ((doc or {}).get("packet_path") or {}).get("drops") or {}
    if watcher is not None:
        watcher.join(5)
    if held is not None:
        trial.survived = held.round()
        held.close()
    for name in victims:
        lab.state["processes"][name]["stopped"] = True  # lab.restore() starts them again
    return trial


def dc1_status(lab: Lab) -> dict | None:
    """dc1's (active) director's /status, or None."""
    try:
        with lab.inside("ops"):
            status, doc = probe.http_json(topo.DIRECTORS["dc1"], lab.sites["dc1"].status_port, "/status")
    except OSError:
        return None
    return doc if status == 200 and isinstance(doc, dict) else None


def marked_down_at(doc: dict | None) -> float | None:
    """Wall-clock time dc1's director marked the last of its real servers down (``doc``: its /status), or None."""
    if doc is None:
        return None
    servers = [rs for svc in doc["services"] for rs in svc["real_servers"]]
    if not servers or any(rs["state"] != "down" for rs in servers):
        return None
    return max(rs["since"] for rs in servers)


def split_at_mark(t: Trial, window: float) -> tuple[tuple[int, int], ...] | None:
    """The single-address client's (failed, sent) before and after dc1's servers were marked down, and
    after it to dc1's VIP, within ``window`` s of the fault; None without a mark."""
    if t.marked is None:
        return None
    return t.split_failed("single", t.fault_at, window, t.fault_at + t.marked)


def summarize(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "      -        -        -"
    return f"{min(vals):7.2f}  {statistics.median(vals):7.2f}  {max(vals):7.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--trials", type=int, default=5)
    ap.add_argument("--fault", choices=["servers", "director"], default="servers",
                    help="kill every real server of dc1 (default) or dc1's director")
    ap.add_argument("--rate", type=float, default=20.0, help="requests/s of each client (default 20)")
    ap.add_argument("--window", type=float, default=10.0, help="seconds after the fault over which failures are counted")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--prefix", default="glb-bench-", help="the lab's namespace prefix (default glb-bench-)")
    ap.add_argument("--state-dir", default="/run/glb-bench", help="the lab's state directory (default /run/glb-bench)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)

    t0 = time.monotonic()
    lab = Lab(prefix=args.prefix, state_dir=Path(args.state_dir),
              log=lambda m: print(f"[{time.monotonic() - t0:5.1f}s] {m}", flush=True))
    if lab.is_up():
        lab.log("a benchmark lab was left over: removing it")
        lab.down()
    cfg = lab.config
    hc = cfg.site("dc1").services[0].health_check
    single = next(n for n in cfg.names if n.name == SINGLE + ".")
    try:
        summary = lab.up()
        vip_ok = all(v and v.startswith("ok") for v in summary["vip_path"].values())
        pair = len(topo.director_roles(cfg.site("dc1"))) > 1
        what = "every real server of dc1 killed" if args.fault == "servers" else \
            "dc1's active director killed (a pair: its standby takes over)" if pair else "dc1 director killed"
        print(f"\nfault: {what}; "
              f"health checks every {hc.interval} s, timeout {hc.timeout} s, fall {hc.fall}; heartbeat "
              f"{cfg.site('dc1').director.heartbeat} s, stale_after {cfg.redis.stale_after} s; TTL {single.ttl} s; "
              f"{args.rate:g} requests/s per client; failures counted over {args.window:g} s after the fault")
        if not vip_ok:
            print("NOTE: no forwarding through the VIPs (the director's packet path is missing): DNS only. "
                  "'failed' counts requests whose answer sent them to dc1 first.")
        trials = []
        with Load(lab, args.rate, vip_ok) as load:
            for i in range(args.trials):
                t = run_trial(lab, load, args.fault, args.window, rng)
                trials.append(t)
                f1, n1 = t.share_failed("single", t.fault_at, args.window)
                f2, n2 = t.share_failed("fallback", t.fault_at, args.window)
                line = (f"trial {i + 1}: dnsfront answer changed {fmt(t.dnsfront)}, resolver answer {fmt(t.resolver)}; "
                        f"failed: single-address {f1}/{n1} ({pct(f1, n1)})")
                if vip_ok:
                    line += (f", with fallback {f2}/{n2} ({pct(f2, n2)}); single-address client served again "
                             f"{fmt(t.client_back)}")
                split = split_at_mark(t, args.window)
                if split is not None:
                    (b, nb), (a, na), (a1, na1) = split
                    line += (f"; dc1 marked its servers down {fmt(t.marked)}: single-address failed {b}/{nb} "
                             f"before, {a}/{na} after ({a1}/{na1} to dc1's VIP); spilled ahead of the plan "
                             f"(dc1's total) {t.ahead}; its drops {t.drops}")
                    mark = t.fault_at + t.marked
                    late = [f"{s.error} connecting {1000 * (s.connect - mark):.1f} ms after" for s in t.single
                            if not s.ok and s.connect >= mark and t.fault_at <= s.sent < t.fault_at + args.window]
                    if late:
                        line += f" ({'; '.join(late)})"
                if args.fault == "director" and pair:
                    line += (f"; standby forwarding {fmt(t.takeover)}; long-lived connections survived "
                             f"{t.survived}/{t.held}; DNS {'unchanged' if dns_unchanged(t) else 'CHANGED'}")
                print(line, flush=True)
        lab.restore()
        print(f"\n{args.trials} trials, seconds after the fault      min   median      max")
        print(f"  dnsfront's answer changed (both)     {summarize([t.dnsfront for t in trials])}")
        print(f"  resolver's answer changed            {summarize([t.resolver for t in trials])}")
        if vip_ok:
            print(f"  single-address client served again  {summarize([t.client_back for t in trials])}")
        if args.fault == "servers":
            print(f"  dc1's director marked servers down  {summarize([t.marked for t in trials])}")
        shares = [share(t, 'single', t.fault_at, args.window) for t in trials]
        print(f"  failed requests, single-address (%)  {summarize(shares)}")
        if vip_ok:
            fb = [share(t, 'fallback', t.fault_at, args.window) for t in trials]
            print(f"  failed requests, with fallback (%)   {summarize(fb)}")
        splits = [split_at_mark(t, args.window) for t in trials]
        if any(sp is not None for sp in splits):
            before = [sp[0][0] if sp else None for sp in splits]
            after = [sp[1][0] if sp else None for sp in splits]
            after1 = [sp[2][0] if sp else None for sp in splits]
            print(f"  single-address failed before mark    {summarize(before)}   (requests)")
            print(f"  single-address failed after mark     {summarize(after)}   (requests)")
            print(f"    of which to dc1's VIP              {summarize(after1)}   (requests; spill serves them)")
        if args.fault == "director" and pair:
            print(f"  standby forwarding (s)               {summarize([t.takeover for t in trials])}")
            print(f"  long-lived connections survived (%)  "
                  f"{summarize([100.0 * t.survived / t.held if t.held else None for t in trials])}")
            print(f"  DNS unchanged in                     {sum(dns_unchanged(t) for t in trials)} of {len(trials)} trials")
        return 0
    finally:
        lab.down()


def dns_unchanged(t: Trial) -> bool:
    """Neither dnsfront nor the resolver ever answered without dc1 after the fault."""
    return t.dnsfront is None and t.resolver is None


def share(t: Trial, which: str, start: float, window: float) -> float | None:
    f, n = t.share_failed(which, start, window)
    return 100.0 * f / n if n else None


def fmt(v: float | None) -> str:
    return f"{v:.2f} s" if v is not None else "-"


def pct(f: int, n: int) -> str:
    return f"{100.0 * f / n:.1f}%" if n else "-"


if __name__ == "__main__":
    sys.exit(main())
