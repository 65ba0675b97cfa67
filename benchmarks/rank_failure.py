"""What clients see when a rank dies or hangs under load: start the server with torchrun, keep N client threads
sending requests (raw HTTP, like any client), SIGKILL or SIGSTOP rank 1 a few seconds in, and record for every
request in flight at the fault when and how it was answered, and when torchrun exited with which code.

  python benchmarks/rank_failure.py --fault kill --nproc 2 -- model.path=/tmp/rm8b parallel.tensor_parallel_size=2
Prints one JSON object (also written to --json).
"""

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np


def rank_pid(torchrun: int, rank: int) -> int:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if ppid == torchrun and env.get(b"RANK") == str(rank).encode():
            return int(pid)
    raise RuntimeError(f"rank {rank} not found")


def request(port: int, ids, timeout: float):
    body = json.dumps({"inputs": [{"name": "token_ids", "shape": [1, 1], "datatype": "BYTES",
                                   "data": [" ".join(map(str, ids))]}]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v2/models/reward/infer", body=body)
        response = conn.getresponse()
        data = response.read()
        return str(response.status), "" if response.status == 200 else json.loads(data).get("error", "")[:200]
    except (OSError, http.client.HTTPException) as exc:
        return "connection", repr(exc)[:200]
    finally:
        conn.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--fault", choices=["kill", "stop"], required=True)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--after-s", type=float, default=10.0, help="seconds of load before the fault")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--log", default="/tmp/rank_failure.log")
    p.add_argument("--json", default="")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    with open(args.log, "w") as log:
        torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
                                     "serve_reward_model.py", *args.overrides], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    ready_by = time.monotonic() + 600
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{args.port}/v2/models/reward/ready", timeout=2)
            break
        except OSError:
            if torchrun.poll() is not None or time.monotonic() > ready_by:
                sys.exit(f"server did not start; see {args.log}")
            time.sleep(0.5)

    rng = np.random.default_rng(0)
    records, lock, stop = [], threading.Lock(), threading.Event()

    def client():
        while not stop.is_set():
            ids = rng.integers(100, args.vocab - 100, int(rng.integers(200, 1500)))
            sent = time.monotonic()
            status, message = request(args.port, ids, timeout=120)
            with lock:
                records.append((sent, time.monotonic(), status, message))
            if status != "200":
                return  # like a client that stops on an error

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(args.after_s)
    victim = rank_pid(torchrun.pid, 1)
    fault_at = time.monotonic()
    os.kill(victim, signal.SIGKILL if args.fault == "kill" else signal.SIGSTOP)
    rc = torchrun.wait(timeout=300)
    exited = time.monotonic() - fault_at
    stop.set()
    for t in threads:
        t.join(timeout=130)
    if args.fault == "stop":
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    in_flight = [(done - fault_at, status, message) for sent, done, status, message in records
                 if sent < fault_at <= done]
    statuses = {}
    for _, status, _ in in_flight:
        statuses[status] = statuses.get(status, 0) + 1
    result = {
        "fault": args.fault, "overrides": args.overrides, "clients": args.clients,
        "scored_before_fault": sum(1 for _, done, s, _ in records if done < fault_at and s == "200"),
        "in_flight_at_fault": len(in_flight), "in_flight_statuses": statuses,
        "in_flight_answered_within_s": round(max((t for t, _, _ in in_flight), default=0.0), 2),
        "first_error_after_s": round(min((t for t, s, _ in in_flight if s != "200"), default=float("nan")), 2),
        "sample_message": next((m for _, s, m in in_flight if s != "200"), ""),
        "torchrun_exited_after_s": round(exited, 2), "torchrun_rc": rc,
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
