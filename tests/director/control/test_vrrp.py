"""The VRRPv3 state machine: every transition of RFC 5798 6.4, time driven by the test."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from director.control import vrrp_packet as wire
from director.control.vrrp import (
    CancelTimer, LogDrop, Reclaim, Router, RouterConfig, SetTimer, State, StateChange, Transmit,
    master_down_interval, skew_time,
)
from director.control.vrrp_packet import Advertisement, Received
from glb.errors import HAError

A = ipaddress.ip_address
ME, PEER, LOW_PEER = A("10.0.0.2"), A("10.0.0.3"), A("10.0.0.1")
VIPS = (A("10.0.0.100"),)
CFG = RouterConfig(vrid=7, priority=100, address=ME, addresses=VIPS, advert_interval=10)


def advert(priority, src=PEER, *, vrid=7, interval=10, addresses=VIPS, ttl=255, dst=wire.GROUP_V4):
    payload = wire.encode(Advertisement(vrid, priority, interval, addresses), src, dst)
    return Received(src, dst, ttl, payload)


def kinds(actions):
    """Action names, a state change as Become<State>."""
    return [f"Become{a.state.name.title()}" if isinstance(a, StateChange) else type(a).__name__ for a in actions]


def backup(cfg=CFG, now=0.0) -> Router:
    r = Router(cfg)
    r.startup(now)
    assert r.state is State.BACKUP
    return r


def master(cfg=CFG, now=0.0) -> Router:
    r = backup(cfg, now)
    r.on_timer(r.timer)
    assert r.state is State.MASTER
    return r


def test_timer_formulas_follow_the_rfc():
    # Skew_Time = ((256 - Priority) * Master_Adver_Interval) / 256, in centiseconds.
    assert skew_time(100, 100) == pytest.approx(156 / 256)
    assert master_down_interval(100, 100) == pytest.approx(3 + 156 / 256)
    assert master_down_interval(254, 10) == pytest.approx(0.3 + (2 * 10 / 256) / 100)


# ---- Initialize ------------------------------------------------------------------

def test_startup_goes_backup_and_arms_the_master_down_timer():
    r = Router(CFG)
    actions = r.startup(5.0)
    assert actions == [StateChange(State.BACKUP, "startup"), SetTimer(5.0 + master_down_interval(100, 10))]
    assert r.master_adver_int == 10 and r.timer == actions[-1].at


def test_startup_as_address_owner_goes_master_at_once():
    r = Router(replace(CFG, priority=255))
    actions = r.startup(1.0)
    assert kinds(actions) == ["Transmit", "BecomeMaster", "SetTimer"]
    assert actions[0].dst == wire.GROUP_V4 and actions[0].priority == 255
    assert wire.decode(Received(ME, wire.GROUP_V4, 255, actions[0].payload)) == Advertisement(7, 255, 10, VIPS)
    assert actions[-1] == SetTimer(1.1) and r.state is State.MASTER


def test_initialize_ignores_packets_timers_and_shutdown():
    r = Router(CFG)
    assert r.receive(advert(200), 0.0) == [] and r.state is State.INITIALIZE
    assert r.on_timer(100.0) == [] and r.shutdown(0.0) == []
    assert r.counters["rx"] == 1


def test_startup_twice_is_a_no_op():
    r = backup()
    assert r.startup(1.0) == []


# ---- Backup ----------------------------------------------------------------------

def test_backup_master_down_timer_makes_it_master():
    r = backup()
    assert r.on_timer(r.timer - 0.001) == []  # early wake-up: nothing
    actions = r.on_timer(r.timer)
    assert kinds(actions) == ["Transmit", "BecomeMaster", "SetTimer"]
    assert actions[0].priority == 100 and r.state is State.MASTER and r.master == ME


def test_backup_accepts_a_higher_master_and_learns_its_interval():
    r = backup()
    actions = r.receive(advert(200, interval=25), 1.0)
    assert r.master_adver_int == 25 and r.master == PEER
    # the interval differs from ours: tolerated (v3), counted and logged once, and used.
    assert isinstance(actions[0], LogDrop) and actions[0].reason == "interval_mismatch" and not actions[0].dropped
    assert actions[-1] == SetTimer(1.0 + master_down_interval(100, 25))
    assert r.receive(advert(200, interval=25), 2.0) == [SetTimer(2.0 + master_down_interval(100, 25))]
    assert r.counters["interval_mismatch"] == 2 and r.state is State.BACKUP


def test_backup_accepts_an_equal_priority_master():
    r = backup()
    assert r.receive(advert(100), 1.0) == [SetTimer(1.0 + master_down_interval(100, 10))]


def test_backup_priority_zero_waits_only_skew_time():
    r = backup()
    r.receive(advert(200), 1.0)
    assert r.receive(advert(0), 1.5) == [SetTimer(1.5 + skew_time(100, 10))]
    actions = r.on_timer(1.5 + skew_time(100, 10))
    assert kinds(actions) == ["Transmit", "BecomeMaster", "SetTimer"]
    assert "released (priority 0)" in actions[1].reason  # the log tells a handover from a failure


def test_backup_with_preempt_discards_a_lower_master_and_takes_over():
    r = backup()
    t0 = r.timer
    assert r.receive(advert(50, LOW_PEER), 0.1) == []  # discarded: the timer is not reset
    assert r.timer == t0
    assert kinds(r.on_timer(t0)) == ["Transmit", "BecomeMaster", "SetTimer"]


def test_backup_without_preempt_follows_a_lower_master():
    r = backup(replace(CFG, preempt=False))
    assert r.receive(advert(50, LOW_PEER), 0.1) == [SetTimer(0.1 + master_down_interval(100, 10))]
    assert r.master == LOW_PEER


def test_preempt_delay_follows_a_lower_master_until_the_delay_has_passed():
    r = backup(replace(CFG, preempt_delay=2.0))
    for t in (1.0, 1.3, 2.9):  # first heard at 1.0: accepted until 3.0
        assert r.receive(advert(50, LOW_PEER), t) == [SetTimer(t + master_down_interval(100, 10))]
    deadline = r.timer
    assert r.receive(advert(50, LOW_PEER), 3.0) == []  # now it preempts
    assert kinds(r.on_timer(deadline)) == ["Transmit", "BecomeMaster", "SetTimer"]


def test_preempt_delay_restarts_when_a_better_master_was_heard_in_between():
    r = backup(replace(CFG, preempt_delay=2.0))
    r.receive(advert(50, LOW_PEER), 1.0)
    r.receive(advert(200), 2.0)  # a better master: the lower one's clock is forgotten
    assert r.receive(advert(50, LOW_PEER), 3.5) != []  # accepted: its delay starts again at 3.5
    assert r.receive(advert(50, LOW_PEER), 5.5) == []


def test_a_backup_that_is_not_ready_follows_a_lower_master_and_its_delay_starts_when_ready():
    """A restarted primary whose checks have not passed yet must not take the VIPs only to drop their packets."""
    r = backup(replace(CFG, preempt_delay=2.0))
    for t in (1.0, 2.0, 3.5):  # not ready: accepted as master however long
        assert r.receive(advert(50, LOW_PEER), t, ready=False) == [SetTimer(t + master_down_interval(100, 10))]
    assert r.master == LOW_PEER and r.state is State.BACKUP
    assert r.receive(advert(50, LOW_PEER), 4.0) != []  # ready from 4.0: the delay counts from there
    assert r.receive(advert(50, LOW_PEER), 5.9) != []
    assert r.receive(advert(50, LOW_PEER), 6.0) == []  # now it preempts


def test_a_backup_that_is_not_ready_still_takes_over_a_silent_master():
    r = backup()
    r.receive(advert(200), 1.0, ready=False)
    assert kinds(r.on_timer(1.0 + master_down_interval(100, 10))) == ["Transmit", "BecomeMaster", "SetTimer"]


def test_backup_shutdown_goes_initialize_silently():
    r = backup()
    assert r.shutdown(1.0) == [CancelTimer(), StateChange(State.INITIALIZE, "shutdown")]
    assert r.state is State.INITIALIZE and r.timer is None and r.on_timer(100.0) == []


# ---- Master ----------------------------------------------------------------------

def test_master_adver_timer_sends_and_rearms():
    r = master()
    t = r.timer
    actions = r.on_timer(t)
    assert kinds(actions) == ["Transmit", "SetTimer"] and actions[1] == SetTimer(t + 0.1)


def test_master_answers_priority_zero_with_an_advertisement_at_once():
    r = master()
    actions = r.receive(advert(0), 10.0)
    assert kinds(actions) == ["Transmit", "SetTimer"] and actions[1] == SetTimer(10.1)


def test_master_yields_to_a_higher_priority():
    r = master()
    actions = r.receive(advert(200, interval=20), 10.0)
    assert kinds(actions) == ["LogDrop", "BecomeBackup", "SetTimer"]
    assert actions[-1] == SetTimer(10.0 + master_down_interval(100, 20))
    assert r.state is State.BACKUP and r.master == PEER and r.master_adver_int == 20


def test_master_tie_on_priority_goes_to_the_higher_address():
    r = master()
    assert kinds(r.receive(advert(100, LOW_PEER), 10.0)) == ["Transmit", "Reclaim"] and r.state is State.MASTER
    assert kinds(r.receive(advert(100, PEER), 10.0)) == ["BecomeBackup", "SetTimer"]


def test_master_hearing_a_lower_master_stays_advertises_and_reclaims_the_vips_once_a_second():
    r = master()
    actions = r.receive(advert(99), 10.0)
    assert kinds(actions) == ["Transmit", "Reclaim"] and r.state is State.MASTER
    assert actions[0].priority == 100 and actions[1] == Reclaim(PEER, 99)
    assert r.receive(advert(99), 10.5) == []  # it keeps advertising (it cannot hear us?): no storm
    assert kinds(r.receive(advert(99), 11.0)) == ["Transmit", "Reclaim"]


def test_master_shutdown_sends_priority_zero():
    r = master()
    actions = r.shutdown(10.0)
    assert kinds(actions) == ["Transmit", "CancelTimer", "BecomeInitialize"]
    assert actions[0].priority == 0
    assert wire.decode(Received(ME, wire.GROUP_V4, 255, actions[0].payload)).priority == 0
    assert r.state is State.INITIALIZE


# ---- validation and counters -------------------------------------------------------

@pytest.mark.parametrize("pkt,reason", [
    (advert(200, ttl=64), "ttl"),
    (advert(200, vrid=8), "vrid"),
    (Received(PEER, wire.GROUP_V4, 255, b"\x31\x07"), "length"),
    (Received(A("fe80::3"), wire.GROUP_V6, 255, wire.encode(Advertisement(7, 200, 10, ()), A("fe80::3"), wire.GROUP_V6)), "family"),
])
def test_bad_packets_are_dropped_counted_and_logged_once(pkt, reason):
    r = backup()
    t0 = r.timer
    first = r.receive(pkt, 1.0)
    assert len(first) == 1 and first[0].reason == reason and first[0].dropped and first[0].src == pkt.src
    assert r.receive(pkt, 1.1) == []  # logged once
    assert r.counters[reason] == 2 and r.counters["rx"] == 0 and r.timer == t0 and r.state is State.BACKUP


def test_an_address_owner_drops_every_advertisement():
    r = Router(replace(CFG, priority=255))
    r.startup(0.0)
    assert kinds(r.receive(advert(254), 1.0)) == ["LogDrop"] and r.counters["owner"] == 1
    assert r.state is State.MASTER


def test_address_mismatch_is_logged_once_but_processed():
    r = backup()
    actions = r.receive(advert(200, addresses=(A("10.0.0.200"),)), 1.0)
    assert kinds(actions) == ["LogDrop", "SetTimer"] and actions[0].reason == "address_mismatch"
    assert not actions[0].dropped and r.master == PEER


def test_unicast_peers_get_one_advertisement_each_with_their_own_checksum():
    peers = (A("10.0.0.3"), A("10.0.0.4"))
    r = master(replace(CFG, peers=peers))
    sends = [a for a in r.on_timer(r.timer) if isinstance(a, Transmit)]
    assert [s.dst for s in sends] == list(peers)
    for s in sends:
        assert wire.decode(Received(ME, s.dst, 255, s.payload)).priority == 100


def test_config_refuses_impossible_values():
    for bad in (dict(vrid=0), dict(vrid=256), dict(priority=0), dict(priority=256), dict(advert_interval=0),
                dict(advert_interval=4096), dict(peers=(A("fe80::1"),))):
        with pytest.raises(ValueError):
            replace(CFG, **bad)


# ---- two routers on a simulated LAN -------------------------------------------------

class LAN:
    """Routers exchanging their Transmits instantly; time advances from timer to timer."""

    def __init__(self, *routers: Router):
        self.routers = list(routers)
        self.now = 0.0
        self.log: list[tuple[float, str, str]] = []

    def deliver(self, sender: Router, actions) -> None:
        for a in actions:
            if isinstance(a, StateChange):
                self.log.append((self.now, str(sender.config.address), a.state))
            if isinstance(a, Transmit):
                for r in self.routers:
                    if r is not sender:
                        self.deliver(r, r.receive(Received(sender.config.address, a.dst, 255, a.payload), self.now))

    def start(self, r: Router) -> None:
        self.deliver(r, r.startup(self.now))

    def run_until(self, t: float) -> None:
        while True:
            due = [r for r in self.routers if r.timer is not None]
            nxt = min((r.timer for r in due), default=None)
            if nxt is None or nxt > t:
                self.now = t
                return
            self.now = nxt
            for r in due:
                if r.timer == nxt:
                    self.deliver(r, r.on_timer(nxt))

    def took_over(self, who: str) -> float:
        """When ``who`` last became master."""
        return [t for t, addr, state in self.log if addr == who and state is State.MASTER][-1]

    def masters(self):
        return [r.config.address for r in self.routers if r.state is State.MASTER]


def pair(preempt=True, delay=0.0):
    a = Router(replace(CFG, address=A("10.0.0.1"), priority=200, preempt=preempt, preempt_delay=delay))
    b = Router(replace(CFG, address=A("10.0.0.2"), priority=100, preempt=preempt, preempt_delay=delay))
    return a, b


def settled_pair() -> tuple[Router, Router, LAN]:
    """Both started (the lower first), run for 5 s: the higher one is master."""
    a, b = pair()
    lan = LAN(a, b)
    lan.start(b)
    lan.start(a)
    lan.run_until(5.0)
    assert lan.masters() == [a.config.address] and b.state is State.BACKUP
    return a, b, lan


def test_pair_elects_the_higher_priority_and_fails_over_in_the_master_down_interval():
    a, b, lan = settled_pair()
    # a dies silently (kill -9): b takes over after its master-down interval
    lan.routers.remove(a)
    died = lan.now
    lan.run_until(10.0)
    took = lan.took_over("10.0.0.2")
    assert died < took <= died + master_down_interval(100, 10) + 1e-9


def test_pair_clean_stop_hands_over_after_skew_time_only():
    a, b, lan = settled_pair()
    lan.deliver(a, a.shutdown(lan.now))
    stopped = lan.now
    lan.routers.remove(a)
    lan.run_until(10.0)
    took = lan.took_over("10.0.0.2")
    assert took == pytest.approx(stopped + skew_time(100, 10))


@pytest.mark.parametrize("preempt", [True, False])
def test_recovered_primary_preempts_only_when_configured(preempt):
    a, b = pair(preempt)
    lan = LAN(b)
    lan.start(b)
    lan.run_until(2.0)
    assert lan.masters() == [b.config.address]
    lan.routers.append(a)
    lan.start(a)
    lan.run_until(6.0)
    assert lan.masters() == [a.config.address if preempt else b.config.address]


def test_recovered_primary_waits_its_preempt_delay():
    a, b = pair(True, delay=3.0)
    lan = LAN(b)
    lan.start(b)
    lan.run_until(2.0)
    lan.routers.append(a)
    lan.start(a)
    lan.run_until(4.9)
    assert lan.masters() == [b.config.address]
    lan.run_until(8.0)
    assert lan.masters() == [a.config.address]
    took = lan.took_over("10.0.0.1")
    assert 2.0 + 3.0 <= took <= 2.0 + 3.0 + master_down_interval(200, 10) + 0.1


def test_split_brain_ends_when_advertisements_cross():
    a, b = pair()
    for r in (a, b):  # both masters: a partitioned LAN
        r.startup(0.0)
        r.on_timer(r.timer)
    lan = LAN(a, b)
    lan.run_until(1.0)
    assert lan.masters() == [a.config.address] and b.state is State.BACKUP


def test_a_false_takeover_ends_at_once_and_the_master_reclaims_the_vips():
    a, b, lan = settled_pair()
    # a's advertisements are late (its event loop stalled): b's master-down timer runs out.
    b_took = b.on_timer(b.timer)
    assert b.state is State.MASTER
    got = a.receive(Received(b.config.address, wire.GROUP_V4, 255, b_took[0].payload), lan.now)
    assert kinds(got) == ["Transmit", "Reclaim"]  # a stays master, tells b, announces the VIPs again
    b.receive(Received(a.config.address, wire.GROUP_V4, 255, got[0].payload), lan.now)
    assert b.state is State.BACKUP


def test_router_config_from_a_pair_in_the_config():
    from glb.config import PairConfig, PairMember

    pair = PairConfig(51, (PairMember("a", A("10.0.0.1"), 200), PairMember("b", A("10.0.0.2"), 100),
                           PairMember("c", A("10.0.0.3"), 50)), advert_interval=0.25, preempt=False, preempt_delay=3.0)
    vips = (A("10.0.0.100"), A("2001:db8::100"), A("10.0.0.100"), A("10.0.0.101"))
    cfg = RouterConfig.from_pair(pair, "b", vips)
    assert cfg == RouterConfig(vrid=51, priority=100, address=A("10.0.0.2"), addresses=(A("10.0.0.100"), A("10.0.0.101")),
                               advert_interval=25, preempt=False, preempt_delay=3.0, peers=())
    assert RouterConfig.from_pair(replace(pair, unicast=True), "b", vips).peers == (A("10.0.0.1"), A("10.0.0.3"))
    with pytest.raises(HAError) as info:
        RouterConfig.from_pair(pair, "z", vips)
    assert str(info.value) == "member: 'z' is not a member of the pair (a, b, c)"
