"""Hand-written wire parsing: names, queries, ECS."""

from __future__ import annotations

import pytest

from dnsfront import wire


def test_read_name_plain_and_pointer():
    data = b"\x00" * 12 + b"\x03www\x07example\x03net\x00" + b"\x03foo\xc0\x10"
    name, end = wire.read_name(data, 12)
    assert name == b"\x03www\x07example\x03net\x00" and end == 29
    name, end = wire.read_name(data, 29)
    assert name == b"\x03foo\x07example\x03net\x00" and end == len(data)


@pytest.mark.parametrize(
    "blob",
    [
        b"\xc0\x0c",  # points at itself
        b"\x03ab",  # runs past the end
        b"\x40abc",  # extended label type
        b"\xc0",  # truncated pointer
        (b"\x3f" + b"a" * 63) * 5 + b"\x00",  # longer than 255
    ],
)
def test_read_name_rejects(blob):
    with pytest.raises(wire.WireError):
        wire.read_name(b"\x00" * 12 + blob, 12)


def test_parse_query_finds_opts_and_rejects_trailing_bytes():
    import dns.message

    q = dns.message.make_query("a.example.", "A", use_edns=0, payload=4096).to_wire()
    raw = wire.parse_query(q)
    assert raw.qname == b"\x01a\x07example\x00" and raw.qtype == 1 and len(raw.opts) == 1
    assert raw.opts[0][1] == 4096
    with pytest.raises(wire.WireError):
        wire.parse_query(q + b"\x00")


@pytest.mark.parametrize(
    "option,ok",
    [
        (b"\x00\x01\x18\x00\xc6\x33\x64", True),  # 198.51.100/24
        (b"\x00\x01\x00\x00", True),  # /0, no address
        (b"\x00\x01\x18\x00\xc6\x33", False),  # too few bytes
        (b"\x00\x01\x18\x00\xc6\x33\x64\x01", False),  # too many
        (b"\x00\x01\x17\x00\xc6\x33\x65", False),  # bits set beyond /23
        (b"\x00\x03\x00\x00", False),  # unknown family
        (b"\x00\x01\x21\x00\x01\x02\x03\x04\x05", False),  # /33 for IPv4
        (b"\x00\x01", False),
    ],
)
def test_parse_ecs(option, ok):
    if ok:
        assert wire.parse_ecs(option)[0] == 4
    else:
        with pytest.raises(wire.WireError):
            wire.parse_ecs(option)


def test_key_fits_table():
    assert wire.key_fits_table(b"\x00\x01\x00\x01")
    assert not wire.key_fits_table(b"\x00\x61\x00\x01")  # 'a': HTTPS (0x41) would lower() onto it


def test_full_rcode_includes_the_opt_extended_bits():
    import dns.message
    import dns.rcode

    for rcode, edns in ((dns.rcode.NXDOMAIN, -1), (dns.rcode.NXDOMAIN, 0), (dns.rcode.BADVERS, 0)):
        m = dns.message.make_response(dns.message.make_query("a.example.net", "A", use_edns=edns))
        m.set_rcode(rcode)
        assert wire.full_rcode(m.to_wire()) == rcode
    assert wire.full_rcode(b"\x00\x01\x80\x03" + b"\x00\x00\x00\x00\x00\x00\x00\x01") == 3  # unparseable: header only
