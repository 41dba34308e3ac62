"""A real server's HTTP service for the lab: says which server answered.

    python -m deploy.lab.httpd --name dc1-rs1 [--port 80]

Listens on every address of its namespace (so on the real server's own
address for health checks and on the VIP that `glb realserver setup` put on
`lo` or the tunnel device). Every path answers 200 with a one-line body and
an ``X-Served-By`` header; ``/healthz`` is what the directors check.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, default=80)
    args = ap.parse_args(argv)
    name = args.name

    class Handler(BaseHTTPRequestHandler):
        server_version = "glb-lab-httpd"
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            host = self.headers.get("Host", "")
            local = self.connection.getsockname()[0]
            body = f"{name} answered {self.path} (to {self.client_address[0]}, via {local}, Host {host})\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Served-By", name)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *a) -> None:  # quiet: the demo prints its own timeline
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = socket.AF_INET

    server = Server(("0.0.0.0", args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever(poll_interval=0.2)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
