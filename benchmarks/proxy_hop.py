"""What a reverse proxy in front of Triton's HTTP port would cost (issue #29): Triton's HTTP server resets connections
while it stops and never answers `Connection: close`, so the only way to drain its port without a closed connection
is something of ours on that port. This measures the cheapest such thing, an aiohttp reverse proxy in a process of its
own (keep-alive to Triton, bodies passed through), against the same server reached directly: ab_requests' 1-row
load, runs alternating direct / proxied on one server, requests/s and CPU milliseconds per request of the server and
of the proxy.

    python benchmarks/proxy_hop.py --rounds 4 --clients 8 --seconds 15

Not part of the server: a measurement for the decision whether to put one there.
"""

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ab_requests import load, start, stop  # benchmarks/ab_requests.py
from live import free_port  # benchmarks/live.py

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "content-length", "host"}


def serve_proxy(listen: int, upstream: int) -> None:
    """The proxy: every request to 127.0.0.1:`listen` goes to 127.0.0.1:`upstream` and its answer comes back."""
    from aiohttp import ClientSession, TCPConnector, web

    async def main() -> None:
        session = ClientSession(connector=TCPConnector(limit=0), auto_decompress=False)
        base = f"http://127.0.0.1:{upstream}"

        async def forward(request: web.Request) -> web.Response:
            body = await request.read()
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
            async with session.request(request.method, base + request.path_qs, data=body, headers=headers) as r:
                data = await r.read()
                out = {k: v for k, v in r.headers.items() if k.lower() not in HOP_BY_HOP}
            return web.Response(status=r.status, body=data, headers=out)

        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", listen).start()
        await asyncio.Event().wait()

    asyncio.run(main())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--serve-proxy", nargs=2, type=int, metavar=("LISTEN", "UPSTREAM"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve_proxy:
        serve_proxy(*a.serve_proxy)
        return
    work = Path(tempfile.mkdtemp(prefix="proxy-hop-"))
    server, port = start(Path(__file__).resolve().parents[1], work / "server.log", str(work / "cache"))
    proxy_port = free_port()
    proxy = subprocess.Popen([sys.executable, __file__, "--serve-proxy", str(proxy_port), str(port)],
                             start_new_session=True)
    time.sleep(2.0)
    runs = {"direct": [], "proxied": []}
    try:
        for r in range(a.rounds):
            for kind in ("direct", "proxied") if r % 2 == 0 else ("proxied", "direct"):
                rate, (server_ms, proxy_ms) = load(port if kind == "direct" else proxy_port, a.clients, a.warmup,
                                                   a.seconds, roots=[server.pid, proxy.pid])
                runs[kind].append((rate, server_ms, proxy_ms))
                print(f"round {r} {kind}: {rate:.1f} requests/s, server CPU {server_ms:.2f} ms per request, "
                      f"proxy CPU {runs[kind][-1][2]:.2f} ms per request", flush=True)
    finally:
        os.killpg(proxy.pid, signal.SIGKILL)
        stop(server)
    print("\n| path | requests/s (runs) | median | server CPU ms per request | proxy CPU ms per request |")
    print("|---|---|---|---|---|")
    for kind, rows in runs.items():
        print(f"| {kind} | {', '.join(f'{x[0]:.0f}' for x in rows)} | {statistics.median(x[0] for x in rows):.1f} | "
              f"{statistics.median(x[1] for x in rows):.2f} | {statistics.median(x[2] for x in rows):.2f} |")


if __name__ == "__main__":
    main()
