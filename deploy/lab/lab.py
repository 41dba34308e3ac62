"""The lab: build the network of :mod:`deploy.lab.topology`, start every process, tear it all down.

    lab = Lab()              # namespaces glb-lab-<role>, state in /run/glb-lab
    lab.up()                 # network, Redis, NSD, real servers, directors, dnsfront x2, unbound
    with lab.inside("client"):
        probe.request(topology.RESOLVER, "app.example.net")
    lab.stop_process("dc1-rs1-httpd")
    lab.down()               # also works from a fresh process: it reads the state file

Everything the lab creates is recorded in ``<state_dir>/state.json`` *as it
is created* (namespace names; processes with PID and start time, so a
recycled PID is never signalled), so :meth:`Lab.down` removes it all even
after a crash half-way through :meth:`Lab.up`, and from another shell.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from deploy.lab import net, probe, services
from deploy.lab import topology as topo
from deploy.lab.net import LabError

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "examples" / "lab.yaml"
DEFAULT_PREFIX = "glb-lab-"
DEFAULT_STATE_DIR = Path("/run/glb-lab")
RESOLV_ROLES = ("client", "ops")
OPS = "172.16.0.5"
"""The ops host's address (topology): the dashboard listens there."""
DASHBOARD_PORT = 9180
"""The dashboard's port on the ops host, and `python -m deploy.lab`'s default on the host's loopback
(through deploy.lab.forward). Other users of ``Lab`` (tests, benchmarks) get a free port there, so
their labs never clash with the demo's."""
HOST = "host"
"""The role name of the processes the lab runs in the host's own namespace (the dashboard's forwarder)."""
HOST_SYSCTLS = {
    # Replies leave real servers from the VIP through routers that did not see the request: no
    # reverse-path filtering anywhere (a host distribution may make it strict by default).
    "net.ipv4.conf.all.rp_filter": 0,
    "net.ipv4.conf.default.rp_filter": 0,
    # The core router forwards between hosts of one segment: no ICMP redirects, routes stay as built.
    "net.ipv4.conf.all.send_redirects": 0,
    "net.ipv4.conf.default.send_redirects": 0,
    # IPv4 only: no router solicitations or DAD noise on the lab's links.
    "net.ipv6.conf.all.disable_ipv6": 1,
    "net.ipv6.conf.default.disable_ipv6": 1,
}
ROUTER_SYSCTLS = {"net.ipv4.ip_forward": 1}  # namespaces that get /etc/netns/<ns>/resolv.conf -> the lab's resolver

Log = Callable[[str], None]


def glb_command() -> list[str]:
    """The real `glb` console script of this Python environment."""
    exe = Path(sys.executable).with_name("glb")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "glb.cli"]


def _quiet(_: str) -> None:
    pass


# The capabilities each long-running GLB process keeps in the lab: the same as
# its systemd unit (deploy/systemd), so the lab proves the units' limits work.
CAPABILITIES = {"director": ("net_raw", "net_admin", "bpf", "perfmon", "sys_admin"), "dnsfront": ("net_bind_service",)}
SETPRIV = shutil.which("setpriv")


def limited(caps: Sequence[str], argv: list[str]) -> list[str]:
    """``argv`` with every capability but ``caps`` dropped (bounding, inheritable and ambient sets)."""
    if SETPRIV is None:
        return argv
    keep = ",".join(f"+{c}" for c in caps)
    return [SETPRIV, f"--inh-caps=-all,{keep}", f"--ambient-caps=-all,{keep}", f"--bounding-set=-all,{keep}", *argv]


class Lab:
    def __init__(self, *, prefix: str = DEFAULT_PREFIX, state_dir: Path = DEFAULT_STATE_DIR,
                 config: Path = CONFIG, log: Log = _quiet, dashboard_port: int = 0):
        self.prefix = prefix
        self.dashboard_port = dashboard_port
        """The dashboard's port on the host's loopback; 0: a free one, chosen at ``up``."""
        self.state_dir = Path(state_dir)
        self.config_path = Path(config)
        self.log = log
        self.state_file = self.state_dir / "state.json"
        self.logs = self.state_dir / "logs"
        self._children: dict[int, subprocess.Popen] = {}
        self._config = None
        self.state: dict = self._read_state() or self._fresh_state()

    # -- names and state ---------------------------------------------------

    def ns(self, role: str) -> str:
        if role not in topo.BY_ROLE:
            raise LabError(f"no lab host {role!r} (hosts: {', '.join(topo.BY_ROLE)})")
        return self.prefix + role

    @property
    def config(self):
        if self._config is None:
            from glb import config as configmod

            cfg = configmod.load(self.config_path)
            problems = topo.check(cfg)
            if problems:
                raise LabError(f"{self.config_path} does not fit the lab: {'; '.join(problems)}")
            self._config = cfg
        return self._config

    @property
    def sites(self) -> dict[str, topo.SiteView]:
        return topo.sites_from_config(self.config)

    def _fresh_state(self) -> dict:
        return {"schema": 1, "prefix": self.prefix, "config": str(self.config_path), "phase": "none",
                "namespaces": [], "processes": {}, "realservers": {}, "resolv_dirs": []}

    def _read_state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            self.log(f"warning: unreadable state file {self.state_file} ({e}); removing by namespace prefix only")
            return None

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.state_file)

    def is_up(self) -> bool:
        return bool(self.state["namespaces"]) or bool(net.namespaces(self.prefix))

    @contextmanager
    def inside(self, role: str) -> Iterator[None]:
        """Run the body with this thread in ``role``'s namespace (sockets, /proc/sys/net, children)."""
        with net.entered(self.ns(role)):
            yield

    # -- up ----------------------------------------------------------------

    def up(self, *, check_vips: bool = True) -> dict:
        """Build everything and wait until DNS answers with both sites; tear down on any failure.

        Returns a summary: {"vip_path": {site: "ok" | reason}, "seconds": build time}.
        """
        if self.is_up():
            raise LabError(f"a lab with prefix {self.prefix!r} is already up (state {self.state_file}): "
                           "run 'python -m deploy.lab down' first")
        self.config  # validate before touching anything
        t0 = time.monotonic()
        if self.logs.exists():
            shutil.rmtree(self.logs)
        self.logs.mkdir(parents=True)
        self.state = self._fresh_state()
        self.state["phase"] = "building"
        self.state["created"] = time.time()
        self._save()
        try:
            self.log("network: %d namespaces, %d segments" % (len(topo.HOSTS), len(topo.SEGMENTS)))
            self._build_network()
            self._start_services()
            summary = self.wait_ready(check_vips=check_vips)
        except BaseException:
            self.log("build failed: tearing down what was built (logs kept in %s)" % self.logs)
            self.down()
            raise
        self.state["phase"] = "up"
        self._save()
        summary["seconds"] = round(time.monotonic() - t0, 1)
        return summary

    def _build_network(self) -> None:
        for host in topo.HOSTS:
            name = self.ns(host.role)
            net.add_namespace(name)
            self.state["namespaces"].append(name)
            self._save()
        for host in topo.HOSTS:
            for key, value in {**HOST_SYSCTLS, **(ROUTER_SYSCTLS if host.router else {})}.items():
                net.sysctl(self.ns(host.role), key, value)
            net.ip_batch(self.ns(host.role), ["link set lo up"])
        offload: dict[str, list[str]] = {}
        for seg in topo.SEGMENTS:
            net.ip_batch(self.ns(seg.router), [
                f"link add {seg.bridge} type bridge stp_state 0 forward_delay 0",
                *([f"addr add {seg.address} dev {seg.bridge}"] if seg.address else []),
                f"link set {seg.bridge} up",
            ])
            offload.setdefault(seg.router, []).append(seg.bridge)
        segments = {s.name: s for s in topo.SEGMENTS}
        for host in topo.HOSTS:
            for i, att in enumerate(host.attachments):
                seg = segments[att.segment]
                # A host's second link to the same router (dc2's director: edge and NAT side) needs its own name.
                port = (f"to-{host.role}" if i == 0 else f"to{i}-{host.role}")[:15]
                net.ip("link", "add", att.ifname, "type", "veth", "peer", "name", port,
                       "netns", self.ns(seg.router), ns=self.ns(host.role))
                net.ip_batch(self.ns(seg.router), [f"link set {port} master {seg.bridge}", f"link set {port} up"])
                net.ip_batch(self.ns(host.role), [f"addr add {att.address} dev {att.ifname}", f"link set {att.ifname} up"])
                offload.setdefault(host.role, []).append(att.ifname)
                offload.setdefault(seg.router, []).append(port)
        for host in topo.HOSTS:
            cmds = [f"route add {r}" for r in host.routes]
            if host.gateway:
                cmds.append(f"route add default via {host.gateway}")
            net.ip_batch(self.ns(host.role), cmds)
        for role, ifnames in offload.items():
            net.tx_offload_off(self.ns(role), ifnames)
        for role in RESOLV_ROLES:
            d = Path("/etc/netns") / self.ns(role)
            d.mkdir(parents=True, exist_ok=True)
            self.state["resolv_dirs"].append(str(d))
            self._save()
            (d / "resolv.conf").write_text(f"# the GLB lab's resolver (unbound)\nnameserver {topo.RESOLVER}\n")

    def _start_services(self) -> None:
        run = self.state_dir
        files = services.write_all(self.state_dir / "etc", run)
        glb = glb_command()
        cfg = str(self.config_path)
        self.log(f"redis-server on {topo.REDIS}:6379")
        self.start("redis", "redis", ["redis-server", "--bind", topo.REDIS, "--port", "6379", "--save", "",
                                      "--appendonly", "no", "--protected-mode", "no", "--dir", str(run),
                                      "--daemonize", "no"])
        self.log(f"parent zones . and net. (NSD) on {topo.PARENT}, delegating {topo.ZONE} to "
                 + ", ".join(f"{r}.{topo.ZONE} ({a})" for r, a in topo.DNSFRONTS.items()))
        self.start("nsd", "parent", ["nsd", "-d", "-c", str(files["nsd"])])
        rs_dir = self.state_dir / "realserver"
        rs_dir.mkdir(exist_ok=True)
        for svc in (svc for site in self.sites.values() for svc in site.services):
            for role, addr in svc.real_servers.items():
                state_file = rs_dir / f"{role}.json"
                argv = glb + ["realserver", "setup", "--mode", svc.forwarding, "--state-file", str(state_file)]
                if svc.gateway:  # NAT: the default route through the director, no VIP on the server
                    argv += ["--gateway", svc.gateway]
                else:
                    for vip in svc.vips + svc.spilled_in:  # spilled-in: another site tunnels its VIP's flows here
                        argv += ["--vip", vip]
                self.log(f"{role} ({addr}): {' '.join(['glb'] + argv[len(glb):])}")
                self.state["realservers"][role] = {"state_file": str(state_file), "mode": svc.forwarding}
                self._save()
                self.run_in(role, argv, what=f"glb realserver setup on {role}")
                self.start_httpd(role)
        for name, site in self.sites.items():
            for role, member in topo.director_roles(self.config.site(name)).items():
                member_args = ["--id", member] if member else []
                self.log(f"{role} ({topo.address_of(role)}, {site.forwarding.upper()}): glb director --config "
                         f"{self._rel(cfg)} --site {name}{' --id ' + member if member else ''}")
                self.start(role, role, limited(CAPABILITIES["director"],
                                               glb + ["director", "--config", cfg, "--site", name, *member_args]))
        for role, addr in topo.DNSFRONTS.items():
            self.log(f"{role} ({addr}): glb dnsfront --config {self._rel(cfg)}")
            self.start(f"dnsfront-{role}", role, limited(CAPABILITIES["dnsfront"], glb + ["dnsfront", "--config", cfg]))
        self.log(f"resolver (unbound) on {topo.RESOLVER}, root hint {topo.PARENT}")
        self.start("unbound", "resolver", ["unbound", "-d", "-c", str(files["unbound"])])
        self._start_dashboard(glb, cfg)

    def _start_dashboard(self, glb: list[str], cfg: str) -> None:
        """`glb dashboard` on the ops host, told where the directors and dnsfronts are (their status
        listeners bind 0.0.0.0, which from ops means nothing), and reachable from the host's browser."""
        argv = glb + ["dashboard", "--config", cfg, "--listen", f"{OPS}:{DASHBOARD_PORT}"]
        for name, site in self.sites.items():
            argv += ["--director", f"{name}={topo.DIRECTORS[name]}:{site.status_port}"]
        for addr in topo.DNSFRONTS.values():
            argv += ["--dnsfront", f"{addr}:{self.config.dnsfront.status_listen.port}"]
        self.state["dashboard_port"] = self.dashboard_port or net.free_port()
        self._save()
        self.log(f"ops ({OPS}): glb dashboard --listen {OPS}:{DASHBOARD_PORT}; {self.dashboard_url} on this host")
        self.start("dashboard", "ops", argv)
        self.start("dashboard-forward", HOST, [sys.executable, "-m", "deploy.lab.forward", "--listen",
                                               f"127.0.0.1:{self.state['dashboard_port']}", "--netns", self.ns("ops"),
                                               "--to", f"{OPS}:{DASHBOARD_PORT}"])

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.state.get('dashboard_port') or self.dashboard_port or DASHBOARD_PORT}/"

    @staticmethod
    def _rel(path: str) -> str:
        try:
            return str(Path(path).resolve().relative_to(ROOT))
        except ValueError:
            return path

    def start_httpd(self, role: str) -> None:
        port = topo.service_of(self.sites, role).server_ports[role]
        self.start(f"{role}-httpd", role, [sys.executable, "-m", "deploy.lab.httpd", "--name", role, "--port", str(port)])

    # -- readiness -----------------------------------------------------------

    def wait_ready(self, timeout: float = 60.0, *, check_vips: bool = True) -> dict:
        deadline = time.monotonic() + timeout

        def until(what: str, predicate: Callable[[], object], role: str = "ops") -> None:
            while True:
                self.check_processes()
                with self.inside(role):
                    if predicate():
                        return
                if time.monotonic() > deadline:
                    raise LabError(f"timed out waiting for {what} (logs in {self.logs})")
                time.sleep(0.1)

        until("redis", lambda: probe.redis_ping(topo.REDIS))
        for name, site in self.sites.items():
            for svc in site.services:
                # NAT servers are on a private network: only their director reaches them.
                where = f"{name}-director" if svc.forwarding == "nat" else "ops"
                for role, addr in svc.real_servers.items():
                    until(f"{role}'s HTTP server",
                          lambda a=addr, p=svc.server_ports[role]: probe.fetch(a, p, "/healthz", timeout=0.5).ok, where)
            for role in topo.director_roles(self.config.site(name)):
                until(f"{role} to see every real server up (and not spill)",
                      lambda r=role, s=site: self._all_up(topo.address_of(r), s.status_port))
        expect = [v for s in sorted(self.sites) for v in self.sites[s].vips]
        for role, addr in topo.DNSFRONTS.items():
            until(f"{role} (dnsfront) to answer app.{topo.ZONE} with both sites",
                  lambda a=addr: probe.resolve(a, f"app.{topo.ZONE}", rd=False, timeout=0.5).addresses == expect)
        until("the dashboard", lambda: probe.fetch(OPS, DASHBOARD_PORT, "/healthz", timeout=0.5).ok)
        until(f"the resolver to resolve app.{topo.ZONE} through the delegation",
              lambda: sorted(probe.resolve(topo.RESOLVER, f"app.{topo.ZONE}", timeout=1.0).addresses) == sorted(expect),
              role="client")  # the resolver shuffles the order
        self.log(f"DNS ready: app.{topo.ZONE} -> {' '.join(expect)} (through the resolver)")
        summary: dict = {"vip_path": {}}
        if check_vips:
            summary["vip_path"] = self.vip_path()
            for site, result in summary["vip_path"].items():
                self.log(f"fetch through {site}'s VIP: {result}")
        return summary

    def vip_path(self, tries: int = 3) -> dict[str, str]:
        """Can the client fetch through each site's VIP, and each further service's (``site/service``)?
        {site or site/service: "ok (served by ...)" | the last error}."""
        out = {}
        with self.inside("client"):
            for name, site in sorted(self.sites.items()):
                for i, svc in enumerate(site.services):
                    result = None
                    for _ in range(tries):
                        f = probe.fetch(svc.vips[0], svc.port, timeout=1.0)
                        if f.ok:
                            result = f"ok (served by {f.served_by})"
                            break
                        result = f.error
                        time.sleep(0.2)
                    out[name if i == 0 else f"{name}/{svc.name}"] = result
        return out

    def director_status(self, role: str) -> dict | None:
        """The /status of the director on lab host ``role`` (None if it does not answer)."""
        site = self.sites[topo.site_of(role)]
        with self.inside("ops"):
            try:
                code, body = probe.http_json(topo.address_of(role), site.status_port, "/status", timeout=0.5)
            except OSError:
                return None
        return body if code == 200 and isinstance(body, dict) else None

    def pair_role(self, role: str) -> str | None:
        """``master``, ``backup``... of the pair member on lab host ``role`` (None: not answering, or no pair)."""
        return ((self.director_status(role) or {}).get("pair") or {}).get("role")

    @staticmethod
    def _all_up(addr: str, port: int) -> bool:
        try:
            code, st = probe.http_json(addr, port, "/status", timeout=0.5)
        except OSError:
            return False
        # ... and serving them itself: at start a site spills (docs/director.md) until its servers have
        # been up recover_after seconds.
        return code == 200 and all(rs["state"] == "up" for svc in st["services"] for rs in svc["real_servers"]) \
            and not any((svc.get("spill") or {}).get("spilling_to") for svc in st["services"])

    @staticmethod
    def _get_ok(addr: str, port: int, path: str) -> bool:
        try:
            return probe.http_json(addr, port, path, timeout=0.5)[0] == 200
        except OSError:
            return False

    # -- processes -------------------------------------------------------------

    def start(self, name: str, role: str, argv: Sequence[str]) -> int:
        """Start ``argv`` in ``role``'s namespace as lab process ``name``; output to logs/<name>.log."""
        self.logs.mkdir(parents=True, exist_ok=True)
        logfile = self.logs / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        full = list(argv) if role == HOST else net.exec_argv(self.ns(role), argv)
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT, env=env)
        self._children[proc.pid] = proc
        self.state["processes"][name] = {"role": role, "pid": proc.pid, "started": net.start_time(proc.pid),
                                         "argv": list(map(str, argv)), "log": str(logfile)}
        self._save()
        return proc.pid

    def run_in(self, role: str, argv: Sequence[str], *, what: str, timeout: float = 60) -> str:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        res = subprocess.run(net.exec_argv(self.ns(role), argv), capture_output=True, text=True, timeout=timeout,
                             cwd=ROOT, env=env)
        if res.returncode != 0:
            lines = (res.stderr.strip() or res.stdout.strip()).splitlines()
            raise LabError(f"{what} failed: {lines[-1] if lines else f'exit {res.returncode}'}")
        return res.stdout

    def running(self, name: str) -> bool:
        p = self.state["processes"].get(name)
        if p is None:
            return False
        if p["pid"] in self._children:
            return self._children[p["pid"]].poll() is None
        return net.is_running(p["pid"], p["started"])

    def check_processes(self) -> None:
        """LabError naming the first lab process that died on its own (with its log's last line)."""
        for name, p in self.state["processes"].items():
            if p.get("stopped"):
                continue
            if not self.running(name):
                tail = self.log_tail(name)
                raise LabError(f"{name} exited: {tail or 'no output'} (log {p['log']})")

    def log_tail(self, name: str, lines: int = 1) -> str:
        p = self.state["processes"].get(name)
        try:
            text = Path(p["log"]).read_text(errors="replace").strip().splitlines()
        except (OSError, TypeError):
            return ""
        return " | ".join(text[-lines:])

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
        """Stop lab process ``name`` (``sig`` first, SIGKILL after ``timeout``); it stays recorded as stopped."""
        p = self.state["processes"].get(name)
        if p is None:
            raise LabError(f"no lab process {name!r}")
        if sig == signal.SIGKILL:
            net.signal_pid(p["pid"], p["started"], signal.SIGKILL)
            net.stop_pids([(p["pid"], p["started"])], timeout=0)
        else:
            net.signal_pid(p["pid"], p["started"], sig)
            net.stop_pids([(p["pid"], p["started"])], timeout=timeout)
        child = self._children.pop(p["pid"], None)
        if child is not None:
            child.wait(5)
        p["stopped"] = True
        self._save()

    def kill_process(self, name: str) -> None:
        self.stop_process(name, signal.SIGKILL)

    def restart_process(self, name: str) -> int:
        p = self.state["processes"][name]
        if self.running(name) and not p.get("stopped"):
            self.stop_process(name)
        return self.start(name, p["role"], p["argv"])

    def restore(self, timeout: float = 60.0) -> list[str]:
        """Start again every process that was stopped (in the original start order), then wait until
        DNS answers with both sites again; returns the names restarted."""
        restarted = []
        for name, p in list(self.state["processes"].items()):
            if p.get("stopped") or not self.running(name):
                self.restart_process(name)
                restarted.append(name)
        self.wait_ready(timeout, check_vips=False)
        return restarted

    # -- down ------------------------------------------------------------------

    def down(self) -> list[str]:
        """Remove every process and namespace of this lab (recorded or carrying the prefix); returns what was removed."""
        removed: list[str] = []
        state = self._read_state() or self.state
        namespaces = list(dict.fromkeys(state.get("namespaces", []) + net.namespaces(self.prefix)))
        existing = set(net.namespaces(self.prefix))
        # Real servers first, through the real command: it stops the TUN decapsulator daemons cleanly.
        teardowns = []
        for role, rs in state.get("realservers", {}).items():
            if self.prefix + role in existing and Path(rs["state_file"]).exists():
                argv = net.exec_argv(self.prefix + role, glb_command() + ["realserver", "teardown", "--state-file",
                                                                         rs["state_file"]])
                teardowns.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                  env=dict(os.environ, PYTHONPATH=str(ROOT))))
        for t in teardowns:
            try:
                t.wait(20)
            except subprocess.TimeoutExpired:
                t.kill()
                t.wait()
        # Recorded processes (Redis last, so directors can withdraw their site on the way out).
        procs = state.get("processes", {})
        first = [(p["pid"], p["started"]) for n, p in procs.items() if n != "redis"]
        net.stop_pids(first, timeout=5)
        if "redis" in procs:
            net.stop_pids([(procs["redis"]["pid"], procs["redis"]["started"])], timeout=5)
        removed += [f"process {n} ({p['pid']})" for n, p in procs.items()]
        for child in self._children.values():
            try:
                child.wait(1)
            except subprocess.TimeoutExpired:
                pass
        self._children.clear()
        # Anything else still inside our namespaces (decapsulators, NSD's helpers, a shell someone left).
        for name in namespaces:
            pids = net.namespace_pids(name)
            if pids:
                net.stop_pids([(pid, net.start_time(pid)) for pid in pids], timeout=3)
                removed += [f"process {pid} in {name}" for pid in pids]
        for name in reversed(namespaces):
            net.delete_namespace(name)
            removed.append(f"namespace {name}")
        for d in state.get("resolv_dirs", []):
            if Path(d).parent == Path("/etc/netns") and Path(d).name.startswith(self.prefix):
                shutil.rmtree(d, ignore_errors=True)
        try:
            Path("/etc/netns").rmdir()  # only if empty: another user's files stay
        except OSError:
            pass
        left = net.namespaces(self.prefix)
        if left:
            raise LabError(f"could not delete namespaces: {', '.join(left)}")
        self.state_file.unlink(missing_ok=True)
        self.state = self._fresh_state()
        return removed

    # -- status ----------------------------------------------------------------

    def status(self) -> dict:
        st = self._read_state()
        if st is None and not net.namespaces(self.prefix):
            return {"up": False}
        st = st or self._fresh_state()
        existing = set(net.namespaces(self.prefix))
        out = {"up": True, "phase": st.get("phase"), "state_file": str(self.state_file), "logs": str(self.logs),
               "namespaces": {n: n in existing for n in st.get("namespaces", [])},
               "processes": {}}
        for name, p in st.get("processes", {}).items():
            out["processes"][name] = {"pid": p["pid"], "namespace": "(host)" if p["role"] == HOST else self.prefix + p["role"],
                                      "running": net.is_running(p["pid"], p["started"])}
        if existing:
            try:
                with self.inside("client"):
                    out["dns"] = {
                        "resolver": str(probe.resolve(topo.RESOLVER, f"app.{topo.ZONE}")),
                        **{role: str(probe.resolve(a, f"app.{topo.ZONE}", rd=False)) for role, a in topo.DNSFRONTS.items()},
                    }
                out["vip_path"] = self.vip_path(tries=1)
            except LabError as e:
                out["dns"] = {"error": str(e)}
        return out

    def glb_status(self) -> str:
        res = subprocess.run(net.exec_argv(self.ns("ops"), glb_command() + ["status", "--config", str(self.config_path)]),
                             capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        return res.stdout + res.stderr
