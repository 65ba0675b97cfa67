"""In-process baselines: what a user gets with no server at all, on the same model and tokens.

  dense    forward of [B, L] real tokens (no padding): the GPU's best case at that length
  workload a workload of benchmarks/workload.py (--workload rlhf | grpo | tree) scored by each layout, attention
           kernel and prefix-sharing setting, either in chunks of --chunk sequences (one scorer call per dynamic
           batch) or, with --schedule leader, in the forwards the server's leader would cut from the whole
           workload (engine.plan_forward: each forward filled to the token budget of tokens computed): the same
           forwards as the server at full load, with no server. Reports tokens/s as sent (before sharing).
--compile both repeats everything after torch.compile of the decoder layers (model.compile in the server).
It also checks that each scorer's rewards equal a plain per-sequence transformers forward.

    python benchmarks/inprocess.py --model /tmp/rm8b --n 512 --chunk 64
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForSequenceClassification

from collections import deque

from reward_server.config import BatchingConfig
from reward_server.engine import Work, plan_forward
from reward_server.loading.model import compile_layers
from reward_server.scoring.readout import LastToken
from reward_server.scoring.scorer import build_scorer
from workload import make


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat=1):
    fn()  # warm-up (kernels, compilation)
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--budget", type=int, nargs="+", default=[16384])
    p.add_argument("--layouts", nargs="+", default=["packed", "padded"])
    p.add_argument("--row-tokens", type=int, nargs="+", default=[4096], help="packed row lengths to try")
    p.add_argument("--attn", nargs="+", default=["sdpa"])
    p.add_argument("--dense", nargs="+", default=["32x512", "8x2048"], help="BxL shapes for the dense baseline")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    p.add_argument("--repeat", type=int, default=1, help="timed passes over the workload after the warm-up pass")
    p.add_argument("--schedule", nargs="+", default=["chunk"], choices=["chunk", "leader"])
    p.add_argument("--compile", default="off", choices=["off", "on", "both"],
                   help="torch.compile the decoder layers: off, on, or both (uncompiled first)")
    p.add_argument("--uncompiled", default="all", choices=["all", "dense"],
                   help="with --compile both: what the uncompiled pass runs (dense: only the dense baseline)")
    p.add_argument("--workload", nargs="+", default=["rlhf"], choices=["rlhf", "grpo", "tree"])
    p.add_argument("--sharing", nargs="+", default=["on"], choices=["on", "off"], help="prefix sharing (packed)")
    p.add_argument("--json", default="")
    a = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForSequenceClassification.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    cfg = model.config
    n_linear = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    results = []

    def report(name, tokens, seconds, **extra):
        tps = tokens / seconds
        mfu = 2 * n_linear * tps / (a.peak_tflops * 1e12)
        row = {"name": name, "tokens_per_s": round(tps), "mfu_linear": round(mfu, 3), **extra}
        results.append(row)
        print(json.dumps(row), flush=True)

    vocab = cfg.vocab_size
    workloads = {w: [torch.as_tensor(s) for s in make(w, a.n, vocab)] for w in a.workload}
    plain = {}
    with torch.inference_mode():
        for w, seqs in workloads.items():
            plain[w] = torch.stack([model(input_ids=s[None].to(device)).logits[0].float() for s in seqs[:16]])

    def forwards(seqs, schedule, budget, sharing):
        if schedule == "chunk":
            return [seqs[i:i + a.chunk] for i in range(0, len(seqs), a.chunk)]
        pending, out = deque([Work(seqs, None, False)]), []
        while pending[0].untaken:
            out.append([seqs[i] for _, i in plan_forward(pending, budget, sharing)[0]])
        return out

    for compiled in {"off": [False], "on": [True], "both": [False, True]}[a.compile]:
        tag = " compiled" if compiled else ""
        if compiled:
            compile_layers(model)
        model.set_attn_implementation("sdpa")  # dense causal rows: sdpa's flash kernel
        with torch.inference_mode():
            for shape in a.dense:
                b, length = map(int, shape.split("x"))
                ids = torch.randint(3, vocab, (b, length), device=device)
                seconds = timed(lambda: model.base_model(input_ids=ids, use_cache=False), repeat=3)
                report(f"dense {shape}{tag}", b * length, seconds)
        for attn in a.attn if compiled or a.uncompiled == "all" else []:
            model.set_attn_implementation(attn)
            settings = [(layout, b, r, sharing) for layout in a.layouts for b in a.budget
                        for r in (a.row_tokens if layout == "packed" else [0])
                        for sharing in (a.sharing if layout == "packed" else ["off"])]
            for (layout, budget, row, sharing), (w, seqs) in [(s, w) for s in settings for w in workloads.items()]:
                batching = BatchingConfig(layout=layout, max_tokens_per_forward=budget, packed_row_tokens=row,
                                          prefix_sharing=sharing == "on")
                scorer = build_scorer(model, LastToken(model.score, cfg.num_labels, cfg.pad_token_id), batching, cfg.pad_token_id,
                                      device)
                n_tokens = sum(len(s) for s in seqs)
                for schedule in a.schedule:
                    calls = forwards(seqs, schedule, budget, sharing == "on")
                    name = f"{w} {layout} {attn} sharing {sharing} budget {budget}" + (f" row {row}" if row else "") \
                        + (f" chunk {a.chunk}" if schedule == "chunk" else " leader") + tag
                    try:
                        start = time.perf_counter()
                        seconds = timed(lambda: [scorer(c) for c in calls], repeat=a.repeat)
                        first = time.perf_counter() - start - seconds * a.repeat
                        diff = (scorer(seqs[:16]) - plain[w]).abs().max().item()
                    except Exception as exc:  # report and go on: one kernel failing must not hide the others
                        print(json.dumps({"name": name, "error": repr(exc)[:300]}), flush=True)
                        continue
                    report(name, n_tokens, seconds, calls=len(calls), first_pass_s=round(first, 1),
                           max_abs_diff_vs_plain=round(diff, 5))
    from torch._dynamo.utils import counters

    compiles = {"unique_graphs": counters["stats"].get("unique_graphs", 0),
                "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0}
    print(json.dumps({"dynamo": compiles}), flush=True)
    results.append({"dynamo": compiles})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
