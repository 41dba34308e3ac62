#!/usr/bin/env bash
# dnsfront at scale (issue 18): for each SITESxNAMES size, with S sites
# heartbeating once a second each (spread over the second, as independent
# directors do) and N weighted names of 8 members:
#   - config load: seconds to read and check the config (RUNS runs);
#   - CPU with heartbeats only: dnsfront's share of a core, no queries;
#   - qps under heartbeats: dnsperf, and the ratio to the same dnsfront
#     with no heartbeats (same names and answers; a config whose staleness
#     and heartbeat intervals are so long that nothing changes without them);
#     qps/core divides queries by dnsfront's own CPU time;
#   - change -> answer: ms from publishing a site's service down to a name
#     it serves answering with the degraded TTL (client-side, over Redis).
#
#   benchmarks/dns_scale.sh [-d SECONDS] [-r RUNS] [-s SERVER_CPU] [-c CLIENT_CPU] [SIZE ...]
#
# SIZE is SITESxNAMES (default: 10x100 50x1000 20x10000 100x5000 100x10000).
# dnsfront is pinned to SERVER_CPU; redis, the heartbeat publisher and
# dnsperf to CLIENT_CPU, redis and the publisher at real-time priority when
# chrt works (directors are other machines: dnsperf must not delay their
# heartbeats). Every process this script starts is killed by PID.
set -euo pipefail

DURATION=5
RUNS=3
SERVER_CPU=1
CLIENT_CPU=0
while getopts "d:r:s:c:" opt; do
  case $opt in
    d) DURATION=$OPTARG ;; r) RUNS=$OPTARG ;; s) SERVER_CPU=$OPTARG ;; c) CLIENT_CPU=$OPTARG ;;
    *) echo "usage: $0 [-d SECONDS] [-r RUNS] [-s SERVER_CPU] [-c CLIENT_CPU] [SITESxNAMES ...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(10x100 50x1000 20x10000 100x5000 100x10000)

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
HELP="$PY $ROOT/benchmarks/dns_scale.py"
for tool in dnsperf redis-server redis-cli taskset curl; do
  command -v "$tool" >/dev/null || { echo "dns_scale: $tool not found (apt install dnsperf redis-server util-linux curl)" >&2; exit 1; }
done

BENCH=dns_scale
# shellcheck source=benchmarks/dns_common.sh
. "$ROOT/benchmarks/dns_common.sh"
RT=""
chrt -f 10 true 2>/dev/null && RT="chrt -f 10"
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
HZ=$(getconf CLK_TCK)
ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
range() { tr ' ' '\n' | sort -g | awk 'NF {v[n++]=$1} END {if (!n) print "-"; else if (v[0]==v[n-1]) print v[0]; else print v[0] "-" v[n-1]}'; }

start_redis() {  # -> REDIS_PORT, REDIS_PID (empty, throwaway)
  REDIS_PORT=$(free_port)
  taskset -c "$CLIENT_CPU" $RT redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK" --loglevel warning --logfile "$WORK/redis.log" & REDIS_PID=$!; PIDS+=($REDIS_PID)
  for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return; sleep 0.1; done
  echo "dns_scale: redis did not start" >&2; exit 1
}

start_dnsfront() {  # config -> DNSF_PID; waits until it serves from Redis with nothing left to rebuild
  taskset -c "$SERVER_CPU" "$PY" -c 'import sys; from dnsfront.main import run; sys.exit(run(sys.argv[1], 1, "warning"))' \
    "$1" >"$WORK/dnsfront.log" 2>&1 & DNSF_PID=$!; PIDS+=($DNSF_PID)
  for _ in $(seq 1200); do
    if [ "$(curl -s "http://127.0.0.1:$STATUS_PORT/healthz" 2>/dev/null)" = "ok" ] \
      && curl -s "http://127.0.0.1:$STATUS_PORT/metrics" 2>/dev/null | grep -q '^dnsfront_rebuild_pending 0.0'; then
      return
    fi
    kill -0 "$DNSF_PID" 2>/dev/null || { echo "dns_scale: dnsfront exited:" >&2; tail -20 "$WORK/dnsfront.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "dns_scale: dnsfront not ready after 120 s" >&2; tail -20 "$WORK/dnsfront.log" >&2; exit 1
}

dnsperf_runs() {  # -> "qps..." and "qps/core..." lines, one value per run
  local qs=() cs=() out done t0 t1
  # A short run first, not counted: the first seconds of a flood after an
  # idle spell came out 2-50x slower in every trial (the VM's CPUs waking up).
  taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$DNS_PORT" -d "$WORK/queries.txt" -l 2 -c 4 -q 256 >/dev/null 2>&1 || true
  for _ in $(seq "$RUNS"); do
    t0=$(ticks "$DNSF_PID")
    out=$(taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$DNS_PORT" -d "$WORK/queries.txt" -l "$DURATION" -c 4 -q 256 2>&1)
    t1=$(ticks "$DNSF_PID")
    qs+=("$(awk '/Queries per second/ {printf "%d", $4}' <<<"$out")")
    done=$(awk '/Queries completed/ {print $3}' <<<"$out")
    cs+=("$(( (t1 - t0) > 0 ? done * HZ / (t1 - t0) : 0 ))")
  done
  echo "${qs[*]}"; echo "${cs[*]}"
}

best() { tr ' ' '\n' | sort -g | tail -1; }

echo "machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p'), kernel $(uname -r); load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "dnsfront on CPU $SERVER_CPU; redis, heartbeats, dnsperf on CPU $CLIENT_CPU${RT:+ (redis and heartbeats: $RT)}; ${DURATION}s x $RUNS runs (ranges over runs)"
printf "%-11s %-10s %-13s %-22s %-22s %-11s %-14s\n" "sites x names" "load s" "CPU hb only %" "qps hb (qps/core)" "qps no hb (qps/core)" "ratio best" "change->answer ms"

start_redis
for size in "${SIZES[@]}"; do
  S=${size%x*}; N=${size#*x}
  DNS_PORT=$(free_port); STATUS_PORT=$(free_port)
  redis-cli -p "$REDIS_PORT" flushall >/dev/null
  $HELP config "$S" "$N" "redis://127.0.0.1:$REDIS_PORT/0" "$DNS_PORT" "$STATUS_PORT" >"$WORK/hb.yaml"
  $HELP config "$S" "$N" "redis://127.0.0.1:$REDIS_PORT/0" "$DNS_PORT" "$STATUS_PORT" --quiet >"$WORK/quiet.yaml"
  "$PY" -c 'import random,sys; n=int(sys.argv[1]); r=random.Random(1); print("\n".join(f"n{r.randrange(n)}.example.net A" for _ in range(min(n, 2000))))' "$N" >"$WORK/queries.txt"
  LOAD=$(taskset -c "$SERVER_CPU" $HELP load "$WORK/hb.yaml" "$RUNS" | range)

  # --- heartbeats ----------------------------------------------------------
  taskset -c "$CLIENT_CPU" $RT $HELP heartbeat "redis://127.0.0.1:$REDIS_PORT/0" "$S" >"$WORK/hb.log" 2>&1 & HB_PID=$!; PIDS+=($HB_PID)
  sleep 1.2  # every site published once
  start_dnsfront "$WORK/hb.yaml"
  sleep 2
  CPU=()
  for _ in $(seq "$RUNS"); do
    t0=$(ticks "$DNSF_PID"); sleep "$DURATION"; t1=$(ticks "$DNSF_PID")
    CPU+=("$("$PY" -c "import sys; print(f'{(int(sys.argv[2]) - int(sys.argv[1])) / int(sys.argv[3]) / float(sys.argv[4]) * 100:.1f}')" "$t0" "$t1" "$HZ" "$DURATION")")
  done
  mapfile -t HBQ < <(dnsperf_runs)
  CHANGE=$(taskset -c "$CLIENT_CPU" $HELP change "redis://127.0.0.1:$REDIS_PORT/0" "$DNS_PORT" "$S" "$N" 5 | range)
  curl -s "http://127.0.0.1:$STATUS_PORT/metrics" | grep -E '^dnsfront_(change_to_answer_seconds|rebuild_names)_(sum|count)|^dnsfront_rebuilds_total' \
    >"$WORK/metrics-$size.txt" || true
  stop "$DNSF_PID"; stop "$HB_PID"

  # --- the same dnsfront with no heartbeats ---------------------------------
  redis-cli -p "$REDIS_PORT" flushall >/dev/null
  $HELP publish "redis://127.0.0.1:$REDIS_PORT/0" "$S"
  start_dnsfront "$WORK/quiet.yaml"
  mapfile -t QQ < <(dnsperf_runs)
  stop "$DNSF_PID"

  RATIO=$("$PY" -c "import sys; a, b = (max(map(int, x.split())) for x in sys.argv[1:3]); print(f'{a / b:.2f}' if b else '-')" "${HBQ[0]}" "${QQ[0]}")
  RATIO_CORE=$("$PY" -c "import sys; a, b = (max(map(int, x.split())) for x in sys.argv[1:3]); print(f'{a / b:.2f}' if b else '-')" "${HBQ[1]}" "${QQ[1]}")
  printf "%-13s %-10s %-13s %-22s %-22s %-11s %-14s\n" "${S}x${N}" "$LOAD" "$(echo "${CPU[*]}" | range)" \
    "$(echo "${HBQ[0]}" | range) ($(echo "${HBQ[1]}" | range))" "$(echo "${QQ[0]}" | range) ($(echo "${QQ[1]}" | range))" \
    "$RATIO ($RATIO_CORE)" "$CHANGE"
  sed 's/^/    /' "$WORK/metrics-$size.txt"
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
