"""The packet-path object (director.dataplane.packetpath) with its Linux side replaced by fakes.

What it must do for the control plane: start (neighbours, guard, groups,
engine, in that order of dependence), coalesce plans, switch VIP ownership
at run time, stop and leave nothing behind. What "not owned" means for the
packets is checked on a real Forwarder: no ARP/ND answers, no forwarding,
and the flows still there when ownership comes back.
"""

from __future__ import annotations

import asyncio
import logging

from scapy.layers.l2 import ARP

from director.dataplane.announce import Announcer
from director.dataplane.forwarder import Forwarder, Plan
from director.dataplane.packetpath import Adapters, PacketPath, real_addresses, without_vips
from tests.director.dataplane.test_forwarder import (
    RS, VIP4, P, dr_owner, frame, fwd, mac, plan, server, syn,
)

MAC = bytes.fromhex("020000000001")


class FakeNeighbours:
    def __init__(self, iface: str) -> None:
        self.closed = False

    def mtu(self) -> int:
        return 1500

    def mac(self) -> bytes:
        return MAC

    def resolve(self, addrs):
        return {a: mac(RS.index(".".join(map(str, a))) + 1) for a in addrs}

    def close(self) -> None:
        self.closed = True


class FakeGuard:
    def __init__(self, iface: str) -> None:
        self.vips: frozenset | None = None

    def install(self, vips) -> None:
        self.vips = frozenset(vips)

    def remove(self) -> None:
        self.vips = None


class FakeGroups:
    def __init__(self, iface: str) -> None:
        self.vips: frozenset = frozenset()
        self.closed = False

    def update(self, vips) -> None:
        self.vips = frozenset(vips)

    def close(self) -> None:
        self.vips, self.closed = frozenset(), True


class FakeEngine:
    note = ""
    """What the next FakeEngine reports as its dataplane note (auto's fallback reason)."""

    def __init__(self, cfg) -> None:
        self.plans: list[Plan] = []
        self.stopped = False
        self.pids: list[int] = []
        self.failed = None
        self.dataplane_note = FakeEngine.note
        self.maps_note = ""
        self.dataplane = "userspace" if self.dataplane_note else "kernel"

    def start(self, plan: Plan) -> None:
        self.plans.append(plan)

    def update(self, plan: Plan) -> None:
        self.plans.append(plan)

    def stop(self) -> None:
        self.stopped = True


class Lab:
    """A PacketPath on fakes; ``weight`` changes what the control plane decides."""

    def __init__(self, owned: bool = True) -> None:
        self.weight = 1
        self.made: dict[str, object] = {}

        def made(kind, cls):
            def factory(arg):
                self.made[kind] = obj = cls(arg)
                return obj
            return factory

        adapters = Adapters(made("neighbours", FakeNeighbours), lambda vips: [], made("guard", FakeGuard),
                            made("groups", FakeGroups), made("engine", FakeEngine))
        self.path = PacketPath("eth0", None, self.build, owned=owned, adapters=adapters)

    def build(self, mac_: bytes, macs, mtu: int) -> Plan:
        p = plan(server(RS[0], weight=self.weight, m=macs.get(P(RS[0])) or b""))
        return Plan(mac_, p.services, p.source4, p.source6)

    @property
    def engine(self) -> FakeEngine:
        return self.made["engine"]  # type: ignore[return-value]


async def test_start_owns_the_vips_and_hands_the_engine_a_resolved_plan():
    lab = Lab()
    await lab.path.start()
    first = lab.engine.plans[0]
    assert first.vips == {P(VIP4)} and first.mac == MAC
    assert first.services[0].servers[0].mac == mac(1)  # resolved before the engine started
    assert lab.made["guard"].vips == {P(VIP4)} and lab.made["groups"].vips == {P(VIP4)}
    assert lab.path.owned
    await lab.path.stop()
    assert lab.engine.stopped and lab.made["guard"].vips is None and lab.made["groups"].closed
    assert lab.made["neighbours"].closed


async def test_a_kernel_data_plane_that_cannot_run_is_one_warning_line(caplog, monkeypatch):
    monkeypatch.setattr(FakeEngine, "note", "the kernel refused the tc program: Operation not permitted")
    lab = Lab()
    with caplog.at_level(logging.INFO, logger="glb.director"):
        await lab.path.start()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["kernel data plane unavailable, the userspace engine forwards every packet: "
                        "the kernel refused the tc program: Operation not permitted"]
    assert any("forwarded in userspace" in r.getMessage() for r in caplog.records)
    await lab.path.stop()


async def test_plans_are_coalesced_and_only_sent_when_they_change():
    lab = Lab()
    await lab.path.start()
    lab.weight = 5
    for _ in range(3):
        lab.path.apply()
    await asyncio.sleep(0)
    assert [p.services[0].servers[0].weight for p in lab.engine.plans] == [1, 5]
    lab.path.apply()
    await asyncio.sleep(0)
    assert len(lab.engine.plans) == 2  # nothing changed, nothing sent
    await lab.path.stop()


async def test_vip_ownership_switches_off_and_on_at_run_time():
    lab = Lab()
    await lab.path.start()
    guard, groups = lab.made["guard"], lab.made["groups"]

    lab.path.set_owned(False)
    assert not lab.path.owned
    assert lab.engine.plans[-1].vips == frozenset()  # at once: no answers, no forwarding
    assert guard.vips is None and groups.vips == frozenset()
    lab.weight = 3  # decisions go on while not owned; the engine still gets no VIP
    lab.path.apply()
    await asyncio.sleep(0)
    assert lab.engine.plans[-1].services[0].servers[0].weight == 3 and lab.engine.plans[-1].vips == frozenset()
    assert guard.vips is None

    lab.path.set_owned(True)
    assert lab.engine.plans[-1].vips == {P(VIP4)} and lab.engine.plans[-1].services[0].servers[0].weight == 3
    assert guard.vips == {P(VIP4)} and groups.vips == {P(VIP4)}
    await lab.path.stop()


async def test_a_director_can_start_as_a_standby():
    lab = Lab(owned=False)
    await lab.path.start()
    assert lab.engine.plans[0].vips == frozenset() and lab.made["guard"].vips is None
    lab.path.set_owned(True)
    assert lab.engine.plans[-1].vips == {P(VIP4)} and lab.made["guard"].vips == {P(VIP4)}
    await lab.path.stop()


def test_a_plan_without_vips_answers_nothing_forwards_nothing_and_keeps_the_flows():
    owned = plan(server(RS[0]), server(RS[1]))
    f = Forwarder()
    f.apply(owned)
    owner = dr_owner(fwd(f, syn(40000)))
    arp = frame(ARP(op=1, hwsrc="02:00:00:00:00:aa", psrc="192.0.2.1", pdst=VIP4))
    assert fwd(f, arp) is not None

    f.apply(without_vips(owned))
    assert fwd(f, arp) is None
    assert fwd(f, syn(40000, flags="A"), 1.0) is None
    assert fwd(f, syn(40001), 1.0) is None

    f.apply(owned)
    assert dr_owner(fwd(f, syn(40000, flags="A"), 2.0)) == owner  # the flow was kept
    assert fwd(f, arp) is not None


def test_taking_the_vips_back_announces_them_again():
    a = Announcer((0.0,))
    a.update({P(VIP4)}, MAC, 0.0)
    assert len(a.due(0.0)) == 1
    a.update(frozenset(), MAC, 5.0)  # released
    a.update({P(VIP4)}, MAC, 9.0)  # taken back
    assert len(a.due(9.0)) == 1


def test_real_addresses_are_every_server_and_sorry_server_once():
    sorry = server(RS[2])
    p = plan(server(RS[0]), server(RS[1]), sorry=sorry)
    assert real_addresses(p) == [P(RS[0]), P(RS[1]), P(RS[2])]
    assert real_addresses(Plan(MAC, p.services * 2)) == [P(RS[0]), P(RS[1]), P(RS[2])]
