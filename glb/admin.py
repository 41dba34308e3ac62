"""`glb drain|undrain|weight`: the client of a director's admin API.

The CLI talks to the director of the site it names, on that site's
``director.admin_listen`` (HTTPS when ``admin.tls_cert`` is set, verified
against ``admin.ca_file`` or ``--ca-file``), with the operator's own bearer
token: ``--token-file``, ``$GLB_ADMIN_TOKEN_FILE`` or ``$GLB_ADMIN_TOKEN``
(never a command-line argument: ``ps`` shows those to every user), or the
legacy shared ``admin.token`` of the config. It does not write Redis itself:
the director validates the request against what it runs (the real server
must exist there), records the override in Redis with who, when and why,
and from there every GLB process follows it.

``DirectorClient`` is deliberately small and synchronous (``http.client``: no
event loop for one request, and no HTTP proxy from the environment in the way
of a loopback address). Every failure is an ``AdminError`` with one line that
names the director's address: not reachable, no answer in time, token
refused (401), admin API disabled (403), unknown real server (404), Redis
unreachable on the director's side (503).
"""

from __future__ import annotations

import getpass
import http.client
import ipaddress
import json
import os
import socket
import ssl
from typing import Any

from glb.config import AdminConfig, Config, ListenAddress, Service, Site
from glb.errors import AdminError
from glb.tokens import read_secret

DEFAULT_TIMEOUT = 5.0
"""Seconds to wait for the director (connect, and each read)."""
TOKEN_FILE_ENV = "GLB_ADMIN_TOKEN_FILE"
TOKEN_ENV = "GLB_ADMIN_TOKEN"


# --------------------------------------------------------------------------
# Arguments


def parse_server(text: str) -> tuple[str, int | None]:
    """``ADDR``, ``ADDR:PORT``, ``[V6ADDR]:PORT`` or a bare IPv6 address ->
    (canonical address, port or None). A port of ``*`` (as ``glb director
    list`` shows for "the VIP's port" in a multi-port service) means none.
    ValueError with a one-line reason otherwise."""
    text = text.strip()
    port_text: str | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"expected ADDR, ADDR:PORT or [IPV6]:PORT, got {text!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host = text  # IPv4 without port, or a bare IPv6 address
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"not an IP address: {host!r}") from None
    if port_text in (None, "*"):
        return address, None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 0..65535, got {port_text!r}")
    return address, int(port_text)


def server_label(address: str, port: int) -> str:
    """How the CLI names a real server: the address alone for port 0 (the VIP's port)."""
    if port == 0:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def resolve_port(service: Service | None, address: str, port: int | None) -> int:
    """The port under which the director knows a real server.

    A server configured without a port is keyed by port 0 (it takes the VIP's
    port), so ``10.1.0.11`` and ``10.1.0.11:80`` (80 being a VIP port, as
    ``glb director list`` shows it) both mean key port 0. An address is listed
    once per service, so the address alone is enough. Anything the config does
    not know is passed through as given: the director decides (and answers 404).
    """
    if service is None:
        return port or 0
    ip = ipaddress.ip_address(address)
    rs = next((r for r in service.real_servers if r.address == ip), None)
    if rs is None:
        return port or 0
    key = rs.port or 0
    if port is None or port == key:
        return key
    if rs.port is None and port in {v.port for v in service.vips}:
        return key
    return port


def default_who() -> str:
    """``$SUDO_USER`` (the human behind sudo) or ``$USER``, at this host."""
    user = os.environ.get("SUDO_USER") or os.environ.get("USER")
    if not user:
        try:
            user = getpass.getuser()
        except (OSError, KeyError):
            user = "unknown"
    return f"{user}@{socket.gethostname()}"


def find_site(config: Config, name: str) -> Site:
    site = config.site(name)
    if site is None:
        known = ", ".join(s.name for s in config.sites) or "none"
        raise AdminError(f"{config.source}: no site {name!r} (sites: {known})")
    return site


# --------------------------------------------------------------------------
# Credentials


def operator_token(config: Config, token_file: str | None = None) -> tuple[str | None, str]:
    """(the operator's token or None, where it came from, for messages).

    First found of: ``token_file`` (``--token-file``), ``$GLB_ADMIN_TOKEN_FILE``,
    ``$GLB_ADMIN_TOKEN``, the config's shared ``admin.token``.
    """
    path = token_file or os.environ.get(TOKEN_FILE_ENV)
    if path:
        where = "--token-file" if token_file else f"${TOKEN_FILE_ENV}"
        token = read_secret(path, f"admin token file ({where})").strip()
        if not token:
            raise AdminError(f"admin token file {path!r} is empty")
        return token, f"the token in {path}"
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    if config.admin.token:
        return config.admin.token, f"admin.token in {config.source}"
    return None, "no token"


def client_tls(admin: AdminConfig, ca_file: str | None = None) -> ssl.SSLContext | None:
    """The client side of the admin listener's TLS: None when the directors serve plain HTTP."""
    if not admin.tls:
        return None
    ca = ca_file or admin.ca_file
    try:
        ctx = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as e:
        raise AdminError(f"admin CA file {ca!r}: cannot load: {getattr(e, 'strerror', None) or e}") from None
    if not admin.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --------------------------------------------------------------------------
# The client


def connect_address(listen: ListenAddress) -> tuple[str, int]:
    """Where to reach a listener: a wildcard bind is reached on loopback."""
    host = listen.host
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, listen.port


class DirectorClient:
    """One site's director, reached over HTTP(S) on its admin listener (or its status listener for reads)."""

    def __init__(self, site: str, host: str, port: int, *, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, config_source: str | None = None,
                 tls: ssl.SSLContext | None = None, token_source: str | None = None,
                 disabled: str | None = None, listener: str = "admin_listen"):
        self.site = site
        self.host = host
        self.port = port
        self.token = token
        self.timeout = timeout
        self.config_source = config_source
        self.tls = tls
        self.token_source = token_source or "the admin token"
        self.disabled = disabled
        """Why admin calls are refused before sending anything (no admin listener), or None."""
        self.listener = listener
        """The config key of the address reached, for messages."""

    @classmethod
    def for_site(cls, config: Config, site: str, *, timeout: float = DEFAULT_TIMEOUT,
                 token_file: str | None = None, ca_file: str | None = None) -> DirectorClient:
        """The site's admin listener with the operator's token; a site without
        one gets its status listener (reads only: admin calls are refused)."""
        director = find_site(config, site).director
        if director.admin_listen is None:
            host, port = connect_address(director.status_listen)
            return cls(site, host, port, timeout=timeout, config_source=config.source, listener="status_listen",
                       disabled=f"{config.source}: site {site} has no director.admin_listen, so its admin API is off")
        token, source = operator_token(config, token_file)
        host, port = connect_address(director.admin_listen)
        return cls(site, host, port, token=token, timeout=timeout, config_source=config.source,
                   tls=client_tls(config.admin, ca_file), token_source=source)

    @classmethod
    def for_status(cls, config: Config, site: str, *, timeout: float = DEFAULT_TIMEOUT) -> DirectorClient:
        """The site's status listener: read-only, no token, plain HTTP."""
        host, port = connect_address(find_site(config, site).director.status_listen)
        return cls(site, host, port, timeout=timeout, config_source=config.source, listener="status_listen")

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def label(self) -> str:
        return f"director of site {self.site} at {self.address}"

    # -- reads

    def status(self) -> dict[str, Any]:
        """GET /status, checked to be this site's director."""
        doc = self._request("GET", "/status")
        self._check_site(doc)
        return doc

    def check_site(self) -> None:
        """GET /healthz: refuse to act on a director that serves another site."""
        self._check_site(self._request("GET", "/healthz"))

    def _check_site(self, doc: dict[str, Any]) -> None:
        served = doc.get("site")
        if served != self.site:
            raise AdminError(f"the director at {self.address} serves site {served!r}, not {self.site!r}: check "
                             f"director.{self.listener} of site {self.site} in {self.config_source or 'the config'}")

    # -- admin calls: each returns the director's answer {"target", "override", "version"}

    def drain(self, service: str, address: str, port: int, *, who: str, why: str) -> dict[str, Any]:
        return self._admin("drain", {"service": service, "address": address, "port": port, "who": who, "why": why})

    def undrain(self, service: str, address: str, port: int, *, who: str, why: str) -> dict[str, Any]:
        return self._admin("undrain", {"service": service, "address": address, "port": port, "who": who, "why": why})

    def set_weight(self, service: str, address: str, port: int, weight: int | None, *,
                   who: str, why: str) -> dict[str, Any]:
        """Set a weight override; ``None`` removes it (the configured weight applies again)."""
        return self._admin("weight", {"service": service, "address": address, "port": port,
                                      "weight": weight, "who": who, "why": why})

    def drain_site(self, *, who: str, why: str) -> dict[str, Any]:
        return self._admin("site/drain", {"who": who, "why": why})

    def undrain_site(self, *, who: str, why: str) -> dict[str, Any]:
        return self._admin("site/undrain", {"who": who, "why": why})

    def require_token(self) -> None:
        if self.disabled:
            raise AdminError(self.disabled)
        if not self.token:
            raise AdminError(f"no admin token: give --token-file FILE, ${TOKEN_FILE_ENV} or ${TOKEN_ENV} "
                             "(a token of scope operate from the directors' admin.tokens_file)")

    def _admin(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        self.require_token()
        return self._request("POST", f"/admin/{action}", body)

    # -- HTTP

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Accept": "application/json", "User-Agent": "glb-cli"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.tls is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=self.tls)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except ssl.SSLCertVerificationError as e:
            raise AdminError(f"{self.label}: its TLS certificate is not trusted: {e.verify_message} "
                             "(admin.ca_file or --ca-file names the CA that signed it)") from None
        except ssl.SSLError as e:
            raise AdminError(f"{self.label}: TLS failed: {e.reason or e} (does it serve TLS? admin.tls_cert)") from None
        except ConnectionRefusedError:
            raise AdminError(f"{self.label} is not reachable: connection refused "
                             f"(is 'glb director --site {self.site}' running?)") from None
        except TimeoutError:
            raise AdminError(f"{self.label} did not answer within {self.timeout:g}s") from None
        except socket.gaierror as e:
            raise AdminError(f"{self.label} is not reachable: cannot resolve {self.host!r}: {e.strerror}") from None
        except OSError as e:
            reason = (e.strerror or str(e) or type(e).__name__).lower()
            raise AdminError(f"{self.label} is not reachable: {reason}") from None
        except http.client.HTTPException as e:
            hint = " (TLS on one side only? admin.tls_cert)" if self.tls is None else ""
            raise AdminError(f"{self.label} sent a broken HTTP answer to {method} {path} "
                             f"({type(e).__name__}): is a GLB director listening there?{hint}") from None
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        status = response.status
        if 200 <= status < 300:
            if not isinstance(doc, dict):
                raise AdminError(f"{self.label} sent no JSON object for {method} {path} "
                                 f"(HTTP {status}): is a GLB director listening there?")
            return doc
        message = doc.get("error") if isinstance(doc, dict) and isinstance(doc.get("error"), str) else None
        raise AdminError(self._refusal(status, response.reason, method, path, message))

    def _refusal(self, status: int, reason: str, method: str, path: str, message: str | None) -> str:
        if message is None:
            return (f"{self.label} answered HTTP {status} {reason} to {method} {path}: "
                    "is a GLB director of this version listening there?")
        if status == 401:
            return f"{self.label} rejected the token (401): {self.token_source} is not one the director accepts"
        if status == 403:
            return f"{self.label} refused (403): {message}"
        if status == 404:
            return f"{self.label}: {message} (404)"
        if status == 400:
            return f"{self.label} rejected the request (400): {message}"
        if status == 503:
            return f"{self.label} could not record it (503): {message}"
        return f"{self.label} answered HTTP {status} {reason}: {message}"


# --------------------------------------------------------------------------
# The commands


def _client(config_path: str, site: str, timeout: float, token_file: str | None,
            ca_file: str | None, direct: bool) -> tuple[Config, Site, Any]:
    """The site's director, or with ``direct`` Redis itself (``glb.direct``): the same methods either way."""
    from glb import config as configmod

    cfg = configmod.load(config_path)
    site_cfg = find_site(cfg, site)
    if direct:
        from glb.direct import DirectClient

        return cfg, site_cfg, DirectClient(cfg, site)
    client = DirectorClient.for_site(cfg, site, timeout=timeout, token_file=token_file, ca_file=ca_file)
    return cfg, site_cfg, client


def _by(ov: dict[str, Any] | None, who: str, why: str) -> str:
    who = (ov or {}).get("who") or who
    why = (ov or {}).get("why", why)
    return f"by {who}" + (f': "{why}"' if why else "")


def drain(config_path: str, site: str, *, service: str | None = None, server: tuple[str, int | None] | None = None,
          undo: bool = False, why: str = "", who: str | None = None, timeout: float = DEFAULT_TIMEOUT,
          token_file: str | None = None, ca_file: str | None = None, direct: bool = False) -> int:
    """``glb drain`` / ``glb undrain`` (``undo``): a real server, or the whole site without ``server``."""
    _, site_cfg, client = _client(config_path, site, timeout, token_file, ca_file, direct)
    who = who or default_who()
    client.require_token()  # before any request: nothing to ask without one
    client.check_site()
    if server is None:
        if undo:
            answer = client.undrain_site(who=who, why=why)
            print(f"undrained site {site}: DNS answers it again; state version {answer.get('version')}")
        else:
            answer = client.drain_site(who=who, why=why)
            print(f"drained site {site}: DNS stops answering it ({_by(answer.get('override'), who, why)}); "
                  f"state version {answer.get('version')}")
        return 0
    if service is None:
        raise AdminError("--server needs --service: a real server is named within its service")
    address, given = server
    port = resolve_port(site_cfg.service(service), address, given)
    name = f"{service} {server_label(address, port)} in site {site}"
    if undo:
        answer = client.undrain(service, address, port, who=who, why=why)
        ov = answer.get("override")
        kept = f"; weight override {ov.get('weight')} kept ({_by(ov, who, why)})" if ov else "; no override left"
        print(f"undrained {name}: drain removed, it takes new connections while healthy{kept}; "
              f"state version {answer.get('version')}")
    else:
        answer = client.drain(service, address, port, who=who, why=why)
        ov = answer.get("override")
        print(f"drained {name}: no new connections, established ones kept ({_by(ov, who, why)}); "
              f"state version {answer.get('version')}")
    return 0


def set_weight(config_path: str, site: str, *, service: str, server: tuple[str, int | None], weight: int | None,
               why: str = "", who: str | None = None, timeout: float = DEFAULT_TIMEOUT,
               token_file: str | None = None, ca_file: str | None = None, direct: bool = False) -> int:
    """``glb weight``: set a real server's weight override, or remove it (``weight=None``)."""
    _, site_cfg, client = _client(config_path, site, timeout, token_file, ca_file, direct)
    who = who or default_who()
    client.require_token()  # before any request: nothing to ask without one
    client.check_site()
    address, given = server
    svc = site_cfg.service(service)
    port = resolve_port(svc, address, given)
    name = f"{service} {server_label(address, port)} in site {site}"
    answer = client.set_weight(service, address, port, weight, who=who, why=why)
    ov = answer.get("override")
    draining = "; still drained" if ov and ov.get("drain") else ""
    if weight is None:
        ip = ipaddress.ip_address(address)
        rs = next((r for r in svc.real_servers if r.address == ip), None) if svc else None
        configured = f" ({rs.weight})" if rs is not None else ""
        print(f"removed the weight override of {name}: the configured weight{configured} applies{draining}; "
              f"state version {answer.get('version')}")
    else:
        print(f"weight of {name} set to {weight} ({_by(ov, who, why)}){draining}; "
              f"state version {answer.get('version')}")
    return 0
