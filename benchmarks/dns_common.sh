# Sourced by the DNS benchmarks: a work directory under /tmp named after
# $BENCH, every process put in PIDS killed by PID on exit, and free ports.
# Needs PY (the Python that runs GLB).
WORK=$(mktemp -d "/tmp/$BENCH.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# Free for UDP and TCP alike (a DNS port is both; a status port is TCP).
free_port() { "$PY" -c '
import socket
while True:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0)); port = u.getsockname()[1]
    t = socket.socket()
    try:
        t.bind(("127.0.0.1", port)); break
    except OSError:
        pass
print(port)'; }
