"""dnsfront's HTTP status server: /healthz, /status (JSON), /metrics (Prometheus).

It reads *reports*: plain dicts each worker produces (``Worker.report``):
counters, Redis connection, plans. With one worker the report is taken in
process at request time; with several, workers send theirs to the parent
every ``REPORT_INTERVAL`` and the parent serves the sum. Counters are kept as
plain ints on the hot path and only turned into Prometheus metrics here, at
scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from glb.config import ListenAddress
from glb.errors import DNSFrontError
from glb.histogram import Histogram
from glb.http import Served, serve

Reports = Callable[[], list[dict[str, Any]]]


def _version() -> str:
    # The installed distribution's version: does not depend on how ``glb``
    # itself was imported.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("glb")
    except PackageNotFoundError:
        return "unknown"

RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED", 16: "BADVERS", 23: "BADCOOKIE"}
QTYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 13: "HINFO", 15: "MX", 16: "TXT", 28: "AAAA",
               33: "SRV", 35: "NAPTR", 41: "OPT", 43: "DS", 48: "DNSKEY", 64: "SVCB", 65: "HTTPS", 99: "SPF",
               251: "IXFR", 252: "AXFR", 255: "ANY", 257: "CAA"}


def qtype_name(t: int) -> str:
    return QTYPE_NAMES.get(t, f"TYPE{t}")


def rcode_name(r: int) -> str:
    return RCODE_NAMES.get(r, f"RCODE{r}")


def merge_counters(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the counters of several workers' reports."""
    responses: dict[tuple[str, str], int] = {}
    sites: dict[tuple[str, str], int] = {}
    scalars: dict[str, int] = {}
    for r in reports:
        c = r["counters"]
        for qtype, rcode, n in c["responses"]:
            key = (qtype_name(qtype), rcode_name(rcode))
            responses[key] = responses.get(key, 0) + n
        for name, site, n in c["site_answers"]:
            sites[(name, site)] = sites.get((name, site), 0) + n
        for k, v in c.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                scalars[k] = scalars.get(k, 0) + v
    return {"responses": responses, "site_answers": sites, **scalars}


class _Collector:
    def __init__(self, reports: Reports):
        self.reports = reports

    def collect(self) -> Iterator[Any]:
        reports = self.reports()
        c = merge_counters(reports)
        now = time.time()
        q = CounterMetricFamily("dnsfront_responses", "DNS responses sent, by query type and rcode",
                                labels=["qtype", "rcode"])
        for (qtype, rcode), n in sorted(c["responses"].items()):
            q.add_metric([qtype, rcode], n)
        yield q
        a = CounterMetricFamily("dnsfront_answers", "Load-balanced answers, by name and chosen site",
                                labels=["name", "site"])
        for (name, site), n in sorted(c["site_answers"].items()):
            a.add_metric([name, site], n)
        yield a
        for key, help_ in (
            ("dropped", "Datagrams dropped without an answer (shorter than a header, or a response)"),
            ("malformed", "Queries answered FORMERR"),
            ("internal_errors", "Queries answered SERVFAIL after an internal error"),
            ("fast", "Queries answered from precomputed bytes"),
            ("slow", "Queries answered by the full parser"),
            ("udp_send_errors", "UDP responses the kernel refused to send"),
            ("tcp_accepted", "TCP connections accepted"),
            ("tcp_refused", "TCP connections closed at once: over tcp_max_connections"),
            ("tcp_refused_source", "TCP connections closed at once: over tcp_max_per_source for their address"),
            ("rrl_limited", "UDP responses over the rate limit (dropped, or slipped)"),
            ("rrl_slipped", "Rate-limited UDP responses answered truncated (or BADCOOKIE) instead of dropped"),
            ("rrl_exempt_cookie", "Responses over the rate limit sent anyway: the query had a valid server cookie"),
            ("tcp_idle_closed", "TCP connections closed for idleness"),
            ("tcp_queries", "Queries received over TCP"),
        ):
            m = CounterMetricFamily(f"dnsfront_{key}", help_)
            m.add_metric([], c.get(key, 0))
            yield m
        g = GaugeMetricFamily("dnsfront_tcp_connections", "Open TCP connections")
        g.add_metric([], c.get("tcp_open", 0))
        yield g
        conn = GaugeMetricFamily("dnsfront_redis_connected", "1 if the worker follows Redis now", labels=["worker"])
        age = GaugeMetricFamily("dnsfront_state_age_seconds",
                                "Seconds since the worker's last full load from Redis (-1: never)", labels=["worker"])
        ver = GaugeMetricFamily("dnsfront_state_version", "Version of the state being answered from", labels=["worker"])
        loads = CounterMetricFamily("dnsfront_redis_full_loads",
                                    "Full loads of the state from Redis (one per resync_interval and per reconnect)",
                                    labels=["worker"])
        for r in reports:
            w = str(r["worker"])
            conn.add_metric([w], 1.0 if r["redis"]["connected"] else 0.0)
            last = r["redis"]["last_sync"]
            age.add_metric([w], now - last if last else -1.0)
            ver.add_metric([w], r["redis"]["state_version"])
            loads.add_metric([w], r["redis"].get("full_loads", 0))
        yield conn
        yield age
        yield ver
        yield loads
        yield from _rebuild_metrics(reports)
        workers = GaugeMetricFamily("dnsfront_workers", "Worker processes reporting")
        workers.add_metric([], len(reports))
        yield workers


_REBUILD_HISTOGRAMS = (
    ("names", "dnsfront_rebuild_names", "Load-balanced names put out of date and rebuilt, per state change"),
    ("seconds", "dnsfront_rebuild_seconds", "Seconds from applying a state change to the last of its names rebuilt"),
    ("change_to_answer", "dnsfront_change_to_answer_seconds",
     "Seconds from a site's publish in Redis to its names answering from it"),
)


def _rebuild_metrics(reports: list[dict[str, Any]]) -> Iterator[Any]:
    """Rebuild counters and histograms, summed over the workers."""
    parts = [r["rebuild"] for r in reports if "rebuild" in r]
    n = CounterMetricFamily("dnsfront_rebuilds", "State changes (or staleness deadlines) that changed some answers")
    n.add_metric([], sum(p["rebuilds"] for p in parts))
    yield n
    pending = GaugeMetricFamily("dnsfront_rebuild_pending", "Load-balanced names waiting to be rebuilt")
    pending.add_metric([], sum(p["pending"] for p in parts))
    yield pending
    for key, name, help_ in _REBUILD_HISTOGRAMS:
        h = Histogram.merged(p[key] for p in parts)
        if h is not None:
            m = HistogramMetricFamily(name, help_)
            m.add_metric([], h.cumulative(), h.sum)
            yield m


def build_app(reports: Reports, *, expected_workers: int = 1) -> web.Application:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(reports))

    async def healthz(request: web.Request) -> web.Response:
        rs = reports()
        if len(rs) < expected_workers:
            return web.Response(status=503, text=f"{len(rs)}/{expected_workers} workers serving\n")
        if all(r["redis"]["connected"] for r in rs):
            return web.Response(text="ok\n")
        # Still healthy: answers come from the last good state (or the config).
        if all(r["redis"]["synced"] for r in rs):
            return web.Response(text="ok (redis unreachable: answering from the last good state)\n")
        return web.Response(text="ok (redis never reached: answering from the configured weights)\n")

    async def status(request: web.Request) -> web.Response:
        rs = reports()
        c = merge_counters(rs)
        first = rs[0] if rs else {}
        body = {
            "version": _version(),
            "workers": len(rs),
            "zones": first.get("zones", []),
            "names": first.get("names", []),
            "redis": [dict(r["redis"], worker=r["worker"], pid=r["pid"]) for r in rs],
            "counters": {
                "responses": [{"qtype": q, "rcode": rc, "count": n} for (q, rc), n in sorted(c["responses"].items())],
                "answers": [{"name": n, "site": s, "count": k} for (n, s), k in sorted(c["site_answers"].items())],
                **{k: v for k, v in c.items() if k not in ("responses", "site_answers")},
            },
        }
        return web.json_response(body, dumps=_dumps)

    async def metrics(request: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(registry))
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        resp.charset = "utf-8"
        return resp

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    return app


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, default=str)


class StatusServer:
    def __init__(self, listen: ListenAddress, reports: Reports, expected_workers: int = 1):
        self.listen = listen
        self.app = build_app(reports, expected_workers=expected_workers)
        self._served: Served | None = None
        self.port: int | None = None

    async def start(self) -> None:
        self._served = await serve(self.app, self.listen, what="the status server", error=DNSFrontError)
        self.port = self._served.port

    async def stop(self) -> None:
        if self._served is not None:
            await self._served.close()
            self._served = None
