#!/usr/bin/env bash
# dnsfront vs NSD (and gdnsd's weighted plugin when installed), queries/s on
# one core each, measured with dnsperf in one run and with the same pinning.
#
#   benchmarks/dns_qps.sh [-d SECONDS] [-s SERVER_CPU] [-c CLIENT_CPU] [-r RUNS] [-R]
#
# -R also measures a second dnsfront, identical but with response rate
# limiting on (dnsfront.rrl) at a rate above the load, so every answer goes
# through its buckets and none is limited: the cost of RRL on the fast path.
# The two are measured in alternation, run by run, so load from elsewhere on
# the machine falls on both alike.
#
# dnsfront serves app.example.net, a weighted load-balanced name with two
# live sites (a throwaway redis-server plus a heartbeat publisher keep both
# sites fresh, exactly as two directors would); NSD serves a static A record
# of the same name. Each server is pinned to SERVER_CPU, dnsperf to
# CLIENT_CPU. Every process this script starts is killed by PID on exit.
set -euo pipefail

DURATION=10
SERVER_CPU=1
CLIENT_CPU=0
RUNS=3
RRL=0
while getopts "d:s:c:r:R" opt; do
  case $opt in
    d) DURATION=$OPTARG ;; s) SERVER_CPU=$OPTARG ;; c) CLIENT_CPU=$OPTARG ;; r) RUNS=$OPTARG ;; R) RRL=1 ;;
    *) echo "usage: $0 [-d SECONDS] [-s SERVER_CPU] [-c CLIENT_CPU] [-r RUNS] [-R]" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
for tool in dnsperf nsd redis-server taskset; do
  command -v "$tool" >/dev/null || { echo "dns_qps: $tool not found (apt install dnsperf nsd redis-server util-linux)" >&2; exit 1; }
done

BENCH=dns_qps
# shellcheck source=benchmarks/dns_common.sh
. "$ROOT/benchmarks/dns_common.sh"
REDIS_PORT=$(free_port); DNSF_PORT=$(free_port); STATUS_PORT=$(free_port); NSD_PORT=$(free_port)

# --- shared state: redis + two live sites ---------------------------------
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" \
  --loglevel warning --logfile "$WORK/redis.log" & PIDS+=($!)
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
"$PY" "$ROOT/benchmarks/dns_state.py" "redis://127.0.0.1:$REDIS_PORT/0" dc1=192.0.2.10 dc2=192.0.2.20 \
  >"$WORK/state.log" 2>&1 & PIDS+=($!)

# --- dnsfront -----------------------------------------------------------------
"$PY" "$ROOT/benchmarks/dns_config.py" "redis://127.0.0.1:$REDIS_PORT/0" "127.0.0.1:$DNSF_PORT" \
  "127.0.0.1:$STATUS_PORT" >"$WORK/glb.yaml"
start_dnsfront() {  # config log -> pid
  taskset -c "$SERVER_CPU" "$PY" -c 'import sys; from dnsfront.main import run; sys.exit(run(sys.argv[1], 1, "warning"))' \
    "$1" >"$2" 2>&1 & PIDS+=($!)
}
start_dnsfront "$WORK/glb.yaml" "$WORK/dnsfront.log"
DNSF_PID=$!
if [ "$RRL" = 1 ]; then
  RRL_PORT=$(free_port); RRL_STATUS_PORT=$(free_port)
  # Same server, RRL on at a rate no single client here reaches: every answer is accounted, none limited.
  "$PY" "$ROOT/benchmarks/dns_config.py" "redis://127.0.0.1:$REDIS_PORT/0" "127.0.0.1:$RRL_PORT" \
    "127.0.0.1:$RRL_STATUS_PORT" 100000000 >"$WORK/glb-rrl.yaml"
  start_dnsfront "$WORK/glb-rrl.yaml" "$WORK/dnsfront-rrl.log"
  RRL_PID=$!
fi

# --- NSD ------------------------------------------------------------------------
cat >"$WORK/example.net.zone" <<ZONE
\$ORIGIN example.net.
\$TTL 3600
@   IN SOA ns1.example.net. hostmaster.example.net. 1 3600 900 1209600 30
@   IN NS  ns1.example.net.
ns1 IN A   192.0.2.53
app 20 IN A 192.0.2.10
ZONE
cat >"$WORK/nsd.conf" <<CONF
server:
  ip-address: 127.0.0.1@$NSD_PORT
  server-count: 1
  username: ""
  chroot: ""
  zonesdir: "$WORK"
  database: ""
  zonelistfile: "$WORK/zone.list"
  xfrdfile: "$WORK/xfrd.state"
  xfrdir: "$WORK"
  pidfile: "$WORK/nsd.pid"
  logfile: "$WORK/nsd.log"
  verbosity: 0
  rrl-ratelimit: 0   # response rate limiting would cap one client (us) at 200 qps
remote-control:
  control-enable: no
zone:
  name: example.net
  zonefile: "$WORK/example.net.zone"
CONF
taskset -c "$SERVER_CPU" nsd -d -c "$WORK/nsd.conf" >"$WORK/nsd.out" 2>&1 & PIDS+=($!)
NSD_PID=$!

# --- wait until both answer, and dnsfront sees both sites live ------------------
wait_answer() {
  for _ in $(seq 100); do
    dig +short +time=1 +tries=1 @127.0.0.1 -p "$1" app.example.net A | grep -q . && return 0
    sleep 0.1
  done
  echo "dns_qps: server on port $1 does not answer; logs in $WORK" >&2; cat "$WORK"/*.log >&2; exit 1
}
wait_answer "$DNSF_PORT"; wait_answer "$NSD_PORT"
wait_live() {  # status port
  for _ in $(seq 100); do
    curl -s "http://127.0.0.1:$1/status" | grep -q '"weighted: dc1 50%, dc2 50%"' && return 0
    sleep 0.1
  done
  echo "dns_qps: dnsfront does not see two live sites" >&2; exit 1
}
wait_live "$STATUS_PORT"
if [ "$RRL" = 1 ]; then wait_answer "$RRL_PORT"; wait_live "$RRL_STATUS_PORT"; fi

echo "app.example.net A" >"$WORK/queries.txt"
descendants() { local c; for c in $(pgrep -P "$1"); do echo "$c"; descendants "$c"; done; }
cpu_ticks() {  # utime+stime of a process and all its descendants (NSD forks twice), in clock ticks
  local total=0 t pid
  for pid in "$1" $(descendants "$1"); do
    # Fields after "pid (comm) ": comm may contain spaces ("nsd: main").
    t=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $12 + $13}')
    t=${t:-0}
    total=$((total + t))
  done
  echo "$total"
}
HZ=$(getconf CLK_TCK)
measure() {  # port pid [dnsperf flags] -> "best_qps qps_per_server_cpu_second" over RUNS runs
  local best=0 best_core=0 out qps done t0 t1 core
  for _ in $(seq "$RUNS"); do
    t0=$(cpu_ticks "$2")
    # shellcheck disable=SC2086 # $3: extra dnsperf flags, word-split on purpose
    out=$(taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$1" -d "$WORK/queries.txt" -l "$DURATION" -c 4 -q 256 ${3:-} 2>&1)
    t1=$(cpu_ticks "$2")
    qps=$(awk '/Queries per second/ {printf "%d", $4}' <<<"$out")
    done=$(awk '/Queries completed/ {print $3}' <<<"$out")
    core=$(( (t1 - t0) > 0 ? done * HZ / (t1 - t0) : 0 ))
    [ "${qps:-0}" -gt "$best" ] && best=$qps
    [ "$core" -gt "$best_core" ] && best_core=$core
  done
  echo "$best $best_core"
}

echo "machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p'), kernel $(uname -r)"
echo "pinning: servers on CPU $SERVER_CPU, dnsperf on CPU $CLIENT_CPU; ${DURATION}s x $RUNS runs (best kept)"
read -r DNSF DNSF_CORE <<<"$(measure "$DNSF_PORT" "$DNSF_PID")"
read -r DNSF_E DNSF_E_CORE <<<"$(measure "$DNSF_PORT" "$DNSF_PID" -e)"
read -r NSDQ NSD_CORE <<<"$(measure "$NSD_PORT" "$NSD_PID")"
# qps is what dnsperf got (limited by the client core too on a 2-core box);
# qps/core divides the queries by the CPU time the server itself used, which
# is the server's capacity per core even when the client is the bottleneck.
printf "%-34s %10s %14s\n" "server" "qps" "qps/core"
printf "%-34s %10s %14s\n" "dnsfront (weighted, 2 live sites)" "$DNSF" "$DNSF_CORE"
printf "%-34s %10s %14s\n" "dnsfront, same with EDNS (-e)" "$DNSF_E" "$DNSF_E_CORE"
printf "%-34s %10s %14s\n" "nsd $(nsd -v 2>&1 | awk 'NR==1{print $3}') (static A)" "$NSDQ" "$NSD_CORE"
if command -v gdnsd >/dev/null; then
  echo "gdnsd is installed but not configured by this script yet: skipped"
else
  echo "gdnsd: not installed, skipped"
fi
"$PY" -c "import sys; d,n,dc,nc=map(int,sys.argv[1:]); print(f'ratio dnsfront/nsd: {d/n:.2f} (qps), {dc/nc:.2f} (qps/core)' if n and nc else 'ratio: n/a')" "$DNSF" "$NSDQ" "$DNSF_CORE" "$NSD_CORE"
if [ "$RRL" = 1 ]; then
  echo "RRL cost, measured in alternation (one run each, $RUNS times; qps and qps/core per run):"
  for i in $(seq "$RUNS"); do
    read -r A A_CORE <<<"$(RUNS=1 measure "$DNSF_PORT" "$DNSF_PID")"
    read -r B B_CORE <<<"$(RUNS=1 measure "$RRL_PORT" "$RRL_PID")"
    "$PY" -c "import sys; a,ac,b,bc=map(int,sys.argv[2:]); print(f'run {sys.argv[1]}: off {a} qps {ac} /core, on {b} qps {bc} /core: cost {100*(1-b/a):.1f} % (qps), {100*(1-bc/ac):.1f} % (qps/core)' if a and ac else 'n/a')" \
      "$i" "$A" "$A_CORE" "$B" "$B_CORE"
  done
  curl -s "http://127.0.0.1:$RRL_STATUS_PORT/metrics" | grep -E '^dnsfront_rrl_limited_total' || true
fi
