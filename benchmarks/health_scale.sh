#!/usr/bin/env bash
# The director's control plane at scale (issue 19), side by side with keepalived.
#
# For each SIZE (number of real servers, default 200 1000 5000), RUNS times:
#   - glb tcp:  a director on lo (control plane only: checks, health table,
#               snapshots published to a throwaway redis, /status, /metrics)
#               with SIZE real servers 127.2.x.y:PORT, tcp checks every 1 s,
#               timeout 0.5 s, rise 1, fall 2;
#   - glb http: the same with http checks (GET /);
#   - keepalived: keepalived's checker (-C) with the same real servers,
#               TCP_CHECK, delay_loop 1, connect_timeout 0.5, retry 1 (fall 2).
# Every real server is served by one backend process on 0.0.0.0:PORT (all of
# 127.0.0.0/8), healthy for the whole run, so every down is a false down.
# Each checker runs alone, after WARMUP seconds, for SECONDS; printed:
#   cpu %        its CPU time (user+system, all its processes) / wall time
#   checks/s     glb: probes finished (/metrics glb_director_probes_total);
#                keepalived: SIZE / delay_loop (it exports no count)
#   cpu/1k       CPU % of a core per 1,000 checks a second
#   false downs  glb: up -> down transitions since start (/metrics);
#                keepalived: "Removing service" lines in its log since start
#   lag p99      glb only: the probe lag histogram's 99th percentile bucket
#
# This kernel has no IPVS, and keepalived's checker process exits at start
# when it cannot initialise IPVS. benchmarks/ipvs_stub.c (built here with cc,
# LD_PRELOADed into keepalived only) answers keepalived's IPVS socket options
# as an empty IPVS would; its checkers run unchanged.
#
#   benchmarks/health_scale.sh [-d SECONDS] [-r RUNS] [-w WARMUP] [-s CHECKER_CPU] [-c OTHER_CPU]
#                              [-o CHECKERS] [SIZE ...]
#
# CHECKERS: a comma-separated subset of "glb tcp,glb http,keepalived" (default all).
# The checker under test is pinned to CHECKER_CPU, the backend and redis to
# OTHER_CPU. Loopback only; every process this script starts is killed by PID.
set -euo pipefail

DURATION=60
RUNS=3
WARMUP=5
CHECKER_CPU=1
OTHER_CPU=0
CHECKERS="glb tcp,glb http,keepalived"
while getopts "d:r:w:s:c:o:" opt; do
  case $opt in
    d) DURATION=$OPTARG ;; r) RUNS=$OPTARG ;; w) WARMUP=$OPTARG ;; s) CHECKER_CPU=$OPTARG ;; c) OTHER_CPU=$OPTARG ;;
    o) CHECKERS=$OPTARG ;;
    *) echo "usage: $0 [-d SECONDS] [-r RUNS] [-w WARMUP] [-s CHECKER_CPU] [-c OTHER_CPU] [-o CHECKERS] [SIZE ...]" >&2
       exit 2 ;;
  esac
done
shift $((OPTIND - 1))
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(200 1000 5000)

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
HELP="$PY $ROOT/benchmarks/health_scale.py"
for tool in keepalived redis-server redis-cli taskset curl cc; do
  command -v "$tool" >/dev/null || { echo "health_scale: $tool not found (apt install keepalived redis-server util-linux curl gcc)" >&2; exit 1; }
done

BENCH=health_scale
# shellcheck source=benchmarks/dns_common.sh
. "$ROOT/benchmarks/dns_common.sh"
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
HZ=$(getconf CLK_TCK)
# CPU ticks of a process and its children (keepalived's checker is a child).
ticks() {
  local t=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    [ -r "/proc/$p/stat" ] && t=$((t + $(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
  done
  echo "$t"
}
range() { tr ' ' '\n' | sort -g | awk 'NF {v[n++]=$1} END {if (!n) print "-"; else if (v[0]==v[n-1]) print v[0]; else print v[0] "-" v[n-1]}'; }
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }
lag_p99() {  # upper bound of the bucket holding the 99th percentile
  curl -s "http://127.0.0.1:$1/metrics" | awk '
    /^glb_director_probe_lag_seconds_bucket/ { match($0, /le="[^"]*"/); le[n] = substr($0, RSTART + 4, RLENGTH - 5); c[n++] = $2 }
    /^glb_director_probe_lag_seconds_count/ { total = $2 }
    END { for (i = 0; i < n; i++) if (c[i] >= 0.99 * total) { print le[i]; exit } }'
}

cc -O2 -shared -fPIC -o "$WORK/ipvs_stub.so" "$ROOT/benchmarks/ipvs_stub.c" -ldl

REDIS_PORT=$(free_port)
taskset -c "$OTHER_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$WORK" --loglevel warning --logfile "$WORK/redis.log" & PIDS+=($!)
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
PORT=$(free_port)
# nice -10: the backend stands for every real server; on a machine other
# sessions load, a backend left without CPU for the timeout fails HTTP checks
# (TCP ones are answered by the kernel) and that is not the checker's doing.
taskset -c "$OTHER_CPU" nice -n -10 $HELP backend "$PORT" & PIDS+=($!)
# Every checker starts against a listening backend: on a loaded machine its
# start can take seconds, and checks refused meanwhile would count as downs.
for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done

measure() {  # PID SECONDS -> cpu % of a core over SECONDS
  local a b
  a=$(ticks "$1"); sleep "$2"; b=$(ticks "$1")
  awk -v t=$((b - a)) -v hz="$HZ" -v d="$2" 'BEGIN {printf "%.1f", 100 * t / hz / d}'
}

# The runs set OUT ("cpu checks/s downs lag") instead of printing it: a $(...)
# subshell would keep the PIDs it starts from the cleanup trap.
glb_run() {  # SIZE TYPE
  local n=$1 kind=$2 sport pid cpu p0 p1 downs lag try
  for try in 1 2 3; do  # a free port can be taken by someone else before the director binds it
    sport=$(free_port)
    $HELP glb-config "$WORK/glb.yaml" "$n" "$kind" "$PORT" "redis://127.0.0.1:$REDIS_PORT/0" "$sport"
    taskset -c "$CHECKER_CPU" "$PY" -m glb.cli director --config "$WORK/glb.yaml" --site dc1 >"$WORK/director.log" 2>&1 &
    pid=$!; PIDS+=($pid)
    for _ in $(seq 300); do
      curl -sf -o /dev/null "http://127.0.0.1:$sport/healthz" && break
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && break
    grep -q "address already in use" "$WORK/director.log" && [ "$try" -lt 3 ] && continue
    echo "health_scale: the director exited:" >&2; tail -5 "$WORK/director.log" >&2; exit 1
  done
  sleep "$WARMUP"
  p0=$(metric "$sport" glb_director_probes_total)
  cpu=$(measure "$pid" "$DURATION")
  p1=$(metric "$sport" glb_director_probes_total)
  downs=$($HELP downs "$sport")
  lag=$(lag_p99 "$sport")
  stop "$pid"
  if [ "$downs" != 0 ]; then  # say why, not just how many
    echo "health_scale: $n $kind: $downs false downs; the director's first:" >&2
    grep -m3 -- "-> down" "$WORK/director.log" >&2 || true
  fi
  OUT="$cpu $(awk -v a="$p0" -v b="$p1" -v d="$DURATION" 'BEGIN {printf "%.0f", (b - a) / d}') $downs $lag"
}

keepalived_run() {  # SIZE
  local n=$1 pid cpu downs
  $HELP keepalived-config "$WORK/keepalived.conf" "$n" "$PORT"
  : >"$WORK/keepalived.log"
  LD_PRELOAD="$WORK/ipvs_stub.so" taskset -c "$CHECKER_CPU" keepalived --dont-fork --log-console -C \
    -f "$WORK/keepalived.conf" -p "$WORK/keepalived.pid" -c "$WORK/checkers.pid" -r "$WORK/vrrp.pid" \
    >"$WORK/keepalived.log" 2>&1 &
  pid=$!; PIDS+=($pid)
  sleep "$WARMUP"
  if ! grep -q "Activating healthchecker" "$WORK/keepalived.log"; then
    echo "health_scale: keepalived's checker did not start:" >&2; tail -5 "$WORK/keepalived.log" >&2
  fi
  cpu=$(measure "$pid" "$DURATION")
  downs=$(grep -c "Removing service" "$WORK/keepalived.log" || true)
  stop "$pid"
  OUT="$cpu $n $downs -"
}

printf "%-7s %-11s %8s %9s %8s %12s %9s\n" servers checker "cpu %" checks/s cpu/1k "false downs" "lag p99"
for n in "${SIZES[@]}"; do
  IFS=, read -r -a WHATS <<<"$CHECKERS"
  for what in "${WHATS[@]}"; do
    cpus=(); rates=(); per=(); downs=(); lags=()
    for _ in $(seq "$RUNS"); do
      if [ "$what" = keepalived ]; then keepalived_run "$n"; else glb_run "$n" "${what#glb }"; fi
      read -r c r d l <<<"$OUT"
      cpus+=("$c"); rates+=("$r"); downs+=("$d"); lags+=("$l")
      per+=("$(awk -v c="$c" -v r="$r" 'BEGIN {printf "%.1f", (r > 0 ? c * 1000 / r : 0)}')")
    done
    printf "%-7s %-11s %8s %9s %8s %12s %9s\n" "$n" "$what" "$(echo "${cpus[*]}" | range)" \
      "$(echo "${rates[*]}" | range)" "$(echo "${per[*]}" | range)" "$(echo "${downs[*]}" | range)" \
      "$(echo "${lags[*]}" | range)"
  done
done
