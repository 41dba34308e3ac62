"""Helper of benchmarks/health_scale.sh: the pieces of a health-check-at-scale run.

    health_scale.py backend PORT
        One process serving every 127.0.0.0/8 address on PORT: a TCP check's
        connection is accepted and closed; an HTTP GET gets "200 ok".
    health_scale.py glb-config FILE N TYPE PORT REDIS_URL STATUS_PORT [PLACEMENT]
        A GLB config: one service on lo with N real servers 127.2.x.y:PORT,
        TYPE (tcp|http) checks every 1 s, timeout 0.5 s, rise 1, fall 2.
    health_scale.py keepalived-config FILE N PORT
        keepalived's equivalent: one virtual_server, N real_server, TCP_CHECK,
        delay_loop 1, connect_timeout 0.5, retry 1 (= fall 2).
    health_scale.py downs STATUS_PORT
        Real servers taken down since start (up -> down transitions in /metrics).

Every real server is healthy for the whole run, so every down is a false down.
"""

from __future__ import annotations

import selectors
import socket
import sys
import urllib.request

RESPONSE = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def address(i: int) -> str:
    """The i-th real server's address: 127.2.0.1 upwards, skipping .0 and .255."""
    hi, lo = divmod(i, 254)
    return f"127.2.{hi}.{lo + 1}"


def backend(port: int) -> None:
    sel = selectors.DefaultSelector()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(4096)
    srv.setblocking(False)
    sel.register(srv, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                while True:
                    try:
                        conn, _ = srv.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, b"")
                continue
            conn = key.fileobj
            try:
                data = conn.recv(4096)
            except OSError:
                data = b""
            seen = key.data + data
            if data and b"\r\n\r\n" not in seen:
                sel.modify(conn, selectors.EVENT_READ, seen)  # request not complete yet
                continue
            if data:
                try:
                    conn.send(RESPONSE)
                except OSError:
                    pass
            sel.unregister(conn)
            conn.close()


def glb_config(path: str, n: int, kind: str, port: int, redis_url: str, status_port: int,
               placement: str = "") -> None:
    servers = "\n".join(f"          - {{address: {address(i)}, port: {port}}}" for i in range(n))
    place = f", probe_placement: {placement}" if placement else ""
    check = f"{{type: {kind}, interval: 1, timeout: 0.5, rise: 1, fall: 2, initial: up"
    check += ", path: /}" if kind == "http" else "}"
    with open(path, "w") as f:
        f.write(f"""redis: {{url: "{redis_url}", timeout: 1.0}}
zones:
  - apex: example.net
    soa: {{mname: ns1.example.net, rname: hostmaster@example.net}}
    ns: [{{name: ns1.example.net, addresses: [192.0.2.53]}}]
sites:
  dc1:
    director: {{interface: lo, id: bench, status_listen: "127.0.0.1:{status_port}", max_probes: 1024{place}}}
    services:
      - name: web
        vips: ["127.1.0.1:{port}/tcp"]
        health_check: {check}
        real_servers:
{servers}
""")


def keepalived_config(path: str, n: int, port: int) -> None:
    out = ["global_defs {", "  router_id health_scale", "}", f"virtual_server 127.1.0.1 {port} {{",
           "  delay_loop 1", "  lb_algo rr", "  lb_kind DR", "  protocol TCP"]
    for i in range(n):
        # retry 1: one retry after a failed connect = down on the 2nd failure (fall 2).
        out += [f"  real_server {address(i)} {port} {{", "    weight 1",
                "    TCP_CHECK {", "      connect_timeout 0.5", "      retry 1", "      delay_before_retry 1",
                "    }", "  }"]
    out.append("}")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def downs(status_port: int) -> None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{status_port}/metrics", timeout=30).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("glb_director_health_transitions_total{") and 'from="up"' in line and 'to="down"' in line:
            total += float(line.rsplit(" ", 1)[1])
    print(int(total))


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "backend":
        backend(int(args[0]))
    elif cmd == "glb-config":
        glb_config(args[0], int(args[1]), args[2], int(args[3]), args[4], int(args[5]), *args[6:])
    elif cmd == "keepalived-config":
        keepalived_config(args[0], int(args[1]), int(args[2]))
    elif cmd == "downs":
        downs(int(args[0]))
    else:
        sys.exit(f"health_scale.py: unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
