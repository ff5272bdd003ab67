"""A TCP proxy that holds every chunk of data for DELAY seconds in each direction: a
database server "across a network" on one machine (this machine's kernel has no netem),
for benchmarks/backends.py.

    python benchmarks/delay_proxy.py LISTEN_PORT TARGET_HOST:PORT DELAY_SECONDS

e.g. ``python benchmarks/delay_proxy.py 54330 127.0.0.1:54329 0.0005 &`` then point
``--postgres`` at port 54330. What a round trip then costs is what backends.py prints in
its header (a statement's median round trip): the proxy's own event loop adds to the
delay (about 2.5 ms per round trip on the 2-core benchmark machine, whatever DELAY), so
quote the measured round trip, not DELAY. Order is kept: every chunk waits the same.
"""

from __future__ import annotations

import asyncio
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               delay: float) -> None:
    loop = asyncio.get_running_loop()
    try:
        while data := await reader.read(65536):
            loop.call_later(delay, writer.write, data)
    except OSError:
        pass  # a side closed: close the other after what is in flight
    finally:
        loop.call_later(2 * delay, writer.close)


async def serve(listen: int, host: str, port: int, delay: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, server_w, delay), pipe(server_r, client_w, delay))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


def main() -> None:
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    host, _, port = sys.argv[2].rpartition(":")
    asyncio.run(serve(int(sys.argv[1]), host or "127.0.0.1", int(port), float(sys.argv[3])))


if __name__ == "__main__":
    main()
