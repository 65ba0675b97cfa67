"""Per-sample load through the API port's POST /classify against the same rows through Triton's `reward` model, from
one Python load generator: --callers threads, each with a keep-alive connection, take the next sample of a GRPO
workload (benchmarks/workload.py: a group's --group samples are consecutive, so they are sent together by different
callers, as verl's and slime's per-sample requests are) and send it as one request, until every sample is answered.
Standard library only (threads, http.client, json), so it runs on a GPU box without aiohttp or requests; the server's
API port itself needs aiohttp.

    torchrun --nproc_per_node 2 serve_reward_model.py &     # Triton on :8000, the API port on :30000, metrics :8002
    python benchmarks/api_load.py --triton localhost:8000 --api localhost:30000 --metrics localhost:8002 \\
        --n 512 --callers 64 --vocab 512 --max-tokens 4096

Rounds alternate the order of the two paths (Triton then API, API then Triton, ...) so that drift on a shared machine
hits both alike. Prints one row per path and round, then the API / Triton tokens/s ratio: over all rounds (total
tokens over total seconds of each path), and the median of the rounds' own ratios (robust to one disturbed run). tokens/s counts the tokens of the answered samples (received, not computed); with --metrics,
the tokens the server computed for each run (after prefix sharing) come from its counters. The two paths' rewards for
the same sample are compared (max |difference| printed). With an inference token, pass --token (sent in both the
Authorization and the triton-access-token header).
"""

import argparse
import http.client
import json
import os
import re
import sys
import threading
import time
import urllib.request
from typing import List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workload import grpo  # noqa: E402


class Path:
    """One way of scoring a sample: its request body and how to read the reward from the answer."""

    def __init__(self, name: str, address: str, route: str, headers: dict):
        self.name, self.host, self.route, self.headers = name, address.removeprefix("http://"), route, headers

    def body(self, ids: List[int]) -> bytes:
        raise NotImplementedError

    def reward(self, answer: dict) -> float:
        raise NotImplementedError


class Triton(Path):
    def body(self, ids):
        return json.dumps({"inputs": [{"name": "token_ids", "shape": [1, 1], "datatype": "BYTES",
                                       "data": [" ".join(map(str, ids))]}],
                           "outputs": [{"name": "rewards"}, {"name": "error"}]}).encode()

    def reward(self, answer):
        outputs = {o["name"]: o["data"] for o in answer["outputs"]}
        assert outputs["error"] == [""], outputs["error"]
        return float(outputs["rewards"][0])


class Classify(Path):
    def body(self, ids):
        return json.dumps({"model": "api-load", "input": ids, "use_activation": False}).encode()

    def reward(self, answer):
        return float(answer["data"][-1]["probs"][-1])  # verl's reading


def computed_tokens(metrics: Optional[str]) -> Optional[float]:
    if not metrics:
        return None
    with urllib.request.urlopen(f"http://{metrics.removeprefix('http://')}/metrics", timeout=30) as response:
        found = re.search(r"^reward_server_tokens_computed_total (\S+)$", response.read().decode(), re.M)
    return float(found.group(1)) if found else None


def run(path: Path, samples: List[List[int]], callers: int, timeout_s: float) -> dict:
    """Every sample once through `path` from `callers` threads; timings and rewards."""
    rewards: List[Optional[float]] = [None] * len(samples)
    sent, answered = [0.0] * len(samples), [0.0] * len(samples)
    bodies = [path.body(s) for s in samples]  # encoded before the clock starts, for both paths alike
    next_index, lock, errors = [0], threading.Lock(), []

    def caller():
        conn = http.client.HTTPConnection(path.host, timeout=timeout_s)
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(samples):
                break
            for attempt in range(3):
                try:
                    sent[i] = time.perf_counter()
                    conn.request("POST", path.route, bodies[i], {"Content-Type": "application/json", **path.headers})
                    response = conn.getresponse()
                    data = response.read()
                    answered[i] = time.perf_counter()
                    if response.status != 200:
                        raise RuntimeError(f"{path.name}: HTTP {response.status}: {data[:300]!r}")
                    rewards[i] = path.reward(json.loads(data))
                    break
                except (OSError, http.client.HTTPException) as exc:  # a dropped keep-alive connection: reconnect
                    conn.close()
                    conn = http.client.HTTPConnection(path.host, timeout=timeout_s)
                    if attempt == 2:
                        errors.append(f"{path.name}: {exc}")
                except Exception as exc:
                    errors.append(str(exc))
                    break
        conn.close()

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} request(s) failed; the first: {errors[0]}")
    latency = np.sort(np.array(answered) - np.array(sent)) * 1e3
    seconds = max(answered) - min(sent)
    tokens = sum(len(s) for s in samples)
    return {"path": path.name, "requests": len(samples), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "requests_per_s": len(samples) / seconds,
            "p50_ms": float(np.percentile(latency, 50)), "p99_ms": float(np.percentile(latency, 99)),
            "rewards": rewards}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--triton", default="localhost:8000", help="Triton's HTTP address")
    p.add_argument("--api", default="localhost:30000", help="the API port's address")
    p.add_argument("--metrics", default="", help="the metrics port's address: tokens computed per run")
    p.add_argument("--n", type=int, default=512, help="samples per run")
    p.add_argument("--callers", type=int, default=64)
    p.add_argument("--group", type=int, default=8, help="GRPO group size")
    p.add_argument("--vocab", type=int, default=512, help="the model's vocabulary (token ids drawn below it)")
    p.add_argument("--max-tokens", type=int, default=4096, help="samples cut to this many tokens (model.max_length)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of both paths, the order alternating")
    p.add_argument("--warmup", type=int, default=16, help="samples through each path first, not timed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--token", default=os.environ.get("REWARD_SERVER_INFERENCE_TOKEN", ""))
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    p.add_argument("--json", default="", help="write the rows here too")
    a = p.parse_args()

    headers = {"Authorization": f"Bearer {a.token}", "triton-access-token": a.token} if a.token else {}
    paths = {"triton": Triton("Triton reward", a.triton, "/v2/models/reward/infer", headers),
             "api": Classify("API /classify", a.api, "/classify", headers)}
    samples = [s[: a.max_tokens].tolist() for s in grpo(a.n + a.warmup, a.vocab, a.seed, a.group)]
    warm, samples = samples[: a.warmup], samples[a.warmup:]
    for path in paths.values():
        run(path, warm, min(a.callers, max(1, len(warm))), a.timeout)
    rows = []
    for r in range(a.rounds):
        for key in (("triton", "api") if r % 2 == 0 else ("api", "triton")):
            before = computed_tokens(a.metrics)
            row = run(paths[key], samples, a.callers, a.timeout)
            after = computed_tokens(a.metrics)
            row.update(round=r + 1, computed=None if before is None or after is None else after - before)
            rows.append(row)
    print(f"{a.n} GRPO samples (groups of {a.group}, {sum(len(s) for s in samples):,} tokens, mean "
          f"{np.mean([len(s) for s in samples]):.0f}), one per request, {a.callers} callers\n")
    print("| path | round | requests | tokens | seconds | tokens/s | requests/s | p50 ms | p99 ms | tokens computed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        computed = f"{row['computed']:,.0f}" if row["computed"] is not None else "-"
        print(f"| {row['path']} | {row['round']} | {row['requests']} | {row['tokens']:,} | {row['seconds']:.2f} | "
              f"{row['tokens_per_s']:,.0f} | {row['requests_per_s']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
              f"{computed} |")
    totals = {}
    for key, name in (("triton", paths["triton"].name), ("api", paths["api"].name)):
        mine = [row for row in rows if row["path"] == name]
        totals[key] = sum(row["tokens"] for row in mine) / sum(row["seconds"] for row in mine)
    ratio = totals["api"] / totals["triton"]
    per_round = [next(r["tokens_per_s"] for r in rows if r["round"] == k and r["path"] == paths["api"].name) /
                 next(r["tokens_per_s"] for r in rows if r["round"] == k and r["path"] == paths["triton"].name)
                 for k in range(1, a.rounds + 1)]
    by_path = {row["path"]: row["rewards"] for row in rows}
    diff = max(abs(x - y) for x, y in zip(by_path[paths["api"].name], by_path[paths["triton"].name]))
    print(f"\nAPI /classify vs Triton reward: tokens/s {totals['api']:,.0f} vs {totals['triton']:,.0f}, ratio {ratio:.3f}; "
          f"rewards max |difference| {diff:.2g}")
    print(f"per round: {', '.join(f'{x:.3f}' for x in per_round)}; median {float(np.median(per_round)):.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": [{k: v for k, v in row.items() if k != "rewards"} for row in rows], "ratio": ratio,
                       "per_round": per_round, "max_abs_diff": diff}, f, indent=1)


if __name__ == "__main__":
    main()
