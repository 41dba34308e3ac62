"""Shared pieces of the director's end-to-end tests (tests/director/test_e2e_*.py).

Real components only: `glb realserver setup` on each real server, a small
HTTP server naming itself, `glb director --config ... --site dc1` as its own
process in the director's namespace, the session's redis-server (reached
through :class:`RedisBridge`, since the director's namespace has its own
loopback), curl and scapy on the client.

A test module's lab is a class whose ``__init__(lab, tmp, redis_port[, dataplane])``
builds it from the pieces here (:func:`real_server`, :func:`uplink`,
:func:`forward`, :func:`counting_table`; :class:`DirectorLab` for the one
director) and whose ``close()`` stops what it started; :func:`running_lab`
(or :func:`lab_per_dataplane` in a module fixture) runs it.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.configs import ZONES
from tests.environment import bpf_unavailable, require
from tests.netns import Lab, Netns, lab_unavailable

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
GLB = str(Path(sys.executable).parent / "glb")
CLONE_NEWNET = 0x40000000

HTTP_SERVER = r"""
import socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name = sys.argv[1]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = (name + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
S(("::", int(sys.argv[2]) if len(sys.argv) > 2 else 80), H).serve_forever()
"""

# A client holding one HTTP/1.1 connection: each line on stdin is a request; prints who answered.
KEEPALIVE_CLIENT = r"""
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], 80, timeout=10)
for line in sys.stdin:
    try:
        c.request("GET", "/")
        print(c.getresponse().read().decode().strip(), flush=True)
    except Exception as e:
        print("error:", type(e).__name__, e, flush=True)
"""


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


class RedisBridge:
    """Listens on 127.0.0.1:<port> inside a namespace, forwards to a Redis on the host's loopback.

    A socket stays in the namespace it was created in: one thread enters the
    lab namespace to create the listener; connections to Redis are made by a
    thread that never left the test's own namespace.
    """

    def __init__(self, netns: str, redis_port: int, port: int = 6379) -> None:
        self.port = port
        self.redis_port = redis_port
        self._accepted: queue.Queue = queue.Queue()
        self._listener: socket.socket | None = None
        self._closed = False
        ready = threading.Event()
        self._errors: list[BaseException] = []

        def listen() -> None:
            try:
                _setns(f"/run/netns/{netns}")
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                s.listen(64)
                self._listener = s
            except BaseException as e:  # pragma: no cover - reported below
                self._errors.append(e)
                return
            finally:
                ready.set()
            while not self._closed:
                try:
                    conn, _ = s.accept()
                except OSError:
                    return
                self._accepted.put(conn)

        threading.Thread(target=listen, daemon=True).start()
        ready.wait(10)
        if self._errors:
            raise self._errors[0]
        threading.Thread(target=self._connect_loop, daemon=True).start()

    def _connect_loop(self) -> None:
        while not self._closed:
            conn = self._accepted.get()
            if conn is None:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.redis_port), timeout=5)
            except OSError:
                conn.close()
                continue
            up.settimeout(None)
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self._accepted.put(None)
        if self._listener is not None:
            self._listener.close()


def realserver_setup(ns, state: Path, vips: list[str], mode: str, gateways: Sequence[str] = (),
                     decap: str = "auto") -> None:
    res = ns.run([GLB, "realserver", "setup", *[a for v in vips for a in ("--vip", v)], "--mode", mode,
                  *[a for g in gateways for a in ("--gateway", g)], "--state-file", str(state),
                  *(["--decap", decap] if mode == "tun" else [])], check=False, cwd=ROOT)
    if res.returncode != 0:
        raise AssertionError(f"glb realserver setup failed: {res.stderr}")


def start_http(ns, name: str, port: int = 80):
    proc = ns.popen([PY, "-c", HTTP_SERVER, name, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc


def config_yaml(*, redis_port: int, services: str, address: str | None = None, address6: str | None = None,
                max_entries: int = 100000, status_port: int = 9100, workers: int = 1,
                dataplane: str = "auto", lan: str | None = None,
                pin_root: str = "") -> str:
    """``pin_root``: the kernel data plane's bpf_pin_root ("": none; ``ip netns exec`` hides /sys/fs/bpf anyway)."""
    pins = f', bpf_pin_root: "{pin_root}"' if pin_root else ""
    extra = ""
    if address:
        extra += f", address: {address}"
    if address6:
        extra += f', address6: "{address6}"'
    return f"""
redis: {{url: "redis://127.0.0.1:{redis_port}/0", timeout: 1.0}}
admin: {{token: lab-token-0123456789}}
{ZONES}sites:
  dc1:
    director:
      interface: eth0
      id: lab-director
      status_listen: "127.0.0.1:{status_port}"
      heartbeat: 0.5
      connection_table: {{max_entries: {max_entries}}}
      packet: {{workers: {workers}, dataplane: {dataplane}{pins}}}
      {extra.lstrip(", ").replace(", ", chr(10) + "      ")}
      {f"lan: {lan}" if lan else ""}
    services:
{services}
"""


def service_yaml(name: str, vips: list[str], servers: list[tuple[str, int]], *, forwarding: str = "dr",
                 scheduler: str = "rr", port: int | None = None, extra: str = "") -> str:
    """``port``: the real servers' own (NAT), probed there too; ``extra``: more service keys, one YAML line."""
    own = f", port: {port}" if port else ""
    rs = "\n".join(f"          - {{address: \"{a}\", weight: {w}{own}}}" for a, w in servers)
    return f"""      - name: {name}
        vips: [{", ".join(json.dumps(v) for v in vips)}]
        forwarding: {forwarding}
        scheduler: {scheduler}
        real_servers:
{rs}
        health_check: {{type: http, port: {port or 80}, interval: 0.3, timeout: 0.3, rise: 1, fall: 2, start_jitter: 0.1}}
{("        " + extra + chr(10)) if extra else ""}"""


class DirectorProcess:
    """`glb director` in a namespace, with helpers to read its /status."""

    def __init__(self, ns, config: Path, log: Path, status_port: int = 9100, *,
                 prefix: Sequence[str] = (), env: Mapping[str, str] | None = None, member: str | None = None) -> None:
        """``prefix``: a command the director runs under (setpriv ...); ``env``: its environment;
        ``member``: the pair member it runs as (``--id``)."""
        self.ns = ns
        self.config = config
        self.log = log
        self.status_port = status_port
        self._log = open(log, "w")
        member_args = ["--id", member] if member else []
        self.proc = ns.popen([*prefix, GLB, "--log-level", "info", "director", "--config", str(config), "--site", "dc1",
                              *member_args], stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def status(self) -> dict | None:
        res = self.ns.run(["curl", "-s", "-m", "2", f"http://127.0.0.1:{self.status_port}/status"], check=False)
        if res.returncode != 0 or not res.stdout:
            return None
        return json.loads(res.stdout)

    def metrics(self) -> str:
        return self.ns.run(["curl", "-s", "-m", "2", f"http://127.0.0.1:{self.status_port}/metrics"]).stdout

    def servers(self) -> dict[str, dict]:
        doc = self.status() or {"services": []}
        return {rs["address"]: rs for svc in doc["services"] for rs in svc["real_servers"]}

    def wait_up(self, addresses: list[str], timeout: float = 30.0) -> dict:
        """Until every address is up and the packet path forwards to it (its
        MAC resolved, the plan carrying it applied by every worker)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"director exited {self.proc.returncode}:\n{self.log.read_text()}")
            doc = self.status() or {"services": []}
            servers = {rs["address"]: rs for svc in doc["services"] for rs in svc["real_servers"]}
            # Up in every service that has it: an address in two services is two checks, and
            # the dict above keeps only the last service's (a test of the first would start early).
            states: dict[str, set[str]] = {}
            for svc in doc["services"]:
                for rs in svc["real_servers"]:
                    states.setdefault(rs["address"], set()).add(rs["state"])
            path = doc.get("packet_path")
            if (all(states.get(a) == {"up"} for a in addresses)
                    and (path is None or (path["plan_applied"] == path["plan_generation"]
                                          and all(path["next_hops"].get(a) for a in addresses)))):
                return servers
            if time.monotonic() > deadline:
                raise AssertionError(f"real servers not up after {timeout}s: {servers}\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def wait_plan(self, timeout: float = 10.0) -> None:
        """Until every packet worker forwards by the latest plan the director sent."""
        deadline = time.monotonic() + timeout
        while True:
            path = (self.status() or {}).get("packet_path") or {}
            if path.get("plan_applied") == path.get("plan_generation"):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the packet path never applied the latest plan: {path}")
            time.sleep(0.05)

    def wait_state(self, address: str, state: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.servers().get(address, {}).get("state") != state:
            if time.monotonic() > deadline:
                raise AssertionError(f"{address} never reached {state}: {self.servers().get(address)}")
            time.sleep(0.2)

    def reload(self, text: str) -> None:
        self.config.write_text(text)
        self.proc.send_signal(1)  # SIGHUP

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


@contextmanager
def running_lab(tag: str, build, tmp: Path, redis_server, dataplane: str | None = None, up: Sequence[str] = ()):
    """The lab ``build(lab, tmp, redis_port[, dataplane])`` makes in a fresh :class:`Lab`, yielded once the
    addresses ``up`` are up at its director ``.d``; ``.close()``d (and the namespaces gone) after.

    Without namespaces (or BPF, for the kernel data plane) it skips; under CI=true it fails instead."""
    require(lab_unavailable(), bpf_unavailable() if dataplane == "kernel" else None)
    redis_server.start()
    with Lab(tag) as lab:
        t = build(lab, tmp, redis_server.port, *([dataplane] if dataplane else []))
        try:
            if up:
                t.d.wait_up(list(up))
            yield t
        finally:
            t.close()


def lab_per_dataplane(tag: str, build, addresses: Sequence[str], request, tmp_path_factory, redis_server):
    """A module fixture's body: the lab ``build(lab, tmp, redis_port, dataplane)`` makes, with
    ``request.param`` as the data plane, yielded once ``addresses`` are up; closed after."""
    with running_lab(tag, build, tmp_path_factory.mktemp(tag), redis_server, request.param, addresses) as t:
        yield t


class DirectorLab:
    """The part every single-director lab shares: ``self.d``, `glb director` in ``self.director`` with
    its config at ``self.config``, reaching the session's Redis through ``self.bridge``."""

    director: Netns
    d: DirectorProcess

    def start_director(self, tmp: Path, redis_port: int, text: str, log: str = "director.log") -> None:
        self.bridge = RedisBridge(self.director.name, redis_port)
        self.config = tmp / "glb.yaml"
        self.config.write_text(text)
        self.d = DirectorProcess(self.director, self.config, tmp / log)

    def close(self) -> None:
        self.d.stop()
        self.bridge.close()


def counting_table(ns, rules: Mapping[str, str]) -> None:
    """nftables' netdev table ``glbt`` in ``ns``: at eth0's ingress (before tc's program hands packets on
    and before the director's guard) a counter per rule, named by its key; read with :func:`nft_counters`."""
    counters = "".join(f'  {match} counter comment "{name}"\n' for name, match in rules.items())
    ns.run(["nft", "-f", "-"], input=(
        'table netdev glbt {\n chain in { type filter hook ingress device "eth0" priority -10;\n'
        f'{counters} }}\n}}\n'))


def real_server(lab: Lab, sw, br: str, tmp: Path, name: str, addrs: Sequence[str], vips: list[str], mode: str, *,
                via: Sequence[str] = (), gateways: Sequence[str] = (), offload: bool = False, decap: str = "auto"):
    """A real server on the bridge ``br`` (in ``sw``): namespace ``name`` with ``addrs``, its default
    routes through ``via``, then `glb realserver setup` (its state in tmp/<name>.json; TUN: ``--decap``)."""
    ns = lab.netns(name)
    lab.port(sw, br, ns, list(addrs), offload=offload)
    default_routes(ns, via)
    realserver_setup(ns, tmp / f"{name}.json", vips, mode, gateways=gateways, decap=decap)
    return ns


def uplink(lab: Lab, ns, router, net: int, name: str, six: bool = False) -> None:
    """``ns``'s eth0 (10.0.<net>.2/24; fd00:<net>::2/64 with ``six``) to the router's ``name`` (.1),
    and ``ns``'s default routes through it."""
    mine = [f"10.0.{net}.2/24"] + ([f"fd00:{net}::2/64"] if six else [])
    its = [f"10.0.{net}.1/24"] + ([f"fd00:{net}::1/64"] if six else [])
    lab.veth(ns, router, mine, its, a_name="eth0", b_name=name)
    default_routes(ns, [a.split("/")[0] for a in its])


def default_routes(ns, gateways: Sequence[str]) -> None:
    """A default route through each gateway, IPv4 or IPv6 by its address."""
    for gateway in gateways:
        ns.ip(*(["-6"] if ":" in gateway else []), "route", "add", "default", "via", gateway)


def forward(router) -> None:
    """``router`` forwards IPv4 and IPv6 and checks no source route (replies come back another way)."""
    for key, value in (("net.ipv4.ip_forward", 1), ("net.ipv6.conf.all.forwarding", 1),
                       ("net.ipv4.conf.all.rp_filter", 0), ("net.ipv4.conf.default.rp_filter", 0)):
        router.sysctl(key, value)


def curl(ns, url: str, timeout: float = 3.0) -> str | None:
    res = ns.run(["curl", "-s", "-g", "-m", str(timeout), url], check=False, timeout=timeout + 5)
    return res.stdout.strip() if res.returncode == 0 else None


def nft_counters(ns, table: str, family: str = "netdev") -> dict[str, int]:
    import re

    text = ns.run(["nft", "list", "table", family, table]).stdout
    return {m.group(3): int(m.group(1)) for m in re.finditer(r'counter packets (\d+) bytes (\d+) comment "(\w+)"', text)}
