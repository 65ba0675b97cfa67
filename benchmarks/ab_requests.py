"""A/B of the per-request path: 1-row requests from several client threads against the default server of two
checkouts, interleaved (A, B, A, B, ...) so that load on the machine hits both alike; requests/s per run and the
server's CPU milliseconds per request (its processes' user + system time over the measured window: on a shared
2-core machine requests/s swings by 2x from second to second, CPU per request much less), then the median and the
spread of each side and of the pairwise ratios.

    git worktree add /tmp/ab_old 0835d90
    python benchmarks/ab_requests.py --a /tmp/ab_old --b . --pairs 5 --clients 8 --seconds 20

Each run starts `torchrun --nproc_per_node 2 <checkout>/serve_reward_model.py` (the embedded default model, free
ports), waits for its ready line, sends for --seconds after a --warmup, and stops it.
"""

import argparse
import http.client
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

from live import free_port  # benchmarks/live.py


def start(checkout: Path, log: Path, cache: str):
    http_port = free_port()
    overrides = [f"server.http_port={http_port}", f"server.grpc_port={free_port()}",
                 f"server.metrics_port={free_port()}", f"model.cache_dir={cache}"]
    config = [checkout / "reward_server" / "config" / name for name in ("schema.py", "server.py")]
    if any(f.exists() and "api_port" in f.read_text(errors="replace") for f in config):
        overrides.append("server.api_port=0")  # a free one: the default 30000 may be taken on a shared machine
    env = {**os.environ, "PYTHONPATH": str(checkout), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", str(checkout / "serve_reward_model.py"), *overrides],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            cwd=checkout)
    deadline = time.monotonic() + 300
    while not re.search(r"^(ready after|serving models)", log.read_text(errors="replace"), re.M):  # new / old
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(log.read_text()[-3000:])
        time.sleep(0.5)
    return proc, http_port


def stop(proc) -> None:
    """torchrun and its ranks (each in a session of its own); rank 0's reaper takes Triton down."""
    ranks = [int(pid) for tid in os.listdir(f"/proc/{proc.pid}/task")
             for pid in open(f"/proc/{proc.pid}/task/{tid}/children").read().split()]
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    time.sleep(2)  # the reaper frees the ports


def server_cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by the live processes under `root` (torchrun): the ranks (each in a
    session of its own), Triton and its Python stubs (children of rank 0)."""
    stats = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(pid)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # after the name: state, ppid, ... utime, stime
    children = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    ticks, todo = 0, [root]
    while todo:
        pid = todo.pop()
        ticks += stats.get(pid, (0, 0))[1]
        todo.extend(children.get(pid, []))
    return ticks / os.sysconf("SC_CLK_TCK")


def load(port: int, clients: int, warmup: float, seconds: float, roots: Sequence[int] = ()) -> tuple:
    """Requests/s of `clients` threads sending 1-row requests back to back on keep-alive connections, and for each of
    `roots` (e.g. torchrun's pid) the CPU milliseconds per request of its process tree over the same window."""
    counts = [0] * clients
    begin = time.monotonic() + warmup
    end = begin + seconds
    cpu = {}

    def meter() -> None:
        time.sleep(max(0.0, begin - time.monotonic()))
        cpu["begin"] = [server_cpu_s(r) for r in roots]
        time.sleep(max(0.0, end - time.monotonic()))
        cpu["end"] = [server_cpu_s(r) for r in roots]

    def client(i: int) -> None:
        rng = random.Random(i)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while (now := time.monotonic()) < end:
            ids = " ".join(str(rng.randrange(4, 500)) for _ in range(rng.randrange(16, 128)))
            body = json.dumps({"inputs": [{"name": "token_ids", "shape": [1, 1], "datatype": "BYTES",
                                           "data": [ids]}]}).encode()
            conn.request("POST", "/v2/models/reward/infer", body=body)
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
            if now >= begin:
                counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)] + [threading.Thread(target=meter)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    served = sum(counts)
    return served / seconds, [1e3 * (b - a) / max(1, served) for a, b in zip(cpu["begin"], cpu["end"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="checkout A (e.g. a worktree of the old commit)")
    parser.add_argument("--b", required=True, help="checkout B")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ab-"))
    rates, cpus = {"A": [], "B": []}, {"A": [], "B": []}
    for pair in range(args.pairs):
        for side, checkout in (("A", args.a), ("B", args.b)) if pair % 2 == 0 else (("B", args.b), ("A", args.a)):
            proc, port = start(Path(checkout).resolve(), work / f"{side}{pair}.log", str(work / "cache"))
            try:
                rate, (cpu_ms,) = load(port, args.clients, args.warmup, args.seconds, roots=[proc.pid])
            finally:
                stop(proc)
            rates[side].append(rate)
            cpus[side].append(cpu_ms)
            print(f"pair {pair} {side}: {rate:.1f} requests/s, server CPU {cpu_ms:.2f} ms per request", flush=True)
    print("\n| side | runs (requests/s) | median | min-max | server CPU ms per request (runs) | median |")
    print("|---|---|---|---|---|---|")
    for side in "AB":
        r, c = rates[side], cpus[side]
        print(f"| {side} | {', '.join(f'{x:.0f}' for x in r)} | {statistics.median(r):.1f} | {min(r):.0f}-{max(r):.0f} | "
              f"{', '.join(f'{x:.2f}' for x in c)} | {statistics.median(c):.2f} |")
    for name, per in (("requests/s", rates), ("server CPU per request", cpus)):
        ratios = [b / a for a, b in zip(per["A"], per["B"])]
        print(f"\n{name}, B/A per pair: {', '.join(f'{x:.3f}' for x in ratios)}; median {statistics.median(ratios):.3f}, "
              f"min-max {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
