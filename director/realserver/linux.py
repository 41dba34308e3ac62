"""The real server's Linux adapter: reads :class:`~director.realserver.plan.Facts` and performs steps.

:class:`LinuxSystem` (a ``steps.System``) works with pyroute2 (links,
addresses), ``/proc/sys`` (sysctls), the TUN ioctl, ``nft`` and a child
process (the userspace decapsulator). Tests use an in-memory fake with the
same methods.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from director import modes
from director.realserver.plan import DEFAULT_MTU, KERNEL_TUNNELS, Facts, Link, Request, sysctl_keys
from director.realserver.steps import NFT_FAMILY, NFT_TABLE, BpfDecap, StartDecap, conf_key, display_key, proc_start_time
from glb import nft as nftables
from glb.errors import NftError, RealServerError

log = logging.getLogger("glb.realserver")

CAP_NET_ADMIN = 12
MAIN_TABLE = 254
POLICY_TABLE = 4242
"""NAT ``--policy-route``: the routing table holding the default route via the director."""
POLICY_PRIORITY = 4242
"""Its rules: at this priority the main table without its default routes (``suppress_prefixlength 0``: a
more specific route still wins), at the next one the replies' source ports -> POLICY_TABLE."""
CAP_NET_RAW = 13


def _capabilities() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return -1 if os.geteuid() == 0 else 0


def has_privileges() -> bool:
    caps = _capabilities()
    return bool(caps & (1 << CAP_NET_ADMIN)) and bool(caps & (1 << CAP_NET_RAW))


class LinuxSystem:
    """The real adapter: pyroute2 for links and addresses, /proc/sys, the TUN ioctl, nft, a child process."""

    def __init__(self, proc_sys: Path = Path("/proc/sys")):
        self.proc_sys = proc_sys
        self._ipr = None

    # pyroute2 is imported lazily so planning and `--help` never pay for it.
    @property
    def ipr(self):
        if self._ipr is None:
            try:
                from pyroute2 import IPRoute
            except ImportError as e:
                raise RealServerError(f"pyroute2 is not installed: {e}") from None
            self._ipr = IPRoute()
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def _netlink(self, what: str, fn, *args, ok: tuple[int, ...] = (), **kw):
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            return fn(*args, **kw)
        except NetlinkError as e:
            if e.code in ok:
                return None
            if e.code == errno.EPERM:
                raise RealServerError(f"{what}: permission denied (needs root / CAP_NET_ADMIN)") from None
            raise RealServerError(f"{what}: {os.strerror(e.code) if e.code else e}") from None

    def _index(self, ifname: str) -> int | None:
        found = self.ipr.link_lookup(ifname=ifname)
        return found[0] if found else None

    # -- facts -------------------------------------------------------------

    def facts(self, req: Request) -> Facts:
        privileged = has_privileges()
        kernel: dict[int, str | None] = {}
        needs = modes.MODES[req.mode].realserver_facts
        if "kernel_tunnels" in needs and req.decap in ("auto", "kernel") and privileged:
            # First, as probing may load the driver, which creates its fallback device.
            for fam in sorted(req.families):
                kernel[fam] = self._kernel_tunnel(fam)
        links: dict[str, Link] = {}
        names: dict[int, str] = {}
        for msg in self._netlink("listing interfaces", self.ipr.get_links):
            name = msg.get_attr("IFLA_IFNAME")
            names[msg["index"]] = name
            links[name] = Link(name, bool(msg["flags"] & 1), int(msg.get_attr("IFLA_MTU") or DEFAULT_MTU))
        addresses: dict[str, set[str]] = {}
        for msg in self._netlink("listing addresses", self.ipr.get_addr):
            addr = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
            name = names.get(msg["index"])
            if addr and name:
                try:
                    addresses.setdefault(name, set()).add(str(ipaddress.ip_address(addr.split("%")[0])))
                except ValueError:
                    continue
        bpf_decap = "not probed"
        if "bpf_decap" in needs and privileged and (req.decap == "bpf" or (
                req.decap == "auto" and not all(kernel.get(f) for f in req.families))):
            from director.realserver import bpfdecap

            bpf_decap = bpfdecap.probe()
        sysctls = {}
        # The BPF decapsulator makes rp_filter of the interfaces it listens on matter (plan.decap_interfaces).
        link_keys = [conf_key(4, name, "rp_filter") for name in links] if bpf_decap is None else []
        for key in sysctl_keys(req) + link_keys:
            value = self.get_sysctl(key)
            if value is not None:
                sysctls[key] = value
        nft = nftables.binary() is not None
        nft_table = False
        if nft and "nft_table" in needs and privileged:
            nft_table = self._nft(["list", "table", NFT_FAMILY, NFT_TABLE]).returncode == 0
        return Facts(
            default_routes=self._default_routes(names) if req.gateways else {},
            privileged=privileged,
            links=links,
            addresses={k: frozenset(v) for k, v in addresses.items()},
            sysctls=sysctls,
            kernel_tunnels=kernel,
            uplink_mtu=self._uplink_mtu(names, links),
            nft=nft,
            nft_table=nft_table,
            tun=os.path.exists("/dev/net/tun"),
            bpf_decap=bpf_decap,
        )

    def _kernel_tunnel(self, fam: int) -> str | None:
        """The fallback device of the kernel's tunnel driver for ``fam``, loading the driver if needed; None if absent."""
        from pyroute2.netlink.exceptions import NetlinkError

        kind, fallback = KERNEL_TUNNELS[fam]
        if self._index(fallback) is not None:
            return fallback
        probe = f"glbprobe{os.getpid() % 100000}"
        remote = {"ipip_remote": "192.0.2.1"} if fam == 4 else {"ip6tnl_remote": "2001:db8::1"}
        try:
            self.ipr.link("add", ifname=probe, kind=kind, **remote)  # autoloads the module; creates the fallback device
        except NetlinkError as e:
            if e.code != errno.EOPNOTSUPP:  # EOPNOTSUPP: "Unknown device type", no such driver
                log.info("probing the %s driver failed (%s); treating it as absent", kind, e)
            return None
        except Exception as e:  # a pyroute2 surprise must not turn into a traceback: fall back to userspace
            log.info("probing the %s driver failed (%s: %s); treating it as absent", kind, type(e).__name__, e)
            return None
        idx = self._index(probe)
        if idx is not None:
            self._netlink(f"deleting probe interface {probe}", self.ipr.link, "del", index=idx, ok=(errno.ENODEV,))
        return fallback if self._index(fallback) is not None else None

    def _default_routes(self, names: Mapping[int, str]) -> dict[int, tuple[str | None, str | None]]:
        out: dict[int, tuple[str | None, str | None]] = {}
        for version, fam in ((4, socket.AF_INET), (6, socket.AF_INET6)):
            try:
                routes = self.ipr.get_routes(family=fam, table=254)
            except Exception:  # a missing family is not an error here
                continue
            for r in routes:
                if r["dst_len"] == 0 and r["type"] == 1:
                    out[version] = (r.get_attr("RTA_GATEWAY"), names.get(r.get_attr("RTA_OIF")))
                    break
        return out

    def set_default_route(self, version: int, gateway: str | None, device: str | None) -> None:
        kw: dict = {"dst": "0.0.0.0/0" if version == 4 else "::/0", "family": socket.AF_INET if version == 4 else socket.AF_INET6}
        if gateway:
            kw["gateway"] = gateway
        if device:
            index = self._index(device)
            if index is None:
                raise RealServerError(f"interface {device} is gone: cannot restore the default route through it")
            kw["oif"] = index
        self._netlink(f"setting the IPv{version} default route via {gateway or device}", self.ipr.route, "replace", **kw)

    def delete_default_route(self, version: int, gateway: str) -> None:
        self._netlink(f"removing the IPv{version} default route via {gateway}", self.ipr.route, "del",
                      dst="0.0.0.0/0" if version == 4 else "::/0", gateway=gateway,
                      family=socket.AF_INET if version == 4 else socket.AF_INET6, ok=(errno.ESRCH,))

    def _policy(self, version: int, gateway: str, ports: tuple[int, ...]):
        """(family, the default route's destination, the rules) of a PolicyRoute."""
        fam = socket.AF_INET if version == 4 else socket.AF_INET6
        rules = [{"priority": POLICY_PRIORITY, "table": MAIN_TABLE, "suppress_prefixlen": 0}]
        rules += [{"priority": POLICY_PRIORITY + 1, "table": POLICY_TABLE, "sport_range": f"{p}:{p}"} for p in ports]
        return fam, "0.0.0.0/0" if version == 4 else "::/0", rules

    def add_policy_route(self, version: int, gateway: str, ports: tuple[int, ...]) -> None:
        fam, dst, rules = self._policy(version, gateway, ports)
        self._netlink(f"setting the IPv{version} default route via {gateway} in table {POLICY_TABLE}",
                      self.ipr.route, "replace", dst=dst, gateway=gateway, table=POLICY_TABLE, family=fam)
        for r in rules:
            self._netlink(f"adding the IPv{version} rule {r}", self.ipr.rule, "add", family=fam,
                          ok=(errno.EEXIST,), **r)

    def delete_policy_route(self, version: int, gateway: str, ports: tuple[int, ...]) -> None:
        fam, dst, rules = self._policy(version, gateway, ports)
        for r in reversed(rules):
            self._netlink(f"removing the IPv{version} rule {r}", self.ipr.rule, "del", family=fam,
                          ok=(errno.ENOENT,), **r)
        self._netlink(f"removing the IPv{version} default route via {gateway} in table {POLICY_TABLE}",
                      self.ipr.route, "del", dst=dst, gateway=gateway, table=POLICY_TABLE, family=fam,
                      ok=(errno.ESRCH, errno.ENOENT))

    def _uplink_mtu(self, names: Mapping[int, str], links: Mapping[str, Link]) -> int:
        mtus = []
        for fam in (socket.AF_INET, socket.AF_INET6):
            try:
                routes = self.ipr.get_routes(family=fam, table=254)
            except Exception:  # a missing family is not an error here
                continue
            for r in routes:
                if r["dst_len"] != 0 or r["type"] != 1:  # default unicast routes only
                    continue
                oif = r.get_attr("RTA_OIF")
                if oif in names and names[oif] in links:
                    mtus.append(links[names[oif]].mtu)
                for nh in r.get_attr("RTA_MULTIPATH") or ():
                    if nh["oif"] in names:
                        mtus.append(links[names[nh["oif"]]].mtu)
        return min(mtus) if mtus else DEFAULT_MTU

    # -- sysctls -----------------------------------------------------------

    def get_sysctl(self, key: str) -> str | None:
        try:
            return (self.proc_sys / key).read_text().strip()
        except OSError:
            return None

    def set_sysctl(self, key: str, value: str) -> None:
        try:
            (self.proc_sys / key).write_text(f"{value}\n")
        except PermissionError:
            raise RealServerError(f"cannot set {display_key(key)}: permission denied (needs root)") from None
        except OSError as e:
            raise RealServerError(f"cannot set {display_key(key)}={value}: {e.strerror}") from None

    # -- links and addresses -----------------------------------------------

    def link_up(self, ifname: str, up: bool) -> None:
        idx = self._index(ifname)
        if idx is None:
            if up:
                raise RealServerError(f"interface {ifname} does not exist")
            return
        self._netlink(f"setting {ifname} {'up' if up else 'down'}", self.ipr.link, "set", index=idx, state="up" if up else "down")

    def create_tun(self, ifname: str) -> None:
        import fcntl

        from director.realserver.decap import TUN_FLAGS, TUNSETIFF, TUNSETPERSIST

        if self._index(ifname) is not None:
            log.warning("replacing leftover interface %s", ifname)
            self.delete_link(ifname)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise RealServerError(f"cannot open /dev/net/tun: {e.strerror} (modprobe tun?)") from None
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), TUN_FLAGS))
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
        except OSError as e:
            raise RealServerError(f"cannot create TUN device {ifname}: {e.strerror}") from None
        finally:
            os.close(fd)
        self.link_up(ifname, True)

    def delete_link(self, ifname: str) -> None:
        idx = self._index(ifname)
        if idx is not None:
            self._netlink(f"deleting {ifname}", self.ipr.link, "del", index=idx, ok=(errno.ENODEV,))

    def add_address(self, ifname: str, address: str, prefixlen: int) -> None:
        idx = self._index(ifname)
        if idx is None:
            raise RealServerError(f"cannot add {address}: interface {ifname} does not exist")
        kw = {"flags": 0x02} if ":" in address else {}  # IFA_F_NODAD: usable at once
        self._netlink(f"adding {address}/{prefixlen} to {ifname}", self.ipr.addr, "add",
                      index=idx, address=address, prefixlen=prefixlen, ok=(errno.EEXIST,), **kw)

    def del_address(self, ifname: str, address: str, prefixlen: int) -> None:
        idx = self._index(ifname)
        if idx is None:
            return
        self._netlink(f"removing {address}/{prefixlen} from {ifname}", self.ipr.addr, "del",
                      index=idx, address=address, prefixlen=prefixlen, ok=(errno.EADDRNOTAVAIL, errno.ENODEV, errno.ESRCH))

    # -- nftables ----------------------------------------------------------

    @staticmethod
    def _nft(args: list[str], script: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return nftables.run(args, script=script)
        except NftError as e:
            raise RealServerError(str(e)) from None

    def nft_load(self, script: str) -> None:
        res = self._nft(["-f", "-"], script)
        if res.returncode != 0:
            raise RealServerError(f"nft could not load table {NFT_FAMILY} {NFT_TABLE}: {nftables.reason(res)}")

    def nft_delete(self) -> None:
        if nftables.binary() is None:
            return
        res = self._nft(["delete", "table", NFT_FAMILY, NFT_TABLE])
        if res.returncode != 0 and "No such file" not in res.stderr:
            raise RealServerError(f"nft could not delete table {NFT_FAMILY} {NFT_TABLE}: {nftables.reason(res)}")

    # -- the decapsulator daemon --------------------------------------------

    def start_decap(self, step: StartDecap, timeout: float = 10.0) -> dict:
        import director

        pkg_root = str(Path(director.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        argv = [sys.executable, "-m", "director.realserver.decap", "--tun", step.tun, "--stats-file", step.stats_file]
        for v in step.vips:
            argv += ["--vip", v]
        r, w = os.pipe()
        try:
            logf = open(step.log_file, "ab")
        except OSError as e:
            os.close(r)
            os.close(w)
            raise RealServerError(f"cannot open the decapsulator log {step.log_file}: {e.strerror}") from None
        try:
            proc = subprocess.Popen(argv + ["--ready-fd", str(w)], pass_fds=(w,), stdin=subprocess.DEVNULL,
                                    stdout=logf, stderr=logf, start_new_session=True, env=env, cwd="/")
        except OSError as e:
            os.close(r)
            raise RealServerError(f"cannot start the decapsulator: {e.strerror}") from None
        finally:
            os.close(w)
            logf.close()
        try:
            answer = b""
            deadline = time.monotonic() + timeout
            while not answer.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([r], [], [], left)[0]:
                    break
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                answer += chunk
        finally:
            os.close(r)
        text = answer.decode(errors="replace").strip()
        if text != "ready":
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            reason = text.removeprefix("error: ") if text else f"it exited or hung at start; see {step.log_file}"
            raise RealServerError(f"the userspace decapsulator did not start: {reason}")
        proc.returncode = 0  # it lives on as a daemon; keep subprocess from reporting it as lost
        return {"pid": proc.pid, "start_time": proc_start_time(proc.pid)}

    def stop_decap(self, runtime: Mapping, timeout: float = 10.0) -> None:
        stop_process(runtime.get("pid"), runtime.get("start_time"), timeout=timeout, what="decapsulator")

    def start_bpf_decap(self, step: BpfDecap) -> dict:
        from director.realserver import bpfdecap

        return bpfdecap.start(step.vips, step.interfaces, step.pin_dir)

    def stop_bpf_decap(self, runtime: Mapping) -> None:
        from director.realserver import bpfdecap

        bpfdecap.stop(runtime)


def stop_process(pid: int | None, start_time: int | None, *, timeout: float = 10.0, what: str = "process") -> bool:
    """SIGTERM the process ``pid`` if it is still the one that started at ``start_time``; wait, then SIGKILL.

    Returns True if it was running. Never signals a PID that now belongs to another process.
    """
    if not pid or proc_start_time(pid) is None or (start_time is not None and proc_start_time(pid) != start_time):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    except PermissionError:
        raise RealServerError(f"cannot stop the {what} (PID {pid}): permission denied") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if proc_start_time(pid) is None:
            return True
        time.sleep(0.02)
    log.warning("the %s (PID %d) ignored SIGTERM for %.0fs; killing it", what, pid, timeout)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
