#!/usr/bin/env bash
# The director's packet path against the kernel's own forwarding: nftables netdev fwd for DR and TUN,
# nftables DNAT (conntrack) for NAT.
# Builds throwaway namespaces (client, director, real server on a bridge), removes them at the end.
# Needs root. Usage: benchmarks/director_pps.sh [dr] [tun] [nat]   (env SECONDS_PER_RUN, default 5;
# TUN_DECAP: the TUN real server's --decap, auto|bpf|userspace, default auto = the best available;
# NIC_HEADROOM=1: the client's frames with a NIC's headroom, see director_bench.py)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -ne 0 ]]; then
  echo "director_pps: needs root (network namespaces, AF_PACKET)" >&2
  exit 1
fi
bash scripts/setup >/dev/null
echo "machine: $(nproc) cores, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
exec .venv/bin/python benchmarks/director_bench.py "$@"
