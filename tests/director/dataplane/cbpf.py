"""A classic BPF interpreter for tests: runs (code, jt, jf, k) programs over an Ethernet frame.

Follows the kernel's semantics (net/core/filter.c, Documentation/networking/filter.rst):
32-bit A and X, 16 scratch words M[] starting at zero, a load outside the
packet ends the program with 0, SKF_NET_OFF loads relative to the network
header (byte 14 of an Ethernet frame), SKF_AD_PROTOCOL is the EtherType,
SKF_AD_PKTTYPE the packet type given.
"""

from __future__ import annotations

SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL, SKF_AD_PKTTYPE = 0, 4
SKF_NET_OFF = -0x100000
NET = 14

_SIZES = {0x00: 4, 0x08: 2, 0x10: 1}
_ALU = {
    0x00: lambda a, b: a + b, 0x10: lambda a, b: a - b, 0x20: lambda a, b: a * b,
    0x30: lambda a, b: a // b, 0x40: lambda a, b: a | b, 0x50: lambda a, b: a & b,
    0x60: lambda a, b: a << b, 0x70: lambda a, b: a >> b, 0x90: lambda a, b: a % b,
    0xA0: lambda a, b: a ^ b,
}
_JMP = {0x10: lambda a, b: a == b, 0x20: lambda a, b: a > b, 0x30: lambda a, b: a >= b, 0x40: lambda a, b: a & b}


def _signed(k: int) -> int:
    return k - (1 << 32) if k & 0x80000000 else k


class _OutOfPacket(Exception):
    pass


def run(prog, frame: bytes, pkttype: int = 0, max_steps: int = 100_000) -> int:
    """The program's return value for ``frame``."""
    a = x = 0
    mem = [0] * 16
    pc = 0

    def load(off: int, size: int) -> int:
        if SKF_AD_OFF <= off < 0:
            which = off - SKF_AD_OFF
            if which == SKF_AD_PROTOCOL:
                return int.from_bytes(frame[12:14], "big")
            if which == SKF_AD_PKTTYPE:
                return pkttype
            raise ValueError(f"ancillary load {which}")
        elif SKF_NET_OFF <= off < SKF_AD_OFF:
            off = off - SKF_NET_OFF + NET
        if off < 0 or off + size > len(frame):
            raise _OutOfPacket
        return int.from_bytes(frame[off:off + size], "big")

    try:
        for _ in range(max_steps):
            code, jt, jf, k = prog[pc]
            pc += 1
            cls = code & 0x07
            if cls in (0x00, 0x01):  # LD, LDX
                mode, size = code & 0xE0, _SIZES.get(code & 0x18, 4)
                if mode == 0x00:  # IMM
                    v = k
                elif mode == 0x20:  # ABS
                    v = load(_signed(k), size)
                elif mode == 0x40:  # IND
                    v = load(_signed((x + k) & 0xFFFFFFFF), size)
                elif mode == 0x60:  # MEM
                    v = mem[k]
                elif mode == 0xA0 and cls == 0x01:  # MSH: 4 * (byte & 0xf)
                    v = (load(_signed(k), 1) & 0xF) * 4
                else:
                    raise ValueError(f"load mode {code:#x}")
                if cls == 0x00:
                    a = v
                else:
                    x = v
            elif cls == 0x02:  # ST
                mem[k] = a
            elif cls == 0x03:  # STX
                mem[k] = x
            elif cls == 0x04:  # ALU
                op, src = code & 0xF0, x if code & 0x08 else k
                if op == 0x80:
                    a = -a & 0xFFFFFFFF
                elif op in (0x30, 0x90) and src == 0:
                    return 0  # division by zero ends the program
                else:
                    a = _ALU[op](a, src) & 0xFFFFFFFF
            elif cls == 0x05:  # JMP
                op = code & 0xF0
                if op == 0x00:
                    pc += k
                else:
                    pc += jt if _JMP[op](a, x if code & 0x08 else k) else jf
            elif cls == 0x06:  # RET
                return a if code & 0x18 == 0x10 else k
            else:  # MISC
                if code == 0x07:
                    x = a
                elif code == 0x87:
                    a = x
                else:
                    raise ValueError(f"misc {code:#x}")
    except _OutOfPacket:
        return 0
    raise RuntimeError("program did not return")
