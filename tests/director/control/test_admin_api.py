"""The director's admin API on its own listener: scoped tokens, one 401 for every
wrong credential, TLS, SIGHUP reloading tokens and certificate without dropping
the listener, every action logged. A real director (control plane on lo), a
real redis-server, real HTTP(S) over loopback."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest

from glb import config
from glb.config import RedisConfig
from glb.errors import AdminError, ConfigError, DirectorError
from glb.state import server_target, site_target
from glb.store import RedisStore
from glb.tokens import Tokens, parse_tokens
from director.control.main import Director
from tests.director.control.test_main import write_config as main_config
from tests.environment import binary_unavailable, require
from tests.ports import free_port

ALICE = "alice-operate-token-0123456789"
GRAFANA = "grafana-read-token-0123456789"
BOB = "bob-operate-token-0123456789ab"


def write_tokens(path: Path, text: str = f"alice operate {ALICE}\ngrafana read {GRAFANA}\n", mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def write_config(tmp: Path, redis_url: str, admin_port: int, *, tls: bool = False) -> Path:
    """test_main's one-site config, with tokens (and TLS) and the admin listener."""
    tls_keys = ', tls_cert: "admin.crt", tls_key: "admin.key", ca_file: "ca.crt"' if tls else ""
    services = f"""
      - name: web
        vips: ["192.0.2.10:80/tcp"]
        real_servers: [127.0.0.1, 127.0.0.2]
        health_check: {{type: tcp, port: {free_port()}, interval: 0.2, timeout: 0.2}}
"""
    path = main_config(tmp / "glb.yaml", redis_url, free_port(), services, token=None)
    text = path.read_text().replace("zones:", f"admin: {{tokens_file: tokens{tls_keys}}}\nzones:", 1)
    path.write_text(text.replace("heartbeat: 0.2,", f'admin_listen: "127.0.0.1:{admin_port}", heartbeat: 0.2,', 1))
    return path


@pytest.fixture
async def director(tmp_path, redis_url):
    write_tokens(tmp_path / "tokens")
    d = Director(config.load(write_config(tmp_path, redis_url, free_port())), "dc1")
    await d.start()
    try:
        yield d
    finally:
        await d.stop()


async def call(http: aiohttp.ClientSession, port: int, path: str, body: dict | None = None,
               token: str | None = ALICE, method: str = "POST", headers: dict | None = None,
               scheme: str = "http", ssl_context: ssl.SSLContext | None = None) -> tuple[int, dict]:
    if headers is None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, f"{scheme}://127.0.0.1:{port}{path}", json=body, headers=headers,
                            ssl=ssl_context if ssl_context is not None else True) as r:
        return r.status, await r.json()


WEB2 = {"service": "web", "address": "127.0.0.2"}


async def test_operate_token_records_overrides_and_every_action_is_logged(director, redis_url, caplog):
    caplog.set_level(logging.INFO, logger="glb.director.admin")
    port = director.admin_api.port
    store = RedisStore(RedisConfig(url=redis_url, timeout=0.5))
    try:
        async with aiohttp.ClientSession() as http:
            status, doc = await call(http, port, "/admin/drain", {**WEB2, "who": "alice@ops1", "why": "kernel upgrade"})
            assert status == 200 and doc["override"]["drain"] is True
            held = await store.load_override(server_target("dc1", "web", "127.0.0.2", 0))
            assert (held.drain, held.who, held.why) == (True, "alice@ops1 via alice", "kernel upgrade")
            # Weight and drain share one override: changing one keeps the other.
            assert (await call(http, port, "/admin/weight", {**WEB2, "weight": 9}))[0] == 200
            status, doc = await call(http, port, "/admin/undrain", WEB2)
            assert status == 200 and (doc["override"]["drain"], doc["override"]["weight"], doc["override"]["who"]) \
                == (False, 9, "alice")
            status, doc = await call(http, port, "/admin/weight", {**WEB2, "weight": None})
            assert status == 200 and doc["override"] is None
            assert await store.load_override(server_target("dc1", "web", "127.0.0.2", 0)) is None
            assert (await call(http, port, "/admin/drain", {"service": "web", "address": "127.0.0.9"}))[0] == 404
            assert (await call(http, port, "/admin/weight", {**WEB2, "weight": -1}))[0] == 400
            assert (await call(http, port, "/admin/drain", {"address": "127.0.0.2"}))[0] == 400
            assert (await call(http, port, "/admin/site/drain", {"why": "maintenance"}))[0] == 200
            assert (await store.load_override(site_target("dc1"))).who == "alice"
            assert (await call(http, port, "/admin/site/undrain"))[0] == 200
    finally:
        await store.close()
    actions = [r.getMessage() for r in caplog.records if r.name == "glb.director.admin"]
    assert any(m.startswith("admin: drain server:dc1/web/127.0.0.2:0 by alice@ops1 via alice (token alice, from 127.0.0.1),"
                            " why 'kernel upgrade': version ") for m in actions), actions
    assert any(m.startswith("admin: site drain site:dc1 by alice (token alice, from 127.0.0.1), why 'maintenance'")
               for m in actions), actions


async def test_concurrent_operators_lose_no_update(director, redis_url):
    """Operators acting at the same moment on one site: two drains of different
    servers and a weight on one of them, as concurrent requests, many rounds:
    every change takes effect (the read-modify-write is a compare-and-set)."""
    port = director.admin_api.port
    store = RedisStore(RedisConfig(url=redis_url, timeout=0.5))
    web1 = {"service": "web", "address": "127.0.0.1"}
    t1, t2 = server_target("dc1", "web", "127.0.0.1", 0), server_target("dc1", "web", "127.0.0.2", 0)
    try:
        async with aiohttp.ClientSession() as http:
            for weight in range(1, 21):
                answers = await asyncio.gather(
                    call(http, port, "/admin/drain", {**web1, "who": "alice"}),
                    call(http, port, "/admin/drain", {**WEB2, "who": "bob"}),
                    call(http, port, "/admin/weight", {**WEB2, "weight": weight, "who": "carol"}),
                    call(http, port, "/admin/site/drain", {"who": "dave"}),
                )
                assert [status for status, _ in answers] == [200, 200, 200, 200], answers
                held = (await store.load()).overrides
                assert (held[t1].drain, held[t1].weight) == (True, None)
                assert (held[t2].drain, held[t2].weight) == (True, weight), held[t2]
                assert held[site_target("dc1")].drain is True
                # And undone at once, the same way.
                answers = await asyncio.gather(
                    call(http, port, "/admin/undrain", web1),
                    call(http, port, "/admin/undrain", WEB2),
                    call(http, port, "/admin/weight", {**WEB2, "weight": None}),
                    call(http, port, "/admin/site/undrain"),
                )
                assert [status for status, _ in answers] == [200, 200, 200, 200], answers
                assert (await store.load()).overrides == {}
    finally:
        await store.close()


async def test_every_wrong_credential_is_the_same_401(director, redis_url):
    port = director.admin_api.port
    wrong = [{}, {"Authorization": "Basic YWxpY2U6eA=="}, {"Authorization": "Bearer"},
             {"Authorization": f"Bearer {ALICE[:-1]}"}, {"Authorization": f"bearer {ALICE}x"},
             {"Authorization": f"Token {ALICE}"}]
    async with aiohttp.ClientSession() as http:
        for headers in wrong:
            for path in ("/admin/drain", "/admin/site/drain"):
                async with http.post(f"http://127.0.0.1:{port}{path}", json=WEB2, headers=headers) as r:
                    assert (r.status, await r.text(), r.headers["WWW-Authenticate"]) == \
                        (401, '{"error": "unauthorized"}', 'Bearer realm="glb"'), headers
            assert (await call(http, port, "/status", method="GET", headers=headers)) == (401, {"error": "unauthorized"})
        # The scheme's case does not matter (RFC 7235).
        assert (await call(http, port, "/admin/site/undrain", headers={"Authorization": f"bearer {ALICE}"}))[0] == 200
    assert (await RedisStore(RedisConfig(url=redis_url)).load()).overrides == {}


async def test_a_read_token_reads_and_may_not_operate(director, caplog):
    caplog.set_level(logging.INFO, logger="glb.director.admin")
    port = director.admin_api.port
    async with aiohttp.ClientSession() as http:
        status, doc = await call(http, port, "/status", method="GET", token=GRAFANA)
        assert status == 200 and doc["site"] == "dc1"
        assert (await call(http, port, "/admin/drain", WEB2, token=GRAFANA)) == \
            (403, {"error": "token grafana has scope read; this needs operate"})
        # /healthz names the site, for anyone (the CLI asks before acting).
        assert await call(http, port, "/healthz", method="GET", token=None) == (200, {"status": "ok", "site": "dc1"})
        # The status listener stays read-only and open, without admin routes.
        async with http.post(f"http://127.0.0.1:{director.status_port}/admin/drain", json=WEB2,
                             headers={"Authorization": f"Bearer {ALICE}"}) as r:
            assert r.status in (404, 405)
        async with http.get(f"http://127.0.0.1:{director.status_port}/status") as r:
            assert r.status == 200
    # Refusals are logged too, with the token's name when it was valid.
    assert "admin: POST /admin/drain from 127.0.0.1 refused: token grafana has scope read (403)" in caplog.messages


async def test_sighup_reloads_tokens_and_keeps_them_on_a_bad_file(director, tmp_path):
    port = director.admin_api.port
    async with aiohttp.ClientSession() as http:
        assert (await call(http, port, "/admin/site/undrain", token=BOB))[0] == 401
        write_tokens(tmp_path / "tokens", f"bob operate {BOB}\n")
        assert await director.reload()
        assert (await call(http, port, "/admin/site/undrain", token=BOB))[0] == 200
        assert (await call(http, port, "/admin/site/undrain", token=ALICE))[0] == 401  # removed from the file
        # A file open to every user is refused; the running tokens stay.
        write_tokens(tmp_path / "tokens", f"alice operate {ALICE}\n", mode=0o644)
        assert await director.reload()  # the config itself reloaded
        assert (await call(http, port, "/admin/site/undrain", token=BOB))[0] == 200
        assert (await call(http, port, "/admin/site/undrain", token=ALICE))[0] == 401
    assert director.admin_api.port == port


async def test_a_bad_tokens_file_is_a_one_line_startup_error(tmp_path, redis_url):
    path = write_config(tmp_path, redis_url, free_port())
    d = Director(config.load(path), "dc1")
    try:
        with pytest.raises(DirectorError) as info:
            await d.start()
        assert str(info.value) == f"admin.tokens_file '{tmp_path / 'tokens'}': no such file"
        assert d.status_port is None  # nothing was bound
        write_tokens(tmp_path / "tokens", mode=0o604)
        with pytest.raises(DirectorError, match=r"is accessible to every user on this host \(mode 0604\)"):
            await d.start()
    finally:
        await d.stop()


# --------------------------------------------------------------------------
# TLS


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(tmp: Path) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=glb test CA", cwd=tmp)


def make_cert(tmp: Path, name: str, ip: str = "127.0.0.1") -> None:
    """``name``.crt/.key for ``ip``, signed by the test CA."""
    (tmp / "san.ext").write_text(f"subjectAltName=IP:{ip}\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}", cwd=tmp)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext", cwd=tmp)


def peer_cert(port: int, ca: Path) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert(binary_form=True)


@pytest.fixture
def pki(tmp_path) -> Path:
    require(binary_unavailable("openssl"))
    make_ca(tmp_path)
    for name in ("admin", "next", "wrongip"):
        make_cert(tmp_path, name, "127.0.0.9" if name == "wrongip" else "127.0.0.1")
    return tmp_path


async def test_tls_and_a_certificate_reloaded_on_sighup(pki, redis_url):
    tmp = pki
    write_tokens(tmp / "tokens")
    (tmp / "admin.crt").rename(tmp / "first.crt")
    (tmp / "admin.key").rename(tmp / "first.key")
    (tmp / "admin.crt").write_bytes((tmp / "first.crt").read_bytes())
    (tmp / "admin.key").write_bytes((tmp / "first.key").read_bytes())
    d = Director(config.load(write_config(tmp, redis_url, free_port(), tls=True)), "dc1")
    await d.start()
    try:
        port = d.admin_api.port
        trusted = ssl.create_default_context(cafile=str(tmp / "ca.crt"))
        async with aiohttp.ClientSession() as http:
            assert (await call(http, port, "/admin/site/undrain", scheme="https", ssl_context=trusted))[0] == 200
            with pytest.raises(aiohttp.ClientConnectorCertificateError):  # not our CA
                await call(http, port, "/admin/site/undrain", scheme="https", ssl_context=ssl.create_default_context())
            with pytest.raises(aiohttp.ClientError):  # plain HTTP to a TLS listener
                await call(http, port, "/admin/site/undrain")
        first = await asyncio.to_thread(peer_cert, port, tmp / "ca.crt")
        keepalive = socket.create_connection(("127.0.0.1", port))  # the listener is not dropped by a reload

        # Renewed files, SIGHUP: new connections get the new certificate.
        (tmp / "admin.crt").write_bytes((tmp / "next.crt").read_bytes())
        (tmp / "admin.key").write_bytes((tmp / "next.key").read_bytes())
        assert await d.reload()
        second = await asyncio.to_thread(peer_cert, port, tmp / "ca.crt")
        assert second != first and second == ssl.PEM_cert_to_DER_cert((tmp / "next.crt").read_text())
        # A key that does not match: the running certificate stays.
        (tmp / "admin.key").write_bytes((tmp / "first.key").read_bytes())
        assert not d.admin_api.reload(d.config.admin)
        assert await asyncio.to_thread(peer_cert, port, tmp / "ca.crt") == second
        assert d.admin_api.port == port
        keepalive.close()
    finally:
        await d.stop()


def test_the_cli_over_tls(pki, redis_url, tmp_path):
    """`glb drain` with admin.tls: verified against admin.ca_file, or refused in one line."""
    from tests.director.control.test_listing import glb, one_line_error

    tmp = pki
    write_tokens(tmp / "tokens")
    port = free_port()
    cfg_path = write_config(tmp, redis_url, port, tls=True)
    token = tmp / "alice.token"
    write_tokens(token, ALICE + "\n")

    async def run_cli() -> list:
        d = Director(config.load(cfg_path), "dc1")
        await d.start()
        try:
            args = ["--config", str(cfg_path), "--site", "dc1", "--token-file", str(token)]
            ok = await asyncio.to_thread(glb, "drain", *args, "--service", "web", "--server", "127.0.0.2")
            other_ca = tmp / "other-ca"
            other_ca.mkdir()
            make_ca(other_ca)
            bad = await asyncio.to_thread(glb, "undrain", *args, "--ca-file", str(other_ca / "ca.crt"))
            (tmp / "admin.crt").write_bytes((tmp / "wrongip.crt").read_bytes())
            (tmp / "admin.key").write_bytes((tmp / "wrongip.key").read_bytes())
            await d.reload()
            wrong_ip = await asyncio.to_thread(glb, "undrain", *args)
            return [ok, bad, wrong_ip]
        finally:
            await d.stop()

    ok, bad, wrong_ip = asyncio.run(run_cli())
    assert ok.returncode == 0 and ok.stdout.startswith("drained web 127.0.0.2 in site dc1"), (ok.stdout, ok.stderr)
    assert one_line_error(bad) == (f"glb: error: director of site dc1 at 127.0.0.1:{port}: its TLS certificate is not "
                                   "trusted: unable to get local issuer certificate (admin.ca_file or --ca-file names "
                                   "the CA that signed it)")
    assert "IP address mismatch" in one_line_error(wrong_ip)


# --------------------------------------------------------------------------
# Config and tokens file, on their own


def test_config_admin_listen_needs_tokens_and_its_own_port(tmp_path, redis_url):
    text = write_config(tmp_path, redis_url, 9101).read_text()
    with pytest.raises(ConfigError, match="sites.dc1.director.admin_listen: needs admin.tokens_file"):
        config.loads(text.replace("admin: {tokens_file: tokens}", ""))
    status = text.split('status_listen: "')[1].split('"')[0]
    with pytest.raises(ConfigError, match="sites.dc1.director.admin_listen: must differ from status_listen"):
        config.loads(text.replace("127.0.0.1:9101", status))
    with pytest.raises(ConfigError, match="admin.tls_key: tls_cert and tls_key go together"):
        config.loads(text.replace("tokens_file: tokens", "tokens_file: tokens, tls_cert: a.crt"))
    cfg = config.loads(text, base_dir=tmp_path)
    assert cfg.admin.tokens_file == str(tmp_path / "tokens")  # anchored at the config's directory
    assert cfg.sites[0].director.admin_listen == config.ListenAddress("127.0.0.1", 9101)


def test_parse_tokens_and_authenticate():
    tokens = parse_tokens(f"# who scope token\n\nalice operate {ALICE}\n  grafana   read {GRAFANA}  \n", "t")
    assert [(t.name, t.scope) for t in tokens.tokens] == [("alice", "operate"), ("grafana", "read")]
    assert tokens.authenticate(f"Bearer {ALICE}").name == "alice"
    assert tokens.authenticate(f"bearer  {GRAFANA} ").name == "grafana"
    for header in (None, "", "Bearer", "Bearer ", f"Basic {ALICE}", f"Bearer {ALICE} x", ALICE):
        assert tokens.authenticate(header) is None, header
    assert tokens.tokens[0].allows("read") and tokens.tokens[0].allows("operate")
    assert tokens.tokens[1].allows("read") and not tokens.tokens[1].allows("operate")
    assert ALICE not in repr(tokens.tokens[0])
    assert Tokens().authenticate(f"Bearer {ALICE}") is None


@pytest.mark.parametrize("text, message", [
    ("alice operate", "t:1: expected NAME SCOPE TOKEN, got 2 fields"),
    (f"alice admin {ALICE}", "t:1: unknown scope 'admin' (scopes: read, operate)"),
    ("alice read short", "t:1: token of alice is shorter than 16 characters"),
    (f"a/b read {ALICE}", "t:1: bad token name 'a/b'"),
    (f"alice read {ALICE}\nalice operate {BOB}", "t:2: token name alice is given twice"),
    (f"alice read {ALICE}\nbob operate {ALICE}", "t:2: the token of bob is also another name's"),
    ("# nothing\n", "t: no tokens"),
])
def test_parse_tokens_rejects(text, message):
    with pytest.raises(AdminError) as info:
        parse_tokens(text, "t")
    assert str(info.value).startswith(message)
