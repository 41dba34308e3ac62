"""The config model: the example loads, and each broken file gives its exact one-line error."""

from __future__ import annotations

import copy
import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from glb import config
from glb.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "examples" / "glb.yaml"


def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def load_dict(data: dict, tmp_path: Path) -> config.Config:
    path = tmp_path / "glb.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return config.load(path)


def problems_of(data: dict, tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_dict(data, tmp_path)
    prefix = f"{tmp_path / 'glb.yaml'}: "
    assert all(p.startswith(prefix) for p in info.value.problems), info.value.problems
    return [p[len(prefix) :] for p in info.value.problems]


def test_example_loads_with_every_section():
    cfg = config.load(EXAMPLE)
    assert cfg.summary() == "1 zone, 3 load-balanced names, 2 sites, 3 services, 7 real servers"
    zone = cfg.zones[0]
    assert zone.apex == "example.net."
    assert zone.soa.rname == "hostmaster.example.net."
    assert zone.soa.negative_ttl == 30
    assert zone.nameservers[0].glue == (ipaddress.ip_address("192.0.2.53"), ipaddress.ip_address("2001:db8::53"))
    www = [r for r in zone.records if r.name == "www.example.net."]
    assert [(r.rtype, r.value) for r in www] == [("CNAME", "app.example.net.")]
    static = [r for r in zone.records if r.name == "static.example.net."]
    assert [(r.value, r.ttl) for r in static] == [("192.0.2.80", 300), ("192.0.2.81", 300)]

    app = cfg.lbname("app.example.net.")
    assert app is not None and app.policy == "weighted" and app.ttl == 20 and app.degraded_ttl == 5
    near = cfg.lbname("near.example.net.")
    assert near is not None and near.ttl == 30 and near.degraded_ttl == 10  # named defaults
    assert [m.site for m in near.members] == ["dc1", "dc2"]

    dc1 = cfg.site("dc1")
    assert dc1 is not None
    assert [str(v) for v in dc1.service("web").vips] == ["192.0.2.10:80/tcp", "[2001:db8:10::10]:80/tcp"]
    assert dc1.vip_addresses("web") == (ipaddress.ip_address("192.0.2.10"), ipaddress.ip_address("2001:db8:10::10"))
    assert dc1.service("web").persistence == config.Persistence(300.0, 24, 128)
    assert dc1.service("dns").health_check == config.DnsCheck(query_name="example.net.", expect_rcode="NOERROR")
    assert dc1.director.packet == config.PacketPathConfig(workers=1, busy_poll=False, ring_frames=1024)
    dc2 = cfg.site("dc2")
    assert dc2.service("web").forwarding == "tun" and dc2.director.address == ipaddress.ip_address("192.0.2.130")
    assert cfg.admin.tokens_file == "/etc/glb/admin-tokens" and cfg.admin.token is None
    assert dc1.director.admin_listen == config.ListenAddress("127.0.0.1", 9111)
    assert "shared" not in repr(config.AdminConfig(token="shared-secret-0123456789"))  # secrets stay out of logs


def test_config_is_frozen():
    cfg = config.load(EXAMPLE)
    with pytest.raises(AttributeError):
        cfg.sites[0].services[0].scheduler = "rr"  # type: ignore[misc]


def _set(path: str, value):
    """Mutator that sets a /-separated path (list indexes as numbers) in the example."""

    def mutate(d: dict) -> None:
        keys = [int(k) if k.isdigit() else k for k in path.split("/")]
        node = d
        for k in keys[:-1]:
            node = node[k]
        if value is _DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return mutate


_DELETE = object()

BROKEN = [
    (
        _set("sites/dc1/director/packet", {"workers": 2, "dataplane": "kernel"}),
        ["sites.dc1.director.packet.dataplane: the kernel data plane runs with workers: 1 (its flows are installed "
         "by one worker); use dataplane: auto or userspace with more workers"],
    ),
    (
        _set("sites/dc1/director/packet", {"bpf_pin_root": ["/sys/fs/bpf"]}),
        ["sites.dc1.director.packet.bpf_pin_root: expected a string, got a list"],
    ),
    (
        _set("sites/dc1/director/packet", {"dataplane": "xdp"}),
        ["sites.dc1.director.packet.dataplane: unknown dataplane 'xdp' (expected one of auto, kernel, userspace)"],
    ),
    (
        _set("sites/dc1/director/packet", {"workers": 0, "busy_poll": "maybe"}),
        ["sites.dc1.director.packet.workers: must be at least 1, got 0",
         "sites.dc1.director.packet.busy_poll: expected true or false, got a string"],
    ),
    (
        _set("sites/dc1/services/0/scheduler", "wrrr"),
        ["sites.dc1.services[0].scheduler: unknown scheduler 'wrrr' (expected one of rr, wrr, lc, wlc, sed, nq, dh, sh, lblc, lblcr, mh)"],
    ),
    (
        _set("sites/dc1/services/0/forwarding", "masq"),
        ["sites.dc1.services[0].forwarding: unknown forwarding method 'masq' (expected one of dr, tun, nat)"],
    ),
    (
        _set("names/app.example.net/members/1/site", "dc9"),
        ["names[app.example.net].members[1].site: unknown site 'dc9' (sites: dc1, dc2)"],
    ),
    (
        _set("sites/dc2/services/0/vips", ["192.0.2.10:80/tcp"]),
        [
            "sites.dc2.services[0].vips[0]: duplicate VIP 192.0.2.10:80/tcp (also at sites.dc1.services[0].vips[0])",
            "sites.dc2.services[0].vips[0]: VIP address 192.0.2.10 is already owned by site dc1",
        ],
    ),
    (
        _set("names/app.example.net/members", [{"site": "dc1"}, {"site": "dc2"}]) ,
        None,  # control row: a valid edit stays valid
    ),
    (
        lambda d: d["names"].update({"app.example.org": d["names"]["app.example.net"]}),
        ["names[app.example.org]: app.example.org. is outside every zone (example.net.)"],
    ),
    (
        lambda d: d["zones"][0]["records"].append({"name": "app", "type": "A", "value": "192.0.2.1"}),
        ["names[app.example.net]: app.example.net. also has static records; a load-balanced name must own its name"],
    ),
    (
        _set("names/api.example.net/fallback", _DELETE),
        ["names[api.example.net].fallback: required when all_down is fallback"],
    ),
    (
        _set("sites/dc1/services/0/mh_table_size", 65536),
        ["sites.dc1.services[0].mh_table_size: must be a prime number (Maglev), got 65536"],
    ),
    (
        _set("sites/dc1/services/0/vips/0", "192.0.2.10:80"),
        ["sites.dc1.services[0].vips[0]: expected ADDRESS:PORT/tcp|udp (IPv6 as [ADDR]:PORT/tcp), got '192.0.2.10:80'"],
    ),
    (
        _set("sites/dc1/services/0/real_servers/0/address", "10.1.0.300"),
        ["sites.dc1.services[0].real_servers[0].address: not an IP address: '10.1.0.300'"],
    ),
    (
        _set("sites/dc1/services/0/real_servers/0/weight", -1),
        ["sites.dc1.services[0].real_servers[0].weight: must be at least 0, got -1"],
    ),
    (
        _set("sites/dc1/services/0/health_check/timeout", 5),
        ["sites.dc1.services[0].health_check.timeout: must not exceed interval (1), got 5"],
    ),
    (
        _set("sites/dc1/services/0/health_check/query_name", "x.example.net"),
        ["sites.dc1.services[0].health_check.query_name: only applies to dns checks, this one is http"],
    ),
    (
        _set("sites/dc1/services/1/health_check", {"type": "dns"}),
        ["sites.dc1.services[1].health_check.query_name: required for dns checks"],
    ),
    (
        _set("sites/dc1/services/1/health_check", {"type": "udp", "expect": "PONG"}),
        ["sites.dc1.services[1].health_check.send: required for udp checks"],
    ),
    (
        _set("sites/dc1/services/1/health_check", {"type": "exec"}),
        ["sites.dc1.services[1].health_check.command: required for exec checks"],
    ),
    (
        _set("sites/dc1/services/1/health_check", {"type": "tcp", "send": "x", "path": "/"}),
        ["sites.dc1.services[1].health_check.send: only applies to udp checks, this one is tcp",
         "sites.dc1.services[1].health_check.path: only applies to http/https checks, this one is tcp"],
    ),
    (
        _set("sites/dc1/services/1/health_check/query_type", "AAA"),
        ["sites.dc1.services[1].health_check.query_type: unknown DNS query type 'AAA' "
         "(a type name such as A, AAAA, MX or SOA, or TYPEnnn)"],
    ),
    (
        _set("sites/dc1/services/1/health_check/query_type", "TYPE70000"),
        ["sites.dc1.services[1].health_check.query_type: unknown DNS query type 'TYPE70000' "
         "(a type name such as A, AAAA, MX or SOA, or TYPEnnn)"],
    ),
    (
        _set("sites/dc1/services/0/health_check/intervall", 2),
        [
            # Only the keys an http check has are offered.
            "sites.dc1.services[0].health_check.intervall: unknown key (expected one of "
            "expect_body, expect_status, fall, host, initial, interval, method, path, port, "
            "rise, start_jitter, timeout, tls_verify, type)"
        ],
    ),
    (
        _set("sites/dc2/director/address", _DELETE),
        ["sites.dc2.director.address: required: service web tunnels IPv4 (192.0.2.140:80/tcp) and needs the outer source address"],
    ),
    (
        _set("sites/dc1/director", _DELETE),
        ["sites.dc1.director: required (every site's state comes from its director)"],
    ),
    (
        _set("zones/0/ns/0/addresses", _DELETE),
        ["zones[0].ns[0].addresses: ns1.example.net. is inside the zone and needs glue addresses"],
    ),
    (
        _set("zones/0/records/3/value", "2001:db8::1"),
        ["zones[0].records[3].value: not an IPv4 address: '2001:db8::1'"],
    ),
    (
        _set("zones/0/records/0/value", "mail.example.net."),
        ["zones[0].records[0].value: MX value must be 'PREFERENCE EXCHANGE', got 'mail.example.net.'"],
    ),
    (
        _set("zones/0/records/0/type", "NAPTR"),
        ["zones[0].records[0].type: unknown record type 'NAPTR' (expected one of a, aaaa, cname, mx, txt, srv, caa, ptr)"],
    ),
    (
        lambda d: d["zones"][0]["records"].append({"name": "www", "type": "A", "value": "192.0.2.1"}),
        ["zones[0].records: www.example.net. has a CNAME and other records (RFC 1034 3.6.2)"],
    ),
    (
        _set("zones/0/records/3/name", "mail.example.org."),
        ["zones[0].records[3].name: mail.example.org. is outside the zone example.net."],
    ),
    (
        _set("redis/url", "http://localhost"),
        ["redis.url: expected a redis://, rediss:// or unix:// URL, got 'http://localhost'"],
    ),
    (
        _set("redis/stale_after", 0),
        ["redis.stale_after: must be greater than 0, got 0"],
    ),
    (
        _set("redis/stale_after", float("nan")),
        ["redis.stale_after: must be a finite number, got nan"],
    ),
    (
        _set("sites/dc1/services/0/health_check/interval", float("inf")),
        ["sites.dc1.services[0].health_check.interval: must be a finite number, got inf"],
    ),
    (
        _set("dnsfront/listen", ["[::1:5300"]),
        ["dnsfront.listen[0]: expected HOST:PORT or [IPV6]:PORT, got '[::1:5300'"],
    ),
    (
        _set("admin/token", "short"),
        ["admin.token: token must be at least 16 characters"],
    ),
    (
        _set("zones", _DELETE),
        [
            "zones: required",
            "names[app.example.net]: app.example.net. is outside every zone ()",
        ][:1],
    ),
    (
        _set("sites/dc1/services/0/real_servers", []),
        ["sites.dc1.services[0].real_servers: must not be empty"],
    ),
    (
        _set("sites/dc1/services/0/persistence/netmask", 33),
        ["sites.dc1.services[0].persistence.netmask: must be at most 32, got 33"],
    ),
    (
        _set("names/app.example.net/degraded_ttl", 60),
        ["names[app.example.net].degraded_ttl: must not exceed ttl (20), got 60"],
    ),
    (
        _set("names/app.example.net/policy", "random"),
        ["names[app.example.net].policy: unknown policy 'random' (expected one of weighted, failover, topology, sticky)"],
    ),
    (
        _set("names/app.example.net/service", "mail"),
        [
            "names[app.example.net].members[0].site: site 'dc1' has no service 'mail' whose VIPs could be answered",
            "names[app.example.net].members[1].site: site 'dc2' has no service 'mail' whose VIPs could be answered",
        ],
    ),
    (
        _set("sites/dc1/networks", ["198.51.100.1/24"]),
        ["sites.dc1.networks[0]: not a network: '198.51.100.1/24' (198.51.100.1/24 has host bits set)"],
    ),
    (
        _set("sites/dc1/services/0/name", "web/v2"),
        ["sites.dc1.services[0].name: service name 'web/v2' must be 1-63 letters, digits, '.', '_' or '-'"],
    ),
    (
        lambda d: d["sites"].update({"dc 3": d["sites"].pop("dc2")}),
        ["sites.dc 3: site name 'dc 3' must be 1-63 letters, digits, '.', '_' or '-'"],
    ),
    (
        _set("sites/dc1/services/0/real_servers/1/address", "10.1.0.11"),
        ["sites.dc1.services[0].real_servers[1].address: real server 10.1.0.11 is listed twice"],
    ),
    (
        _set("sites/dc1/services/0/real_servers/0/port", 8080),
        ["sites.dc1.services[0].real_servers[0].port: 8080 differs from the VIP port: DR and TUN forward without changing ports (NAT can)"],
    ),
]


@pytest.mark.parametrize("mutate, expected", BROKEN, ids=[str(i) for i in range(len(BROKEN))])
def test_broken_config_names_key_path(mutate, expected, tmp_path):
    data = copy.deepcopy(example())
    mutate(data)
    if expected is None:
        load_dict(data, tmp_path)
        return
    assert problems_of(data, tmp_path) == expected


@pytest.mark.parametrize("given, kept", [("soa", "SOA"), ("AAAA", "AAAA"), ("TYPE65", "TYPE65")])
def test_dns_check_query_types_the_probe_can_send(given, kept, tmp_path):
    data = example()
    data["sites"]["dc1"]["services"][1]["health_check"]["query_type"] = given
    assert load_dict(data, tmp_path).site("dc1").service("dns").health_check.query_type == kept


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    data = example()
    data["sites"]["dc1"]["services"][0]["scheduler"] = "wrrr"
    data["redis"]["timeout"] = "soon"
    data["dnsfront"]["workers"] = 0
    assert problems_of(data, tmp_path) == [
        "redis.timeout: expected a number, got a string",
        "dnsfront.workers: must be at least 1, got 0",
        "sites.dc1.services[0].scheduler: unknown scheduler 'wrrr' (expected one of rr, wrr, lc, wlc, sed, nq, dh, sh, lblc, lblcr, mh)",
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "glb.yaml: the file is empty"),
        ("zones: [\n", "glb.yaml:2:1: YAML syntax error: expected the node content, but found '<stream end>'"),
        ("redis: {}\nredis: {}\n", "glb.yaml:2:1: YAML syntax error: duplicate key 'redis'"),
        ("- a\n- b\n", "glb.yaml: expected a mapping, got a list"),
        ("{1: 2, [1]: 3}\n", "glb.yaml:1:8: YAML syntax error: a list cannot be a key"),
        ("sites:\n  ? {a: 1}\n  : x\n", "glb.yaml:2:5: YAML syntax error: a mapping cannot be a key"),
    ],
)
def test_unreadable_files(text, expected, tmp_path):
    path = tmp_path / "glb.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.loads(text, source="glb.yaml")
    assert info.value.problems[0] == expected


def test_missing_file():
    with pytest.raises(ConfigError, match=r"^/nonexistent/glb.yaml: no such file$"):
        config.load("/nonexistent/glb.yaml")


def test_token_file_relative_to_config(tmp_path):
    data = example()
    data["admin"] = {"token_file": "secret/token"}
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "token").write_text("0123456789abcdef0123\n")
    assert load_dict(data, tmp_path).admin.token == "0123456789abcdef0123"
    (tmp_path / "secret" / "token").write_text("")
    assert problems_of(data, tmp_path) == [f"admin.token_file: '{tmp_path / 'secret' / 'token'}' is empty"]


def test_sentinel_and_defaults(tmp_path):
    data = example()
    data["redis"] = {"sentinel": {"service": "glb", "addresses": ["10.0.0.5", "[2001:db8::5]:26380"]}}
    cfg = load_dict(data, tmp_path)
    assert cfg.redis.sentinel == config.SentinelConfig("glb", (("10.0.0.5", 26379), ("2001:db8::5", 26380)))
    assert cfg.redis.stale_after == config.RedisConfig().stale_after


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glb.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_cli_config_check_ok():
    r = _cli("config", "check", "deploy/examples/glb.yaml")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "OK: deploy/examples/glb.yaml: 1 zone, 3 load-balanced names, 2 sites, 3 services, 7 real servers\n"


def test_cli_config_check_errors_one_line_each(tmp_path):
    data = example()
    data["sites"]["dc1"]["services"][0]["scheduler"] = "wrrr"
    data["names"]["app.example.net"]["members"][1]["site"] = "dc9"
    path = tmp_path / "glb.yaml"
    path.write_text(yaml.safe_dump(data))
    r = _cli("config", "check", str(path))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines == [
        f"{path}: sites.dc1.services[0].scheduler: unknown scheduler 'wrrr' (expected one of rr, wrr, lc, wlc, sed, nq, dh, sh, lblc, lblcr, mh)",
    ]  # cross-references are checked once the structure is valid
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args, code, line",
    [
        (["config", "check", "/nonexistent.yaml"], 1, "/nonexistent.yaml: no such file"),
        (["--bogus", "config", "check", "x"], 2, "glb: error: unrecognized arguments: --bogus (see 'glb --help')"),
        (["config", "frobnicate"], 2, r"glb config: error: argument ACTION: invalid choice: 'frobnicate' \(choose from '?check'?\) \(see 'glb config --help'\)"),
    ],
)
def test_cli_usage_errors_are_one_line(args, code, line):
    r = _cli(*args)
    assert r.returncode == code
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    # argparse's quoting of choices differs between Python versions: the third row is a regex
    assert lines[0] == line or re.fullmatch(line, lines[0]), lines[0]


def test_cli_reader_that_goes_away_is_not_an_error():
    # `glb status | head -1`: the reader closes the pipe before glb writes.
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([sys.executable, "-m", "glb.cli", "config", "check", "deploy/examples/glb.yaml"],
                           stdout=write, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=60)
    finally:
        os.close(write)
    assert (r.returncode, r.stderr) == (141, "")


def test_cli_broken_pipe_of_a_socket_is_still_a_bug(monkeypatch, capfd):
    # Only our reader going away is quiet; a BrokenPipeError from a socket
    # (stdout still fine) is an internal error like any other.
    from glb import cli

    def boom(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_cmd_status", boom)
    assert cli.main(["status", "--config", "x.yaml"]) == 1
    assert "glb: internal error: BrokenPipeError" in capfd.readouterr().err


def test_cli_help_lists_commands():
    r = _cli("--help")
    assert r.returncode == 0
    assert "config" in r.stdout
