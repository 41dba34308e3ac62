"""`glb drain|undrain|weight` against a running director (the real `glb
director` process, real servers on 127.0.0.x, a real redis-server), checked
through `glb director list`, the overrides in Redis and `glb status`; plus the
admin client's argument handling and error lines on their own."""

from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from glb.admin import DirectorClient, default_who, parse_server, resolve_port
from glb.config import VIP, RealServer, Service
from glb.errors import AdminError
from glb.state import server_target, site_target
from tests.director.control.test_listing import (  # noqa: F401  (fixtures)
    OPERATOR_TOKEN,
    READER_TOKEN,
    director_lab,
    free_port,
    glb,
    list_rows,
    load_state,
    one_line_error,
    running_director,
    servers_of,
    wait_for,
    write_config,
)

HOST = socket.gethostname()


def ok_line(r) -> str:
    """Exit 0, one line on stdout, nothing on stderr."""
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def row(lab, address: str) -> list[str]:
    """The `glb director list` row of a real server."""
    r = glb("director", "list", *lab.args())
    assert r.returncode == 0, r.stderr
    return next(cells for addr, cells in list_rows(r.stdout).items() if addr.split(":")[0] == address)


def web_port(lab) -> int:
    return int(lab.status()["services"][0]["vips"][0]["vip"].split(":")[1].split("/")[0])


def state_of(lab, key: str) -> str:
    return servers_of(lab.status())[key]["state"]


def test_drain_and_undrain_a_server(director_lab):
    lab = director_lab
    r = glb("drain", *lab.admin_args("--service", "web", "--server", "127.0.0.2", "--reason", "kernel upgrade",
                               "--who", "alice"))
    assert re.fullmatch(r'drained web 127\.0\.0\.2 in site dc1: no new connections, established ones kept '
                        r'\(by alice: "kernel upgrade"\); state version \d+', ok_line(r)), r.stdout
    # The director applies it from Redis; the table shows it; Redis holds who and why.
    wait_for(lambda: state_of(lab, "web/127.0.0.2") == "draining")
    assert row(lab, "127.0.0.2")[:3] == ["Route", "0", "draining"]
    assert row(lab, "127.0.0.1")[:3] == ["Route", "3", "up"]
    held = load_state(lab.redis_url).overrides[server_target("dc1", "web", "127.0.0.2", 0)]
    assert (held.drain, held.weight, held.who, held.why) == (True, None, "alice", "kernel upgrade")
    assert held.when > 0

    def published_draining():
        snap = load_state(lab.redis_url).sites["dc1"]
        return snap.service("web").real_server("127.0.0.2", 0).state == "draining"

    wait_for(published_draining)

    r = glb("undrain", *lab.admin_args("--service", "web", "--server", "127.0.0.2"))
    assert re.fullmatch(r"undrained web 127\.0\.0\.2 in site dc1: drain removed, it takes new connections "
                        r"while healthy; no override left; state version \d+", ok_line(r)), r.stdout
    wait_for(lambda: state_of(lab, "web/127.0.0.2") == "up")
    assert row(lab, "127.0.0.2")[:3] == ["Route", "1", "up"]
    assert load_state(lab.redis_url).overrides == {}


def test_weight_sets_and_clears_the_override(director_lab):
    lab = director_lab
    port = web_port(lab)
    # Named as `glb director list` shows it (the VIP's port): the same server.
    r = glb("weight", *lab.admin_args("--service", "web", "--server", f"127.0.0.1:{port}", "--reason", "bigger box"), "7",
            env={"SUDO_USER": "bob"})
    assert re.fullmatch(rf'weight of web 127\.0\.0\.1 in site dc1 set to 7 \(by bob@{re.escape(HOST)} via alice: '
                        r'"bigger box"\); state version \d+', ok_line(r)), r.stdout
    wait_for(lambda: servers_of(lab.status())["web/127.0.0.1"]["weight"] == 7)
    assert row(lab, "127.0.0.1")[:3] == ["Route", "7*", "up"]
    r = glb("director", "list", *lab.args())
    assert "web: up, 100% healthy" in r.stdout  # 7+1 of 5 configured, clamped
    assert r.stdout.splitlines()[-1].startswith("* weight set by an operator override")
    held = load_state(lab.redis_url).overrides[server_target("dc1", "web", "127.0.0.1", 0)]
    assert (held.drain, held.weight, held.who, held.why) == (False, 7, f"bob@{HOST} via alice", "bigger box")

    # Drain and weight share the override: draining keeps the weight, and back.
    ok_line(glb("drain", *lab.admin_args("--service", "web", "--server", "127.0.0.1")))
    wait_for(lambda: state_of(lab, "web/127.0.0.1") == "draining")
    assert row(lab, "127.0.0.1")[:3] == ["Route", "0*", "draining"]
    line = ok_line(glb("undrain", *lab.admin_args("--service", "web", "--server", "127.0.0.1")))
    assert "; weight override 7 kept (by " in line
    wait_for(lambda: state_of(lab, "web/127.0.0.1") == "up")
    assert row(lab, "127.0.0.1")[:3] == ["Route", "7*", "up"]

    r = glb("weight", *lab.admin_args("--service", "web", "--server", "127.0.0.1"), "clear")
    assert re.fullmatch(r"removed the weight override of web 127\.0\.0\.1 in site dc1: the configured weight \(3\) "
                        r"applies; state version \d+", ok_line(r)), r.stdout
    wait_for(lambda: servers_of(lab.status())["web/127.0.0.1"]["weight"] == 3)
    assert row(lab, "127.0.0.1")[:3] == ["Route", "3", "up"]
    assert load_state(lab.redis_url).overrides == {}


def test_weight_zero_and_a_server_with_its_own_port(director_lab):
    lab = director_lab
    mail = lab.status()["services"][1]["real_servers"][0]
    assert mail["port"] > 0
    line = ok_line(glb("weight", *lab.admin_args("--service", "mail", "--server", f"127.0.0.5:{mail['port']}"), "0"))
    assert line.startswith(f"weight of mail 127.0.0.5:{mail['port']} in site dc1 set to 0 (by ")
    wait_for(lambda: servers_of(lab.status())["mail/127.0.0.5"]["weight"] == 0)
    assert row(lab, "127.0.0.5")[:3] == ["Tunnel", "0*", "up"]  # quiesced, still up
    assert server_target("dc1", "mail", "127.0.0.5", mail["port"]) in load_state(lab.redis_url).overrides


def test_drain_the_whole_site(director_lab):
    lab = director_lab
    r = glb("drain", *lab.admin_args("--reason", "maintenance"), env={"SUDO_USER": "carol"})
    assert re.fullmatch(rf'drained site dc1: DNS stops answering it \(by carol@{re.escape(HOST)} via alice: '
                        r'"maintenance"\); state version \d+', ok_line(r)), r.stdout
    held = load_state(lab.redis_url).overrides[site_target("dc1")]
    assert (held.drain, held.who, held.why) == (True, f"carol@{HOST} via alice", "maintenance")

    status = glb("status", "--config", str(lab.config), "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert {s["site"]: s["state"] for s in report["sites"]}["dc1"] == "drained"
    app = next(n for n in report["names"] if n["name"] == "app.example.net." and n["type"] == "A")
    assert ("dc1", False) in [(m["site"], m["live"]) for m in app["members"]]

    wait_for(lambda: lab.status()["drained"])
    listing = glb("director", "list", *lab.args())
    assert listing.stdout.splitlines()[1].startswith("SITE DRAINED by an operator")
    # Real servers are untouched by a site drain: the site keeps forwarding.
    assert row(lab, "127.0.0.1")[:3] == ["Route", "3", "up"]

    r = glb("undrain", *lab.admin_args())
    assert re.fullmatch(r"undrained site dc1: DNS answers it again; state version \d+", ok_line(r)), r.stdout
    report = json.loads(glb("status", "--config", str(lab.config), "--json").stdout)
    assert {s["site"]: s["state"] for s in report["sites"]}["dc1"] == "up"
    wait_for(lambda: not lab.status()["drained"])


# --------------------------------------------------------------------------
# Errors: one line, exit 1, nothing recorded


def test_wrong_token_is_refused(director_lab, tmp_path):
    lab = director_lab
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-a-token-the-director-knows\n")
    wrong.chmod(0o600)
    for args in (("drain",), ("drain", "--service", "web", "--server", "127.0.0.1"),
                 ("weight", "--service", "web", "--server", "127.0.0.1", "5")):
        line = one_line_error(glb(args[0], *lab.args("--token-file", str(wrong), *args[1:])))
        assert line == (f"glb: error: director of site dc1 at 127.0.0.1:{lab.admin_port} rejected the token (401): "
                        f"the token in {wrong} is not one the director accepts")
    # From the environment, the same.
    line = one_line_error(glb("drain", *lab.args(), env={"GLB_ADMIN_TOKEN": "not-a-token-the-director-knows"}))
    assert line.endswith("rejected the token (401): $GLB_ADMIN_TOKEN is not one the director accepts")
    assert load_state(lab.redis_url).overrides == {}


def test_a_read_token_may_not_operate(director_lab):
    lab = director_lab
    line = one_line_error(glb("drain", *lab.args(), env={"GLB_ADMIN_TOKEN": READER_TOKEN}))
    assert line == (f"glb: error: director of site dc1 at 127.0.0.1:{lab.admin_port} refused (403): "
                    "token grafana has scope read; this needs operate")
    assert load_state(lab.redis_url).overrides == {}


def test_no_token(director_lab):
    lab = director_lab
    line = one_line_error(glb("undrain", *lab.args()))
    assert line.startswith("glb: error: no admin token: give --token-file FILE, $GLB_ADMIN_TOKEN_FILE or "
                           "$GLB_ADMIN_TOKEN")


def test_a_token_file_open_to_everyone_is_refused(director_lab, tmp_path):
    lab = director_lab
    loose = tmp_path / "loose.token"
    loose.write_text(lab.token_file.read_text())
    loose.chmod(0o644)
    line = one_line_error(glb("drain", *lab.args(), env={"GLB_ADMIN_TOKEN_FILE": str(loose)}))
    assert line == (f"glb: error: admin token file ($GLB_ADMIN_TOKEN_FILE) '{loose}' is accessible to every user "
                    "on this host (mode 0644): chmod o-rwx it")
    assert load_state(lab.redis_url).overrides == {}


def test_no_token_flag_on_the_command_line(director_lab):
    """A token typed as an argument would show in ps: there is no such flag, not even abbreviated."""
    r = glb("drain", *director_lab.args("--token", OPERATOR_TOKEN))
    assert r.returncode == 2 and "unrecognized arguments: --token" in r.stderr


def test_a_site_without_admin_listen(director_lab):
    lab = director_lab
    line = one_line_error(glb("drain", "--config", str(lab.config), "--site", "dc2",
                              "--token-file", str(lab.token_file)))
    assert line == f"glb: error: {lab.config}: site dc2 has no director.admin_listen, so its admin API is off"


def test_unknown_server_or_service(director_lab):
    lab = director_lab
    line = one_line_error(glb("drain", *lab.admin_args("--service", "web", "--server", "127.0.0.9")))
    assert line == (f"glb: error: director of site dc1 at 127.0.0.1:{lab.admin_port}: "
                    "no real server 127.0.0.9 port 0 in service 'web' (404)")
    line = one_line_error(glb("weight", *lab.admin_args("--service", "nope", "--server", "127.0.0.1", "3")))
    assert line.endswith("no real server 127.0.0.1 port 0 in service 'nope' (404)")
    # A port that is neither the server's nor a VIP's: the director says no.
    line = one_line_error(glb("undrain", *lab.admin_args("--service", "web", "--server", "127.0.0.1:1")))
    assert line.endswith("no real server 127.0.0.1 port 1 in service 'web' (404)")
    assert load_state(lab.redis_url).overrides == {}


def test_unreachable_director(director_lab, tmp_path):
    gone = free_port()
    config = write_config(tmp_path / "glb.yaml", director_lab.redis_url, free_port(), 8080, 25, admin_port=gone)
    for args in (("drain",), ("undrain", "--service", "web", "--server", "127.0.0.1"),
                 ("weight", "--service", "web", "--server", "127.0.0.1", "2")):
        line = one_line_error(glb(args[0], *director_lab.admin_args(*args[1:], config=config)))
        assert line == (f"glb: error: director of site dc1 at 127.0.0.1:{gone} is not reachable: "
                        "connection refused (is 'glb director --site dc1' running?)")


def test_another_sites_director_is_not_touched(director_lab, tmp_path):
    """dc2's admin_listen pointing at dc1's director: nothing is drained."""
    lab = director_lab
    text = lab.config.read_text()
    dc2_listen = re.search(r'dc2:\n    director: \{interface: lo, status_listen: "([^"]+)"', text).group(1)
    config = tmp_path / "glb.yaml"
    config.write_text(text.replace(f'"{dc2_listen}"', f'"{dc2_listen}", admin_listen: "127.0.0.1:{lab.admin_port}"'))
    line = one_line_error(glb("drain", "--config", str(config), "--site", "dc2", "--token-file", str(lab.token_file)))
    assert line == (f"glb: error: the director at 127.0.0.1:{lab.admin_port} serves site 'dc1', not 'dc2': "
                    f"check director.admin_listen of site dc2 in {config}")
    assert load_state(lab.redis_url).overrides == {}


@pytest.mark.parametrize("args, message", [
    (("drain", "--service", "web"), "--server and --service go together"),
    (("undrain", "--server", "127.0.0.1"), "--server and --service go together"),
    (("drain", "--service", "web", "--server", "web1"), "argument --server: not an IP address: 'web1'"),
    (("drain", "--service", "web", "--server", "127.0.0.1:99999"), "argument --server: port must be 0..65535"),
    (("weight", "--service", "web", "--server", "127.0.0.1", "65536"), "argument WEIGHT: must be 0..65535, got 65536"),
    (("weight", "--service", "web", "--server", "127.0.0.1", "heavy"), "argument WEIGHT: expected 0..65535 or 'clear'"),
    (("weight", "--service", "web", "--server", "127.0.0.1"), "the following arguments are required: WEIGHT"),
    (("weight", "--server", "127.0.0.1", "3"), "the following arguments are required: --service"),
])
def test_usage_errors_are_one_line_exit_2(tmp_path, args, message):
    config = write_config(tmp_path / "glb.yaml", "redis://127.0.0.1:1/0", free_port(), 8080, 25)
    r = glb(args[0], "--config", str(config), "--site", "dc1", *args[1:])
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert lines[0].startswith(f"glb {args[0]}: error: ")


# --------------------------------------------------------------------------
# The client on its own: argument handling and every refusal


@pytest.mark.parametrize("text, expected", [
    ("10.1.0.11", ("10.1.0.11", None)),
    ("10.1.0.11:8080", ("10.1.0.11", 8080)),
    ("10.1.0.11:0", ("10.1.0.11", 0)),
    ("10.1.0.11:*", ("10.1.0.11", None)),
    ("2001:db8::0011", ("2001:db8::11", None)),
    ("[2001:db8::11]:443", ("2001:db8::11", 443)),
    ("[2001:db8::11]", ("2001:db8::11", None)),
])
def test_parse_server(text, expected):
    assert parse_server(text) == expected


@pytest.mark.parametrize("text", ["web1", "10.1.0.11:http", "10.1.0.11:65536", "[10.1.0.11", "[::1]x", ""])
def test_parse_server_rejects(text):
    with pytest.raises(ValueError):
        parse_server(text)


def test_resolve_port():
    import ipaddress

    ip = ipaddress.ip_address
    svc = Service("web", (VIP(ip("192.0.2.10"), 80, "tcp"), VIP(ip("192.0.2.10"), 443, "tcp")),
                  (RealServer(ip("10.0.0.1")), RealServer(ip("10.0.0.2"), port=80)))
    assert resolve_port(svc, "10.0.0.1", None) == 0
    assert resolve_port(svc, "10.0.0.1", 443) == 0  # a VIP port: the server takes the VIP's port
    assert resolve_port(svc, "10.0.0.1", 0) == 0
    assert resolve_port(svc, "10.0.0.1", 8080) == 8080  # passed through: the director answers 404
    assert resolve_port(svc, "10.0.0.2", None) == 80
    assert resolve_port(svc, "10.0.0.2", 80) == 80
    assert resolve_port(svc, "10.0.0.9", None) == 0
    assert resolve_port(None, "10.0.0.1", 7) == 7


def test_default_who(monkeypatch):
    monkeypatch.setenv("SUDO_USER", "alice")
    monkeypatch.setenv("USER", "root")
    assert default_who() == f"alice@{HOST}"
    monkeypatch.delenv("SUDO_USER")
    assert default_who() == f"root@{HOST}"


class _Canned(BaseHTTPRequestHandler):
    answers: dict[str, tuple[int, bytes]] = {}

    def _answer(self) -> None:
        status, body = self.answers.get(self.path, (404, b"nothing here"))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def canned():
    """An HTTP server answering canned (status, body) per path; yields (answers, client)."""
    answers: dict[str, tuple[int, bytes]] = {}
    handler = type("Handler", (_Canned,), {"answers": answers})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = DirectorClient("dc1", "127.0.0.1", server.server_address[1], token="t" * 16, timeout=2,
                            config_source="glb.yaml")
    try:
        yield answers, client
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _error(call) -> str:
    with pytest.raises(AdminError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def _json(doc) -> bytes:
    return json.dumps(doc).encode()


def test_client_refusals_are_one_line(canned):
    answers, client = canned
    at = f"director of site dc1 at 127.0.0.1:{client.port}"
    answers["/admin/drain"] = (403, _json({"error": "token grafana has scope read; this needs operate"}))
    assert _error(lambda: client.drain("web", "10.0.0.1", 0, who="a", why="")) == (
        f"{at} refused (403): token grafana has scope read; this needs operate")
    answers["/admin/site/undrain"] = (401, _json({"error": "unauthorized"}))
    assert _error(lambda: client.undrain_site(who="a", why="")) == (
        f"{at} rejected the token (401): the admin token is not one the director accepts")
    answers["/admin/site/drain"] = (503, _json({"error": "redis at redis://127.0.0.1:6379/0: connection refused"}))
    assert _error(lambda: client.drain_site(who="a", why="")) == (
        f"{at} could not record it (503): redis at redis://127.0.0.1:6379/0: connection refused")
    answers["/admin/weight"] = (400, _json({"error": "weight must be an integer 0..65535 or null"}))
    assert _error(lambda: client.set_weight("web", "10.0.0.1", 0, 5, who="a", why="")) == (
        f"{at} rejected the request (400): weight must be an integer 0..65535 or null")
    answers["/admin/undrain"] = (500, b"<html>oops</html>")
    assert _error(lambda: client.undrain("web", "10.0.0.1", 0, who="a", why="")) == (
        f"{at} answered HTTP 500 Internal Server Error to POST /admin/undrain: "
        "is a GLB director of this version listening there?")
    answers["/status"] = (200, b"not json")
    assert _error(client.status) == (
        f"{at} sent no JSON object for GET /status (HTTP 200): is a GLB director listening there?")
    answers["/healthz"] = (200, _json({"status": "ok", "site": "dc7", "redis": "ok"}))
    assert _error(client.check_site) == (
        f"the director at 127.0.0.1:{client.port} serves site 'dc7', not 'dc1': "
        "check director.admin_listen of site dc1 in glb.yaml")
    tokenless = DirectorClient("dc1", "127.0.0.1", client.port, token=None, config_source="glb.yaml")
    assert _error(lambda: tokenless.drain_site(who="a", why="")).startswith("no admin token: give --token-file FILE")


def test_client_gives_up_on_a_silent_director():
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        client = DirectorClient("dc1", "127.0.0.1", silent.getsockname()[1], timeout=0.3)
        assert _error(client.status) == f"director of site dc1 at 127.0.0.1:{client.port} did not answer within 0.3s"


# --------------------------------------------------------------------------
# --direct: the override written to Redis by the CLI, for a director that is down


def test_direct_drain_with_the_director_down(director_lab, tmp_path):
    lab = director_lab
    # dc1's director unreachable: only Redis is there.
    config = write_config(tmp_path / "glb.yaml", lab.redis_url, free_port(), 8080, 25)
    args = ("--config", str(config), "--site", "dc1", "--direct", "--who", "alice")
    line = ok_line(glb("drain", *args, "--reason", "dc1 lost power"))
    assert re.fullmatch(r'drained site dc1: DNS stops answering it \(by alice via redis:default: "dc1 lost power"\); '
                        r"state version \d+", line), line
    line = ok_line(glb("weight", *args, "--service", "web", "--server", "127.0.0.2", "4"))
    assert line.startswith("weight of web 127.0.0.2 in site dc1 set to 4 (by alice via redis:default)")
    overrides = load_state(lab.redis_url).overrides
    assert (overrides[site_target("dc1")].drain, overrides[site_target("dc1")].who) == (True, "alice via redis:default")
    assert overrides[server_target("dc1", "web", "127.0.0.2", 0)].weight == 4
    # The same document the director writes: a director that runs applies it.
    wait_for(lambda: lab.status()["drained"] and servers_of(lab.status())["web/127.0.0.2"]["weight"] == 4)
    # And through the admin API the drain and weight stay one override.
    ok_line(glb("drain", *lab.admin_args("--service", "web", "--server", "127.0.0.2")))
    held = load_state(lab.redis_url).overrides[server_target("dc1", "web", "127.0.0.2", 0)]
    assert (held.drain, held.weight) == (True, 4)
    ok_line(glb("undrain", *args))
    ok_line(glb("undrain", *args, "--service", "web", "--server", "127.0.0.2"))
    ok_line(glb("weight", *args, "--service", "web", "--server", "127.0.0.2", "clear"))
    assert load_state(lab.redis_url).overrides == {}


def test_direct_refusals_are_one_line(director_lab, tmp_path):
    lab = director_lab
    config = write_config(tmp_path / "glb.yaml", lab.redis_url, free_port(), 8080, 25)
    args = ("--config", str(config), "--site", "dc1", "--direct")
    line = one_line_error(glb("drain", *args, "--service", "web", "--server", "127.0.0.9"))
    assert line == f"glb: error: {config}: no real server 127.0.0.9 port 0 in service 'web' of site dc1"
    gone = f"redis://127.0.0.1:{free_port()}/0"
    line = one_line_error(glb("drain", *args, env={"GLB_REDIS_URL": gone}))
    assert line.startswith(f"glb: error: site dc1 (direct to redis): redis at {gone}: ")
    assert load_state(lab.redis_url).overrides == {}


def test_direct_with_an_operators_redis_acl_user(director_lab, tmp_path):
    """The Redis user docs/operations.md proposes for --direct may write overrides, and nothing else."""
    import redis

    from glb.direct import operator_acl

    lab = director_lab
    admin = redis.Redis.from_url(lab.redis_url)
    admin.execute_command("ACL", "SETUSER", "glb-operator-test", "on", ">operator-pw-0123456789", *operator_acl())
    try:
        url = lab.redis_url.replace("redis://", "redis://glb-operator-test:operator-pw-0123456789@")
        config = write_config(tmp_path / "glb.yaml", lab.redis_url, free_port(), 8080, 25)
        line = ok_line(glb("drain", "--config", str(config), "--site", "dc1", "--direct", "--who", "alice",
                           env={"GLB_REDIS_URL": url}))
        assert "(by alice via redis:glb-operator-test)" in line
        operator = redis.Redis.from_url(url)
        for command in (("HSET", "{glb}:site:dc1", "data", "x"), ("DEL", "{glb}:overrides"), ("FLUSHALL",)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                operator.execute_command(*command)
        operator.close()
        assert load_state(lab.redis_url).overrides[site_target("dc1")].drain is True
    finally:
        admin.execute_command("ACL", "DELUSER", "glb-operator-test")
        admin.close()
