"""Run Triton's perf_analyzer (shipped in the tritonclient 2.51.0 wheel) against a live server and report
requests/s, tokens/s and latency per concurrency.

    python benchmarks/workload.py --out workload.json --n 2000 --vocab 128256
    REWARD_SERVER_ACCESS_TOKEN=... python benchmarks/perf.py --input workload.json --concurrency 1 8 64

perf_analyzer needs libb64.so.0d and libcudart.so.12; nvidia-pytriton carries both, and this script puts them
on LD_LIBRARY_PATH, so it runs on a CPU-only machine too. It reads Triton's statistics
API, which PyTriton protects with an access token: pass it in REWARD_SERVER_ACCESS_TOKEN (sent as a header).

Requests/s, tokens/s and latencies come from the send and answer time of every measured request
(perf_analyzer's --profile-export-file): the measured requests over the time from the first one's send to the last
one's answer. perf_analyzer's own figure (last column) divides by a window that ends on its polling tick, so a
short run reads low: 1,024 requests answered in 4.26 s were reported over a 5.0 s window (204.7 instead of 240.5
requests/s; CPU, tiny model, tree workload, docs/performance.md), an error that shrinks as a run grows longer.
"""

import argparse
import csv
import glob
import io
import json
import math
import os
import shutil
import site
import subprocess
import sys
import tempfile


def library_path() -> str:
    """perf_analyzer links libb64.so.0d and libcudart.so.12 by name; nvidia-pytriton ships both under hashed
    names, so link them under their plain names in a temporary directory."""
    alias = os.path.join(tempfile.gettempdir(), "perf-analyzer-libs")
    os.makedirs(alias, exist_ok=True)
    for sp in site.getsitepackages():
        for pattern, name in (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.12*", "libcudart.so.12")):
            found = glob.glob(os.path.join(sp, "nvidia_pytriton.libs", pattern))
            link = os.path.join(alias, name)
            if found and not os.path.exists(link):
                try:
                    os.symlink(found[0], link)
                except FileExistsError:  # another run made it first
                    pass
    return ":".join([alias, os.environ.get("LD_LIBRARY_PATH", "")])


def mean_tokens(input_json: str) -> float:
    with open(input_json) as f:
        rows = json.load(f)["data"]
    return sum(len(r["token_ids"]["content"][0].split()) for r in rows) / len(rows)


def from_timestamps(export_json: str) -> dict:
    """Requests/s over first send to last answer, and latency percentiles (nearest rank), from perf_analyzer's
    profile export."""
    with open(export_json) as f:
        requests = [r for e in json.load(f)["experiments"] for r in e["requests"] if r["response_timestamps"]]
    sent = [r["timestamp"] for r in requests]
    answered = [r["response_timestamps"][-1] for r in requests]
    latency = sorted((a - s) / 1e6 for s, a in zip(sent, answered))

    def percentile(q):
        return latency[max(0, math.ceil(q * len(latency)) - 1)]

    return {"infer_per_s": len(requests) / ((max(answered) - min(sent)) / 1e9), "p50_ms": percentile(0.5),
            "p99_ms": percentile(0.99), "requests": len(requests)}


def run(url: str, model: str, input_json: str, concurrency: int, request_count: int, token: str) -> dict:
    exe = shutil.which("perf_analyzer") or os.path.join(os.path.dirname(sys.executable), "perf_analyzer")
    with tempfile.TemporaryDirectory() as tmp:
        out, export = os.path.join(tmp, "perf.csv"), os.path.join(tmp, "requests.json")
        cmd = [exe, "-m", model, "-u", url, "-i", "http", "--input-data", input_json,
               "--concurrency-range", str(concurrency), "--request-count", str(request_count), "-f", out,
               "--profile-export-file", export]
        if token:
            cmd += ["-H", f"triton-access-token:{token}"]
        proc = subprocess.run(cmd, env={**os.environ, "LD_LIBRARY_PATH": library_path()},
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"perf_analyzer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        row = next(csv.DictReader(io.StringIO(open(out).read())))
        measured = from_timestamps(export)
    return {"concurrency": concurrency, **measured, "perf_analyzer_per_s": float(row["Inferences/Second"])}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="localhost:8000")
    p.add_argument("--model", default="reward")
    p.add_argument("--input", required=True, help="JSON from benchmarks/workload.py")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--requests", type=int, default=0, help="requests measured per concurrency (0: 8 x concurrency, >= 64)")
    p.add_argument("--label", default="server")
    a = p.parse_args()
    tokens = mean_tokens(a.input)
    token = os.environ.get("REWARD_SERVER_ACCESS_TOKEN", "")
    print("| label | concurrency | requests/s | tokens/s | p50 ms | p99 ms | perf_analyzer's requests/s |")
    print("|---|---|---|---|---|---|---|")
    for c in a.concurrency:
        n = a.requests or max(64, 8 * c)
        run(a.url, a.model, a.input, c, max(c, n // 4), token)  # warm-up, not reported
        r = run(a.url, a.model, a.input, c, n, token)
        print(f"| {a.label} | {c} | {r['infer_per_s']:.1f} | {r['infer_per_s'] * tokens:.0f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['perf_analyzer_per_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
