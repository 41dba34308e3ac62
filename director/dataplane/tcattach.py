"""Attach the kernel data plane's program at an interface's tc ingress (clsact, direct-action), with pyroute2.

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
