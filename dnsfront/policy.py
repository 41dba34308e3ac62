"""Answer policy: which site(s) a load-balanced name answers with, and why.

Pure: takes the configured name, the sites, the followed ``DeploymentState``
(or None when Redis was never reached) and ``now``; returns a ``Plan``. A plan
is computed once per state change, not per query: it lists the possible
answers (``Choice``: addresses, TTL, reason) and a ``Selector`` that picks one
per query from a random number and, for topology/sticky, the client's network.
That split is what lets the server precompute every answer's bytes and still
vary randomised answers query by query.

Rules (docs/dnsfront.md has the long form):

* A member is *live* when its site has a fresh snapshot (age <= stale_after),
  is not withdrawn, not drained by an operator, runs the service, the service
  is up and its healthy fraction is > 0.
* Effective weight = (operator weight override, else configured weight)
  x healthy fraction. Members of weight 0 are standby: used, equally, only
  when no live member has a positive weight (Route 53's semantics).
* Policies (each a ``Policy`` in ``POLICIES``, the config's list of names):
* weighted: random in proportion to effective weight.
* failover: the lowest priority group with a live member; weighted inside it.
* topology: the live member whose ``networks`` most specifically contain the
  client (ECS address, else the resolver's); none -> weighted.
* sticky: weighted rendezvous hashing of the client's /24 (IPv4) or /56
  (IPv6): a subnet keeps its site while it is live, and a weight change only
  moves that site's proportional share.
* ``answers`` > 1 appends the next-best live sites' addresses after the
  chosen one, for client-side fallback.
* No live member: ``all_down`` = fail-open (every member's addresses),
  fallback (the sorry addresses) or servfail.
* TTL: ``ttl``; ``degraded_ttl`` while any member is not live, below full
  capacity or two heartbeats late, while all are down, and while we have no state at all.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from glb.state import DeploymentState

if TYPE_CHECKING:
    # Annotations only: glb.config takes its list of policy names from POLICIES
    # here, so this module must load without it.
    from glb.config import LBName, Site

OVERDUE_HEARTBEATS = 2
"""Heartbeats a live site may miss before its answers get the degraded TTL."""

STICKY_PREFIX = {4: 24, 6: 56}
"""Client subnet that shares a sticky site: what a resolver's ECS usually sends."""

ANSWER, NODATA, SERVFAIL = "answer", "nodata", "servfail"


@dataclass(frozen=True, slots=True)
class Client:
    """The network a query is answered for: ECS's, else the resolver's address.

    ``bits`` is how many leading bits of ``address`` are known: 32/128 for a
    resolver's address, the ECS SOURCE PREFIX-LENGTH otherwise.
    """

    family: int
    address: int
    bits: int

    @classmethod
    def from_ip(cls, text: str) -> Client:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a v4 client on a dual-stack socket
        return cls(ip.version, int(ip), ip.max_prefixlen)


@dataclass(frozen=True, slots=True)
class MemberView:
    """One pool member as the policy saw it (also shown in /status)."""

    site: str
    configured_weight: int
    weight: float
    """Effective weight: override or configured weight x healthy fraction."""
    priority: int
    healthy_fraction: float
    live: bool
    status: str
    """Why (not) live: "up", "stale 4.2s", "withdrawn", "drained", ..."""
    addresses: tuple[str, ...]
    """The site's VIPs of the plan's address family."""
    overdue: bool = False
    """Live, but its director missed OVERDUE_HEARTBEATS heartbeats: answered with the degraded TTL."""


@dataclass(frozen=True, slots=True)
class Choice:
    """One possible answer."""

    sites: tuple[str, ...]
    """Sites whose addresses are answered; the first is the chosen one."""
    addresses: tuple[str, ...]
    ttl: int
    reason: str


class Selector:
    """Picks a choice index per query. Pure: randomness is passed in."""

    client_dependent = False
    """True when ``decide(client)`` says which choice a client gets (topology, sticky)."""

    def select(self, rand: float, client: Client | None) -> tuple[int, int]:
        """(choice index, ECS scope prefix length) for one query."""
        raise NotImplementedError

    def slot_table(self, n: int) -> bytes | array:
        """The ``weight_slots`` table of this selector's random picks among ``n`` choices."""
        return weight_slots((1.0,) * n)


class Fixed(Selector):
    def select(self, rand: float, client: Client | None) -> tuple[int, int]:
        return 0, 0


SLOT_BITS = 16
SLOTS = 1 << SLOT_BITS


def weight_slots(weights: Sequence[float]) -> bytes | array:
    """A table of ``SLOTS`` choice indices, each index appearing in proportion
    to its weight (largest-remainder rounding; every positive weight gets at
    least one slot). Indexing it with 16 random bits is a weighted pick that
    costs one C call on the hot path; shares are exact to 1/65536.
    """
    total = float(sum(weights))
    if total <= 0:
        weights, total = [1.0] * len(weights), float(len(weights))
    exact = [w * SLOTS / total for w in weights]
    counts = [max(1, int(x)) if w > 0 else 0 for x, w in zip(exact, weights)]
    # Hand out the rounding difference by largest remainder (or, if the
    # one-slot minimum overshot, take it back from the smallest remainders).
    diff = SLOTS - sum(counts)
    order = sorted(range(len(weights)), key=lambda i: exact[i] - int(exact[i]), reverse=diff > 0)
    k = 0
    while diff != 0:
        i = order[k % len(order)]
        if diff > 0 and weights[i] > 0:
            counts[i] += 1
            diff -= 1
        elif diff < 0 and counts[i] > 1:
            counts[i] -= 1
            diff += 1
        k += 1
    # Sequence repetition runs in C: building the table costs microseconds.
    if len(weights) <= 256:
        return b"".join(bytes((i,)) * c for i, c in enumerate(counts))
    table = array("H")
    for i, c in enumerate(counts):
        table += array("H", (i,)) * c
    return table


class Weighted(Selector):
    """Random in proportion to ``weights`` (one per choice), via ``weight_slots``."""

    def __init__(self, weights: Sequence[float]):
        self.weights = tuple(weights)
        self.total = sum(self.weights)
        self.slots = weight_slots(self.weights)

    def pick(self, rand: float) -> int:
        return self.slots[int(rand * SLOTS)]

    def select(self, rand: float, client: Client | None) -> tuple[int, int]:
        return self.pick(rand), 0

    def slot_table(self, n: int) -> bytes | array:
        return self.slots


@dataclass(frozen=True, slots=True)
class _Net:
    family: int
    network: int
    prefix: int
    site: str


def _prefix_match(a: int, b: int, width: int) -> int:
    """Leading bits ``a`` and ``b`` have in common."""
    x = a ^ b
    return width - x.bit_length()


class _ByClient(Selector):
    """A selector whose choice depends on the client's network, not on chance.

    ``decide`` is pure in the client (so the engine can cache it per subnet);
    None means "no preference": a weighted random pick from ``fallback``.
    """

    client_dependent = True
    fallback: Weighted

    def select(self, rand: float, client: Client | None) -> tuple[int, int]:
        index, scope = self.decide(client)
        return (self.fallback.pick(rand) if index is None else index), scope

    def slot_table(self, n: int) -> bytes | array:
        return self.fallback.slots

    def decide(self, client: Client | None) -> tuple[int | None, int]:
        raise NotImplementedError


class Topology(_ByClient):
    """The most specific member network containing the client; else weighted."""

    def __init__(self, nets: Sequence[_Net], index_of: Mapping[str, int], fallback: Weighted):
        # Most specific first: a /24 inside another site's /16 wins.
        self.nets = tuple(sorted(nets, key=lambda n: -n.prefix))
        self.index_of = dict(index_of)
        self.fallback = fallback

    def decide(self, client: Client | None) -> tuple[int | None, int]:
        """(index or None = "weighted random among all", ECS scope); cacheable per client."""
        if client is None or client.bits == 0:
            # ECS /0 means "do not tailor" (RFC 7871 7.1.2): answer as for anyone.
            return None, 0
        width = 32 if client.family == 4 else 128
        scope = 0
        chosen = None
        for net in self.nets:
            if net.family != client.family:
                continue
            common = _prefix_match(client.address, net.network, width)
            if common >= net.prefix:
                # Inside: the answer holds for all of this network (at least).
                scope = max(scope, net.prefix)
                if chosen is None and net.site in self.index_of:
                    chosen = self.index_of[net.site]
            else:
                # Outside: the answer holds only while the address stays
                # outside, i.e. up to and including the first differing bit.
                scope = max(scope, common + 1)
        return chosen, min(scope, width)


class Sticky(_ByClient):
    """Weighted rendezvous hashing of the client's subnet over live members.

    Each (site, subnet) gets a uniform hash u in (0, 1); the site with the
    highest ``-weight / ln(u)`` wins. Removing or reweighting one site only
    moves the subnets whose winner changes, in proportion (weighted HRW).
    """

    def __init__(self, sites: Sequence[str], weights: Sequence[float], fallback: Weighted):
        self.sites = tuple(sites)
        self.weights = tuple(weights)
        self.fallback = fallback
        self._salts = tuple(hashlib.blake2b(s.encode(), digest_size=16).digest() for s in self.sites)

    def decide(self, client: Client | None) -> tuple[int | None, int]:
        """(index or None = "weighted random", ECS scope); cacheable per client."""
        if client is None or client.bits == 0:
            return None, 0
        width = 32 if client.family == 4 else 128
        prefix = STICKY_PREFIX[client.family]
        subnet = (client.address >> (width - prefix)).to_bytes(16, "big") + bytes((client.family,))
        best, best_score = 0, -math.inf
        for i, (salt, w) in enumerate(zip(self._salts, self.weights)):
            if w <= 0:
                continue
            h = int.from_bytes(hashlib.blake2b(subnet, digest_size=8, key=salt).digest(), "big")
            u = (h + 0.5) / 2**64  # strictly inside (0, 1)
            score = -w / math.log(u)
            if score > best_score:
                best, best_score = i, score
        return best, prefix


# --------------------------------------------------------------------------
# Policies: what each one decides beyond the shared rules of ``plan``.


class Policy:
    """One answer policy: what it decides beyond the rules every policy shares.
    The defaults are ``weighted``'s; a policy overrides what it does differently.
    Stateless: one instance each, in ``POLICIES``."""

    name = ""

    def narrow(self, live: list[MemberView], members: list[MemberView]) -> tuple[list[MemberView], str]:
        """(the live members the first address is chosen from, the reason's prefix)."""
        return live, self.name

    def rank(self, m: MemberView) -> tuple:
        """Sort key of the next-best live members (answers > 1): best first."""
        return (-m.weight, m.site)

    def selector(self, candidates: list[MemberView], weights: list[float], members: list[MemberView],
                 sites: Mapping[str, Site], fallback: Weighted) -> Selector:
        """How a query picks among several choices (one per candidate, same order)."""
        return fallback


class WeightedPolicy(Policy):
    """Random in proportion to effective weight."""

    name = "weighted"


class FailoverPolicy(Policy):
    """The lowest priority group with a live member; weighted inside it."""

    name = "failover"

    def narrow(self, live: list[MemberView], members: list[MemberView]) -> tuple[list[MemberView], str]:
        best = min(m.priority for m in live)
        reason = f"failover to priority {best}" if best != min(m.priority for m in members) else self.name
        return [m for m in live if m.priority == best], reason

    def rank(self, m: MemberView) -> tuple:
        return (m.priority, -m.weight, m.site)


class TopologyPolicy(Policy):
    """The live member whose networks most specifically hold the client."""

    name = "topology"

    def selector(self, candidates, weights, members, sites, fallback) -> Selector:
        index_of = {m.site: i for i, m in enumerate(candidates)}
        nets = [
            _Net(net.version, int(net.network_address), net.prefixlen, m.site)
            for m in members
            for net in (sites[m.site].networks if m.site in sites else ())
        ]
        return Topology(nets, index_of, fallback)


class StickyPolicy(Policy):
    """Weighted rendezvous hashing of the client's subnet."""

    name = "sticky"

    def selector(self, candidates, weights, members, sites, fallback) -> Selector:
        return Sticky([m.site for m in candidates], weights, fallback)


POLICIES: dict[str, Policy] = {p.name: p for p in (WeightedPolicy(), FailoverPolicy(), TopologyPolicy(), StickyPolicy())}
"""Answer policies by name; ``glb.config`` accepts exactly these names. A new
policy is one ``Policy`` subclass (and, if it needs one, a ``Selector``) plus
an entry here."""


@dataclass(frozen=True, slots=True)
class Plan:
    """How one load-balanced name answers one address family right now."""

    name: str
    family: int
    kind: str
    """ANSWER, NODATA (no member has an address of this family) or SERVFAIL."""
    choices: tuple[Choice, ...]
    selector: Selector
    members: tuple[MemberView, ...]
    degraded: bool
    reason: str
    """One line for /status and logs: what the policy did and why."""

    def choose(self, rand: float, client: Client | None = None) -> tuple[Choice, int]:
        """The choice for one query, and the ECS scope. Reference path for tests."""
        i, scope = self.selector.select(rand, client)
        return self.choices[i], scope


# --------------------------------------------------------------------------


def _addresses(site: Site | None, service: str, family: int) -> tuple[str, ...]:
    if site is None:
        return ()
    return tuple(str(a) for a in site.vip_addresses(service) if a.version == family)


def assess(
    lb: LBName,
    sites: Mapping[str, Site],
    state: DeploymentState | None,
    now: float,
    stale_after: float,
    family: int,
) -> list[MemberView]:
    """Every member's liveness and effective weight, for one address family."""
    out = []
    for m in lb.members:
        addrs = _addresses(sites.get(m.site), lb.service, family)
        weight = m.weight
        if state is None:
            out.append(MemberView(m.site, m.weight, float(weight), m.priority, 1.0, True,
                                  "no state yet (configured weight)", addrs))
            continue
        ov = state.site_override(m.site)
        if ov is not None and ov.weight is not None:
            weight = ov.weight
        snap = state.sites.get(m.site)
        hf = 0.0
        live = False
        overdue = False
        if snap is None:
            status = "no snapshot"
        elif snap.withdrawn:
            status = "withdrawn"
        elif state.is_drained(m.site):
            status = "drained"
        elif not state.site_is_up(m.site, now, stale_after):
            age = state.site_age(m.site, now)
            status = f"stale {age:.1f}s" if age is not None else "stale"
        else:
            svc = snap.service(lb.service)
            if svc is None:
                status = f"no service {lb.service}"
            elif not svc.up:
                status = "service down"
            elif svc.healthy_fraction <= 0:
                status = "no healthy capacity"
            else:
                hf = svc.healthy_fraction
                live = True
                status = "up" if hf >= 1 else f"up at {hf:.0%} capacity"
                # Two heartbeats missed: the director may be dead but is not
                # stale yet. Shorten the TTL now, so resolvers that refresh in
                # this window do not keep a dead site for a whole TTL more.
                site_cfg = sites.get(m.site)
                age = state.site_age(m.site, now)
                if site_cfg is not None and age is not None and age > OVERDUE_HEARTBEATS * site_cfg.director.heartbeat:
                    overdue = True
                    status += f", heartbeat overdue ({age:.1f}s)"
        if ov is not None and ov.weight is not None and live:
            status += f", weight override {ov.weight}"
        out.append(MemberView(m.site, m.weight, weight * hf if live else 0.0, m.priority, hf, live, status, addrs, overdue))
    return out


def plan(
    lb: LBName,
    sites: Mapping[str, Site],
    state: DeploymentState | None,
    now: float,
    stale_after: float,
    family: int,
) -> Plan:
    """The plan for ``lb``'s A (family 4) or AAAA (family 6) answers now."""
    members = [m for m in assess(lb, sites, state, now, stale_after, family) if m.addresses]
    views = tuple(members)
    if not members:
        return Plan(lb.name, family, NODATA, (), Fixed(), views, False,
                    f"no member has IPv{family} addresses for service {lb.service}")
    live = [m for m in members if m.live]
    nostate = state is None
    degraded = nostate or any(not m.live or m.healthy_fraction < 1 or m.overdue for m in members)
    ttl = lb.degraded_ttl if degraded else lb.ttl
    note = " (no Redis state yet: configured weights)" if nostate else ""

    if not live:
        return _all_down(lb, family, members, views)

    pol = POLICIES[lb.policy]
    # Candidates for the first address (failover narrows to the best group).
    candidates, prefix_reason = pol.narrow(live, members)
    positive = [m for m in candidates if m.weight > 0]
    standby = not positive
    if standby:
        # Only weight-0 members are live: use them, equally.
        weights = [1.0] * len(candidates)
    else:
        candidates = positive
        weights = [m.weight for m in candidates]
    total = sum(weights)

    # Fallback order for answers > 1: the rest of the live members, best first.
    def order_after(first: MemberView) -> list[MemberView]:
        rest = [m for m in live if m is not first]
        rest.sort(key=pol.rank)
        return [first, *rest]

    choices = []
    for m, w in zip(candidates, weights):
        chain = order_after(m)
        addrs: list[str] = []
        for s in chain:
            for a in s.addresses:
                if a not in addrs:
                    addrs.append(a)
        addrs = addrs[: lb.answers]
        used = tuple(dict.fromkeys(s.site for s in chain if any(a in addrs for a in s.addresses)))
        why = f"{prefix_reason}: {m.site} ({w / total:.0%} of answers"
        why += ", standby)" if standby else ")"
        choices.append(Choice(used, tuple(addrs), ttl, why + note))

    fallback = Weighted(weights)
    selector: Selector
    if len(choices) == 1:
        # One possible answer does not depend on the client, whatever the
        # policy: ECS SCOPE 0 (RFC 7871 7.2.1) lets a resolver cache it for
        # everyone, and it is what the fast path answers for such an entry.
        selector = Fixed()
    else:
        selector = pol.selector(candidates, weights, members, sites, fallback)

    down = [f"{m.site} {m.status}" for m in members if not m.live or m.healthy_fraction < 1 or m.overdue]
    shares = ", ".join(f"{m.site} {w / total:.0%}" for m, w in zip(candidates, weights))
    reason = f"{prefix_reason}: {shares}"
    if down:
        reason += f"; degraded ({'; '.join(down)})"
    if standby:
        reason += "; only standby (weight 0) members live"
    return Plan(lb.name, family, ANSWER, tuple(choices), selector, views, degraded, reason + note)


def _all_down(lb: LBName, family: int, members: list[MemberView], views: tuple[MemberView, ...]) -> Plan:
    why = "; ".join(f"{m.site} {m.status}" for m in members)
    if lb.all_down == "servfail":
        return Plan(lb.name, family, SERVFAIL, (), Fixed(), views, True, f"all members down ({why}): servfail")
    if lb.all_down == "fallback":
        addrs = tuple(str(a) for a in lb.fallback if a.version == family)
        if not addrs:
            return Plan(lb.name, family, NODATA, (), Fixed(), views, True,
                        f"all members down ({why}): no IPv{family} fallback address")
        reason = f"all members down ({why}): fallback address"
        return Plan(lb.name, family, ANSWER, (Choice((), addrs, lb.degraded_ttl, reason),), Fixed(), views, True, reason)
    # fail-open: a resolver caching "every member" is better than caching nothing
    # (Route 53 does the same): health data may be what is wrong.
    addrs = tuple(dict.fromkeys(a for m in members for a in m.addresses))
    reason = f"all members down ({why}): fail-open, answering every member"
    choice = Choice(tuple(m.site for m in members), addrs, lb.degraded_ttl, reason)
    return Plan(lb.name, family, ANSWER, (choice,), Fixed(), views, True, reason)
