"""The kernel data plane's netlink side (pyroute2): its attachment at tc ingress and its slow-path veth.

The thin netlink adapter: a clsact qdisc (created if missing, removed on
detach only if this made it) and one bpf filter at ingress, priority
:data:`PRIO`, holding the program by fd. The program's maps live as long as
the filter or the loader holds it. Failures are one KernelDataplaneError line.
"""

from __future__ import annotations

import errno

from glb.errors import KernelDataplaneError

INGRESS = "ffff:fff2"
PRIO = 0xC1B
"""Our filter's priority on the ingress hook (another tool's filters keep theirs)."""


class TcIngress:
    """The program attached at ``interface``'s ingress; :meth:`detach` removes exactly what it added."""

    def __init__(self, interface: str, prog_fd: int, name: str = "glb_ingress") -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        self.interface = interface
        self._made_qdisc = False
        self._ipr = ipr = IPRoute()
        try:
            links = ipr.link_lookup(ifname=interface)
            if not links:
                raise KernelDataplaneError(f"cannot attach the tc program: no interface {interface}")
            self.ifindex = links[0]
            try:
                ipr.tc("add", "clsact", self.ifindex)
                self._made_qdisc = True
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            # replace, not add: a director killed without detaching left its filter here, still
            # forwarding by maps nobody updates; this one takes its place.
            ipr.tc("replace-filter", "bpf", self.ifindex, ":1", fd=prog_fd, name=name, parent=INGRESS,
                   classid=1, direct_action=True, prio=PRIO)
        except NetlinkError as e:
            self.detach()
            raise KernelDataplaneError(f"cannot attach the tc program to {interface}: {e.args[-1]}") from None
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        ipr, self._ipr = self._ipr, None
        if ipr is None:
            return
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            if self._made_qdisc:
                ipr.tc("del", "clsact", self.ifindex)
            elif hasattr(self, "ifindex"):
                ipr.tc("del-filter", "bpf", self.ifindex, ":1", parent=INGRESS, prio=PRIO)
        except NetlinkError:
            pass  # already gone (the interface went away, someone removed the qdisc)
        finally:
            ipr.close()


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
