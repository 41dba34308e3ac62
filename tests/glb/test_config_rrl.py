"""dnsfront's rrl, cookies and per-source TCP keys: defaults and one-line errors."""

from __future__ import annotations

import ipaddress

import pytest

from glb import config
from glb.errors import ConfigError

BASE = """
dnsfront:
{body}
zones:
  - apex: example.net
    soa: {{mname: ns1.example.net, rname: hostmaster@example.net}}
    ns: [ns.other.org]
sites:
  dc1:
    director: {{interface: eth0}}
    services: [{{name: web, vips: ["192.0.2.10:80/tcp"], real_servers: [10.1.0.1]}}]
"""


def load(body: str, tmp_path=None) -> config.Config:
    return config.loads(BASE.format(body=body), source="t.yaml", base_dir=tmp_path)


def problems(body: str, tmp_path=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(body, tmp_path)
    return info.value.problems


def test_defaults_rrl_off_cookies_on():
    d = load("  workers: 1").dnsfront
    assert d.rrl.enabled is False
    assert (d.rrl.responses_per_second, d.rrl.slip, d.rrl.window) == (20, 2, 15)
    assert (d.rrl.ipv4_prefix_length, d.rrl.ipv6_prefix_length) == (24, 56)
    assert d.cookies.enabled and d.cookies.secret is None and d.cookies.rotate == 3600
    assert d.tcp_max_per_source == 32


def test_rrl_keys():
    d = load("  rrl: {enabled: true, responses_per_second: 50, slip: 0, allow: [10.0.0.0/8, '2001:db8::/32']}").dnsfront
    assert d.rrl.enabled and d.rrl.responses_per_second == 50 and d.rrl.slip == 0
    assert d.rrl.nxdomains_per_second == 50 and d.rrl.errors_per_second == 50  # follow the answers' rate
    assert d.rrl.allow == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))


@pytest.mark.parametrize("body,want", [
    ("  rrl: {slip: 11}", "t.yaml: dnsfront.rrl.slip: must be at most 10, got 11"),
    ("  rrl: {responses_per_second: 0}", "t.yaml: dnsfront.rrl.responses_per_second: must be at least 1, got 0"),
    ("  rrl: {allow: [10.0.0.1/8]}", "t.yaml: dnsfront.rrl.allow[0]: not a network"),
    ("  rrl: {ipv4_prefix_length: 33}", "t.yaml: dnsfront.rrl.ipv4_prefix_length: must be at most 32, got 33"),
    ("  rrl: {rate: 5}", "t.yaml: dnsfront.rrl.rate: unknown key"),
    ("  cookies: {rotate: 1}", "t.yaml: dnsfront.cookies.rotate: must be at least 60, got 1"),
    ("  tcp_max_per_source: 0", "t.yaml: dnsfront.tcp_max_per_source: must be at least 1, got 0"),
])
def test_errors_are_one_line(body, want):
    got = problems(body)
    assert len(got) == 1 and "\n" not in got[0]
    assert got[0].startswith(want), got  # (the rest names the bad value)


def test_cookie_secret_file(tmp_path):
    (tmp_path / "secret").write_text("00112233445566778899aabbccddeeff\n")
    c = load("  cookies: {secret_file: secret}", tmp_path).dnsfront.cookies
    assert c.secret == bytes.fromhex("00112233445566778899aabbccddeeff")
    assert "0011" not in repr(c)
    (tmp_path / "short").write_text("0011")
    assert problems("  cookies: {secret_file: short}", tmp_path) == [
        f"t.yaml: dnsfront.cookies.secret_file: '{tmp_path / 'short'}' must hold 32 hex digits (a 16-byte secret)"]
    assert problems("  cookies: {secret_file: nope}", tmp_path) == [
        f"t.yaml: dnsfront.cookies.secret_file: cannot read '{tmp_path / 'nope'}': No such file or directory"]
