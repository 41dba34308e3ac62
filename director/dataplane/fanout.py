"""Which packet worker gets a frame: a classic BPF program for PACKET_FANOUT_CBPF.

With ``packet.workers`` > 1 the workers' AF_PACKET sockets form one fanout
group and the kernel runs this program on each received frame; its return
value picks the socket (``ret % members`` in net/packet/af_packet.c). Each
worker has its own connection table and persistence templates, so every
frame about one client must reach the same worker:

* the key is the **client address**: the source of a packet to a VIP; in an
  ICMP/ICMPv6 error about a flow (type 3/11/12, ICMPv6 1-4), the address
  quoted inside: the error is about a packet the real server sent from the
  VIP to the client, so the client is that quoted packet's *destination*;
* masked by the persistence netmask of the service behind the VIP (the
  outer destination, in an error too), so one persistence entry's clients
  share a worker; other services use the whole address;
* a NAT real server's packet (its source is one, ``sources``): the client
  is its **destination** (a reply, or an ICMP error the real server sends
  the client), masked by the real server's service's persistence netmask,
  so both directions of a flow meet in one worker;
* fragments carry the same source, so they follow their first fragment;
  nothing above IP is read (no ports), so all of a client's connections
  go together.

The address (IPv6: its four words XORed) is hashed multiplicatively into one
of ``workers`` buckets; bucket *b* belongs to worker *b*, whose socket sits
at some position of the kernel's array. That array moves: a socket that
leaves is replaced by the last one (``__fanout_unlink``), one that joins is
appended. :class:`Members` replays those moves so the program can map each
bucket to its worker's current position (or, while a worker is dead, to a
live one). Frames that are neither IPv4 nor IPv6 (ARP) go to position 0.

Loads are relative to the network header (SKF_NET_OFF), which is where the
kernel's fanout hook sees a received frame. Pure: returns instructions as
(code, jt, jf, k) tuples; tests run them in a small interpreter.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable

PACKET_FANOUT_CBPF = 6
PACKET_FANOUT_DATA = 22

# <linux/filter.h>
LD_W_ABS, LD_H_ABS, LD_B_ABS = 0x20, 0x28, 0x30
LD_W_IND, LD_B_IND = 0x40, 0x50
LDX_MSH_B, LDX_IMM = 0xB1, 0x01
LD_MEM, ST = 0x60, 0x02
ALU_ADD_K, ALU_AND_K, ALU_MUL_K, ALU_RSH_K, ALU_MOD_K, ALU_XOR_X = 0x04, 0x54, 0x24, 0x74, 0x94, 0xAC
JEQ_K, JGT_K, JGE_K, JA = 0x15, 0x25, 0x35, 0x05
TAX, TXA = 0x07, 0x87
RET_K, RET_A = 0x06, 0x16
SKF_NET_OFF = -0x100000 & 0xFFFFFFFF
SKF_AD_PROTOCOL = -0x1000 & 0xFFFFFFFF
NET = SKF_NET_OFF

GOLDEN = 2654435761
"""Knuth's multiplicative constant: the product's high bits mix every address bit."""
ICMP4_ERRORS = (3, 11, 12)
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD


class Members:
    """The kernel's array of a fanout group's sockets, replayed (net/packet/af_packet.c).

    Workers must join one at a time, in the order :meth:`join` is called,
    for the replay to match the kernel.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.arr: list[int] = []

    def join(self, worker: int) -> None:
        """``__fanout_link``: appended."""
        if worker not in self.arr:
            self.arr.append(worker)

    def leave(self, worker: int) -> None:
        """``__fanout_unlink``: the last socket takes the leaver's position."""
        if worker in self.arr:
            i = self.arr.index(worker)
            self.arr[i] = self.arr[-1]
            self.arr.pop()

    def table(self) -> tuple[int, ...]:
        """Position for each bucket: its worker's, or a live worker's while it is gone."""
        pos = {w: i for i, w in enumerate(self.arr)}
        live = sorted(pos)
        if not live:
            return (0,) * self.workers
        return tuple(pos[b] if b in pos else pos[live[b % len(live)]] for b in range(self.workers))


def sources(plan: Any) -> dict[bytes, int]:
    """NAT real server address -> client prefix length of its replies' destinations (32/128: whole).

    A real server in several services with different netmasks: the shorter wins, as for VIPs.
    """
    from director.modes import MODES

    out: dict[bytes, int] = {}
    for sp in plan.services:
        if not MODES[sp.forwarding].two_way:
            continue
        for s in (*sp.servers, *((sp.sorry,) if sp.sorry is not None else ())):
            width = 8 * len(s.address)
            bits = width
            if sp.persistence is not None:
                bits = sp.persistence[1] if width == 32 else sp.persistence[2]
            out[s.address] = min(bits, out.get(s.address, width))
    return out


def masks(plan: Any, parked: bool = False) -> dict[bytes, int]:
    """VIP address -> client prefix length, for VIPs of services with persistence.

    ``parked``: a standby's parked VIPs too (connection sync: which worker a client will reach).

    Two services on one address with different netmasks: the shorter prefix
    wins (a coarser key keeps both services' clients together).
    """
    out: dict[bytes, int] = {}
    for sp in plan.services:
        if sp.persistence is None:
            continue
        _, netmask, netmask6 = sp.persistence
        for v in (*sp.vips, *sp.parked_vips) if parked else sp.vips:
            bits = netmask if len(v.address) == 4 else netmask6
            if bits < 8 * len(v.address):
                out[v.address] = min(bits, out.get(v.address, bits))
    return out


class _Asm:
    """Instructions with symbolic jump targets; conditional jumps must stay short (< 256)."""

    def __init__(self) -> None:
        self.prog: list[list[Any]] = []
        self.labels: dict[str, int] = {}

    def __call__(self, code: int, jt: Any = 0, jf: Any = 0, k: Any = 0) -> None:
        self.prog.append([code, jt, jf, k])

    def label(self, name: str) -> None:
        self.labels[name] = len(self.prog)

    def assemble(self) -> list[tuple[int, int, int, int]]:
        out = []
        for i, (code, jt, jf, k) in enumerate(self.prog):
            jt, jf = (self.labels[x] - i - 1 if isinstance(x, str) else x for x in (jt, jf))
            if isinstance(k, str):
                k = self.labels[k] - i - 1
            if not (0 <= jt < 256 and 0 <= jf < 256):
                raise ValueError(f"fanout program: conditional jump too long at {i}")
            out.append((code, jt, jf, k & 0xFFFFFFFF))
        return out


def _mask_words(bits: int, width: int) -> list[int]:
    m = ((1 << width) - 1) ^ ((1 << (width - bits)) - 1)
    return [(m >> (width - 32 * (i + 1))) & 0xFFFFFFFF for i in range(width // 32)]


def _words(addr: bytes) -> list[int]:
    return [int.from_bytes(addr[i:i + 4], "big") for i in range(0, len(addr), 4)]


def program(workers: int, vip_masks: dict[bytes, int] | None = None,
            table: Iterable[int] | None = None,
            reply_sources: dict[bytes, int] | None = None) -> list[tuple[int, int, int, int]]:
    """The fanout program for ``workers`` buckets.

    ``vip_masks``: :func:`masks`; ``table``: the socket position of each
    bucket (:meth:`Members.table`; default: bucket *b* at position *b*);
    ``reply_sources``: :func:`sources`.
    """
    if workers < 1:
        raise ValueError("a fanout program needs at least one worker")
    vip_masks = vip_masks or {}
    reply_sources = reply_sources or {}
    src4 = sorted((a, b) for a, b in reply_sources.items() if len(a) == 4)
    src6 = sorted((a, b) for a, b in reply_sources.items() if len(a) == 16)
    table = tuple(range(workers)) if table is None else tuple(table)
    if len(table) != workers:
        raise ValueError("one position per bucket")
    a = _Asm()
    a(LD_W_ABS, k=SKF_AD_PROTOCOL)
    a(JEQ_K, 0, 1, ETH_P_IPV6)
    a(JA, k="v6")
    a(JEQ_K, 1, 0, ETH_P_IP)
    a(RET_K, k=0)

    # IPv4. X = offset of the client from NET + 12: 0 (the source), or in an
    # ICMP error the quoted header's destination: ihl + 8 + 16 - 12.
    a.label("v4")
    if src4:  # a NAT real server's packet: the client is its destination
        a(LD_W_ABS, k=NET + 12)
        for addr, bits in src4:
            a(JEQ_K, 0, 1, _words(addr)[0])
            a(JA, k=f"r4_{bits}")
    a(LD_B_ABS, k=NET + 9)
    a(JEQ_K, 0, "src4", 1)  # ICMP
    a(LDX_MSH_B, k=NET)  # X = 4 * ihl
    a(LD_B_IND, k=NET)  # its type
    for t in ICMP4_ERRORS:
        a(JEQ_K, "inner4", 0, t)
    a.label("src4")
    a(LDX_IMM, k=0)
    a(JA, k="load4")
    a.label("inner4")
    a(TXA)
    a(ALU_ADD_K, k=12)
    a(TAX)
    a.label("load4")
    a(LD_W_IND, k=NET + 12)
    a(ST, k=0)
    by_mask4: dict[int, list[bytes]] = {}
    for vip, bits in sorted(vip_masks.items()):
        if len(vip) == 4 and bits < 32:
            by_mask4.setdefault(bits, []).append(vip)
    a(LD_W_ABS, k=NET + 16)  # the VIP
    for bits, vips in sorted(by_mask4.items()):
        for vip in vips:
            a(JEQ_K, 0, 1, _words(vip)[0])
            a(JA, k=f"m4_{bits}")
    a(LD_MEM, k=0)
    a(JA, k="hash")
    for bits in sorted(by_mask4):
        a.label(f"m4_{bits}")
        a(LD_MEM, k=0)
        a(ALU_AND_K, k=_mask_words(bits, 32)[0])
        a(JA, k="hash")
    for bits in sorted({b for _, b in src4}):
        a.label(f"r4_{bits}")
        a(LD_W_ABS, k=NET + 16)
        a(ALU_AND_K, k=_mask_words(bits, 32)[0])
        a(JA, k="hash")

    # IPv6. X = offset of the client from NET + 8: 0 (the source), or in an
    # ICMPv6 error right after the header, the quoted destination: 40 + 8 + 24 - 8.
    a.label("v6")
    for addr, bits in src6:  # compare the four words of the source; a mismatch skips to the next
        for i, w in enumerate(_words(addr)):
            a(LD_W_ABS, k=NET + 8 + 4 * i)
            a(JEQ_K, 0, 2 * (3 - i) + 1, w)
        a(JA, k=f"r6_{bits}")
    a(LD_B_ABS, k=NET + 6)
    a(JEQ_K, 0, "src6", 58)
    a(LD_B_ABS, k=NET + 40)  # its type
    a(JGE_K, 0, "src6", 1)
    a(JGT_K, "src6", 0, 4)
    a(LDX_IMM, k=64)
    a(JA, k="load6")
    a.label("src6")
    a(LDX_IMM, k=0)
    a.label("load6")
    for i in range(4):
        a(LD_W_IND, k=NET + 8 + 4 * i)
        a(ST, k=i)
    by_mask6: dict[int, list[bytes]] = {}
    for vip, bits in sorted(vip_masks.items()):
        if len(vip) == 16 and bits < 128:
            by_mask6.setdefault(bits, []).append(vip)
    for bits, vips in sorted(by_mask6.items()):
        for vip in vips:  # compare the four words of the VIP; a mismatch skips to the next VIP
            ws = _words(vip)
            for i, w in enumerate(ws):
                a(LD_W_ABS, k=NET + 24 + 4 * i)
                a(JEQ_K, 0, 2 * (3 - i) + 1, w)
            a(JA, k=f"m6_{bits}")
    a(JA, k="m6_128")  # no persistence: the whole address
    for bits in sorted({b for _, b in src6}):
        a.label(f"r6_{bits}")
        for i in range(4):  # the destination, where m6_* expects the client
            a(LD_W_ABS, k=NET + 24 + 4 * i)
            a(ST, k=i)
        a(JA, k=f"m6_{bits}")
    for bits in sorted({*by_mask6, *(b for _, b in src6), 128}):
        a.label(f"m6_{bits}")
        for i, m in enumerate(_mask_words(bits, 128)):  # A = the masked words XORed
            a(LD_MEM, k=i)
            a(ALU_AND_K, k=m)
            if i:
                a(ALU_XOR_X)
            if i < 3:
                a(TAX)
        a(JA, k="hash")

    a.label("hash")
    a(ALU_MUL_K, k=GOLDEN)
    a(ALU_RSH_K, k=16)
    a(ALU_MOD_K, k=workers)
    if table == tuple(range(workers)):
        a(RET_A)
    else:
        for b, pos in enumerate(table):
            a(JEQ_K, 0, 1, b)
            a(RET_K, k=pos)
        a(RET_K, k=0)
    return a.assemble()


def bucket(client: bytes, workers: int, bits: int | None = None) -> int:
    """The bucket :func:`program` gives a client (the reference the tests hold it to)."""
    width = 8 * len(client)
    v = int.from_bytes(client, "big")
    if bits is not None:
        v &= ((1 << width) - 1) ^ ((1 << (width - bits)) - 1)
    folded = 0
    for w in _words(v.to_bytes(len(client), "big")):
        folded ^= w
    return (((folded * GOLDEN) & 0xFFFFFFFF) >> 16) % workers


def describe(vip_masks: dict[bytes, int]) -> str:
    """For logs: which VIPs hash a client prefix instead of the whole address."""
    return ", ".join(f"{ipaddress.ip_address(v)}: /{b}" for v, b in sorted(vip_masks.items())) or "whole addresses"
