"""`python -m deploy.lab.forward`: a TCP port on this host's loopback that leads into a lab namespace.

The lab touches nothing in the root namespace's network, so a browser on the
host cannot reach the dashboard on the ops host (172.16.0.5). This process
listens on the host's loopback first, then moves itself (setns) into the ops
namespace: every connection it makes from then on starts there. No route,
address or firewall rule of the host changes; stopping the process undoes it.

    python -m deploy.lab.forward --listen 127.0.0.1:9180 --netns glb-lab-ops --to 172.16.0.5:9180
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from deploy.lab import net
from deploy.lab.net import LabError


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve(listen: tuple[str, int], netns: str, to: tuple[str, int]) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.open_connection(*to)
        except OSError:
            w.close()
            return
        await asyncio.gather(_pipe(r, w2), _pipe(r2, w))

    server = await asyncio.start_server(handle, *listen)  # bound in the host's namespace...
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    # ...and every connection made from now on starts in the lab's (asyncio: all in this one thread).
    with net.entered(netns):
        async with server:
            await stop.wait()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.lab.forward", description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", type=_hostport, required=True, metavar="HOST:PORT")
    ap.add_argument("--netns", required=True, metavar="NAME")
    ap.add_argument("--to", type=_hostport, required=True, metavar="HOST:PORT")
    args = ap.parse_args(argv)
    try:
        asyncio.run(serve(args.listen, args.netns, args.to))
    except (OSError, LabError) as e:
        print(f"forward: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
