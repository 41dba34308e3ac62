"""The director benchmark (run by benchmarks/director_pps.sh, as root).

Namespaces: client, director and a real server on one bridge (as the DR
end-to-end test). For each forwarding method (DR, TUN) and for the kernel's
own forwarding (an nftables netdev ``fwd`` rule in the director's namespace,
DR-style MAC rewrite) in the same run:

* **pps**: the client blasts 64-byte UDP frames (1024 flows) at the VIP for
  SECONDS; delivered = what the real server's ingress counted (and dropped,
  so its stack costs nothing); CPU us/packet = the director engine's own
  CPU time / delivered, and the whole machine's busy time minus the
  generator's own / delivered (this includes the kernel's softirq work on
  both sides of the director);
* **latency**: UDP echo RTT from the client through the VIP at 1000/s,
  p50; added = p50 through the engine - p50 through nftables;
* **TCP**: one stream client -> VIP -> real server for SECONDS, with
  checksum/TSO/GSO offloads on (DR passes GSO super-frames; TUN cannot,
  see docs/packet-path.md, so TUN runs with them off).

TUN has a second reference for **pps**: the kernel's own tunnelled
forwarding. This kernel has no ``ipip`` (nor gre, sit, ip6tnl, geneve),
only ``vxlan``: nftables ``fwd`` into a VXLAN device on the director (the
kernel encapsulates, routes and sends), a VXLAN device on the real server
(the kernel's UDP stack and VXLAN driver decapsulate), the blast counted
at its ingress. It tunnels with 50 bytes of headers where TUN adds 20, so
it is a reference for "as the kernel tunnels", not for IP-in-IP itself.

NAT (``nat``) has its own reference in the same run: nftables DNAT with
conntrack in the director's kernel (``ip daddr VIP dnat to RS``, IP
forwarding on), the real server's default route through the director (one
interface for both sides, as ``director.lan`` unset), replies SNAT'd back.
Its packets/s are measured twice: first with 1024 new flows (the kernel data
plane's first packets of each go through the engine, which schedules and
installs the flow; its ring drops some while it does), then again at once
with the same flows established ("warm": the steady state, for nftables too).

Each is measured for the userspace engine alone and for the kernel data
plane (``packet.dataplane: kernel``: the engine schedules each new flow and
installs it, the tc program forwards the rest; offloads on for both modes,
since it tunnels GSO frames whole). The TUN real server decapsulates as
``glb realserver setup --decap $TUN_DECAP`` chooses (default ``auto``: the
ipip driver, else the tc-BPF decapsulator, else userspace; printed); this
kernel has no ipip, and the userspace decapsulator bounds TUN TCP whoever
forwards. With the BPF one the blast is unwrapped before the real server's
netdev ingress hook counts it, so the count rule matches it either way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.netns import ETHTOOL, Lab  # noqa: E402

PY = sys.executable
GLB = str(Path(PY).parent / "glb")
TOOLS = str(ROOT / "benchmarks" / "director_tools.py")
ENGINE = str(ROOT / "benchmarks" / "director_engine.py")
VIP, CLIENT, DIRECTOR, RS = "10.0.0.100", "10.0.0.10", "10.0.0.2", "10.0.0.11"
NAT_CLIENT, NAT_DIRECTOR = "10.0.1.10", "10.0.1.2"
"""NAT: the client on a subnet of its own (same bridge), or the real server would answer it directly."""
UDP_PORT, TCP_PORT, ECHO_PORT = 9, 5001, 7
SECONDS = float(os.environ.get("SECONDS_PER_RUN", "5"))
TUN_DECAP = os.environ.get("TUN_DECAP", "auto")
NIC_HEADROOM = os.environ.get("NIC_HEADROOM", "") not in ("", "0")
"""The client's frames with a NIC's headroom: an AF_PACKET frame on a veth gets 16 bytes before its
Ethernet header, where a NIC driver leaves 64 or more (NET_SKB_PAD, XDP's 256), so every TUN
encapsulation (20 bytes) reallocates the head here and would not on a NIC. A VXLAN port on the lab's
bridge (never up, never sent to) makes the bridge raise every port's needed_headroom, and veth passes it
to its peer, the client's eth0: AF_PACKET then reserves 80 bytes. Same for every column."""


def busy_jiffies() -> int:
    parts = open("/proc/stat").readline().split()[1:]
    v = list(map(int, parts))
    return sum(v) - v[3] - v[4]  # all but idle and iowait


def mac(ns) -> str:
    return mac_of(ns, "eth0")


def mac_of(ns, ifname: str) -> str:
    return ns.run(["cat", f"/sys/class/net/{ifname}/address"]).stdout.strip()


def counter(ns) -> int:
    text = ns.run(["nft", "list", "table", "netdev", "bench"]).stdout
    return sum(int(part.split()[0]) for part in text.split("counter packets ")[1:])


class Bench:
    def __init__(self, lab: Lab, mode: str, tmp: Path) -> None:
        self.lab, self.mode = lab, mode
        sw = lab.netns("sw")
        br = lab.bridge(sw)
        self.sw = sw
        self.client, self.director, self.rs = lab.netns("client"), lab.netns("director"), lab.netns("rs")
        self.cip = NAT_CLIENT if mode == "nat" else CLIENT
        lab.port(sw, br, self.client, f"{self.cip}/24")
        lab.port(sw, br, self.director, [f"{DIRECTOR}/24", f"{NAT_DIRECTOR}/24"] if mode == "nat" else f"{DIRECTOR}/24")
        lab.port(sw, br, self.rs, f"{RS}/24")
        if NIC_HEADROOM:
            sw.ip("link", "add", "hr0", "type", "vxlan", "id", "4242", "dstport", "4790")
            sw.ip("link", "set", "hr0", "master", br)
            print(f"{mode}: client frames with a NIC's headroom (a VXLAN port on the bridge)", file=sys.stderr,
                  flush=True)
        who = ["--gateway", DIRECTOR] if mode == "nat" else ["--vip", VIP]
        state = tmp / f"rs-{mode}.json"
        res = self.rs.run([GLB, "realserver", "setup", *who, "--mode", mode, "--state-file", str(state),
                           *(["--decap", TUN_DECAP] if mode == "tun" else [])], check=False)
        if res.returncode:
            raise SystemExit(res.stderr)
        self.decap = json.loads(state.read_text()).get("decap")
        if self.decap:
            print(f"{mode}: the real server decapsulates with: {self.decap}", file=sys.stderr, flush=True)
        self.dmac, self.rmac = mac(self.director), mac(self.rs)
        if mode == "nat":
            self.client.ip("route", "add", f"{VIP}/32", "dev", "eth0")
        self.client.ip("neigh", "replace", VIP, "lladdr", self.dmac, "dev", "eth0")
        self.director.ip("neigh", "replace", RS, "lladdr", self.rmac, "dev", "eth0")
        self.rs.ip("neigh", "replace", DIRECTOR, "lladdr", self.dmac, "dev", "eth0")
        # The real server counts and drops the blast at ingress (outer IPIP packets for TUN).
        # Only the blast: echo and TCP must reach the server (for TUN, through its
        # decapsulator), so match the inner UDP port past the 20-byte inner header.
        match = f"ip protocol 4 @th,72,8 17 @th,176,16 {UDP_PORT}" if mode == "tun" else f"udp dport {UDP_PORT}"
        unwrapped = f'  ip saddr {self.cip} udp dport {UDP_PORT} counter drop\n' if self.decap == "bpf" else ""
        self.rs.run(["nft", "-f", "-"], input=(
            'table netdev bench { chain in { type filter hook ingress device "eth0" priority 0;\n'
            f'  ip saddr {DIRECTOR if mode == "tun" else self.cip} {match} counter drop\n{unwrapped} }}\n}}\n'))
        self.tools = [self.rs.popen([PY, TOOLS, "echo", str(ECHO_PORT)], stdout=subprocess.PIPE, text=True)]
        self.tools[0].stdout.readline()

    def offloads(self, on: bool) -> None:
        state = "on" if on else "off"
        for ns in (self.client, self.director, self.rs, self.sw):
            links = json.loads(ns.ip("-j", "link").stdout)
            for link in links:
                if link["ifname"] != "lo":
                    ns.run([ETHTOOL, "-K", link["ifname"], "tx", state, "tso", state, "gso", state], check=False)

    # -- what forwards

    def start_engine(self, **options):
        plan = {"interface": "eth0", "mode": self.mode, "vip": VIP, "servers": [[RS, self.rmac]],
                "source": DIRECTOR, "ports": [[UDP_PORT, 17], [TCP_PORT, 6], [ECHO_PORT, 17]], **options}
        p = self.director.popen([PY, ENGINE, json.dumps(plan)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, cwd=ROOT)
        line = p.stdout.readline()
        if not line.startswith("ready"):
            raise SystemExit(f"engine did not start: {line}")
        # What the director's KernelGuard does: the kernel drops its copy of VIP traffic.
        self.director.run(["nft", "-f", "-"], input=(
            f'table netdev glb_director {{ chain in {{ type filter hook ingress device "eth0" priority 0;\n'
            f'  ip daddr {VIP} drop\n }}\n}}\n'))
        self.engine = p
        return p

    def engine_stats(self) -> dict:
        self.engine.stdin.write("\n")
        self.engine.stdin.flush()
        return json.loads(self.engine.stdout.readline())

    def stop_engine(self) -> None:
        self.engine.stdin.close()
        self.engine.wait(20)
        self.director.run(["nft", "delete", "table", "netdev", "glb_director"], check=False)

    def start_nft(self) -> None:
        if self.mode == "nat":  # DNAT with conntrack, the kernel routing both ways
            self.director.sysctl("net.ipv4.ip_forward", 1)
            self.director.sysctl("net.ipv4.conf.all.send_redirects", 0)
            self.director.sysctl("net.ipv4.conf.eth0.send_redirects", 0)
            self.director.run(["nft", "-f", "-"], input=(
                f"table ip knat {{ chain pre {{ type nat hook prerouting priority dstnat;\n"
                f"  ip daddr {VIP} dnat to {RS}\n }}\n}}\n"))
            return
        self.director.run(["nft", "-f", "-"], input=(
            'table netdev kfwd { chain in { type filter hook ingress device "eth0" priority 0;\n'
            f'  ip daddr {VIP} ether daddr set {self.rmac} ether saddr set {self.dmac} fwd to "eth0"\n }}\n}}\n'))

    def start_vxlan(self) -> None:
        """The kernel's own tunnel (TUN's second reference): nftables fwd into VXLAN, counted past the
        real server's VXLAN device (a chain of the ``bench`` table, so :func:`counter` sums it)."""
        self.rs.ip("link", "add", "vx0", "type", "vxlan", "id", "42", "local", RS, "dstport", "4789",
                   "dev", "eth0", "nolearning")
        self.director.ip("link", "add", "vx0", "type", "vxlan", "id", "42", "remote", RS, "local", DIRECTOR,
                         "dstport", "4789", "dev", "eth0", "nolearning")
        for ns in (self.rs, self.director):
            ns.ip("link", "set", "vx0", "up")
        self.rs.run(["nft", "-f", "-"], input=(
            'table netdev bench { chain vx { type filter hook ingress device "vx0" priority 0;\n'
            f'  ip saddr {self.cip} udp dport {UDP_PORT} counter drop\n }}\n}}\n'))
        self.director.run(["nft", "-f", "-"], input=(
            'table netdev kvx { chain in { type filter hook ingress device "eth0" priority 0;\n'
            f'  ip daddr {VIP} ether daddr set {mac_of(self.rs, "vx0")} fwd to "vx0"\n }}\n}}\n'))

    def stop_vxlan(self) -> None:
        self.director.run(["nft", "delete", "table", "netdev", "kvx"], check=False)
        self.rs.run(["nft", "delete", "chain", "netdev", "bench", "vx"], check=False)
        for ns in (self.rs, self.director):
            ns.ip("link", "del", "vx0", check=False)

    def stop_nft(self) -> None:
        self.director.run(["nft", "delete", "table", "netdev", "kfwd"], check=False)
        self.director.run(["nft", "delete", "table", "ip", "knat"], check=False)
        self.director.sysctl("net.ipv4.ip_forward", 0)

    # -- measurements

    def pps(self, engine: bool) -> dict:
        time.sleep(0.5)
        before_rs, before_busy = counter(self.rs), busy_jiffies()
        cpu0 = self.engine_stats()["cpu"] if engine else 0.0
        out = self.client.run([PY, TOOLS, "blast", "eth0", self.dmac, self.cip, VIP, str(UDP_PORT), str(SECONDS)],
                              timeout=SECONDS + 60, cwd=ROOT)
        time.sleep(0.6)
        sent = json.loads(out.stdout)
        delivered = counter(self.rs) - before_rs
        busy = (busy_jiffies() - before_busy) / os.sysconf("SC_CLK_TCK")
        res = {"sent_pps": sent["sent"] / SECONDS, "delivered_pps": delivered / SECONDS,
               "generator_cpu_s": sent.get("cpu", 0.0)}
        gen = sent.get("cpu", 0.0)
        res["machine_us_per_pkt"] = (busy - gen) / delivered * 1e6 if delivered else None
        if engine:
            st = self.engine_stats()
            res["engine_us_per_pkt"] = (st["cpu"] - cpu0) / delivered * 1e6 if delivered else None
            res["ring_drops"] = st["ring_drops"]
            res["conns"] = st["forwarder"]["connections"]
        return res

    def latency(self) -> dict:
        out = self.client.run([PY, TOOLS, "ping", VIP, str(ECHO_PORT), "2000", "0.001"], timeout=120, cwd=ROOT)
        return json.loads(out.stdout)

    def tcp(self) -> dict:
        sink = self.rs.popen([PY, TOOLS, "sink", str(TCP_PORT)], stdout=subprocess.PIPE, text=True)
        sink.stdout.readline()
        self.client.run([PY, TOOLS, "stream", VIP, str(TCP_PORT), str(SECONDS)], timeout=SECONDS + 60, cwd=ROOT,
                        check=False)
        line = sink.stdout.readline()
        sink.wait(10)
        return json.loads(line) if line else {"gbit": 0.0}


def run(mode: str, tmp: Path) -> dict:
    with Lab(f"bench-{mode}") as lab:
        b = Bench(lab, mode, tmp)
        out = {"rs_decap": b.decap}
        if mode in ("dr", "nat"):  # nftables cannot encapsulate: its MAC-rewrite fwd is the reference for TUN too
            b.start_nft()
            out["nft_pps"] = b.pps(False)
            if mode == "nat":  # the same 1024 flows again, their conntrack entries made: steady state
                out["nft_pps_warm"] = b.pps(False)
            out["nft_latency"] = b.latency()
            b.offloads(True)
            out["nft_tcp"] = b.tcp()
            b.offloads(False)
            b.stop_nft()
        if mode == "tun":
            b.start_vxlan()
            out["vxlan_pps"] = b.pps(False)
            b.stop_vxlan()
        b.start_engine()
        out["engine_pps"] = b.pps(True)
        out["engine_latency"] = b.latency()
        b.offloads(mode != "tun")
        out["engine_tcp"] = b.tcp()
        b.offloads(False)
        b.stop_engine()
        b.start_engine(busy_poll=True)  # director.packet.busy_poll: no wake-up, a core spinning
        out["busy_latency"] = b.latency()
        b.stop_engine()
        b.start_engine(dataplane="kernel")
        out["kernel_pps"] = b.pps(True)
        if mode == "nat":  # again, the flows installed: no first packets through the engine's ring
            out["kernel_pps_warm"] = b.pps(True)
        out["kernel_latency"] = b.latency()
        b.offloads(True)
        out["kernel_tcp"] = b.tcp()
        b.offloads(False)
        st = b.engine_stats()
        out["kernel_reasons"], out["kernel_dataplane"] = st["kernel"], st["dataplane"]
        b.stop_engine()
        return out


def main() -> None:
    # A timeout or kill(1) must still remove the namespaces: leave through SystemExit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"glb-bench-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    results = {m: run(m, tmp) for m in sys.argv[1:] or ["dr", "tun", "nat"]}
    print(json.dumps(results, indent=1))
    print()
    if "tun" in results:
        print(f"TUN real server decapsulation: {results['tun']['rs_decap']}")
    dr, tun = results.get("dr", {}), results.get("tun", {})
    ref = dr or results.get("nat") or tun
    if "nft_pps" not in ref:  # tun alone: nftables can only forward DR-style, so it is measured with dr or nat
        print("nftables' reference is measured by the dr (or nat) run: `director_pps.sh dr tun` for the ratios")

    def fmt(v, f="{:,.0f}"):
        return f.format(v) if isinstance(v, (int, float)) else "-"

    def got(r, *path):
        for k in path:
            r = r.get(k) if isinstance(r, dict) else None
        return r

    def ratio(a, b):
        return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    def per_core(r, who):
        us = got(r, f"{who}_pps", "engine_us_per_pkt")
        return 1e6 / us if us else None

    nft_p50 = got(ref, "nft_latency", "p50")

    def added(r, key):
        p50 = got(r, key, "p50")
        return p50 - nft_p50 if isinstance(p50, (int, float)) and isinstance(nft_p50, (int, float)) else None

    # (row, value for a column's results and its forwarder ("engine" / "kernel"), nftables' value, format)
    rows = [
        ("delivered pps", lambda r, w: got(r, f"{w}_pps", "delivered_pps"), got(ref, "nft_pps", "delivered_pps"),
         "{:,.0f}"),
        ("engine CPU us/pkt", lambda r, w: got(r, f"{w}_pps", "engine_us_per_pkt"), None, "{:.2f}"),
        ("machine CPU us/pkt", lambda r, w: got(r, f"{w}_pps", "machine_us_per_pkt"),
         got(ref, "nft_pps", "machine_us_per_pkt"), "{:.2f}"),
        ("TCP Gbit/s", lambda r, w: got(r, f"{w}_tcp", "gbit"), got(ref, "nft_tcp", "gbit"), "{:.2f}"),
        ("RTT p50 us", lambda r, w: got(r, f"{w}_latency", "p50"), nft_p50, "{:.0f}"),
        ("added p50 us", lambda r, w: added(r, f"{w}_latency"), None, "{:.0f}"),
        ("added p50 us, busy_poll", lambda r, w: added(r, "busy_latency") if w == "engine" else None, None, "{:.0f}"),
        ("pps per engine core", lambda r, w: per_core(r, w) if w == "engine" else None, None, "{:,.0f}"),
        ("  / target 300k", lambda r, w: ratio(per_core(r, w), 300_000) if w == "engine" else None, None, "{:.2f}"),
        ("delivered / nftables", lambda r, w: ratio(got(r, f"{w}_pps", "delivered_pps"),
                                                    got(ref, "nft_pps", "delivered_pps")), None, "{:.2f}"),
        ("TCP / nftables", lambda r, w: ratio(got(r, f"{w}_tcp", "gbit"), got(ref, "nft_tcp", "gbit")), None, "{:.2f}"),
    ]
    columns = [("DR", dr, "engine"), ("TUN", tun, "engine"), ("DR kernel", dr, "kernel"), ("TUN kernel", tun, "kernel")]
    print(f"{'':24}" + "".join(f"{name:>12}" for name, _, _ in columns) + f"{'nftables fwd':>14}")
    for name, get, nft, f in rows:
        cells = "".join(f"{fmt(get(r, w) if r else None, f):>12}" for _, r, w in columns)
        print(f"{name:24}{cells}{fmt(nft, f):>14}")
    vx = got(tun, "vxlan_pps", "delivered_pps")
    if vx:
        print()
        print(f"TUN's second reference, the kernel's own tunnel (nftables fwd into VXLAN; no ipip here): "
              f"{vx:,.0f} pps delivered")
        print(f"  / it: TUN engine {fmt(ratio(got(tun, 'engine_pps', 'delivered_pps'), vx), '{:.2f}')}, "
              f"TUN kernel {fmt(ratio(got(tun, 'kernel_pps', 'delivered_pps'), vx), '{:.2f}')}")
    nat = results.get("nat")
    if nat:  # against its own reference, nftables DNAT (conntrack), measured in the same run
        print()
        print(f"{'':24}{'NAT':>12}{'NAT kernel':>12}{'nftables DNAT':>15}")
        for name, key, sub, f in (("sent pps", "pps", "sent_pps", "{:,.0f}"),
                                  ("delivered pps", "pps", "delivered_pps", "{:,.0f}"),
                                  ("machine CPU us/pkt", "pps", "machine_us_per_pkt", "{:.2f}"),
                                  ("warm: sent pps", "pps_warm", "sent_pps", "{:,.0f}"),
                                  ("warm: delivered pps", "pps_warm", "delivered_pps", "{:,.0f}"),
                                  ("warm: machine us/pkt", "pps_warm", "machine_us_per_pkt", "{:.2f}"),
                                  ("TCP Gbit/s", "tcp", "gbit", "{:.2f}"),
                                  ("RTT p50 us", "latency", "p50", "{:.0f}")):
            cells = "".join(f"{fmt(got(nat, f'{w}_{key}', sub), f):>12}" for w in ("engine", "kernel"))
            print(f"{name:24}{cells}{fmt(got(nat, f'nft_{key}', sub), f):>15}")
        for name, key, sub in (("pps / nftables DNAT", "pps", "delivered_pps"),
                               ("warm: pps / nftables", "pps_warm", "delivered_pps"),
                               ("TCP / nftables DNAT", "tcp", "gbit")):
            cells = "".join(f"{fmt(ratio(got(nat, f'{w}_{key}', sub), got(nat, f'nft_{key}', sub)), '{:.2f}'):>12}"
                            for w in ("engine", "kernel"))
            print(f"{name:24}{cells}")


if __name__ == "__main__":
    main()
