"""RLHF-shaped workload: one sequence per request, prompt 64-1024 + response 16-2048 tokens, long-tailed
(log-normal, clipped), fixed seed. Writes perf_analyzer --input-data JSON for the native `reward` model.

    python benchmarks/workload.py --out workload.json --n 2000 --vocab 128256
    python benchmarks/workload.py --out fixed512.json --n 500 --fixed 512
"""

import argparse
import json

import numpy as np


def lengths(n: int, seed: int = 0, fixed: int = 0) -> np.ndarray:
    if fixed:
        return np.full(n, fixed)
    rng = np.random.default_rng(seed)
    prompt = np.clip(rng.lognormal(np.log(256), 0.7, n), 64, 1024).astype(int)
    response = np.clip(rng.lognormal(np.log(384), 0.9, n), 16, 2048).astype(int)
    return prompt + response


def sequences(n: int, vocab: int, seed: int = 0, fixed: int = 0):
    rng = np.random.default_rng(seed + 1)
    return [rng.integers(3, vocab, int(k)) for k in lengths(n, seed, fixed)]


def perf_analyzer_json(seqs) -> dict:
    return {"data": [{"token_ids": {"content": [" ".join(map(str, s.tolist()))], "shape": [1]}} for s in seqs]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fixed", type=int, default=0, help="every sequence this many tokens (0: RLHF mix)")
    a = p.parse_args()
    seqs = sequences(a.n, a.vocab, a.seed, a.fixed)
    with open(a.out, "w") as f:
        json.dump(perf_analyzer_json(seqs), f)
    n_tok = np.array([len(s) for s in seqs])
    print(f"{a.out}: {a.n} sequences, mean {n_tok.mean():.0f} tokens, p50 {np.median(n_tok):.0f}, "
          f"p99 {np.percentile(n_tok, 99):.0f}, max {n_tok.max()}")


if __name__ == "__main__":
    main()
