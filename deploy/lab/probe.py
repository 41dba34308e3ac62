"""What a client does, from whatever namespace the calling thread is in.

Use inside ``with lab.inside("client"):`` (see :class:`deploy.lab.lab.Lab`).
DNS with dnslib over UDP; HTTP with http.client. Every function returns a
result object and never raises for a network failure: a failure is data.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import time
from dataclasses import dataclass, field

from dnslib import QTYPE, RCODE, DNSRecord


@dataclass
class DNSAnswer:
    addresses: list[str] = field(default_factory=list)
    ttl: int | None = None
    rcode: str = "NOERROR"
    error: str | None = None  # timeout, refused...

    @property
    def ok(self) -> bool:
        return self.error is None and self.rcode == "NOERROR"

    def __str__(self) -> str:
        if self.error:
            return self.error
        if self.rcode != "NOERROR":
            return self.rcode
        return " ".join(self.addresses) or "NODATA"


def resolve(server: str, name: str, qtype: str = "A", timeout: float = 1.0, port: int = 53, rd: bool = True) -> DNSAnswer:
    """One query to ``server``; the A addresses in answer order, the TTL of the set."""
    q = DNSRecord.question(name, qtype)
    q.header.id = random.randrange(65536)
    q.header.rd = 1 if rd else 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(q.pack(), (server, port))
            deadline = time.monotonic() + timeout
            while True:
                s.settimeout(max(0.001, deadline - time.monotonic()))
                data, _ = s.recvfrom(4096)
                r = DNSRecord.parse(data)
                if r.header.id == q.header.id:
                    break
        except socket.timeout:
            return DNSAnswer(error="timeout")
        except OSError as e:
            return DNSAnswer(error=e.strerror or str(e))
        except Exception as e:  # noqa: BLE001 - a garbled reply is a result too
            return DNSAnswer(error=f"bad reply: {e}")
    ans = DNSAnswer(rcode=RCODE.get(r.header.rcode))
    for rr in r.rr:
        if rr.rtype == getattr(QTYPE, qtype):
            ans.addresses.append(str(rr.rdata))
            ans.ttl = rr.ttl if ans.ttl is None else min(ans.ttl, rr.ttl)
    return ans


@dataclass
class Fetch:
    address: str
    ok: bool
    served_by: str | None = None
    error: str | None = None
    seconds: float = 0.0
    started: float = 0.0
    """``time.monotonic()`` as the connection attempt began (its SYN leaves right after)."""

    def __str__(self) -> str:
        return self.served_by if self.ok else f"{self.address}: {self.error}"


def fetch(address: str, port: int = 80, path: str = "/", host: str = "app.example.net", timeout: float = 1.0) -> Fetch:
    """GET http://address:port/path with a fresh connection; who answered (``X-Served-By``)."""
    start = time.monotonic()
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host, "Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        took = time.monotonic() - start
        if resp.status != 200:
            return Fetch(address, False, error=f"HTTP {resp.status}", seconds=took, started=start)
        return Fetch(address, True, served_by=resp.getheader("X-Served-By") or "?", seconds=took, started=start)
    except socket.timeout:
        return Fetch(address, False, error="timeout", seconds=time.monotonic() - start, started=start)
    except OSError as e:
        return Fetch(address, False, error=(e.strerror or str(e)).lower(), seconds=time.monotonic() - start,
                     started=start)
    except http.client.HTTPException as e:
        return Fetch(address, False, error=f"bad HTTP: {type(e).__name__}", seconds=time.monotonic() - start,
                     started=start)
    finally:
        conn.close()


@dataclass
class Attempt:
    """A browser-like request: resolve, then try the answer's addresses in order until one works."""

    at: float
    answer: DNSAnswer
    tries: list[Fetch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.tries) and self.tries[-1].ok

    @property
    def served_by(self) -> str | None:
        return self.tries[-1].served_by if self.ok else None

    @property
    def first_ok(self) -> bool:
        """Did the first address work (what a client without fallback sees)?"""
        return bool(self.tries) and self.tries[0].ok


def request(resolver: str, name: str, *, fallback: bool = True, connect_timeout: float = 1.0, port: int = 80) -> Attempt:
    """Resolve ``name`` through ``resolver`` (which caches for the TTL) and fetch ``/``."""
    att = Attempt(time.monotonic(), resolve(resolver, name))
    for addr in att.answer.addresses if att.answer.ok else ():
        f = fetch(addr, port, host=name, timeout=connect_timeout)
        att.tries.append(f)
        if f.ok or not fallback:
            break
    return att


def http_json(address: str, port: int, path: str, *, method: str = "GET", token: str | None = None,
              body: dict | None = None, timeout: float = 3.0) -> tuple[int, object]:
    """A JSON request (status endpoints, admin API); (status, decoded body or text). Raises OSError when unreachable."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        resp = conn.getresponse()
        raw = resp.read().decode(errors="replace")
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw
    finally:
        conn.close()


def redis_ping(address: str, port: int = 6379, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False
