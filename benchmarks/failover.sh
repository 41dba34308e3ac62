#!/usr/bin/env bash
# GLB failover, measured end to end in the lab (deploy/lab), over several trials:
# time from killing a site's real servers (or its director) to dnsfront's answer
# changing, to a TTL-honouring client being served again, and the share of
# client requests that failed. Prints min / median / max. Needs root.
#
#   benchmarks/failover.sh [-n TRIALS] [--fault servers|director] [--rate R] [--window S] [--seed N]
#                          [--prefix glb-bench-] [--state-dir /run/glb-bench]
#
# The lab it builds is its own (namespaces glb-bench-*, state /run/glb-bench)
# and is removed at the end, also on failure or Ctrl-C.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [[ $(id -u) -ne 0 ]]; then
  echo "failover.sh: needs root (network namespaces)" >&2
  exit 1
fi
bash scripts/setup
exec "${PYTHON:-$ROOT/.venv/bin/python}" benchmarks/failover_run.py "$@"
