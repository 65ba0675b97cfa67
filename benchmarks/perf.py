"""Run Triton's perf_analyzer (shipped in the tritonclient 2.51.0 wheel) against a live server and report
requests/s, tokens/s and latency per concurrency.

    python benchmarks/workload.py --out workload.json --n 2000 --vocab 128256
    REWARD_SERVER_ACCESS_TOKEN=... python benchmarks/perf.py --input workload.json --concurrency 1 8 64

perf_analyzer needs libb64.so.0d (Debian's libb64-0d, or the copy inside nvidia-pytriton) and libcudart.so.12
(the nvidia-cuda-runtime-cu12 wheel); this script puts both on LD_LIBRARY_PATH. It reads Triton's statistics
API, which PyTriton protects with an access token: pass it in REWARD_SERVER_ACCESS_TOKEN (sent as a header).
"""

import argparse
import csv
import glob
import io
import json
import os
import shutil
import site
import subprocess
import sys
import tempfile


def library_path() -> str:
    dirs = []
    for sp in site.getsitepackages():
        dirs += glob.glob(os.path.join(sp, "nvidia", "cuda_runtime", "lib"))
        libs = glob.glob(os.path.join(sp, "nvidia_pytriton.libs", "libb64-*.so.0d"))
        if libs and not glob.glob("/usr/lib/*/libb64.so.0d"):
            alias = os.path.join(tempfile.gettempdir(), "perf-analyzer-libs")
            os.makedirs(alias, exist_ok=True)
            link = os.path.join(alias, "libb64.so.0d")
            if not os.path.exists(link):
                os.symlink(libs[0], link)
            dirs.append(alias)
    return ":".join(dirs + [os.environ.get("LD_LIBRARY_PATH", "")])


def mean_tokens(input_json: str) -> float:
    with open(input_json) as f:
        rows = json.load(f)["data"]
    return sum(len(r["token_ids"]["content"][0].split()) for r in rows) / len(rows)


def run(url: str, model: str, input_json: str, concurrency: int, request_count: int, token: str) -> dict:
    exe = shutil.which("perf_analyzer") or os.path.join(os.path.dirname(sys.executable), "perf_analyzer")
    with tempfile.NamedTemporaryFile(suffix=".csv") as out:
        cmd = [exe, "-m", model, "-u", url, "-i", "http", "--input-data", input_json,
               "--concurrency-range", str(concurrency), "--request-count", str(request_count), "-f", out.name]
        if token:
            cmd += ["-H", f"triton-access-token:{token}"]
        proc = subprocess.run(cmd, env={**os.environ, "LD_LIBRARY_PATH": library_path()},
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"perf_analyzer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        row = next(csv.DictReader(io.StringIO(open(out.name).read())))
    return {"concurrency": concurrency, "infer_per_s": float(row["Inferences/Second"]),
            "p50_ms": float(row["p50 latency"]) / 1000, "p99_ms": float(row["p99 latency"]) / 1000}


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
    print("| label | concurrency | requests/s | tokens/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for c in a.concurrency:
        n = a.requests or max(64, 8 * c)
        run(a.url, a.model, a.input, c, max(c, n // 4), token)  # warm-up, not reported
        r = run(a.url, a.model, a.input, c, n, token)
        print(f"| {a.label} | {c} | {r['infer_per_s']:.1f} | {r['infer_per_s'] * tokens:.0f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
