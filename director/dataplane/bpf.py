"""The AF_PACKET socket's classic BPF filter: which frames wake the packet engine. Pure.

:func:`socket_filter` builds the program the engine attaches
(SO_ATTACH_FILTER); :func:`bpf_run` interprets it for tests.
"""

from __future__ import annotations

import struct
from typing import Any, Iterable, NamedTuple

from director.dataplane import codec

PACKET_OTHERHOST = 3  # <linux/if_packet.h>: the first pkttype that is not for this host


class Match(NamedTuple):
    """More frames a forwarding mode must see (``Mode.filter_matches``): an IP
    packet of ``ethertype`` whose bytes at ``offset`` (from the frame's
    start) are ``value`` (a whole number of 32-bit words)."""

    ethertype: int
    offset: int
    value: bytes


# Classic BPF opcodes (<linux/filter.h>)
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS = 0x20, 0x28, 0x30
_JEQ_K, _JGE_K, _JA = 0x15, 0x35, 0x05
_RET_K = 0x06
_SKF_AD_PKTTYPE = (-0x1000 + 4) & 0xFFFFFFFF
BPF_MAXINSNS = 4096
ACCEPT_LEN = 0x40000
"""Bytes of a frame the filter keeps: more than any GSO frame."""


def bpf_program(vips, extra: Iterable[Match] = ()) -> list[tuple[int, int, int, int]]:
    """A classic BPF program accepting only frames a director must see.

    Accepted: IPv4/IPv6 packets whose destination is a VIP (flows, ICMP
    errors about them), ARP whose target is a VIP, ICMPv6 neighbour
    solicitations whose target is a VIP (without extension headers), and
    IPv4/IPv6 packets that fit one of the ``extra`` matches. Refused:
    everything else, and frames the host sends (PACKET_OUTGOING) or that
    were for another MAC (PACKET_OTHERHOST, promiscuous mode).

    Returns (code, jt, jf, k) tuples. Conditional jumps only ever skip one
    instruction; ``ja`` (32-bit offset) makes the long jumps, so any number
    of VIPs up to the kernel's 4096-instruction limit fits.
    """
    v4 = sorted(v for v in vips if len(v) == 4)
    v6 = sorted(v for v in vips if len(v) == 16)
    extra = sorted(set(extra))
    for m in extra:
        if m.ethertype not in (codec.ETH_P_IP, codec.ETH_P_IPV6) or not m.value or len(m.value) % 4:
            raise ValueError(f"unsupported filter match {m}")
    prog: list[list[Any]] = []  # [code, jt, jf, k or label]
    labels: dict[str, int] = {}

    def emit(code, jt=0, jf=0, k=0):
        prog.append([code, jt, jf, k])

    def label(name):
        labels[name] = len(prog)

    def match_words(offset: int, words: list[int]):
        # compare consecutive 32-bit words; any mismatch skips to after "ja accept"
        n = len(words)
        for i, w in enumerate(words):
            emit(_LD_W_ABS, k=offset + 4 * i)
            emit(_JEQ_K, 0, 2 * (n - i - 1) + 1, w)
        emit(_JA, k="accept")

    def extra_matches(ethertype: int):
        for m in extra:
            if m.ethertype == ethertype:
                match_words(m.offset, [int.from_bytes(m.value[i:i + 4], "big") for i in range(0, len(m.value), 4)])

    emit(_LD_W_ABS, k=_SKF_AD_PKTTYPE)
    emit(_JGE_K, 0, 1, PACKET_OTHERHOST)  # OTHERHOST, LOOPBACK, OUTGOING ...
    emit(_RET_K, k=0)
    emit(_LD_H_ABS, k=12)
    for ethertype, name in ((codec.ETH_P_IP, "ipv4"), (codec.ETH_P_IPV6, "ipv6"), (codec.ETH_P_ARP, "arp")):
        emit(_JEQ_K, 0, 1, ethertype)
        emit(_JA, k=name)
    emit(_RET_K, k=0)
    label("ipv4")
    for v in v4:
        match_words(30, [int.from_bytes(v, "big")])
    extra_matches(codec.ETH_P_IP)
    emit(_RET_K, k=0)
    label("arp")
    for v in v4:
        match_words(38, [int.from_bytes(v, "big")])  # target protocol address
    emit(_RET_K, k=0)
    label("ipv6")
    for v in v6:
        match_words(38, [int.from_bytes(v[i:i + 4], "big") for i in range(0, 16, 4)])
    extra_matches(codec.ETH_P_IPV6)
    if v6:  # a neighbour solicitation: ICMPv6 type 135, target at 14 + 40 + 8
        emit(_LD_B_ABS, k=20)
        emit(_JEQ_K, 0, 1, codec.IPPROTO_ICMPV6)
        emit(_JA, k="ns")
    emit(_RET_K, k=0)
    label("ns")
    if v6:
        emit(_LD_B_ABS, k=54)
        emit(_JEQ_K, 1, 0, 135)
        emit(_RET_K, k=0)
        for v in v6:
            match_words(62, [int.from_bytes(v[i:i + 4], "big") for i in range(0, 16, 4)])
    emit(_RET_K, k=0)
    label("accept")
    emit(_RET_K, k=ACCEPT_LEN)
    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        if isinstance(k, str):
            k = labels[k] - i - 1
        out.append((code, jt, jf, k))
    return out


def socket_filter(vips, extra: Iterable[Match] = ()) -> list[tuple[int, int, int, int]]:
    """:func:`bpf_program`, or with too many VIPs for the kernel's limit one letting every IP/ARP frame through
    (the forwarder then refuses what is not for a VIP, at a cost)."""
    prog = bpf_program(vips, extra)
    if len(prog) > BPF_MAXINSNS:
        prog = [(_LD_H_ABS, 0, 0, 12), (_JGE_K, 1, 0, 0), (_RET_K, 0, 0, 0), (_RET_K, 0, 0, ACCEPT_LEN)]
    return prog


def bpf_bytes(prog) -> bytes:
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def bpf_run(prog, frame: bytes, pkttype: int = 0) -> int:
    """A tiny classic BPF interpreter for the instructions bpf_program uses (tests)."""
    pc = 0
    a = 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code in (_LD_W_ABS, _LD_H_ABS, _LD_B_ABS):
            if k == _SKF_AD_PKTTYPE:
                a = pkttype
                continue
            size = {_LD_W_ABS: 4, _LD_H_ABS: 2, _LD_B_ABS: 1}[code]
            if k + size > len(frame):
                return 0  # the kernel rejects the frame on an out-of-bounds load
            a = int.from_bytes(frame[k:k + size], "big")
        elif code == _JEQ_K:
            pc += jt if a == k else jf
        elif code == _JGE_K:
            pc += jt if a >= k else jf
        elif code == _JA:
            pc += k
        elif code == _RET_K:
            return k
        else:  # pragma: no cover
            raise ValueError(f"opcode {code:#x}")


