"""Throwaway network namespaces, veth pairs and bridges for tests (needs root).

Generic on purpose: any test that needs hosts on a virtual network uses it.

    from tests.environment import require
    from tests.netns import Lab, lab_unavailable

    require(lab_unavailable())  # skips, or fails under CI=true
    with Lab() as lab:
        client, server = lab.netns("client"), lab.netns("server")
        lab.veth(client, server, "10.0.0.1/24", "10.0.0.2/24")
        proc = server.popen(["python3", "-m", "http.server", "--bind", "10.0.0.2", "8080"])
        client.run(["curl", "-s", "http://10.0.0.2:8080/"])

pytest puts the project root on ``sys.path`` (``pythonpath = ["."]``), so a
test imports this helper as ``tests.netns``. Tests using it are marked
``netns`` (``-m "not netns"`` leaves them out).

Rules it enforces:

* every namespace is named ``glbt-<pytest pid>-<n>-<role>`` so parallel runs
  and other engineers' tests never collide, and a leftover says who made it;
* veth ends are created directly inside their namespaces (never in the
  root namespace) with tx checksum offload off by default, because veth
  hands packets over with partial checksums that raw sockets and userspace
  packet paths see unfinished;
* :meth:`Lab.close` (also on ``with`` exit, also when the test failed)
  stops every process started through the lab, then every other process
  still inside the lab's namespaces, by PID, then deletes the namespaces by
  name. Nothing else is touched.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

IP = shutil.which("ip") or "/usr/sbin/ip"
NFT = shutil.which("nft") or "/usr/sbin/nft"
ETHTOOL = shutil.which("ethtool") or "/usr/sbin/ethtool"
PREFIX = f"glbt-{os.getpid()}-"
_counter = itertools.count(1)
unmarked_test: str | None = None
"""The running test if it is not marked ``netns`` (tests/conftest.py keeps it): it may not build a Lab."""


def netns_unavailable() -> str | None:
    """Why namespace tests cannot run here (a reason for tests.environment.require), or None if they can."""
    return _probe(nft=False)


def lab_unavailable() -> str | None:
    """Why a :class:`Lab` (namespaces, nftables in them) cannot run here, or None."""
    return _probe(nft=True)


# A netdev ingress chain is the least common nftables piece the tests (and the director's guard) use.
_NFT_PROBE = 'table netdev glbt_probe {\n chain in { type filter hook ingress device "lo" priority 0; }\n}\n'


def _probe(nft: bool) -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if not Path(IP).exists():
        return "needs iproute2's 'ip'"
    if nft and not Path(NFT).exists():
        return "needs nft (apt package nftables; bash scripts/setup installs it)"
    probe = f"{PREFIX}probe{next(_counter)}"
    res = subprocess.run([IP, "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"cannot create network namespaces: {res.stderr.strip()}"
    try:
        if nft:
            res = subprocess.run([IP, "netns", "exec", probe, NFT, "-f", "-"], input=_NFT_PROBE,
                                 capture_output=True, text=True, timeout=30)
            if res.returncode != 0:
                return f"nftables does not work in a namespace (netdev ingress): {res.stderr.strip()}"
    finally:
        subprocess.run([IP, "netns", "del", probe], capture_output=True)
    return None


@contextmanager
def private_bpffs(path: Path) -> Iterator[Path]:
    """A bpffs instance of its own at ``path`` (made here): nothing else's pins, and one even where the host
    mounts none at /sys/fs/bpf (``ip netns exec`` hides that one anyway); unmounted after, pins and all."""
    path.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


class Netns:
    """One namespace. Commands run in it through ``ip netns exec`` (which also gives it its own /sys)."""

    def __init__(self, lab: Lab, name: str):
        self.lab = lab
        self.name = name

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return [IP, "netns", "exec", self.name, *map(str, cmd)]

    def run(self, cmd: Sequence[str], *, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside the namespace and wait; text output captured. Raises on failure if ``check``."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        res = subprocess.run(self.argv(cmd), timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise RuntimeError(f"[{self.name}] {' '.join(map(str, cmd))} exited {res.returncode}: {res.stderr or res.stdout}")
        return res

    def popen(self, cmd: Sequence[str], **kw) -> subprocess.Popen:
        """Start ``cmd`` inside the namespace; the lab stops it at close (``ip netns exec`` execs, so the PID is the command's)."""
        proc = subprocess.Popen(self.argv(cmd), **kw)
        self.lab.processes.append(proc)
        return proc

    def ingress_programs(self, ifname: str = "eth0", ids: bool = False) -> list:
        """Names (``ids``: (name, id)) of the BPF programs at ``ifname``'s ingress, tcx and clsact alike
        (iproute2's ``tc filter show`` here does not list tcx): director/dataplane/tcattach.py's view."""
        import json
        import sys

        out = self.run([sys.executable, "-m", "director.dataplane.tcattach", ifname],
                       cwd=Path(__file__).resolve().parents[1]).stdout
        return [(p["name"], p["id"]) if ids else p["name"] for p in json.loads(out)]

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([IP, "-n", self.name, *map(str, args)], capture_output=True, text=True)
        if check and res.returncode != 0:
            raise RuntimeError(f"[{self.name}] ip {' '.join(map(str, args))}: {res.stderr.strip()}")
        return res

    def sysctl(self, key: str, value: str | int | None = None) -> str:
        """Read (and with ``value``, first write) a sysctl of this namespace; ``key`` in dotted or slash form."""
        path = key.replace(".", "/") if "/" not in key else key
        if value is not None:
            self.run(["sh", "-c", f"echo {value} > /proc/sys/{path}"])
        return self.run(["cat", f"/proc/sys/{path}"]).stdout.strip()

    def link_stats(self, ifname: str) -> dict[str, int]:
        """rx/tx packet and byte counters of an interface."""
        out = {}
        for name in ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_dropped", "tx_dropped"):
            out[name] = int(self.run(["cat", f"/sys/class/net/{ifname}/statistics/{name}"]).stdout)
        return out

    def pids(self) -> list[int]:
        res = subprocess.run([IP, "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []


class Lab:
    """A set of namespaces and the processes running in them, all removed by :meth:`close`."""

    def __init__(self, tag: str = ""):
        if unmarked_test:
            # `-m "not netns"` must leave out every test that needs namespaces.
            raise RuntimeError(f"{unmarked_test} builds a namespace Lab: mark it @pytest.mark.netns")
        self.tag = tag
        self.namespaces: list[Netns] = []
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def netns(self, role: str, *, loopback: bool = True, ipv6_dad: bool = False) -> Netns:
        """Create a namespace (``lo`` up unless ``loopback=False``).

        IPv6 duplicate address detection is off unless ``ipv6_dad``: on a
        lab link nothing can collide, and DAD keeps link-local addresses
        tentative for a second or more, which delays or drops the first
        packets a test sends.
        """
        for _ in range(100):
            name = f"{PREFIX}{next(_counter)}-{self.tag + '-' if self.tag else ''}{role}"
            res = subprocess.run([IP, "netns", "add", name], capture_output=True, text=True)
            if res.returncode == 0:
                break
            if not Path(f"/run/netns/{name}").exists():
                raise RuntimeError(f"ip netns add {name}: {res.stderr.strip()}")
        else:
            raise RuntimeError("could not find a free namespace name")
        ns = Netns(self, name)
        self.namespaces.append(ns)
        if not ipv6_dad:
            ns.run(["sh", "-c", "for c in all default; do echo 0 > /proc/sys/net/ipv6/conf/$c/accept_dad; done"], check=False)
        if loopback:
            ns.ip("link", "set", "lo", "up")
        return ns

    def veth(self, a: Netns, b: Netns, a_addr: str | Sequence[str] | None = None, b_addr: str | Sequence[str] | None = None,
             *, a_name: str | None = None, b_name: str | None = None, mtu: int | None = None,
             offload: bool = False) -> tuple[str, str]:
        """Join ``a`` and ``b`` with a veth pair, addresses given as CIDR strings; returns the two interface names.

        ``offload=False`` (default) turns tx checksum offload off on both ends
        so packets leave with complete checksums.
        """
        a_name = a_name or f"v{next(_counter)}"
        b_name = b_name or f"v{next(_counter)}"
        a.ip("link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b.name)
        for ns, ifname, addrs in ((a, a_name, a_addr), (b, b_name, b_addr)):
            self._configure(ns, ifname, addrs, mtu, offload)
        return a_name, b_name

    def bridge(self, ns: Netns, name: str = "br0", addr: str | Sequence[str] | None = None) -> str:
        """A bridge inside ``ns`` (up); attach ports with :meth:`port`.

        It stands for a switch, so bridged frames skip the host's netfilter
        hooks (br_netfilter would otherwise run them and charge whoever
        sends into the bridge, a packet path under test included).
        """
        ns.ip("link", "add", name, "type", "bridge",
              "nf_call_iptables", "0", "nf_call_ip6tables", "0", "nf_call_arptables", "0")
        # The per-bridge options only add to these per-namespace switches (on by default).
        for family in ("iptables", "ip6tables", "arptables"):
            path = Path(f"/proc/sys/net/bridge/bridge-nf-call-{family}")
            ns.run(["sh", "-c", f"[ ! -e {path} ] || echo 0 > {path}"])
        self._configure(ns, name, addr, None, True)
        return name

    def port(self, bridge_ns: Netns, bridge: str, host: Netns, host_addr: str | Sequence[str] | None = None, *,
             host_name: str = "eth0", mtu: int | None = None, offload: bool = False) -> tuple[str, str]:
        """Plug ``host`` into ``bridge`` (in ``bridge_ns``) with a veth pair; returns (host end, bridge end)."""
        port_name = f"p{next(_counter)}"
        host_name, port_name = self.veth(host, bridge_ns, host_addr, None, a_name=host_name, b_name=port_name,
                                         mtu=mtu, offload=offload)
        bridge_ns.ip("link", "set", port_name, "master", bridge)
        return host_name, port_name

    @staticmethod
    def _configure(ns: Netns, ifname: str, addrs, mtu: int | None, offload: bool) -> None:
        if mtu:
            ns.ip("link", "set", ifname, "mtu", str(mtu))
        if isinstance(addrs, str):
            addrs = [addrs]
        for addr in addrs or ():
            ns.ip("addr", "add", addr, "dev", ifname, *(("nodad",) if ":" in addr else ()))
        ns.ip("link", "set", ifname, "up")
        if not offload and Path(ETHTOOL).exists():
            ns.run([ETHTOOL, "-K", ifname, "tx", "off"], check=False)

    def wait_for(self, predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
        """Poll ``predicate()`` until it returns something truthy; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)

    def close(self) -> None:
        """Stop our processes, then any process left in our namespaces (by PID), then delete the namespaces."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.processes.clear()
        for ns in self.namespaces:
            pids = ns.pids()
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 3
                while pids and time.monotonic() < deadline:
                    for pid in pids:
                        try:
                            os.waitpid(pid, os.WNOHANG)
                        except ChildProcessError:
                            pass
                    pids = [p for p in pids if _alive(p)]
                    if pids:
                        time.sleep(0.02)
                if not pids:
                    break
        for ns in reversed(self.namespaces):
            subprocess.run([IP, "netns", "del", ns.name], capture_output=True)
        self.namespaces.clear()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:][:1] != "Z"
