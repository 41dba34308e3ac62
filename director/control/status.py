"""The director's HTTP status endpoints and Prometheus metrics.

* ``/healthz``: 200 while the director runs (Redis being down does not make
  the director unhealthy: it keeps forwarding; the body says so).
* ``/status``: JSON with what ``ipvsadm -Ln --stats --rate`` shows for the
  site (services, VIPs, forwarding method, scheduler, real servers with
  weights, states, connections, totals and rates) plus what ipvsadm cannot
  know: health verdict, admin mode, last check result, time and latency,
  quorum and sorry-server decisions, and the publication to Redis.
* the admin endpoints are not here: they have their own listener
  (``director.control.admin_api``).
* ``/metrics``: Prometheus text. Health transitions, checks and check latency
  are counted as they happen; states, weights, connections and traffic are
  read from the director at scrape time, so a server removed by a reload
  disappears from the gauges instead of lingering at its last value.

Each director has its own ``CollectorRegistry``: two directors in one process
(tests) never share or clash on metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from glb.histogram import Histogram as PlainHistogram
from glb.state import SERVER_STATES
from director.control.checker import Checker, Target
from director.control.health import HealthTable, ServerKey, Transition
from director.control.probes import ProbeResult
from director.control.publisher import Publisher
from director.control.site import ZERO, ServerCounters, VipCounters

def _version() -> str:
    # The installed distribution's version, not ``glb.__version__``: with
    # tests/ on pytest's pythonpath, ``glb`` can import as a namespace package.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("glb")
    except PackageNotFoundError:
        return "unknown"


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class StatusSource(Protocol):
    """What the endpoints read; ``director.control.main.Director`` provides it."""

    director_id: str
    started_at: float
    table: HealthTable
    checker: Checker
    publisher: Publisher

    def counters(self) -> Mapping[ServerKey, ServerCounters]: ...

    def vip_counters(self) -> Mapping[str, VipCounters]: ...

    def site_drained(self) -> bool: ...

    def spill_status(self, service: str) -> dict[str, Any] | None: ...


# --------------------------------------------------------------------------
# /status


def status_document(src: StatusSource, now: float) -> dict[str, Any]:
    """The /status JSON as a dict (also what a CLI table would be built from)."""
    site = src.table.site
    counters = src.counters()
    vip_counters = src.vip_counters()
    pub = src.publisher
    services = []
    for svc, sh in zip(site.services, src.table.services()):
        servers = []
        for s in sh.servers:
            c = counters.get(s.key, ZERO)
            servers.append({
                "address": s.key.address,
                "port": s.key.port,
                "state": s.state,
                "health": s.health,
                "admin": s.admin,
                "weight": s.weight,
                "configured_weight": s.configured_weight,
                "weight_override": s.weight_override,
                "active_conns": c.active_conns,
                "inactive_conns": c.inactive_conns,
                "packets": c.packets,
                "bytes": c.bytes,
                "out_packets": c.out_packets,
                "out_bytes": c.out_bytes,
                "new_conns_per_s": c.new_conns_per_s,
                "packets_per_s": c.packets_per_s,
                "bytes_per_s": c.bytes_per_s,
                "last_check": s.last_check,
                "last_ok": s.last_ok,
                "last_result": s.last_result,
                "last_latency": s.last_latency,
                "since": s.since,
            })
        per = [counters.get(s.key, ZERO) for s in sh.servers]
        check = svc.health_check
        services.append({
            "name": svc.name,
            "vips": [
                {"vip": str(v), **_vip_stats(vip_counters.get(str(v)))} for v in svc.vips
            ],
            "forwarding": svc.forwarding,
            "scheduler": svc.scheduler,
            "persistence": None if svc.persistence is None else {
                "timeout": svc.persistence.timeout,
                "netmask": svc.persistence.netmask,
                "netmask6": svc.persistence.netmask6,
            },
            "up": sh.up,
            "healthy_fraction": sh.healthy_fraction,
            "quorum": sh.quorum,
            "sorry_server": None if svc.sorry_server is None else str(svc.sorry_server),
            "sorry_active": sh.sorry_active,
            "spill": src.spill_status(svc.name),
            "health_check": {
                "type": check.type, "port": check.port, "interval": check.interval,
                "timeout": check.timeout, "rise": check.rise, "fall": check.fall,
            },
            "active_conns": sum(c.active_conns for c in per),
            "inactive_conns": sum(c.inactive_conns for c in per),
            "new_conns_per_s": sum(c.new_conns_per_s for c in per),
            "packets_per_s": sum(c.packets_per_s for c in per),
            "bytes_per_s": sum(c.bytes_per_s for c in per),
            "real_servers": servers,
        })
    last = pub.last
    return {
        "site": site.name,
        "director_id": src.director_id,
        "glb_version": _version(),
        "now": now,
        "uptime": max(0.0, now - src.started_at),
        "drained": src.site_drained(),
        "redis": {
            "connected": pub.connected,
            "last_error": pub.last_error,
            "outage_since": pub.outage_since,
            "published": pub.published,
            "failed": pub.failed,
            "last_version": last.version if last else None,
            "last_published_at": last.published_at if last else None,
        },
        "checker": {
            "targets": len(src.checker.targets()),
            "in_flight": src.checker.in_flight,
            "max_probes": src.checker.max_probes,
        },
        "services": services,
        "packet_path": packet_path_document(src),
        "pair": pair_document(src),
    }


def pair_document(src: StatusSource) -> dict[str, Any] | None:
    """The director pair as this member sees it (director/control/pair.py), None for a director alone."""
    status_of = getattr(src, "pair_status", None)
    return status_of() if status_of is not None else None


def packet_path_document(src: StatusSource) -> dict[str, Any] | None:
    """The packet engine's own counters (None when the director runs without one)."""
    stats_of = getattr(src, "packet_stats", None)
    st = stats_of() if stats_of is not None else None
    if st is None:
        return None
    f = st.forwarder
    return {
        "connections": f.connections,
        "evicted": f.evicted,
        "expired": f.expired,
        "forwarded": f.forwarded,
        "replies": f.replies,
        "spilled_ahead": f.spilled_ahead,
        "drops": dict(sorted(f.drops.items())),
        "rx_frames": st.rx_frames,
        "ring_drops": st.ring_drops,
        "truncated": st.truncated,
        "tx_frames": st.tx_frames,
        "tx_errors": {str(k): v for k, v in st.tx_errors.items()},
        "cpu_seconds": st.cpu,
        "loop": getattr(src, "packet_loop", lambda: None)(),
        "dataplane": st.dataplane,
        "kernel": dict(st.kernel),
        "flow_events": dict(st.flow_events),
        "workers": [{"pid": pid, "rx_frames": w.rx_frames, "forwarded": w.forwarder.forwarded,
                     "cpu_seconds": w.cpu, "restarts": restarts}
                    for pid, w, restarts in getattr(src, "packet_workers", list)()],
        **_plan_document(src),
    }


def _plan_document(src: StatusSource) -> dict[str, Any]:
    # Which plan the workers forward by and the MAC each real server gets:
    # "up" in the health table means nothing to the packet path until its
    # next hop is resolved and the plan carrying it has been applied.
    plan_of = getattr(src, "packet_plan", None)
    if plan_of is None:
        return {}
    generation, applied, hops = plan_of()
    return {
        "plan_generation": generation,
        "plan_applied": applied,
        "next_hops": {addr: None if mac is None else mac.hex(":") for addr, mac in hops.items()},
    }


def _vip_stats(c: VipCounters | None) -> dict[str, Any]:
    c = c or VipCounters()
    return {"packets": c.packets, "bytes": c.bytes, "connections": c.connections}


# --------------------------------------------------------------------------
# /metrics


class DirectorMetrics:
    """Prometheus metrics of one director."""

    def __init__(self, src: StatusSource):
        self.registry = CollectorRegistry(auto_describe=True)
        self.transitions = Counter(
            "glb_director_health_transitions",
            "Changes of a real server's published state.",
            ["service", "server", "from", "to"],
            registry=self.registry,
        )
        self.checks: dict[tuple[ServerKey, bool], int] = {}
        """Health probes run per server and result (rendered by ``_ServerLines``)."""
        self.check_latency: dict[tuple[str, str], PlainHistogram] = {}
        """Probe durations by (service, check type): plain counts, one ``bisect``
        per check (prometheus_client's observe takes a lock and walks the
        buckets in Python, thousands of times a second); written at scrape."""
        self.registry.register(_LatencyCollector(self.check_latency))
        self.role_changes = Counter(
            "glb_director_pair_role_changes",
            "Times this pair member became master or left master.",
            ["to"],
            registry=self.registry,
        )
        self._lines = _ServerLines(src, self.checks)
        self.registry.register(_LiveCollector(src))

    def observe_role(self, master: bool) -> None:
        self.role_changes.labels("master" if master else "backup").inc()

    def observe_checks(self, batch: Iterable[tuple[Target, ProbeResult]]) -> None:
        checks, latencies = self.checks, self.check_latency
        for target, result in batch:
            key = (target.key, result.ok)
            checks[key] = checks.get(key, 0) + 1
            hkey = (target.key.service, target.check.type)
            latency = latencies.get(hkey)
            if latency is None:
                latency = latencies[hkey] = PlainHistogram(LATENCY_BUCKETS)
            latency.observe(result.latency)

    def observe_transition(self, t: Transition) -> None:
        if t.server is not None:
            self.transitions.labels(t.service, t.server.server, t.old, t.new).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry) + self._lines.render()


class _ServerLines:
    """The per-real-server families, written as text directly.

    prometheus_client formats every sample through label-name validation and
    escaping (~20 us each); with 5,000 real servers and 11 series each a
    scrape held the event loop for about a second, and checks due meanwhile
    ran late. Here each server's label text is made once, and a sample is one
    f-string. Same names, labels (sorted, as prometheus_client writes them)
    and values as before.
    """

    def __init__(self, src: StatusSource, checks: dict[tuple[ServerKey, bool], int]):
        self.src = src
        self.checks = checks
        self._labels: dict[ServerKey, str] = {}

    def labels(self, key: ServerKey) -> str:
        text = self._labels.get(key)
        if text is None:
            text = self._labels[key] = f'server="{_escape(key.server)}",service="{_escape(key.service)}"'
        return text

    def render(self) -> bytes:
        src = self.src
        counters = src.counters()
        state, weight, conns, packets, octets = [], [], [], [], []
        for sh in src.table.services():
            for s in sh.servers:
                lb = self.labels(s.key)
                for name in SERVER_STATES:
                    state.append(f'glb_director_server_state{{{lb},state="{name}"}} '
                                 f'{"1.0" if s.state == name else "0.0"}\n')
                weight.append(f"glb_director_server_weight{{{lb}}} {_num(s.weight)}\n")
                c = counters.get(s.key, ZERO)
                conns.append(f'glb_director_server_connections{{{lb},state="active"}} {_num(c.active_conns)}\n'
                             f'glb_director_server_connections{{{lb},state="inactive"}} {_num(c.inactive_conns)}\n')
                packets.append(f"glb_director_server_packets_total{{{lb}}} {_num(c.packets)}\n")
                octets.append(f"glb_director_server_bytes_total{{{lb}}} {_num(c.bytes)}\n")
        checks = [f'glb_director_checks_total{{result="{"ok" if ok else "fail"}",{self.labels(key)}}} {_num(n)}\n'
                  for (key, ok), n in self.checks.items()]
        out = [
            _head("glb_director_server_state", "gauge", "1 for the real server's current state."), *state,
            _head("glb_director_server_weight", "gauge", "Effective scheduling weight."), *weight,
            _head("glb_director_server_connections", "gauge", "Connections in the connection table."), *conns,
            _head("glb_director_server_packets", "counter", "Packets forwarded to the real server."), *packets,
            _head("glb_director_server_bytes", "counter", "Bytes forwarded to the real server."), *octets,
            _head("glb_director_checks", "counter", "Health probes run, by result."), *checks,
        ]
        return "".join(out).encode()


def _head(name: str, kind: str, help_: str) -> str:
    return f"# HELP {name}{'_total' if kind == 'counter' else ''} {help_}\n# TYPE {name}{'_total' if kind == 'counter' else ''} {kind}\n"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _num(value: float) -> str:
    """prometheus_client's number format; an integer (nearly every sample) without its cost."""
    if type(value) is int and -10**15 < value < 10**15:
        return f"{value}.0"
    return floatToGoString(value)


class _LiveCollector:
    """Reads the director's current state at scrape time."""

    def __init__(self, src: StatusSource):
        self.src = src

    def describe(self) -> list:
        return []  # families are dynamic; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        src = self.src
        table = src.table
        up = GaugeMetricFamily("glb_director_service_up", "1 if the service takes new flows at or above quorum.",
                               labels=["service"])
        fraction = GaugeMetricFamily("glb_director_service_healthy_fraction",
                                     "Healthy capacity / configured capacity.", labels=["service"])
        sorry = GaugeMetricFamily("glb_director_service_sorry_active", "1 while the sorry server takes new flows.",
                                  labels=["service"])
        for sh in table.services():
            up.add_metric([sh.name], 1.0 if sh.up else 0.0)
            fraction.add_metric([sh.name], sh.healthy_fraction)
            sorry.add_metric([sh.name], 1.0 if sh.sorry_active else 0.0)
        vip_counters = src.vip_counters()
        vip_packets = CounterMetricFamily("glb_director_vip_packets", "Packets received for the VIP.",
                                          labels=["service", "vip"])
        vip_bytes = CounterMetricFamily("glb_director_vip_bytes", "Bytes received for the VIP.",
                                        labels=["service", "vip"])
        vip_conns = CounterMetricFamily("glb_director_vip_connections", "Connections scheduled for the VIP.",
                                        labels=["service", "vip"])
        for svc in table.site.services:
            for v in svc.vips:
                c = vip_counters.get(str(v)) or VipCounters()
                vip_packets.add_metric([svc.name, str(v)], c.packets)
                vip_bytes.add_metric([svc.name, str(v)], c.bytes)
                vip_conns.add_metric([svc.name, str(v)], c.connections)
        pub = src.publisher
        published = CounterMetricFamily("glb_director_publications", "Snapshot publications to Redis.",
                                        labels=["result"])
        published.add_metric(["ok"], pub.published)
        published.add_metric(["failed"], pub.failed)
        redis_up = GaugeMetricFamily("glb_director_redis_connected", "1 if the last publication reached Redis.")
        redis_up.add_metric([], 1.0 if pub.connected else 0.0)
        in_flight = GaugeMetricFamily("glb_director_probes_in_flight", "Health probes running now.")
        in_flight.add_metric([], src.checker.in_flight)
        yield from (up, fraction, sorry,
                    vip_packets, vip_bytes, vip_conns, published, redis_up, in_flight)
        yield from _checker_metrics(src.checker)
        yield from _spill_metrics(src)
        yield from _packet_path_metrics(packet_path_document(src))
        yield from _pair_metrics(pair_document(src))


def _pair_metrics(pair: dict[str, Any] | None) -> Iterator[Any]:
    if pair is None:
        return
    master = GaugeMetricFamily("glb_director_pair_master", "1 while this pair member is master (owns the VIPs).")
    master.add_metric([], 1.0 if pair["role"] == "master" else 0.0)
    present = GaugeMetricFamily("glb_director_pair_member_present",
                                "1 if the member was heard lately (this one: always).", labels=["member", "role"])
    for m in pair["members"]:
        present.add_metric([m["id"], m["role"]], 1.0 if m["present"] else 0.0)
    vrrp = CounterMetricFamily("glb_director_vrrp_packets", "VRRP packets sent, received, and dropped by reason.",
                               labels=["counter"])
    for name, n in sorted(pair["counters"]["vrrp"].items()):
        vrrp.add_metric([name], n)
    sync = CounterMetricFamily("glb_director_sync", "Connection sync: records sent, received (applied), ignored "
                               "(and why), datagrams.", labels=["direction", "counter"])
    for direction in ("sent", "received", "link"):
        for name, n in sorted(pair["counters"].get(f"sync_{direction}", {}).items()):
            sync.add_metric([direction, name], n)
    yield from (master, present, vrrp, sync)


class _LatencyCollector:
    """``glb_director_check_latency_seconds`` from ``DirectorMetrics.check_latency``."""

    def __init__(self, histograms: dict[tuple[str, str], PlainHistogram]):
        self.histograms = histograms

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Any]:
        family = HistogramMetricFamily("glb_director_check_latency_seconds",
                                       "Health probe duration (a timed-out probe counts its timeout).",
                                       labels=["service", "type"])
        for (service, kind), h in sorted(self.histograms.items()):
            family.add_metric([service, kind], h.cumulative(), h.sum)
        yield family


def _checker_metrics(checker: Checker) -> Iterator[Any]:
    """How the checker keeps up: is the event loop late for its probes?"""
    lag = HistogramMetricFamily("glb_director_probe_lag_seconds",
                                "How late each check started after it was due (event loop lag).")
    lag.add_metric([], checker.lag.cumulative(), checker.lag.sum)
    probes = CounterMetricFamily("glb_director_probes", "Health probes finished.")
    probes.add_metric([], checker.probes_run)
    rate = GaugeMetricFamily("glb_director_probes_per_second",
                             "Health probes finished per second, averaged over the last 10 s.")
    rate.add_metric([], checker.probes_per_second())
    skipped = CounterMetricFamily("glb_director_checks_skipped_for_lag",
                                  "Checks not counted because the event loop was late by more than their timeout "
                                  "(each was run again at once).")
    skipped.add_metric([], checker.skipped_for_lag)
    yield from (lag, probes, rate, skipped)


def _spill_metrics(src: StatusSource) -> Iterator[Any]:
    """Cross-site spill (director/control/spill.py): where each service spills, and its spilled connections."""
    docs = {svc.name: src.spill_status(svc.name) for svc in src.table.site.services}
    docs = {name: doc for name, doc in docs.items() if doc is not None}
    if not docs:
        return
    spilling = GaugeMetricFamily("glb_director_service_spilling",
                                 "1 for the site a service's new connections spill to now.", labels=["service", "site"])
    triggered = GaugeMetricFamily("glb_director_service_spill_triggered",
                                  "1 while the spill trigger holds (after hysteresis), target or not.", labels=["service"])
    conns = GaugeMetricFamily("glb_director_spilled_connections",
                              "Connections held by another site's real servers.", labels=["service", "site", "state"])
    for name, doc in docs.items():
        triggered.add_metric([name], 1.0 if doc["triggered"] else 0.0)
        for site in doc["to"]:
            spilling.add_metric([name, site], 1.0 if doc["spilling_to"] == site else 0.0)
            rows = [r for r in doc["servers"] if r["site"] == site]
            conns.add_metric([name, site, "active"], sum(r["active_conns"] for r in rows))
            conns.add_metric([name, site, "inactive"], sum(r["inactive_conns"] for r in rows))
    yield from (spilling, triggered, conns)


def _packet_path_metrics(pp: dict[str, Any] | None) -> Iterator[Any]:
    if pp is None:
        return
    drops = CounterMetricFamily("glb_director_packet_drops", "Frames the packet path dropped, by reason.",
                                labels=["reason"])
    for reason, n in pp["drops"].items():
        drops.add_metric([reason], n)
    tracked = GaugeMetricFamily("glb_director_connections_tracked", "Entries in the connection table.")
    tracked.add_metric([], pp["connections"])
    evicted = CounterMetricFamily("glb_director_connections_evicted",
                                  "Connection entries evicted because the table was full.")
    evicted.add_metric([], pp["evicted"])
    rx = CounterMetricFamily("glb_director_rx_frames", "Frames read from the RX ring.")
    rx.add_metric([], pp["rx_frames"])
    ring = CounterMetricFamily("glb_director_ring_drops", "Frames the kernel dropped: the RX ring was full.")
    ring.add_metric([], pp["ring_drops"])
    tx = CounterMetricFamily("glb_director_tx_frames", "Frames sent by the packet path.")
    tx.add_metric([], pp["tx_frames"])
    tx_err = CounterMetricFamily("glb_director_tx_errors", "Frames the kernel refused to send, by errno.",
                                 labels=["errno"])
    for err, n in pp["tx_errors"].items():
        tx_err.add_metric([err], n)
    cpu = CounterMetricFamily("glb_director_packet_cpu_seconds", "CPU time of the packet engine workers.")
    cpu.add_metric([], pp["cpu_seconds"])
    restarts = CounterMetricFamily("glb_director_packet_worker_restarts",
                                   "Packet workers started again after they died, by worker.", labels=["worker"])
    for i, w in enumerate(pp["workers"]):
        restarts.add_metric([str(i)], w["restarts"])
    kernel = CounterMetricFamily("glb_director_kernel_packets",
                                 "Packets the kernel data plane saw: forwarded_dr/_tun, or why it left them to the "
                                 "userspace engine.", labels=["reason"])
    for reason, n in pp.get("kernel", {}).items():
        kernel.add_metric([reason], n)
    events = CounterMetricFamily("glb_director_kernel_flow_events",
                                 "Flows the kernel data plane made or moved to another state, told to Python at once: "
                                 "received, or lost (the ring was full: the sweep finds those later).",
                                 labels=["outcome"])
    for outcome, n in pp.get("flow_events", {}).items():
        events.add_metric([outcome], n)
    ahead = CounterMetricFamily("glb_director_spilled_ahead",
                                "New connections spilled to a standby target on the spill flag, before the plan.")
    ahead.add_metric([], pp["spilled_ahead"])
    yield from (drops, tracked, evicted, rx, ring, tx, tx_err, cpu, restarts, kernel, events, ahead)


# --------------------------------------------------------------------------
# The app


def make_app(src: StatusSource, metrics: DirectorMetrics) -> web.Application:
    """The status listener: read-only and unauthenticated (the admin API is
    ``director.control.admin_api``, on its own listener)."""
    async def healthz(request: web.Request) -> web.Response:
        pub = src.publisher
        redis = "unknown" if pub.connected is None else ("ok" if pub.connected else "unreachable")
        return web.json_response({"status": "ok", "site": src.table.site.name, "redis": redis})

    async def status(request: web.Request) -> web.Response:
        return web.json_response(status_document(src, time.time()))

    async def prometheus(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", prometheus)
    return app
