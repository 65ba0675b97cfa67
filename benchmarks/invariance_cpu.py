"""The cost of batch-invariant mode (batching.batch_invariant, docs/invariance.md) on the CPU, in process: tokens/s
(as sent, before sharing) of the scorer with the mode on and off on the same model and sequences, called with
--chunk sequences at a time (one scorer call per dynamic batch, as the server's forwards), a fresh scorer (empty
prefix cache) for every pass, the passes of the two modes interleaved so that a loaded machine hits both alike;
the best pass of each mode, by wall time and by the process's CPU time (steadier on a shared machine). Also
checks the two modes against each other (max |diff|) and the mode's rewards alone against in the run (equal).

  rlhf  48 independent sequences of 50..600 tokens
  grpo  6 prompts of 300 tokens x 8 answers of 50..400 tokens
  grpo_short  the same with answers of 10..60 tokens (most of every sequence shared)
  tree  4 questions of 150..400 tokens, 3 depths x 4 candidate steps of 30..120 tokens (benchmarks/workload.py)

    PYTHONPATH=. python benchmarks/invariance_cpu.py --passes 5 --json /tmp/invariance_cpu.json
"""

import argparse
import json
import sys
import time

import numpy as np
import torch

from reward_server.config import BatchingConfig
from reward_server.scoring.readout import LastToken
from reward_server.scoring.scorer import build_scorer
from workload import tree


def model_4x256(seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096, pad_token_id=0,
                      num_labels=1)
    model = LlamaForSequenceClassification(cfg).eval()
    model.config._attn_implementation = "sdpa"
    return model


def workloads(seed: int = 0):
    rng = np.random.default_rng(seed)

    def ids(n):
        return rng.integers(3, 512, int(n)).astype(np.int64)

    rlhf = [ids(n) for n in rng.integers(50, 601, 48)]
    grpo, short = [], []
    for _ in range(6):
        prompt = ids(300)
        grpo += [np.concatenate([prompt, ids(n)]) for n in rng.integers(50, 401, 8)]
    for _ in range(6):
        prompt = ids(300)
        short += [np.concatenate([prompt, ids(n)]) for n in rng.integers(10, 61, 8)]
    return {"rlhf": rlhf, "grpo": grpo, "grpo_short": short, "tree": tree(48, 512, seed, beams=4, depth=3, trees=4)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passes", type=int, default=5, help="timed passes per mode and workload (best one reported)")
    p.add_argument("--chunk", type=int, default=16, help="sequences per scorer call")
    p.add_argument("--budget", type=int, default=16384, help="batching.max_tokens_per_forward")
    p.add_argument("--workload", nargs="+", default=["rlhf", "grpo", "grpo_short", "tree"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeat", type=int, default=1, help="each pass scores the workload this many times (a fresh "
                   "scorer each time): longer passes, less noise")
    p.add_argument("--json", default="")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = model_4x256()
    pad = model.config.pad_token_id

    def scorer(on):
        batching = BatchingConfig(max_tokens_per_forward=a.budget, batch_invariant=on)
        return build_scorer(model, LastToken(model.score, 1, pad), batching, pad, torch.device("cpu"))

    rows = []
    for name, seqs in workloads().items():
        if name not in a.workload:
            continue
        tensors = [torch.from_numpy(s) for s in seqs]
        chunks = [tensors[i:i + a.chunk] for i in range(0, len(tensors), a.chunk)]
        tokens = sum(len(s) for s in seqs)
        best, cpu, outs, computed = {True: np.inf, False: np.inf}, {True: np.inf, False: np.inf}, {}, {}
        for k in range(a.passes + 1):  # pass 0: warm-up
            for on in (False, True):
                start, start_cpu = time.perf_counter(), time.process_time()
                for _ in range(a.repeat):
                    s = scorer(on)
                    outs[on] = torch.cat([s(c) for c in chunks]).numpy()
                if k:
                    best[on] = min(best[on], time.perf_counter() - start)
                    cpu[on] = min(cpu[on], time.process_time() - start_cpu)
                computed[on] = s.computed_tokens
        alone = scorer(True)
        same = all(np.array_equal(alone([t]).numpy()[0], outs[True][i]) for i, t in enumerate(tensors))
        tokens *= a.repeat
        row = {"workload": name, "sequences": len(seqs), "tokens": tokens,
               "off_tokens_per_s": round(tokens / best[False]), "on_tokens_per_s": round(tokens / best[True]),
               "on_vs_off": round(best[False] / best[True], 3), "on_vs_off_cpu_time": round(cpu[False] / cpu[True], 3),
               "computed_off": computed[False],
               "computed_on": computed[True], "max_abs_diff_on_vs_off": float(np.abs(outs[True] - outs[False]).max()),
               "on_alone_equal": same}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"argv": sys.argv, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
