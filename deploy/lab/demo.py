"""The failover demo on the lab: what `bash scripts/demo` shows.

1. Build the lab (every process through the real `glb` commands).
2. A client resolves app.example.net through the resolver (which follows the
   delegation to dnsfront and caches for the TTL) and fetches http://VIP/,
   trying the answer's next address if one fails, as browsers do.
3. Every real server of dc1 stops: dc1's director sees it within its fall
   threshold and publishes; dnsfront stops answering dc1; the resolver's
   cached answer runs out; the client keeps being served (by dc2). A second
   client asks for api.example.net (one address per answer) and never tries
   another: while its cached answer still says dc1, dc1's director spills
   its new connections to dc2's real servers (dc2-rsN@dc1: served by dc2
   through dc1's VIP).
4. dc1's servers come back: dc1 is answered and serves again.
5. dc1's active director is killed (kill -9): its standby (a VRRP pair,
   docs/ha.md) takes the VIP over with the connection table; DNS never
   changes and the client keeps being served by dc1. The killed director
   is started again and takes the VIP back (preempt).
6. The client fetches through nat.example.net, dc2's second service: LVS-NAT,
   VIP:80 rewritten to port 8080 of real servers on a private network whose
   gateway is the director; the client only ever talks to the VIP.

A line per second: time, what the resolver answered (sites, TTL), which real
servers answered the client's requests, retries on the next address, failures.
"""

from __future__ import annotations

import collections
import sys
import time
from dataclasses import dataclass, field

from deploy.lab import probe
from deploy.lab import topology as topo
from deploy.lab.lab import Lab
from deploy.lab.net import LabError

NAME = f"app.{topo.ZONE}"
SINGLE = f"api.{topo.ZONE}"
"""The single-address client's name: one VIP per answer, no second address to try."""
NAT = f"nat.{topo.ZONE}"
"""dc2's NAT service's name."""
NAT_REQUESTS = 20
TICK = 0.2  # seconds between client requests


@dataclass
class Second:
    answers: collections.Counter = field(default_factory=collections.Counter)
    ttls: set = field(default_factory=set)
    served: collections.Counter = field(default_factory=collections.Counter)
    retried: int = 0
    failed: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    single: collections.Counter = field(default_factory=collections.Counter)
    """The single-address client: ``server@site of the VIP it used`` (or the error) -> requests."""


class Timeline:
    def __init__(self, lab: Lab, vip_ok: bool):
        self.lab = lab
        self.vip_ok = vip_ok
        self.vip_site = {v: s for s, view in lab.sites.items() for v in view.vips}
        self.t0 = time.monotonic()
        self.requests = self.served = self.retried = self.failed = 0
        self.single_requests = self.single_failed = 0
        self.events: dict[str, float] = {}

    def site_names(self, addresses) -> str:
        return "+".join(sorted(self.vip_site.get(a, a) for a in addresses)) or "-"

    def header(self) -> None:
        legend = ", ".join(f"{s} = {' '.join(v.vips)}" for s, v in sorted(self.lab.sites.items()))
        print(f"\n  Client {topo.address_of('client')} asks the resolver for {NAME} and fetches http://VIP/ every "
              f"{TICK:.1f} s ({legend}).")
        print(f"  The single-address client asks for {SINGLE}; its column reads server@site of the VIP it used.")
        print("  time   resolver answer      served by (requests)                  retried  failed  "
              "single-address client")

    def event(self, text: str) -> None:
        print(f"  {time.monotonic() - self.t0:5.1f}s  >>> {text}", flush=True)

    def run(self, seconds: float, until=None, settle: float = 0.0) -> float | None:
        """Sample for up to ``seconds``; with ``until(second)``, stop ``settle`` s after it first holds; return that time."""
        end = time.monotonic() + seconds
        hit = None
        while time.monotonic() < end:
            sec = Second()
            second_end = time.monotonic() + 1.0
            dns_seen = []
            while time.monotonic() < second_end:
                self.lab.check_processes()
                with self.lab.inside("client"):
                    direct = probe.resolve(topo.DNSFRONTS["ns1"], NAME, rd=False, timeout=0.5)
                    att = probe.request(topo.RESOLVER, NAME, fallback=True, connect_timeout=0.5) if self.vip_ok \
                        else probe.Attempt(time.monotonic(), probe.resolve(topo.RESOLVER, NAME))
                self._note_dns(direct, att.answer)
                dns_seen.append(att.answer)
                sec.answers[self.site_names(att.answer.addresses) if att.answer.ok else str(att.answer)] += 1
                if att.answer.ttl is not None:
                    sec.ttls.add(att.answer.ttl)
                if self.vip_ok:
                    self.requests += 1
                    if att.ok:
                        self.served += 1
                        sec.served[att.served_by] += 1
                    else:
                        self.failed += 1
                        sec.failed += 1
                        for t in att.tries[-1:]:
                            sec.errors[f"{self.vip_site.get(t.address, t.address)}: {t.error}"] += 1
                    if len(att.tries) > 1:
                        self.retried += 1
                        sec.retried += 1
                    with self.lab.inside("client"):
                        one = probe.request(topo.RESOLVER, SINGLE, fallback=False, connect_timeout=0.5)
                    self.single_requests += 1
                    if one.ok:
                        sec.single[f"{one.served_by}@{self.vip_site.get(one.tries[-1].address, '?')}"] += 1
                    else:
                        self.single_failed += 1
                        sec.single["failed"] += 1
                time.sleep(max(0.0, TICK - (time.monotonic() - att.at)))
            self._print(sec)
            if until is not None and hit is None and until(sec):
                hit = time.monotonic()
                end = min(end, hit + settle)
        return hit

    def _note_dns(self, direct: probe.DNSAnswer, via_resolver: probe.DNSAnswer) -> None:
        now = time.monotonic()
        dc1 = self.lab.sites["dc1"].vips[0]
        fault = self.events.get("fault")
        back = self.events.get("back")
        if fault is not None and back is None:
            if "dnsfront_moved" not in self.events and direct.ok and dc1 not in direct.addresses:
                self.events["dnsfront_moved"] = now
                self.event(f"dnsfront no longer answers dc1 ({now - fault:.2f} s after the fault)")
            if "resolver_moved" not in self.events and via_resolver.ok and dc1 not in via_resolver.addresses:
                self.events["resolver_moved"] = now
                self.event(f"the resolver's answer no longer has dc1 ({now - fault:.2f} s: its cached TTL ran out)")
        director = self.events.get("director_fault")
        if director is not None and direct.ok and dc1 not in direct.addresses:
            self.events.setdefault("director_dns_changed", now)
        if back is not None:
            if "dnsfront_back" not in self.events and dc1 in direct.addresses:
                self.events["dnsfront_back"] = now
                self.event(f"dnsfront answers dc1 again ({now - back:.2f} s after its servers came back)")

    def _print(self, sec: Second) -> None:
        t = time.monotonic() - self.t0
        answer = ", ".join(f"{a}" for a, _ in sec.answers.most_common(2))
        ttl = f" ttl {min(sec.ttls)}-{max(sec.ttls)}" if sec.ttls and min(sec.ttls) != max(sec.ttls) else \
            (f" ttl {min(sec.ttls)}" if sec.ttls else "")
        if self.vip_ok:
            served = ", ".join(f"{s} {n}" for s, n in sorted(sec.served.items())) or "-"
            errors = "  " + "; ".join(f"{e} x{n}" for e, n in sec.errors.items()) if sec.errors else ""
            single = ", ".join(f"{s} {n}" for s, n in sorted(sec.single.items())) or "-"
            print(f"  {t:5.1f}s {answer + ttl:<20} {served:<37} {sec.retried:>7}  {sec.failed:>6}  {single}{errors}",
                  flush=True)
        else:
            print(f"  {t:5.1f}s {answer + ttl:<18} (VIP path not forwarding yet: DNS only)", flush=True)


def run_demo(lab: Lab, *, hold: float | None = None, keep: bool = False) -> int:
    log = lab.log
    print(__doc__.split("\n\n")[1].replace("\n", "\n  ").join(["  ", "\n"]))
    if lab.is_up():
        log("a lab is already up: removing it first")
        lab.down()
    try:
        summary = lab.up()
        log(f"lab up in {summary['seconds']} s")
        print(f"\n  Dashboard: {lab.dashboard_url}  (open it now to watch the failover live;\n"
              f"  actions ask for the admin token: admin.token in {lab._rel(str(lab.config_path))})\n", flush=True)
        vip_ok = all(v and v.startswith("ok") for v in summary["vip_path"].values())
        if not vip_ok:
            print("\n  NOTE: the client cannot fetch through the VIPs "
                  f"({'; '.join(f'{s}: {r}' for s, r in summary['vip_path'].items())}): the director's packet path is "
                  "not forwarding. The timeline shows the DNS side only.")
        tl = Timeline(lab, vip_ok)
        tl.header()
        tl.run(4.0)
        dc1 = [r for r in lab.sites["dc1"].real_servers]
        tl.event(f"stopping every real server of dc1 ({', '.join(dc1)})")
        for role in dc1:
            lab.stop_process(f"{role}-httpd")
        tl.events["fault"] = time.monotonic()
        moved = tl.run(25.0, until=lambda s: "resolver_moved" in tl.events, settle=3.0)
        if moved is None:
            raise LabError("DNS still pointed the client at dc1 25 s after its servers stopped")
        tl.event(f"starting dc1's real servers again ({', '.join(dc1)})")
        for role in dc1:
            lab.restart_process(f"{role}-httpd")
        tl.events["back"] = time.monotonic()

        def dc1_serves(sec: Second) -> bool:
            if vip_ok:
                return any(s.startswith("dc1") for s in sec.served)
            return any("dc1" in a for a in sec.answers)

        returned = tl.run(25.0, until=dc1_serves, settle=3.0)
        if returned is None:
            raise LabError("dc1 did not serve again within 25 s of its servers coming back")
        tl.event(f"dc1 serves the client again ({returned - tl.events['back']:.1f} s after its servers came back)")
        director_phase(lab, tl)
        if vip_ok:
            nat_phase(lab, tl)
        _summary(tl)
        print()
        print(lab.glb_status())
        if hold is None:
            hold = float("inf") if sys.stdin.isatty() else 0.0
        if hold > 0 or keep:
            print("The lab is still up. Try, in another shell (as root, from the repository):\n"
                  "  bash scripts/demo status                  # processes, DNS answers, glb status\n"
                  "  bash scripts/demo glb status\n"
                  "  bash scripts/demo glb director list --site dc1\n"
                  "  bash scripts/demo glb drain --site dc1     # then: glb undrain --site dc1\n"
                  f"  bash scripts/demo exec client dig +short {NAME}\n"
                  f"  bash scripts/demo exec client curl -s http://{NAME}/\n"
                  f"  bash scripts/demo exec client curl -s http://{NAT}/    # dc2's NAT service\n"
                  "  bash scripts/demo exec ops curl -s http://10.1.0.2:9100/metrics\n"
                  f"  open {lab.dashboard_url} in a browser on this host   # the dashboard\n"
                  "  bash scripts/demo down\n"
                  + ("Ctrl-C here tears it down." if not keep else "It stays up until 'bash scripts/demo down'."),
                  flush=True)
        if keep:
            return 0
        end = time.monotonic() + hold
        while time.monotonic() < end:
            lab.check_processes()
            time.sleep(1)
        return 0
    except KeyboardInterrupt:
        print()
        return 0
    finally:
        if not keep:
            log("tearing the lab down")
            lab.down()
            log("lab down: every namespace and process removed")


def director_phase(lab: Lab, tl: Timeline) -> None:
    """Kill dc1's active director; its standby takes over; start it again (it takes the VIP back)."""
    roles = [r for r in topo.director_roles(lab.config.site("dc1"))]
    active = next((r for r in roles if lab.pair_role(r) == "master"), None)
    if active is None:
        tl.event("dc1 has no director pair (or no master): skipping the director failover")
        return
    standby = next(r for r in roles if r != active)
    tl.event(f"killing dc1's active director {active} (kill -9); its standby {standby} takes the VIP over")
    tl.events["director_fault"] = time.monotonic()
    failed_before = tl.failed
    lab.kill_process(active)
    tl.run(6.0)
    tl.events["director_failed"] = tl.failed - failed_before
    tl.events["director_standby_master"] = lab.pair_role(standby) == "master"
    tl.event(f"starting {active} again: it takes the VIP back (preempt, after preempt_delay)")
    lab.restart_process(active)
    restarted = time.monotonic()
    back = tl.run(20.0, until=lambda sec: lab.pair_role(active) == "master", settle=2.0)
    if back is not None:
        tl.event(f"{active} is master again ({back - restarted:.1f} s after it was started; the handover "
                 f"carried the connection table)")
    tl.events["director_back"] = time.monotonic()


def nat_phase(lab: Lab, tl: Timeline) -> None:
    """Fetch through dc2's NAT service: who served, which address the client talked to, and the
    director's counters of both directions (it rewrites the replies too)."""
    svc = next((s for s in lab.sites["dc2"].services if s.forwarding == "nat"), None)
    if svc is None:
        tl.event("dc2 has no NAT service: skipping the NAT fetches")
        return
    tl.event(f"the client fetches http://{NAT}/ {NAT_REQUESTS} times: dc2's {svc.name} service, LVS-NAT "
             f"VIP:{svc.port} -> {', '.join(f'{a}:{svc.server_ports[r]}' for r, a in svc.real_servers.items())}")
    before = _nat_counters(lab, svc.name)
    served: collections.Counter = collections.Counter()
    peers: collections.Counter = collections.Counter()
    with lab.inside("client"):
        for _ in range(NAT_REQUESTS):
            att = probe.request(topo.RESOLVER, NAT, fallback=False, connect_timeout=1.0)
            served[att.served_by or f"failed: {att.tries[-1].error if att.tries else att.answer}"] += 1
            peers.update(t.address for t in att.tries if t.ok)
    # Each packet worker reports its counters to the control plane on its own: read until they stop moving.
    end = time.monotonic() + 5.0
    moved: dict[str, tuple[int, int]] = {}
    while True:
        after = _nat_counters(lab, svc.name)
        last, moved = moved, {a: (after[a][0] - before.get(a, (0, 0))[0], after[a][1] - before.get(a, (0, 0))[1])
                              for a in after}
        if (moved == last and all(i > 0 and o > 0 for i, o in moved.values())) or time.monotonic() > end:
            break
        time.sleep(0.5)
    tl.event(f"served by {', '.join(f'{s} {n}' for s, n in sorted(served.items()))}; the client talked to "
             f"{', '.join(sorted(peers)) or 'nothing'} only; director packets to/from each server: "
             + ", ".join(f"{a} {i}/{o}" for a, (i, o) in sorted(moved.items())))
    tl.events["nat"] = {"served": served, "peers": sorted(peers), "vips": svc.vips, "moved": moved,
                        "servers": sorted(svc.real_servers)}


def _nat_counters(lab: Lab, service: str) -> dict[str, tuple[int, int]]:
    """{real server address: (packets to it, packets from it)} of dc2's director."""
    st = lab.director_status("dc2-director") or {}
    return {rs["address"]: (rs.get("packets", 0), rs.get("out_packets", 0))
            for svc in st.get("services", []) if svc.get("name") == service for rs in svc["real_servers"]}


def _summary(tl: Timeline) -> None:
    ev = tl.events
    f = ev["fault"]
    print("\n  Summary")
    if "dnsfront_moved" in ev:
        print(f"    dnsfront stopped answering dc1      {ev['dnsfront_moved'] - f:5.2f} s after dc1's servers stopped")
    if "resolver_moved" in ev:
        print(f"    the resolver's answer followed      {ev['resolver_moved'] - f:5.2f} s after (the cached TTL ran out)")
    if "dnsfront_back" in ev:
        print(f"    dnsfront answered dc1 again         {ev['dnsfront_back'] - ev['back']:5.2f} s after they came back")
    if "director_fault" in ev:
        print(f"    dc1's active director killed:       standby master: "
              f"{'yes' if ev.get('director_standby_master') else 'NO'}; DNS "
              f"{'CHANGED' if 'director_dns_changed' in ev else 'unchanged'}; "
              f"{ev.get('director_failed', 0)} client requests failed meanwhile")
    if tl.vip_ok:
        print(f"    client requests {tl.requests}: served {tl.served}, {tl.retried} needed the answer's second "
              f"address, failed {tl.failed}")
        print(f"    single-address client requests {tl.single_requests}: failed {tl.single_failed} "
              f"(served through dc1's VIP by dc2's servers while dc1 spilled)")
    nat = ev.get("nat")
    if nat:
        by_nat = sum(n for s, n in nat["served"].items() if s in nat["servers"])
        seen = ", ".join(nat["peers"])
        seen = f"only the VIP {seen}" if nat["peers"] == nat["vips"] else f"NOT only the VIP: {seen}"
        both = any(i > 0 and o > 0 for i, o in nat["moved"].values())
        print(f"    NAT service ({NAT}): {by_nat}/{sum(nat['served'].values())} requests served by the NAT "
              f"servers ({', '.join(f'{s} {n}' for s, n in sorted(nat['served'].items()))}); the client saw "
              f"{seen}; director rewrote {'both directions' if both else 'NOT both directions'}")
