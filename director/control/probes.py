"""Health probes: one asyncio adapter per check type.

``Prober`` runs one ``HealthCheck`` against one ``address:port`` and returns a
``ProbeResult(ok, detail, latency)``. It never raises for anything the probed
server does: refusals, resets, garbage, TLS failures and timeouts all become
``ok=False`` with a one-line ``detail`` for /status and the logs. Every probe
runs under the check's timeout, so a hung server costs that one timeout and
nothing else (the exec probe also kills the command's whole process group).

Check types (keepalived's names in brackets):

* ``tcp`` [TCP_CHECK]: a TCP connect.
* ``http``/``https`` [HTTP_GET/SSL_GET]: one request with aiohttp, no redirects
  followed (a 301 is a status like any other), optional Host header (also the
  TLS SNI name), an expected status set and an optional body substring; TLS
  verification can be turned off for self-signed real servers.
* ``dns`` [DNS_CHECK]: one UDP query built with dnslib; the reply's rcode must
  be the expected one.
* ``udp`` [UDP_CHECK]: send a payload, a reply is required and must contain
  ``expect`` if set. An ICMP port unreachable fails at once.
* ``exec`` [MISC_CHECK]: run a command, exit status 0 means fit. ``{address}``
  and ``{port}`` in its arguments are replaced, and ``GLB_ADDRESS``/``GLB_PORT``
  are set in its environment.

Each type's fields are its class in ``glb.config`` (``CHECKS``); its probe is
the function of the same name here, found through ``PROBES``, except ``tcp``
and plain ``http``: those run as callback probes without a task
(``director.control.fastprobe``, found through its ``STARTERS``), because at
thousands of checks a second asyncio's per-task and per-transport cost was
most of the director's CPU. A new check type is one config class, one probe
function and one entry in each registry.

The checker only needs the ``Probe`` call signature, so tests can substitute
an in-memory fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

import aiohttp
import dnslib

from director.control import fastprobe
from director.control.timerheap import TimerHeap
from glb.config import DnsCheck, ExecCheck, HealthCheck, HttpCheck, UdpCheck

BODY_LIMIT = 1 << 20
"""Bytes of an HTTP body searched for ``expect_body``; a page that only says
"ok" after its first MiB is not a health page."""
DETAIL_MAX = fastprobe.DETAIL_MAX
USER_AGENT = "glb-director-healthcheck"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: str
    """One line for humans: "HTTP 200", "timeout after 0.5s", "connection refused"."""
    latency: float
    """Seconds the probe took (up to the timeout)."""
    stalled: bool = False
    """The event loop, not the server, was late: the probe's timeout fired later
    than the timeout itself past its deadline. The checker does not count it."""


class Probe(Protocol):
    async def __call__(self, check: HealthCheck, address: str, port: int) -> ProbeResult: ...


_one_line = fastprobe.one_line


def _describe(e: BaseException) -> str:
    """A short reason for a failure, without the exception zoo's noise."""
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ConnectionResetError):
        return "connection reset"
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate: {getattr(e.certificate_error, 'verify_message', None) or e.certificate_error}"
    if isinstance(e, aiohttp.ClientConnectorError):
        return _describe(e.os_error) if e.os_error is not None else str(e)
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or e}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return _one_line(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)


class Prober:
    """Runs health checks. Holds one aiohttp session for every HTTP(S) probe.

    The session never reuses connections (``force_close``): a probe must see
    what a new client sees, not a keep-alive connection that outlived a
    restart. Call ``close()`` when done.
    """

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._timers: TimerHeap | None = None
        self._poller: fastprobe.Poller | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._timers is not None:
            self._timers.close()
            self._timers = None
        if self._poller is not None:
            self._poller.close()
            self._poller = None

    def timers(self) -> TimerHeap:
        """The callback probes' deadlines (one heap, one loop timer)."""
        if self._timers is None:
            self._timers = TimerHeap(asyncio.get_running_loop())
        return self._timers

    def poller(self) -> fastprobe.Poller:
        """The callback probes' sockets (one epoll set, one loop reader)."""
        if self._poller is None:
            self._poller = fastprobe.Poller(asyncio.get_running_loop())
        return self._poller

    async def __call__(self, check: HealthCheck, address: str, port: int) -> ProbeResult:
        fast = await _fast(self.poller(), self.timers(), check, address, port)
        if fast is not None:
            return fast
        run = PROBES.get(check.type)
        if run is None:
            return ProbeResult(False, f"unknown check type {check.type!r}", 0.0)
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + check.timeout
        try:
            async with asyncio.timeout(check.timeout):
                ok, detail = await run(self, check, address, port)
        except TimeoutError:
            # Woken this late past the deadline, the loop was stalled: say so (see ProbeResult.stalled).
            late = loop.time() - deadline
            return ProbeResult(False, f"timeout after {check.timeout:g}s", time.perf_counter() - start,
                               late > check.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a probe reports, it never crashes the checker
            ok, detail = False, _describe(e)
        return ProbeResult(ok, _one_line(detail), time.perf_counter() - start)

    def start(self, check: HealthCheck, address: str, port: int,
              done: Callable[[Any, ProbeResult], None], token: Any) -> Callable[[], None] | None:
        """Run ``check`` without a task if its type has a callback probe
        (``director.control.fastprobe``): ``done(token, result)`` gets the
        result (a ``fastprobe.FastResult``: the same fields); returns the
        cancel function, or None for a type that only has a coroutine probe."""
        return fastprobe.start(self.poller(), self.timers(), check, address, port, done, token)

    def http_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                timeout=aiohttp.ClientTimeout(total=None),  # the probe's own timeout rules
                headers={"User-Agent": USER_AGENT},
                auto_decompress=False,
                trust_env=False,
            )
        return self._session



async def _fast(poller: fastprobe.Poller, timers: TimerHeap, check: HealthCheck, address: str,
                port: int) -> ProbeResult | None:
    """The callback probe's result, awaited; None if ``check`` has none."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[ProbeResult] = loop.create_future()

    def done(_token: None, r: fastprobe.FastResult) -> None:
        if not fut.done():
            fut.set_result(ProbeResult(r.ok, r.detail, r.latency, r.stalled))

    cancel = fastprobe.start(poller, timers, check, address, port, done)
    if cancel is None:
        return None
    try:
        return await fut
    finally:
        cancel()


# -- http / https


async def _http(prober: Prober, check: HttpCheck, address: str, port: int) -> tuple[bool, str]:
    host = f"[{address}]" if ":" in address else address
    url = f"{check.type}://{host}:{port}{check.path}"
    kwargs: dict = {"allow_redirects": False}
    if check.host:
        kwargs["headers"] = {"Host": check.host}
    if check.type == "https":
        kwargs["ssl"] = True if check.tls_verify else False
        if check.host:
            kwargs["server_hostname"] = check.host
    async with prober.http_session().request(check.method, url, **kwargs) as resp:
        if resp.status not in check.expect_status:
            want = ",".join(map(str, check.expect_status))
            return False, f"HTTP {resp.status} (expected {want})"
        if check.expect_body is None:
            return True, f"HTTP {resp.status}"
        needle = check.expect_body.encode()
        seen, total = b"", 0
        async for chunk in resp.content.iter_chunked(65536):
            # Keep only a needle-sized tail between chunks so a match
            # across a chunk boundary is still found.
            seen = seen[-len(needle):] + chunk
            if needle in seen:
                return True, f"HTTP {resp.status}, body matched"
            total += len(chunk)
            if total >= BODY_LIMIT:
                break
        return False, f"HTTP {resp.status}, body lacks {check.expect_body!r}"


# -- dns


async def _dns(prober: Prober, check: DnsCheck, address: str, port: int) -> tuple[bool, str]:
    try:
        query = dnslib.DNSRecord.question(check.query_name, check.query_type)
    except Exception:  # noqa: BLE001 - dnslib raises several types for a bad type name
        return False, f"unknown query type {check.query_type!r}"
    qid = query.header.id

    def matches(data: bytes) -> bool:
        # The first two bytes are the id; skip strays and late replies.
        return len(data) >= 2 and int.from_bytes(data[:2], "big") == qid

    data = await _udp_exchange(address, port, query.pack(), matches)
    try:
        reply = dnslib.DNSRecord.parse(data)
    except Exception:  # noqa: BLE001 - dnslib's parser raises more than DNSError
        return False, "malformed DNS reply"
    if not reply.header.qr:
        return False, "reply without the QR bit"
    rcode = dnslib.RCODE.get(reply.header.rcode, str(reply.header.rcode))
    if rcode != check.expect_rcode:
        return False, f"rcode {rcode} (expected {check.expect_rcode})"
    return True, f"rcode {rcode}, {len(reply.rr)} answers"


# -- udp


async def _udp(prober: Prober, check: UdpCheck, address: str, port: int) -> tuple[bool, str]:
    data = await _udp_exchange(address, port, check.send.encode(), lambda _: True)
    if check.expect is not None and check.expect.encode() not in data:
        return False, f"reply lacks {check.expect!r}"
    return True, f"reply of {len(data)} bytes"


# -- exec


async def _exec(prober: Prober, check: ExecCheck, address: str, port: int) -> tuple[bool, str]:
    argv = [a.replace("{address}", address).replace("{port}", str(port)) for a in check.command]
    env = dict(os.environ, GLB_ADDRESS=address, GLB_PORT=str(port))
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group, so a kill takes its children too
        )
    except OSError as e:
        return False, f"cannot run {argv[0]}: {_describe(e)}"
    try:
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:  # timed out (cancelled): kill the whole group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    first = out.decode("utf-8", "replace").strip().splitlines()[:1]
    suffix = f": {first[0]}" if first else ""
    if proc.returncode == 0:
        return True, f"exit 0{suffix}"
    if proc.returncode < 0:
        return False, f"killed by signal {-proc.returncode}{suffix}"
    return False, f"exit {proc.returncode}{suffix}"


ProbeFn = Callable[[Prober, Any, str, int], Awaitable[tuple[bool, str]]]

PROBES: dict[str, ProbeFn] = {
    "https": _http,
    "dns": _dns,
    "udp": _udp,
    "exec": _exec,
}
"""The coroutine probe of each check type that has no callback probe in
``director.control.fastprobe.STARTERS`` (tcp, http), by ``glb.config.CHECKS`` name."""


class _Exchange(asyncio.DatagramProtocol):
    """Waits for the first datagram that ``accept`` likes, or an ICMP error."""

    def __init__(self, accept) -> None:
        self.accept = accept
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr) -> None:
        if not self.reply.done() and self.accept(data):
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # On a connected UDP socket the kernel reports ICMP port unreachable here.
        if not self.reply.done():
            self.reply.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc or ConnectionError("socket closed"))


async def _udp_exchange(address: str, port: int, payload: bytes, accept) -> bytes:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _Exchange(accept), remote_addr=(address, port)
    )
    try:
        transport.sendto(payload)
        return await proto.reply
    finally:
        transport.close()
