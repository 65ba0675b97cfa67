"""Benchmark workloads, one sequence per request, fixed seed; writes perf_analyzer --input-data JSON for the
native `reward` model. perf_analyzer takes the entries in order, so requests that are neighbours in the file are
in flight together.

  rlhf   prompt 64-1024 + response 16-2048 tokens, long-tailed (log-normal, clipped): nothing shared
  fixed  every sequence --fixed tokens
  grpo   GRPO / RLOO groups: a prompt (log-normal, mean ~1,000, clipped [64, 4096]) and G = --group responses
         (log-normal, mean ~500, clipped [16, 2048]); a group's G requests are consecutive, so sent together
  tree   tree search shaped like beam search / ETS with a PRM: a question of 150-400 tokens, --beams candidate
         next steps of 30-120 tokens at each of --depth depths; every candidate of a depth extends the path chosen
         so far (question + one candidate of each earlier depth), each request is one candidate path. --trees
         trees advance together, depth by depth, so a depth's candidates of those trees are sent together.
--step-tag ID ends every step with that token id (tree: each step; others: every --step-tokens tokens on
average), for process reward models; random tokens never equal it. The token count is the same with or without
tags, so a PRM and a scalar RM can be timed on the same tokens.

    python benchmarks/workload.py --out rlhf.json --n 1000 --vocab 128256
    python benchmarks/workload.py --kind grpo --out grpo.json --n 1000 --vocab 128256
    python benchmarks/workload.py --kind tree --out tree.json --n 1024 --vocab 128256 --step-tag 12902
"""

import argparse
import json
from typing import List, Optional

import numpy as np


def lengths(n: int, seed: int = 0, fixed: int = 0) -> np.ndarray:
    if fixed:
        return np.full(n, fixed)
    rng = np.random.default_rng(seed)
    prompt = np.clip(rng.lognormal(np.log(256), 0.7, n), 64, 1024).astype(int)
    response = np.clip(rng.lognormal(np.log(384), 0.9, n), 16, 2048).astype(int)
    return prompt + response


class Tokens:
    """Random token ids in [3, vocab), never the step tag."""

    def __init__(self, vocab: int, seed: int, tag: Optional[int]):
        self.rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.tag = tag

    def __call__(self, n: int) -> np.ndarray:
        ids = self.rng.integers(3, self.vocab, int(n))
        if self.tag is not None:
            ids[ids == self.tag] = 3 if self.tag != 3 else 4
        return ids

    def step(self, n: int) -> np.ndarray:
        """n tokens ending with the tag (when there is one)."""
        ids = self(n)
        if self.tag is not None:
            ids[-1] = self.tag
        return ids


def lognormal(rng, mean: float, sigma: float, lo: int, hi: int, n: int) -> np.ndarray:
    return np.clip(rng.lognormal(np.log(mean) - sigma ** 2 / 2, sigma, n), lo, hi).astype(int)


def tag_every(seqs: List[np.ndarray], tag: Optional[int], step_tokens: int, seed: int) -> List[np.ndarray]:
    """End steps of about `step_tokens` tokens (and the sequence) with the tag, in place of the token there."""
    if tag is None:
        return seqs
    rng = np.random.default_rng(seed + 7)
    for s in seqs:
        at = np.cumsum(rng.integers(step_tokens // 2, step_tokens * 3 // 2 + 1, len(s) // max(1, step_tokens // 2) + 1))
        s[at[at < len(s)] - 1] = tag
        s[-1] = tag
    return seqs


def sequences(n: int, vocab: int, seed: int = 0, fixed: int = 0, tag: Optional[int] = None, step_tokens: int = 100):
    """The rlhf (or fixed-length) workload."""
    tokens = Tokens(vocab, seed + 1, tag)
    return tag_every([tokens(k) for k in lengths(n, seed, fixed)], tag, step_tokens, seed)


def grpo(n: int, vocab: int, seed: int = 0, group: int = 8, tag: Optional[int] = None, step_tokens: int = 100):
    rng, tokens = np.random.default_rng(seed), Tokens(vocab, seed + 1, tag)
    out = []
    for prompt_len in lognormal(rng, 1000, 0.6, 64, 4096, -(-n // group)):
        prompt = tokens(prompt_len)
        for response_len in lognormal(rng, 500, 0.7, 16, 2048, group):
            out.append(np.concatenate([prompt, tokens(response_len)]))
    return tag_every(out[:n], tag, step_tokens, seed)


def tree(n: int, vocab: int, seed: int = 0, beams: int = 16, depth: int = 8, trees: int = 4,
         tag: Optional[int] = None):
    rng, tokens = np.random.default_rng(seed), Tokens(vocab, seed + 1, tag)
    out = []
    while len(out) < n:
        paths = [tokens(rng.integers(150, 401)) for _ in range(trees)]  # each tree's question, then chosen path
        for _ in range(depth):
            for t in range(trees):
                candidates = [np.concatenate([paths[t], tokens.step(rng.integers(30, 121))]) for _ in range(beams)]
                out += candidates
                paths[t] = candidates[rng.integers(beams)]  # the search goes on from one of them
    return out[:n]


def perf_analyzer_json(seqs) -> dict:
    return {"data": [{"token_ids": {"content": [" ".join(map(str, s.tolist()))], "shape": [1]}} for s in seqs]}


def make(kind: str, n: int, vocab: int, seed: int = 0, fixed: int = 0, tag: Optional[int] = None,
         step_tokens: int = 100, group: int = 8, beams: int = 16, depth: int = 8, trees: int = 4):
    if kind == "grpo":
        return grpo(n, vocab, seed, group, tag, step_tokens)
    if kind == "tree":
        return tree(n, vocab, seed, beams, depth, trees, tag)
    return sequences(n, vocab, seed, fixed if kind == "fixed" else 0, tag, step_tokens)


def trie_tokens(seqs) -> int:
    """Tokens left when every prefix shared by consecutive requests is counted once (sorted neighbours)."""
    keys = sorted(s.tobytes() for s in seqs)
    total = len(keys[0]) // 8 if keys else 0
    for a, b in zip(keys, keys[1:]):
        x, y = np.frombuffer(a, np.int64), np.frombuffer(b, np.int64)
        m = min(len(x), len(y))
        diff = np.flatnonzero(x[:m] != y[:m])
        total += len(y) - (int(diff[0]) if diff.size else m)
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--kind", default="rlhf", choices=["rlhf", "fixed", "grpo", "tree"])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fixed", type=int, default=0, help="every sequence this many tokens (implies --kind fixed)")
    p.add_argument("--step-tag", type=int, default=None, help="token id that ends each step (PRM workloads)")
    p.add_argument("--step-tokens", type=int, default=100, help="rlhf / grpo: mean step length with --step-tag")
    p.add_argument("--group", type=int, default=8, help="grpo: responses per prompt")
    p.add_argument("--beams", type=int, default=16, help="tree: candidates per depth")
    p.add_argument("--depth", type=int, default=8, help="tree: steps per solution")
    p.add_argument("--trees", type=int, default=4, help="tree: trees searched together")
    a = p.parse_args()
    kind = "fixed" if a.fixed else a.kind
    seqs = make(kind, a.n, a.vocab, a.seed, a.fixed, a.step_tag, a.step_tokens, a.group, a.beams, a.depth, a.trees)
    with open(a.out, "w") as f:
        json.dump(perf_analyzer_json(seqs), f)
    n_tok = np.array([len(s) for s in seqs])
    window = [trie_tokens(seqs[i:i + 64]) for i in range(0, len(seqs), 64)]
    print(f"{a.out}: {kind}, {len(seqs)} sequences, mean {n_tok.mean():.0f} tokens, p50 {np.median(n_tok):.0f}, "
          f"p99 {np.percentile(n_tok, 99):.0f}, max {n_tok.max()}; shared within each 64 consecutive requests: "
          f"{n_tok.sum() / sum(window):.2f}x fewer tokens")


if __name__ == "__main__":
    main()
