"""The state contract: what GLB keeps in Redis, as plain data.

Directors publish one ``SiteSnapshot`` per site; operators write ``Override``
documents; dnsfront and directors follow both as a ``DeploymentState``. This
module defines those documents, their JSON encoding, the Redis key names and
the pub/sub message format, and the staleness rule. It does no I/O at all (no
redis, asyncio or sockets) so every rule here is unit-tested with explicit
``now`` values; ``glb.store`` is the adapter that moves these documents in and
out of Redis. The exact wire format is documented in ``docs/state.md``.

Every document is validated when it is constructed, so a reader can never hold
a half-valid snapshot: decoding a malformed or unknown-schema document raises
``StateError`` with a one-line reason instead of crashing the reader later.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Literal

from glb.errors import StateError

SCHEMA = 1
"""Version of the JSON document layout. Readers reject any other number: a
newer writer may have changed a field's meaning, and guessing is worse than
keeping the last good state."""

SERVER_STATES = ("up", "down", "draining", "disabled")
"""Real-server states: ``draining`` keeps established connections but takes no
new ones; ``disabled`` was taken out by configuration or an operator."""

VIP_PROTOCOLS = ("tcp", "udp", "sctp")
MAX_WEIGHT = 65535
"""Same range as LVS (ipvsadm) weights, so a weight means the same everywhere."""
MAX_NAME = 200

DEFAULT_PREFIX = "{glb}"

# Names end up inside Redis keys, space-separated channel messages and
# "/"-separated override targets, so whitespace and "/" are excluded.
_NAME_RE = re.compile(r"[^\s/]+")


# --------------------------------------------------------------------------
# Small validators. Each raises StateError naming the field, so the decoder can
# prefix the path ("services[0].real_servers[1].port: ...").


def valid_name(value: object) -> bool:
    """True if ``value`` can be a site or service name (see docs/state.md)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_NAME
        and value.isprintable()
        and _NAME_RE.fullmatch(value) is not None
    )


def _check_name(what: str, value: object) -> None:
    if not valid_name(value):
        raise StateError(
            f"{what}: expected a name (1..{MAX_NAME} printable characters, "
            f"no whitespace or '/'), got {value!r}"
        )


def _check_str(what: str, value: object, *, nonempty: bool = False) -> None:
    if not isinstance(value, str):
        raise StateError(f"{what}: expected a string, got {type(value).__name__}")
    if nonempty and not value:
        raise StateError(f"{what}: must not be empty")


def _check_bool(what: str, value: object) -> None:
    if not isinstance(value, bool):
        raise StateError(f"{what}: expected true/false, got {value!r}")


def _check_int(what: str, value: object, lo: int, hi: int | None = None) -> None:
    # bool is an int subclass; true/false in a count field is a writer bug.
    if not isinstance(value, int) or isinstance(value, bool):
        raise StateError(f"{what}: expected an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bounds = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise StateError(f"{what}: {value} out of range ({bounds})")


def _as_float(
    obj: object, name: str, value: object, lo: float | None = None, hi: float | None = None
) -> float:
    """Validate a number and store it back as float (JSON writes 1.0 as 1)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise StateError(f"{name}: expected a number, got {value!r}")
    f = float(value)
    if not math.isfinite(f):
        raise StateError(f"{name}: must be finite, got {value!r}")
    if (lo is not None and f < lo) or (hi is not None and f > hi):
        raise StateError(f"{name}: {value} out of range ({lo}..{hi})")
    if type(value) is not float:
        object.__setattr__(obj, name, f)
    return f


def _check_tuple(what: str, value: object, item_type: type) -> None:
    if not isinstance(value, tuple):
        raise StateError(f"{what}: expected a tuple, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, item_type):
            raise StateError(f"{what}[{i}]: expected {item_type.__name__}, got {type(item).__name__}")


def _check_ip(what: str, value: object) -> None:
    _check_str(what, value)
    try:
        ipaddress.ip_address(value)  # type: ignore[arg-type]
    except ValueError:
        raise StateError(f"{what}: not an IP address: {value!r}") from None


def format_vip(address: str, port: int, proto: str) -> str:
    """``addr:port/proto``; IPv6 addresses in brackets so the port is unambiguous."""
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}/{proto}"


def parse_vip(text: str) -> tuple[str, int, str]:
    """Inverse of ``format_vip``: ``(address, port, proto)``; StateError if malformed."""
    if not isinstance(text, str):
        raise StateError(f"VIP: expected a string, got {type(text).__name__}")
    hostport, sep, proto = text.rpartition("/")
    if not sep or proto not in VIP_PROTOCOLS:
        raise StateError(f"VIP {text!r}: expected addr:port/proto with proto one of {', '.join(VIP_PROTOCOLS)}")
    host, sep, port_s = hostport.rpartition(":")
    if not sep or not port_s.isdigit():
        raise StateError(f"VIP {text!r}: missing :port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise StateError(f"VIP {text!r}: brackets are only for IPv6 addresses")
    elif ":" in host:
        raise StateError(f"VIP {text!r}: IPv6 addresses must be written in brackets")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise StateError(f"VIP {text!r}: not an IP address: {host!r}") from None
    port = int(port_s)
    if port > 65535:
        raise StateError(f"VIP {text!r}: port out of range")
    return host, port, proto


# --------------------------------------------------------------------------
# Documents


@dataclass(frozen=True, slots=True)
class RealServerState:
    """One real server behind a service, as its director sees it now.

    Carries the director's view (state, weight, connections, traffic rates)
    so dnsfront and operators can see capacity without asking the director.
    """

    address: str
    """The real server's IP address."""
    port: int
    """Port the director forwards to; 0 means "the VIP's port" (as in LVS DR mode)."""
    state: str
    """One of ``SERVER_STATES``."""
    weight: int
    """Effective scheduling weight (after any operator override), 0..MAX_WEIGHT."""
    active_conns: int = 0
    inactive_conns: int = 0
    last_check: float | None = None
    """Wall-clock time of the last health check, or None before the first one."""
    last_result: str = ""
    """Short human-readable outcome of the last check (e.g. "timeout")."""
    # Traffic rates last, with defaults: positional construction keeps working,
    # and a snapshot from a director that does not send them reads as 0.
    new_conns_per_s: float = 0.0
    packets_per_s: float = 0.0
    bytes_per_s: float = 0.0

    def __post_init__(self) -> None:
        _check_ip("address", self.address)
        _check_int("port", self.port, 0, 65535)
        if self.state not in SERVER_STATES:
            raise StateError(f"state: expected one of {', '.join(SERVER_STATES)}, got {self.state!r}")
        _check_int("weight", self.weight, 0, MAX_WEIGHT)
        _check_int("active_conns", self.active_conns, 0)
        _check_int("inactive_conns", self.inactive_conns, 0)
        if self.last_check is not None:
            _as_float(self, "last_check", self.last_check, 0.0)
        _check_str("last_result", self.last_result)
        for name in ("new_conns_per_s", "packets_per_s", "bytes_per_s"):
            _as_float(self, name, getattr(self, name), 0.0)


@dataclass(frozen=True, slots=True)
class ServiceState:
    """One load-balanced service (a set of VIPs and its real servers) at a site.

    ``healthy_fraction`` is what dnsfront weighs sites by: a site that lost
    half its servers should get roughly half its usual share of answers.
    """

    name: str
    vips: tuple[str, ...]
    """VIPs as ``addr:port/proto`` (``[addr]:port/proto`` for IPv6); see ``format_vip``."""
    healthy_fraction: float
    """Healthy capacity / configured capacity (by weight), 0..1."""
    up: bool
    """The director considers the service able to take new connections."""
    real_servers: tuple[RealServerState, ...] = ()
    active_conns: int = 0
    new_conns_per_s: float = 0.0
    packets_per_s: float = 0.0
    bytes_per_s: float = 0.0
    # Cross-site spill (docs/director.md), last with defaults: a snapshot from a
    # director that does not send them reads as "not spilling".
    spilling_to: str | None = None
    """The site this service's new connections are tunnelled to now, or None."""
    spilled_conns: int = 0
    """Connections of this site's VIPs held by another site's real servers
    (spilled, active + inactive); they may outlast the spill."""

    def __post_init__(self) -> None:
        _check_name("name", self.name)
        _check_tuple("vips", self.vips, str)
        for i, vip in enumerate(self.vips):
            try:
                parse_vip(vip)
            except StateError as e:
                raise StateError(f"vips[{i}]: {e}") from None
        _as_float(self, "healthy_fraction", self.healthy_fraction, 0.0, 1.0)
        _check_bool("up", self.up)
        _check_tuple("real_servers", self.real_servers, RealServerState)
        seen: set[tuple[str, int]] = set()
        for i, rs in enumerate(self.real_servers):
            key = (str(ipaddress.ip_address(rs.address)), rs.port)
            if key in seen:
                raise StateError(f"real_servers[{i}]: duplicate {rs.address}:{rs.port}")
            seen.add(key)
        _check_int("active_conns", self.active_conns, 0)
        for name in ("new_conns_per_s", "packets_per_s", "bytes_per_s"):
            _as_float(self, name, getattr(self, name), 0.0)
        if self.spilling_to is not None:
            _check_name("spilling_to", self.spilling_to)
        _check_int("spilled_conns", self.spilled_conns, 0)

    def real_server(self, address: str, port: int) -> RealServerState | None:
        """The real server at ``address:port``, or None."""
        for rs in self.real_servers:
            if rs.address == address and rs.port == port:
                return rs
        return None


PAIR_ROLES = ("master", "backup", "init", "absent")


@dataclass(frozen=True, slots=True)
class PairMemberState:
    """One member of the site's active/standby director pair, as the publishing (active) one sees it."""

    id: str
    role: str
    """``master``, ``backup``, ``init`` (starting or stopping) or ``absent`` (not heard)."""
    present: bool
    """Heard within three hello intervals (the publisher itself always is)."""
    healthy: bool
    """Said it could take over now (packet path running, a real server up in every service)."""
    last_heard: float | None = None
    """Wall clock of its last hello (None: never heard)."""

    def __post_init__(self) -> None:
        _check_str("id", self.id, nonempty=True)
        if self.role not in PAIR_ROLES:
            raise StateError(f"role: expected one of {', '.join(PAIR_ROLES)}, got {self.role!r}")
        _check_bool("present", self.present)
        _check_bool("healthy", self.healthy)
        if self.last_heard is not None:
            _as_float(self, "last_heard", self.last_heard, 0.0)


@dataclass(frozen=True, slots=True)
class SiteSnapshot:
    """Everything one director says about its site, published as one document.

    A whole snapshot replaces the previous one, so readers never see half a
    site. ``version`` and ``published_at`` are stamped by the store at publish
    time; ``published_at`` is the Redis server's clock, so the staleness rule
    does not depend on the director's and the reader's clocks agreeing.
    """

    site: str
    director_id: str
    """Which director published (useful with an active/standby pair)."""
    heartbeat: float
    """Director's wall clock when it built the snapshot; informational only."""
    services: tuple[ServiceState, ...]
    withdrawn: bool = False
    """The director stopped cleanly: treat the site as down now, without waiting
    for the snapshot to go stale."""
    version: int = 0
    """Global version stamped by the store (0 = not yet published)."""
    published_at: float = 0.0
    """Redis TIME at publish, stamped by the store (0 = not yet published)."""
    pair: tuple[PairMemberState, ...] = ()
    """The site's director pair (empty: one director); ``director_id`` is the active member."""

    def __post_init__(self) -> None:
        _check_name("site", self.site)
        _check_str("director_id", self.director_id, nonempty=True)
        _as_float(self, "heartbeat", self.heartbeat)
        _check_tuple("services", self.services, ServiceState)
        names = [s.name for s in self.services]
        if len(names) != len(set(names)):
            dup = next(n for n in names if names.count(n) > 1)
            raise StateError(f"services: duplicate service {dup!r}")
        _check_bool("withdrawn", self.withdrawn)
        _check_int("version", self.version, 0)
        _as_float(self, "published_at", self.published_at, 0.0)
        _check_tuple("pair", self.pair, PairMemberState)

    def service(self, name: str) -> ServiceState | None:
        """The service called ``name``, or None if this site does not run it."""
        for s in self.services:
            if s.name == name:
                return s
        return None


# --------------------------------------------------------------------------
# Overrides and their targets


def site_target(site: str) -> str:
    """Override target for a whole site: ``site:<site>``."""
    _check_name("site", site)
    return f"site:{site}"


def server_target(site: str, service: str, address: str, port: int) -> str:
    """Override target for one real server: ``server:<site>/<service>/<addr>:<port>``.

    IPv6 addresses are bracketed, like VIPs.
    """
    _check_name("site", site)
    _check_name("service", service)
    _check_ip("address", address)
    _check_int("port", port, 0, 65535)
    address = str(ipaddress.ip_address(address))  # one spelling per address
    host = f"[{address}]" if ":" in address else address
    return f"server:{site}/{service}/{host}:{port}"


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed override target. ``service``/``address``/``port`` are None for a site."""

    kind: Literal["site", "server"]
    site: str
    service: str | None = None
    address: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.kind == "site":
            return site_target(self.site)
        assert self.service is not None and self.address is not None and self.port is not None
        return server_target(self.site, self.service, self.address, self.port)


def parse_target(text: str) -> Target:
    """Parse ``site:<site>`` or ``server:<site>/<service>/<addr>:<port>``; StateError otherwise."""
    if not isinstance(text, str):
        raise StateError(f"override target: expected a string, got {type(text).__name__}")
    kind, sep, rest = text.partition(":")
    if sep and kind == "site":
        if not valid_name(rest):
            raise StateError(f"override target {text!r}: bad site name")
        return Target("site", rest)
    if sep and kind == "server":
        parts = rest.split("/")
        if len(parts) != 3:
            raise StateError(f"override target {text!r}: expected server:<site>/<service>/<addr>:<port>")
        site, service, hostport = parts
        host, sep, port_s = hostport.rpartition(":")
        if not (valid_name(site) and valid_name(service) and sep and port_s.isdigit()):
            raise StateError(f"override target {text!r}: expected server:<site>/<service>/<addr>:<port>")
        if host.startswith("[") and host.endswith("]") and ":" in host:
            host = host[1:-1]
        elif ":" in host:
            raise StateError(f"override target {text!r}: IPv6 addresses must be written in brackets")
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise StateError(f"override target {text!r}: not an IP address: {host!r}") from None
        port = int(port_s)
        if port > 65535:
            raise StateError(f"override target {text!r}: port out of range")
        return Target("server", site, service, host, port)
    raise StateError(f"override target {text!r}: expected site:<site> or server:<site>/<service>/<addr>:<port>")


@dataclass(frozen=True, slots=True)
class Override:
    """An operator's instruction for a site or a real server, with who/when/why.

    ``drain`` takes the target out of new traffic (a drained site is not
    answered by dnsfront; a drained real server keeps its established
    connections but takes no new ones); ``weight`` replaces the configured
    weight. Overrides live in Redis until cleared, so they survive restarts of
    every GLB process (but see docs/state.md on Redis persistence).
    """

    target: str
    """``site:<site>`` or ``server:<site>/<service>/<addr>:<port>``; see ``parse_target``."""
    drain: bool = False
    weight: int | None = None
    who: str = ""
    when: float = 0.0
    """Wall-clock time the override was set; the store fills in Redis time if 0."""
    why: str = ""

    def __post_init__(self) -> None:
        # Canonical spelling, so "2001:0db8::1" and "2001:db8::1" are one target.
        object.__setattr__(self, "target", str(parse_target(self.target)))
        _check_bool("drain", self.drain)
        if self.weight is not None:
            _check_int("weight", self.weight, 0, MAX_WEIGHT)
        if not self.drain and self.weight is None:
            # An override that changes nothing is almost certainly a mistake;
            # removing an override is clear_override's job.
            raise StateError("override: sets neither drain nor weight")
        _check_str("who", self.who)
        _as_float(self, "when", self.when, 0.0)
        _check_str("why", self.why)

    @property
    def parsed_target(self) -> Target:
        return parse_target(self.target)


KEEP: Any = ...
"""``merge_override``'s "leave this as it is held" (None already means "no weight override")."""


def merge_override(held: Override | None, target: str, *, drain: bool | None = None, weight: int | None = KEEP,
                   who: str, why: str) -> Override | None:
    """The override to store after an operator changes ``drain`` or ``weight`` of ``target``.

    A target's drain and weight live in one document: what the request does
    not change is kept from ``held`` (the override in Redis now, or None).
    None when neither is left: the caller clears the override instead of
    storing one that changes nothing. ``who``/``why`` become the new ones;
    ``when`` is left for the store to stamp.
    """
    new_drain = (held.drain if held else False) if drain is None else drain
    new_weight = (held.weight if held else None) if weight is KEEP else weight
    if not new_drain and new_weight is None:
        return None
    return Override(target, drain=new_drain, weight=new_weight, who=who, why=why)


# --------------------------------------------------------------------------
# JSON encoding


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False)


def _rs_to_json(rs: RealServerState) -> dict[str, Any]:
    return {name: getattr(rs, name) for name in _RS_FIELDS}


_RS_FIELDS = tuple(f.name for f in fields(RealServerState))
"""Looked up once: ``fields()`` per server was most of encoding a large snapshot."""


def _service_to_json(s: ServiceState) -> dict[str, Any]:
    d = {f.name: getattr(s, f.name) for f in fields(s)}
    d["vips"] = list(s.vips)
    d["real_servers"] = [_rs_to_json(rs) for rs in s.real_servers]
    return d


def snapshot_to_json(s: SiteSnapshot, *, stamp: bool = True) -> dict[str, Any]:
    """The snapshot as a JSON-ready dict (also used by /status and the CLI)."""
    d: dict[str, Any] = {
        "schema": SCHEMA,
        "site": s.site,
        "director_id": s.director_id,
        "heartbeat": s.heartbeat,
        "withdrawn": s.withdrawn,
        "services": [_service_to_json(x) for x in s.services],
    }
    if s.pair:  # only for a pair: a one-director site's document is as it always was
        d["pair"] = [{f.name: getattr(m, f.name) for f in fields(m)} for m in s.pair]
    if stamp:
        d["version"] = s.version
        d["published_at"] = s.published_at
    return d


def encode_snapshot(s: SiteSnapshot, *, stamp: bool = True) -> str:
    """Compact JSON for ``s``. ``stamp=False`` leaves out version/published_at,
    which the store keeps in separate hash fields (they are only known once
    the publish script runs)."""
    return _dumps(snapshot_to_json(s, stamp=stamp))


def override_to_json(o: Override) -> dict[str, Any]:
    d: dict[str, Any] = {"schema": SCHEMA}
    d.update({f.name: getattr(o, f.name) for f in fields(o)})
    return d


def encode_override(o: Override) -> str:
    return _dumps(override_to_json(o))


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _load_json(kind: str, text: str | bytes) -> dict[str, Any]:
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise StateError(f"{kind}: not UTF-8") from None
    if not isinstance(text, str):
        raise StateError(f"{kind}: expected JSON text, got {type(text).__name__}")
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StateError(f"{kind}: not valid JSON ({reason})") from None
    if not isinstance(doc, dict):
        raise StateError(f"{kind}: expected a JSON object, got {type(doc).__name__}")
    schema = doc.get("schema")
    if schema != SCHEMA or isinstance(schema, bool):
        raise StateError(f"{kind}: unsupported schema {schema!r} (this reader understands {SCHEMA})")
    return doc


_MISSING = object()


def _take(cls: type, doc: dict[str, Any], where: str, convert: dict[str, Any] | None = None) -> Any:
    """Build ``cls`` from the JSON object ``doc``: known fields only (unknown ones
    are ignored for forward compatibility), required fields enforced, every
    StateError prefixed with ``where``."""
    if not isinstance(doc, dict):
        raise StateError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        value = doc.get(f.name, _MISSING)
        if value is _MISSING:
            if f.default is MISSING and f.default_factory is MISSING:
                raise StateError(f"{where}: missing field {f.name!r}" if where else f"missing field {f.name!r}")
            continue
        if convert and f.name in convert:
            value = convert[f.name](value, f"{where}.{f.name}" if where else f.name)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except StateError as e:
        raise StateError(f"{where}.{e}" if where else str(e)) from None


def _list_of(item: Any) -> Any:
    def conv(value: Any, where: str) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise StateError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))

    return conv


def _plain(value: Any, where: str) -> Any:
    return value


def _rs_from(value: Any, where: str) -> RealServerState:
    return _take(RealServerState, value, where)


def _service_from(value: Any, where: str) -> ServiceState:
    return _take(
        ServiceState,
        value,
        where,
        {"vips": _list_of(_plain), "real_servers": _list_of(_rs_from)},
    )


def _pair_from(value: Any, where: str) -> PairMemberState:
    return _take(PairMemberState, value, where)


def decode_snapshot(text: str | bytes) -> SiteSnapshot:
    """Parse and validate a snapshot document; StateError with a one-line reason."""
    doc = _load_json("snapshot", text)
    try:
        return _take(SiteSnapshot, doc, "", {"services": _list_of(_service_from), "pair": _list_of(_pair_from)})
    except StateError as e:
        raise StateError(f"snapshot: {e}") from None


def decode_override(text: str | bytes) -> Override:
    """Parse and validate an override document; StateError with a one-line reason."""
    doc = _load_json("override", text)
    try:
        return _take(Override, doc, "")
    except StateError as e:
        raise StateError(f"override: {e}") from None


# --------------------------------------------------------------------------
# Keys and change messages


@dataclass(frozen=True, slots=True)
class Keys:
    """The one place that names Redis keys. See docs/state.md for each key's type.

    The default prefix ``{glb}`` is a Redis Cluster hash tag: every key hashes
    to one slot, so the Lua scripts that touch several keys stay legal there.
    """

    prefix: str = DEFAULT_PREFIX

    @property
    def sites(self) -> str:
        """SET of site names that have a snapshot."""
        return f"{self.prefix}:sites"

    def site(self, name: str) -> str:
        """HASH with fields ``version``, ``published_at``, ``data`` (snapshot JSON)."""
        return f"{self.prefix}:site:{name}"

    @property
    def version(self) -> str:
        """Integer counter INCRed by every publish and override change."""
        return f"{self.prefix}:version"

    @property
    def overrides(self) -> str:
        """HASH target -> override JSON."""
        return f"{self.prefix}:overrides"

    @property
    def channel(self) -> str:
        """Pub/sub channel announcing every change (see ``Change``)."""
        return f"{self.prefix}:changes"


def answer_digest(s: SiteSnapshot) -> str:
    """A short digest of what an answer can see in ``s``: ``withdrawn`` and each
    service's ``up`` and ``healthy_fraction`` (dnsfront/sitewatch.py's condition
    minus time). Counters, rates, real servers and stamps are left out, so a
    heartbeat that changes only those keeps the digest; a reader that needs only
    answers can then skip fetching the snapshot (see ``Change.digest``)."""
    # bool()/float(): a publisher's 1 and a decoded 1.0 must hash alike.
    doc = [bool(s.withdrawn), [[x.name, bool(x.up), float(x.healthy_fraction)] for x in s.services]]
    raw = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


_DIGEST_RE = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True, slots=True)
class Change:
    """One announcement on the changes channel: ``site <name> <version>
    <published_at> <digest>`` (or the older ``site <name> <version>``) or
    ``override <target> <version>``. It says *what* changed; readers then load
    that item, so a message never carries state that could go out of date,
    except a site's stamps and ``answer_digest``: with those a reader that
    holds a snapshot of the same digest may advance its stamps instead of
    loading it (a heartbeat)."""

    kind: Literal["site", "override"]
    name: str
    """Site name, or override target."""
    version: int
    published_at: float | None = None
    """Redis TIME of the publish (site messages of the current format only)."""
    digest: str | None = None
    """``answer_digest`` of the published snapshot (idem)."""


def format_change(kind: str, name: str, version: int) -> str:
    return f"{kind} {name} {version}"


def parse_change(message: str | bytes) -> Change:
    """Parse a channel message; StateError if it is not one GLB writes."""
    if isinstance(message, (bytes, bytearray)):
        message = bytes(message).decode("utf-8", "replace")
    if not isinstance(message, str):
        raise StateError(f"change message: expected text, got {type(message).__name__}")
    parts = message.split(" ")
    if len(parts) not in (3, 5) or not parts[2].isdigit():
        raise StateError(f"change message {message[:100]!r}: expected '<kind> <name> <version>'")
    kind, name, version_s = parts[:3]
    published_at: float | None = None
    digest: str | None = None
    if kind == "site":
        if not valid_name(name):
            raise StateError(f"change message {message[:100]!r}: bad site name")
        if len(parts) == 5:
            try:
                published_at = float(parts[3])
            except ValueError:
                published_at = -1.0
            if not (math.isfinite(published_at) and published_at >= 0) or not _DIGEST_RE.fullmatch(parts[4]):
                raise StateError(f"change message {message[:100]!r}: bad published_at or digest")
            digest = parts[4]
    elif kind == "override":
        if len(parts) != 3:
            raise StateError(f"change message {message[:100]!r}: expected 'override <target> <version>'")
        parse_target(name)
    else:
        raise StateError(f"change message {message[:100]!r}: unknown kind {kind!r}")
    return Change(kind, name, int(version_s), published_at, digest)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# The reader's view


def _freeze(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True, slots=True)
class DeploymentState:
    """Everything a reader knows: all site snapshots and overrides, immutable.

    Readers swap whole ``DeploymentState`` objects (each ``with_*`` returns a
    new one), so a DNS answer is always computed from one consistent view.
    ``clock_offset`` = Redis time - local time, measured at load, lets callers
    pass their own ``time.time()`` as ``now``.

    ``frozen_at`` is set while the follower cannot reach Redis: staleness is
    then judged as of that local time, so an outage of the shared store leaves
    readers answering from the last good state instead of declaring every
    site dead once ``stale_after`` passes.

    ``paused`` = (local time the outage began, its length) after the follower
    reconnects: the outage does not age a snapshot published before its end
    (a snapshot published during it ages from the end). After a failover the
    reader may load from the new master before a director has republished
    there; without this its last snapshot, aged by the whole failover, would
    go stale for that moment (a flap). A director that died meanwhile goes
    stale ``stale_after`` after the outage at the latest.
    """

    sites: Mapping[str, SiteSnapshot] = field(default_factory=dict)
    overrides: Mapping[str, Override] = field(default_factory=dict)
    version: int = 0
    """Highest version seen (site or override)."""
    clock_offset: float = 0.0
    frozen_at: float | None = None
    paused: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", _freeze(self.sites))
        object.__setattr__(self, "overrides", _freeze(self.overrides))

    @classmethod
    def build(
        cls,
        sites: Iterable[SiteSnapshot] = (),
        overrides: Iterable[Override] = (),
        version: int = 0,
        clock_offset: float = 0.0,
    ) -> DeploymentState:
        """From lists; ``version`` is raised to the highest site version if lower."""
        s = {x.site: x for x in sites}
        o = {x.target: x for x in overrides}
        top = max([version, *(x.version for x in s.values())])
        return cls(s, o, top, clock_offset)

    # -- updates (each returns a new state)

    def with_site(self, snapshot: SiteSnapshot) -> DeploymentState:
        """Replace one site's snapshot, unless we already hold a newer one
        (messages and loads can be delivered out of order)."""
        held = self.sites.get(snapshot.site)
        if held is not None and held.version > snapshot.version:
            return self
        sites = dict(self.sites)
        sites[snapshot.site] = snapshot
        return replace(self, sites=sites, version=max(self.version, snapshot.version))

    def without_site(self, site: str, version: int = 0) -> DeploymentState:
        """Forget a site (an operator removed it from Redis)."""
        held = self.sites.get(site)
        if held is None or (version and held.version > version):
            return self
        sites = dict(self.sites)
        del sites[site]
        return replace(self, sites=sites, version=max(self.version, version))

    def with_override(self, override: Override, version: int = 0) -> DeploymentState:
        overrides = dict(self.overrides)
        overrides[override.target] = override
        return replace(self, overrides=overrides, version=max(self.version, version))

    def without_override(self, target: str, version: int = 0) -> DeploymentState:
        if target not in self.overrides:
            return replace(self, version=max(self.version, version)) if version > self.version else self
        overrides = dict(self.overrides)
        del overrides[target]
        return replace(self, overrides=overrides, version=max(self.version, version))

    def frozen(self, at: float) -> DeploymentState:
        """This state, with staleness judged as of local time ``at`` (store outage)."""
        return replace(self, frozen_at=at)

    def resumed(self, previous: DeploymentState, now: float) -> DeploymentState:
        """This freshly loaded state, keeping ``previous``'s outage out of the ages:
        a new ``paused`` if ``previous`` was frozen, else ``previous.paused``."""
        if previous.frozen_at is not None:
            return replace(self, paused=(previous.frozen_at, max(0.0, now - previous.frozen_at)))
        return replace(self, paused=previous.paused) if previous.paused != self.paused else self

    # -- queries

    def site_age(self, site: str, now: float) -> float | None:
        """Seconds since the site's last publish, on the Redis clock; None if unknown.

        ``now`` is the caller's local ``time.time()``.
        """
        snap = self.sites.get(site)
        if snap is None:
            return None
        if self.frozen_at is not None:
            now = min(now, self.frozen_at)
        elif self.paused is not None:
            # The reader was blind from the outage's start to its end: none of
            # that time ages the snapshot, whenever before the end it was published.
            # Not "published before the start, else as usual": the start is the
            # last message heard, and a snapshot stamped a few milliseconds
            # after it (its message lost with the master, or a clock offset
            # off by that much) would then age by the whole outage (a flap).
            start, length = self.paused
            blind = min(now, start + length) - max(snap.published_at - self.clock_offset, start)
            if blind > 0:
                now -= blind
        return now + self.clock_offset - snap.published_at

    def site_is_up(self, site: str, now: float, stale_after: float) -> bool:
        """Present, not withdrawn, published within ``stale_after`` seconds, not drained."""
        snap = self.sites.get(site)
        if snap is None or snap.withdrawn or self.is_drained(site):
            return False
        age = self.site_age(site, now)
        return age is not None and age <= stale_after

    def site_override(self, site: str) -> Override | None:
        return self.overrides.get(f"site:{site}")

    def is_drained(self, site: str) -> bool:
        """An operator drained the whole site."""
        ov = self.site_override(site)
        return ov is not None and ov.drain

    def server_override(self, site: str, service: str, address: str, port: int) -> Override | None:
        """The override for one real server, or None."""
        try:
            return self.overrides.get(server_target(site, service, address, port))
        except StateError:
            return None
