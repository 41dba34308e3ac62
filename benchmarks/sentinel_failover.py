"""Redis failover through Sentinel, end to end: how long GLB's tiers take to follow.

On loopback free ports: a Redis master, one replica, three Sentinels
(``redis-server --sentinel``; quorum 2, ``down-after-milliseconds`` 1000,
``failover-timeout`` 3000), two
directors (``glb director``, control plane only on lo, publishing every 0.5 s)
and one ``glb dnsfront``, all found through Sentinel. An operator's override is
written (and acknowledged by the replica) first. Then the master is SIGKILLed
while a poller asks dnsfront every 20 ms and the directors and dnsfront are
watched through their /status. Measured from the kill:

* ``promoted``: the first Sentinel naming the replica as master;
* ``director <site>``: the director's first publication to the new master;
* ``dnsfront``: dnsfront's first full load from the new master;
* the DNS answers throughout: any change of the answer set (a flap), any
  query without an answer;
* the override, read from the new master and as dc1's director applies it.

Every process is started here and killed by its PID at the end, even on failure.
Run: ``.venv/bin/python benchmarks/sentinel_failover.py [--trials N]``; prints
each trial and min / median / max. tests/glb/test_sentinel_failover.py runs one
trial and checks the outcome.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.ports import free_ports  # noqa: E402
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
SERVICE = "glbmaster"
VIPS = {"dc1": "192.0.2.10", "dc2": "192.0.2.20"}
NAME = "app.example.net"
DOWN_AFTER_MS = 1000
RESYNC = 10.0
"""dnsfront's and the directors' ``redis.resync_interval`` (the default)."""


def redis_command(port: int, *args: str, timeout: float = 0.5) -> str:
    """One command in RESP, the reply as text (no client library: the harness judges the client)."""
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload.encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            data += chunk
            if not chunk or _complete(data):
                return data.decode(errors="replace")


def resp_value(text: str) -> object:
    """A reply of ``redis_command`` as Python values (arrays as lists; no value here holds CR LF)."""
    lines = iter(text.split("\r\n"))

    def one() -> object:
        line = next(lines)
        kind, rest = line[:1], line[1:]
        if kind == "*":
            return None if int(rest) < 0 else [one() for _ in range(int(rest))]
        if kind == "$":
            return None if int(rest) < 0 else next(lines)
        return int(rest) if kind == ":" else rest

    return one()


def _complete(data: bytes) -> bool:
    try:
        return _parse(data, 0) is not None
    except (ValueError, IndexError):
        return False


def _parse(data: bytes, i: int) -> int | None:
    """The index after one RESP value at ``i``, or None if incomplete."""
    end = data.find(b"\r\n", i)
    if end < 0:
        return None
    kind, head = data[i:i + 1], data[i + 1:end]
    if kind in (b"+", b"-", b":"):
        return end + 2
    if kind == b"$":
        n = int(head)
        return end + 2 if n < 0 else (end + 2 + n + 2 if len(data) >= end + 2 + n + 2 else None)
    if kind == b"*":
        j: int | None = end + 2
        for _ in range(max(int(head), 0)):
            j = _parse(data, j) if j is not None else None
            if j is None:
                return None
        return j
    raise ValueError(kind)


def http_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.load(r)


# --------------------------------------------------------------------------
# The processes


@dataclass
class Processes:
    """Everything started, killed by PID (never by name) in ``stop``."""

    workdir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **(env or {})})
        log.close()
        self.procs[name] = proc
        return proc

    def running(self) -> bool:
        """True while every process runs; RuntimeError naming the first that exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: {self.log(name)[-600:]}")
        return True

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")


def wait(predicate, what: str, timeout: float, step: float = 0.02):
    """``predicate()``'s first true value; OSError (not listening yet) counts as not yet."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except OSError as e:
            last = e  # an exception is truthy: it must not end the wait
        else:
            if last:
                return last
        time.sleep(step)
    raise TimeoutError(f"{what}: not within {timeout:g} s (last: {last!r})")


class Cluster:
    """A master, a replica, three Sentinels and GLB's processes, on loopback."""

    def __init__(self, workdir: Path, log_level: str = "info"):
        self.workdir = workdir
        self.log_level = log_level
        """GLB's processes' --log-level (debug: the follower's ages at each load and loss, dnsfront's site conditions)."""
        self.p = Processes(workdir)
        ports = free_ports(9)
        self.master, self.replica = ports[0], ports[1]
        self.sentinels = ports[2:5]
        self.director_status = dict(zip(VIPS, ports[5:7]))
        self.dns_port, self.dns_status = ports[7], ports[8]
        self.config = workdir / "glb.yaml"
        self.last_ttl: int | None = None
        """The TTL of the last answer (a degraded TTL says dnsfront judged a site not fully up)."""
        # The real servers' health: a listener that accepts and closes, in the
        # kernel's backlog first, so a loaded machine cannot fail the checks.
        self.backend = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.backend_port = self.backend.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.backend.accept()
            except OSError:
                return  # closed by stop()
            conn.close()

    # -- Redis and Sentinel

    def _redis(self, name: str, port: int, *extra: str) -> None:
        self.p.start(name, [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--dir", str(self.workdir), "--loglevel", "warning", *extra])
        wait(lambda: redis_command(port, "PING").startswith("+PONG"), f"{name} to answer PING", 10)

    def start_redis(self) -> None:
        # No diskless-sync delay: the replica's first sync starts at once, not 5 s later.
        self._redis("master", self.master, "--repl-diskless-sync-delay", "0")
        self._redis("replica", self.replica, "--replicaof", "127.0.0.1", str(self.master))
        wait(lambda: "master_link_status:up" in redis_command(self.replica, "INFO", "replication"),
             "the replica to sync", 10)
        for i, port in enumerate(self.sentinels):
            conf = self.workdir / f"sentinel{i}.conf"  # Sentinel rewrites its file: one each
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master} 2\n"
                            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                            f"sentinel failover-timeout {SERVICE} 3000\n"
                            f"sentinel parallel-syncs {SERVICE} 1\n")
            self.p.start(f"sentinel{i}", [REDIS_SERVER, str(conf), "--sentinel", "--loglevel", "warning"])
        for port in self.sentinels:
            wait(lambda port=port: self.sentinel_ready(port),
                 f"sentinel on {port} to know the synced replica and the other sentinels", 30, 0.1)

    def sentinel_ready(self, port: int) -> bool:
        """The Sentinel on ``port`` can lead a failover to the replica: it knows
        the two other Sentinels, and it knows the replica (from the master's
        INFO, asked every 10 s) and has read the replica's own INFO (its run id)
        with the link to the master up. A Sentinel started before the replica
        had synced learns of it only at the master's next INFO: a kill before
        that leaves it no replica to promote (no promotion at all), and one
        that has not read the replica's INFO aborts with no-good-slave."""
        sentinels = resp_value(redis_command(port, "SENTINEL", "SENTINELS", SERVICE))
        replicas = resp_value(redis_command(port, "SENTINEL", "REPLICAS", SERVICE))
        known = [dict(zip(r[::2], r[1::2])) for r in replicas] if isinstance(replicas, list) else []
        return isinstance(sentinels, list) and len(sentinels) >= 2 and any(
            r.get("port") == str(self.replica) and r.get("runid") and r.get("master-link-status") == "ok"
            and "disconnected" not in str(r.get("flags")) for r in known)

    def masters(self) -> set[int]:
        """The master's port as each answering Sentinel names it now."""
        out = set()
        for port in self.sentinels:
            try:
                lines = redis_command(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE).split("\r\n")
            except OSError:
                continue
            if len(lines) >= 5 and lines[4].isdigit():
                out.add(int(lines[4]))
        return out

    def replica_view(self) -> str:
        """One line: each Sentinel's view of the replica (what its failover's choice of replica reads)."""
        keep = ("name", "runid", "flags", "link-pending-commands", "last-ping-sent", "last-ok-ping-reply",
                "info-refresh", "master-link-down-time", "master-link-status", "role-reported", "slave-priority")
        views = []
        for i, port in enumerate(self.sentinels):
            try:
                replicas = resp_value(redis_command(port, "SENTINEL", "REPLICAS", SERVICE))
            except OSError as e:
                views.append(f"s{i} {e}")
                continue
            if not isinstance(replicas, list):
                views.append(f"s{i} {replicas!r}")
                continue
            known = [dict(zip(r[::2], r[1::2])) for r in replicas]
            views.append(f"s{i} " + (", ".join(" ".join(f"{k}={r.get(k)}" for k in keep) for r in known)
                                     or "no replica known"))
        return " | ".join(views)

    # -- GLB

    def write_config(self) -> None:
        sentinels = ", ".join(f'"127.0.0.1:{p}"' for p in self.sentinels)
        sites = "".join(f"""
  {site}:
    director: {{interface: lo, id: {site}-director, status_listen: "127.0.0.1:{self.director_status[site]}",
               heartbeat: 0.5}}
    services:
      - name: web
        vips: ["{vip}:80/tcp"]
        real_servers: [127.0.0.1]
        health_check: {{type: tcp, port: {self.backend_port}, interval: 0.5, timeout: 0.5, fall: 6}}
""" for site, vip in VIPS.items())
        self.config.write_text(f"""
redis:
  url: "redis:///0"
  sentinel: {{service: {SERVICE}, addresses: [{sentinels}]}}
  timeout: 0.5
  stale_after: 3.0
  resync_interval: {RESYNC}
dnsfront:
  listen: ["127.0.0.1:{self.dns_port}"]
  status_listen: "127.0.0.1:{self.dns_status}"
zones:
  - apex: example.net
    soa: {{mname: ns1.example.net, rname: hostmaster@example.net}}
    ns: [{{name: ns1.example.net, addresses: [192.0.2.53]}}]
names:
  {NAME}:
    service: web
    policy: weighted
    answers: 2
    ttl: 5
    members: [dc1, dc2]
sites:{sites}""")

    def start_glb(self) -> None:
        self.write_config()
        glb = [sys.executable, "-m", "glb.cli", "--log-level", self.log_level]
        for site in VIPS:
            self.p.start(f"director-{site}", [*glb, "director", "--config", str(self.config), "--site", site])
        self.p.start("dnsfront", [*glb, "dnsfront", "--config", str(self.config)])
        wait(lambda: self.p.running() and self.both_live(), "dnsfront to judge both sites live", 30, 0.1)

    def live_sites(self) -> set[str]:
        """The sites dnsfront judges live for NAME now (its /status)."""
        for n in http_json(self.dns_status, "/status")["names"]:
            if n["name"].rstrip(".") == NAME and "ipv4" in n:
                return {m["site"] for m in n["ipv4"]["members"] if m["live"]}
        return set()  # being rebuilt

    def both_live(self) -> bool:
        """Both sites live in dnsfront's judgment, and answered. An answer of
        both addresses alone is no baseline: with no site live yet (the
        directors' first health checks still rising) dnsfront answers every
        member (fail-open), then the first site up alone, then both: a "flap"
        in the first second of polling that no failover caused."""
        return self.live_sites() == set(VIPS) and self.answer() == frozenset(VIPS.values())

    def answer(self) -> frozenset[str] | None:
        """The A records dnsfront answers for NAME now; None without an answer."""
        q = dns.message.make_query(NAME, "A")
        try:
            r = dns.query.udp(q, "127.0.0.1", port=self.dns_port, timeout=0.5)
        except (dns.exception.Timeout, OSError):
            return None
        a = [rrset for rrset in r.answer if rrset.rdtype == dns.rdatatype.A]
        self.last_ttl = a[0].ttl if a else None
        return frozenset(rr.address for rrset in a for rr in rrset)

    def director(self, site: str) -> dict:
        return http_json(self.director_status[site], "/status")["redis"]

    def dnsfront(self) -> dict:
        return http_json(self.dns_status, "/status")["redis"][0]

    def stop(self) -> None:
        self.p.stop()
        self.backend.close()


# --------------------------------------------------------------------------
# One trial


@dataclass
class Trial:
    promoted: float
    directors: dict[str, float]
    dnsfront: float
    queries: int
    unanswered: int
    answer_sets: list[frozenset[str]]
    override_kept: bool
    answer_times: list[float] = field(default_factory=list)
    """When each of ``answer_sets`` was first answered, in seconds from the kill (negative: before)."""
    answer_ttls: list[int | None] = field(default_factory=list)
    """The TTL of that first answer."""

    def answers(self) -> str:
        """The answer sets in order, each with when it was first answered."""
        return " -> ".join(f"{','.join(sorted(a))} at {at:+.2f} s (ttl {ttl})"
                           for a, at, ttl in zip(self.answer_sets, self.answer_times, self.answer_ttls))

    @property
    def flapped(self) -> bool:
        return len(set(self.answer_sets)) > 1


class Poller(threading.Thread):
    """Asks dnsfront every 20 ms; keeps every distinct answer set in order."""

    def __init__(self, cluster: Cluster):
        super().__init__(daemon=True)
        self.cluster = cluster
        self.stop_event = threading.Event()
        self.queries = self.unanswered = 0
        self.sets: list[frozenset[str]] = []
        self.times: list[float] = []
        self.ttls: list[int | None] = []
        """Wall clock of each of ``sets``' first answer."""

    def run(self) -> None:
        while not self.stop_event.is_set():
            got = self.cluster.answer()
            self.queries += 1
            if not got:
                self.unanswered += 1
            elif not self.sets or self.sets[-1] != got:
                self.sets.append(got)
                self.times.append(time.time())
                self.ttls.append(self.cluster.last_ttl)
            self.stop_event.wait(0.02)


def write_override(cluster: Cluster) -> str:
    """An operator's weight override, acknowledged by the replica (WAIT) before the fault."""
    env = {"GLB_REDIS_URL": ""}  # the config's Sentinel settings
    r = subprocess.run([sys.executable, "-m", "glb.cli", "weight", "--config", str(cluster.config), "--site", "dc1",
                        "--direct", "--service", "web", "--server", "127.0.0.1", "--who", "bench", "7"],
                       capture_output=True, text=True, cwd=ROOT, timeout=30, env={**os.environ, **env})
    if r.returncode != 0:
        raise RuntimeError(f"glb weight --direct failed: {r.stderr.strip()}")
    # A replica that is still (re)syncing right after start acknowledges nothing until it is done:
    # ask again for a while (the write stands; WAIT only says when the replica has it too).
    for _ in range(5):
        acked = redis_command(cluster.master, "WAIT", "1", "2000", timeout=5)
        if acked.strip() == ":1":
            break
    else:
        raise RuntimeError(f"the replica did not acknowledge the override in 10 s: {acked!r}")
    return "server:dc1/web/127.0.0.1:0"


def run_trial(workdir: Path, log_level: str = "info") -> Trial:
    cluster = Cluster(workdir, log_level)
    try:
        cluster.start_redis()
        cluster.start_glb()
        target = write_override(cluster)
        wait(lambda: all(cluster.director(s)["connected"] for s in VIPS) and cluster.dnsfront()["connected"],
             "every GLB process to follow the master", 10)
        # The baseline: both sites live and answered (a loaded machine may have needed a moment).
        wait(cluster.both_live, "dnsfront to judge both sites live", 10)
        poller = Poller(cluster)
        poller.start()
        time.sleep(1.0)  # a second of answers before the fault: the baseline
        versions = {s: wait(lambda s=s: cluster.director(s)["last_version"], f"director {s}'s /status", 10)
                    for s in VIPS}
        loads = wait(lambda: cluster.dnsfront()["full_loads"], "dnsfront's /status", 10)
        killed_at, killed_wall = time.monotonic(), time.time()
        cluster.p.kill("master")
        # The wall clock of the kill, next to the processes' logs (their debug lines are on that clock).
        (workdir / "trial.log").write_text(f"master killed at {killed_wall:.3f}\n")

        # What each Sentinel knew of the replica until one promoted it, for a failover that takes long.
        with open(workdir / "sentinel-view.log", "w") as view:
            def promoted_yet() -> float | bool:
                view.write(f"{time.time():.3f} {cluster.replica_view()}\n")
                return cluster.replica in cluster.masters() and time.monotonic()

            promoted = wait(promoted_yet, "a sentinel to promote the replica", 60, 0.1) - killed_at
        bound = promoted + RESYNC + 5.0  # the failover, one resync, the follower's longest backoff

        def director_follows(site: str) -> float | bool:
            st = cluster.director(site)
            # A publication after the kill that Redis accepted: only the replica is left to accept it.
            return st["connected"] and st["last_version"] != versions[site] and time.monotonic()

        directors = {s: wait(lambda s=s: director_follows(s), f"director {s} to publish to the new master",
                             bound, 0.01) - killed_at for s in VIPS}

        def dnsfront_follows() -> float | bool:
            st = cluster.dnsfront()
            return st["connected"] and st["full_loads"] > loads and time.monotonic()

        dnsfront = wait(dnsfront_follows, "dnsfront to load from the new master", bound, 0.01) - killed_at
        time.sleep(1.0)  # a second of answers after: the site must not go stale once followed
        poller.stop_event.set()
        poller.join(5)
        held = redis_command(cluster.replica, "HGET", "{glb}:overrides", target, timeout=5)
        # Kept in the new master, and still applied by dc1's director.
        web = wait(lambda: http_json(cluster.director_status["dc1"], "/status"), "director dc1's /status",
                   10)["services"][0]["real_servers"][0]
        return Trial(promoted, directors, dnsfront, poller.queries, poller.unanswered, poller.sets,
                     '"weight":7' in held and web["weight_override"] == 7,
                     [t - killed_wall for t in poller.times], poller.ttls)
    except BaseException:
        for name in cluster.p.procs:
            if name.startswith(("director", "dnsfront")):
                sys.stderr.write(f"--- {name} log (tail)\n{cluster.p.log(name)[-1500:]}\n")
        raise
    finally:
        cluster.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                    help="GLB processes' log level (debug traces what the followers saw)")
    ap.add_argument("--keep", type=Path, metavar="DIR",
                    help="keep each trial's logs and configs in DIR/trial-N (default: a temporary directory)")
    args = ap.parse_args()
    trials = []
    for n in range(args.trials):
        if args.keep is not None:
            workdir = args.keep / f"trial-{n + 1}"
            workdir.mkdir(parents=True, exist_ok=True)
            t = run_trial(workdir, args.log_level)
        else:
            with tempfile.TemporaryDirectory(prefix="glb-sentinel-") as tmp:
                t = run_trial(Path(tmp), args.log_level)
        trials.append(t)
        print(f"trial {n + 1}: promoted {t.promoted:.2f} s; directors "
              + ", ".join(f"{s} {v:.2f} s" for s, v in t.directors.items())
              + f"; dnsfront {t.dnsfront:.2f} s; {t.queries} queries, {t.unanswered} unanswered, "
              f"answer sets {len(set(t.answer_sets))} "
              f"({'FLAP: ' + t.answers() if t.flapped else 'steady'}); "
              f"override {'kept' if t.override_kept else 'LOST'}", flush=True)

    def stats(label: str, values: list[float]) -> None:
        print(f"{label:<22} min {min(values):.2f}  median {statistics.median(values):.2f}  max {max(values):.2f} s")

    stats("promoted", [t.promoted for t in trials])
    stats("directors followed", [max(t.directors.values()) for t in trials])
    stats("dnsfront followed", [t.dnsfront for t in trials])
    print(f"unanswered queries: {sum(t.unanswered for t in trials)} of {sum(t.queries for t in trials)}; "
          f"flaps: {sum(t.flapped for t in trials)}; overrides lost: {sum(not t.override_kept for t in trials)}")
    return 0 if all(not t.flapped and t.override_kept and not t.unanswered for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
