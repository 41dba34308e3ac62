"""The kernel data plane's attachment at tc ingress, and its slow-path veth (pyroute2, libbpf).

tcx (kernel 6.6+) runs the program straight from the receive path; the
clsact qdisc with a cls_bpf filter, where the kernel has no tcx, runs it
through the classifier layer (mini-qdisc statistics, the filter walk),
which cost ~3 % of the 64-byte packet rate on the director benchmark
(docs/benchmarks.md). Either way the attachment outlives the process, as a
filter always did: a director killed without detaching left its program,
still forwarding by maps nobody updates, and the next one takes its place
(tcx: atomically, by BPF_F_REPLACE; clsact: ``replace-filter``). Programs
are told apart by name. Failures are one KernelDataplaneError line.
"""

from __future__ import annotations

import errno

from glb.errors import KernelDataplaneError

INGRESS = "ffff:fff2"
PRIO = 0xC1B
"""The director's filter priority on the clsact ingress hook (another tool's filters keep theirs)."""
DECAP_PRIO = 0xC1C
"""The real server's decapsulator's (director/realserver/bpfdecap.py; both may sit on one host in a lab)."""
TCX, CLSACT, CLSACT_MADE = "tcx", "clsact", "clsact-made"
"""How a program is attached: tcx; a filter on a clsact qdisc that was there; one on a qdisc we made."""


def attach(interface: str, prog_fd: int, name: str, prio: int = PRIO, tcx: bool = True) -> tuple[int, str]:
    """Attach the program ``name`` (its kernel name) at ``interface``'s ingress, replacing one of that
    name left there; (ifindex, how) for :func:`detach`. ``tcx=False``: the clsact filter even where
    tcx exists (the fallback's tests)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    from director.dataplane.libbpf import tcx_attach, tcx_programs

    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=interface)
        if not links:
            raise KernelDataplaneError(f"cannot attach {name}: no interface {interface}")
        ifindex = links[0]
        if tcx:
            try:
                old = [pid for pid, n in tcx_programs(ifindex) if n == name]
                tcx_attach(ifindex, prog_fd, old[0] if old else 0)
                _del_filter(ipr, ifindex, prio)  # an older GLB's clsact filter, not to run after ours
                return ifindex, TCX
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # not "this kernel has no tcx"
                    raise KernelDataplaneError(f"cannot attach {name} to {interface} (tcx): {e.strerror}") from None
        made = False
        try:
            try:
                ipr.tc("add", "clsact", ifindex)
                made = True
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            ipr.tc("replace-filter", "bpf", ifindex, ":1", fd=prog_fd, name=name, parent=INGRESS,
                   classid=1, direct_action=True, prio=prio)
        except NetlinkError as e:
            if made:
                ipr.tc("del", "clsact", ifindex)
            raise KernelDataplaneError(f"cannot attach {name} to {interface}: {e.args[-1]}") from None
        return ifindex, CLSACT_MADE if made else CLSACT


def detach(ifindex: int, how: str, name: str, prio: int = PRIO) -> None:
    """Undo :func:`attach`: the program ``name`` off ``ifindex`` (and the clsact qdisc if attach made
    it). Gone already (the interface, the program) is fine."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    from director.dataplane.libbpf import tcx_detach, tcx_programs

    try:
        if how == TCX:
            for pid, n in tcx_programs(ifindex):
                if n == name:
                    tcx_detach(ifindex, pid)
            return
    except OSError as e:
        if e.errno in (errno.ENODEV, errno.ENOENT):
            return
        raise KernelDataplaneError(f"cannot detach {name} (tcx): {e.strerror}") from None
    with IPRoute() as ipr:
        try:
            if how == CLSACT_MADE:
                ipr.tc("del", "clsact", ifindex)
            else:
                _del_filter(ipr, ifindex, prio)
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise KernelDataplaneError(f"cannot detach {name}: {e.args[-1]}") from None


def _del_filter(ipr, ifindex: int, prio: int) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ipr.tc("del-filter", "bpf", ifindex, ":1", parent=INGRESS, prio=prio)
    except NetlinkError as e:
        if e.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            raise


def attached(interface: str) -> list[dict]:
    """Every program at ``interface``'s ingress, tcx first (they run first), as {"how", "name", "id"}:
    what ``tc filter show`` (which does not list tcx here) and ``bpftool net`` would tell together.
    A clsact filter's id is None (pyroute2 does not decode TCA_BPF_ID)."""
    from pyroute2 import IPRoute

    from director.dataplane.libbpf import tcx_programs

    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=interface)
        if not links:
            raise KernelDataplaneError(f"no interface {interface}")
        try:
            out = [{"how": TCX, "name": name, "id": pid} for pid, name in tcx_programs(links[0])]
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # else: no tcx in this kernel
                raise KernelDataplaneError(f"cannot list tcx ingress of {interface}: {e.strerror}") from None
            out = []
        for msg in ipr.get_filters(links[0], parent=INGRESS):
            opts = msg.get_attr("TCA_OPTIONS")
            if msg.get_attr("TCA_KIND") == "bpf" and opts is not None and opts.get_attr("TCA_BPF_NAME"):
                out.append({"how": CLSACT, "name": opts.get_attr("TCA_BPF_NAME"), "id": None})
    return out


class TcIngress:
    """The director's program attached at ``interface``'s ingress; :meth:`detach` removes exactly that."""

    def __init__(self, interface: str, prog_fd: int, name: str = "glb_ingress", tcx: bool = True) -> None:
        self.interface, self.name = interface, name
        self.ifindex, self.how = attach(interface, prog_fd, name, tcx=tcx)
        self._attached = True

    def detach(self) -> None:
        if self._attached:
            self._attached = False
            detach(self.ifindex, self.how, self.name)


class SlowPathVeth:
    """A veth pair for the frames the program leaves to the userspace engine.

    The program redirects them into ``glb<ifindex>s``; they come out of
    ``glb<ifindex>r``, which the engine reads. That end carries the
    interface's MAC, so the frames are for this host there as they were on
    the interface (the engine's filter refuses other hosts' frames). IPv6 is
    off on both ends so the kernel sends nothing of its own through them. A
    pair a killed director left is replaced.
    """

    def __init__(self, interface: str) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        self._ipr = ipr = IPRoute()
        self.tx_ifindex = 0
        try:
            links = ipr.link_lookup(ifname=interface)
            if not links:
                raise KernelDataplaneError(f"cannot make the slow path: no interface {interface}")
            mac = ipr.get_links(links[0])[0].get_attr("IFLA_ADDRESS")
            self.tx_name, self.rx_name = f"glb{links[0]}s", f"glb{links[0]}r"
            for old in ipr.link_lookup(ifname=self.tx_name):
                ipr.link("del", index=old)
            ipr.link("add", ifname=self.tx_name, kind="veth", peer=self.rx_name)
            for name in (self.tx_name, self.rx_name):
                try:
                    with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
                        f.write("1")
                except OSError:
                    pass  # no IPv6 in this kernel: nothing to silence
            self.tx_ifindex = ipr.link_lookup(ifname=self.tx_name)[0]
            rx = ipr.link_lookup(ifname=self.rx_name)[0]
            ipr.link("set", index=rx, address=mac)
            for index in (self.tx_ifindex, rx):
                ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            self.remove()
            raise KernelDataplaneError(f"cannot make the slow-path veth for {interface}: {e.args[-1]}") from None
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        ipr, self._ipr = self._ipr, None
        if ipr is None:
            return
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            if self.tx_ifindex:
                ipr.link("del", index=self.tx_ifindex)  # its peer goes with it
        except NetlinkError:
            pass
        finally:
            ipr.close()


def main(argv: list[str] | None = None) -> int:
    """What is attached at an interface's ingress, and removing a program left there by hand (a killed
    director's): ``python -m director.dataplane.tcattach IFACE [--detach NAME]``."""
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="python -m director.dataplane.tcattach",
                                 description="List the BPF programs at an interface's ingress (tcx and clsact), "
                                             "or detach one by name.")
    ap.add_argument("interface")
    ap.add_argument("--detach", metavar="NAME", help="detach every program of this name (glb_ingress, glb_decap)")
    args = ap.parse_args(argv)
    try:
        found = attached(args.interface)
        if args.detach:
            import socket

            ifindex = socket.if_nametoindex(args.interface)
            for how in {p["how"] for p in found if p["name"] == args.detach}:
                detach(ifindex, how, args.detach, DECAP_PRIO if args.detach == "glb_decap" else PRIO)
            found = attached(args.interface)
        print(json.dumps(found))
    except KernelDataplaneError as e:
        print(f"tcattach: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
