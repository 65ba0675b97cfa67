"""Soak: random RL traffic through a real server, every reward checked against the same sequence scored alone.

Client threads send GRPO groups (a prompt's responses in one request, or one per request, the later ones after the
earlier are answered, so their prompt comes from the prefix cache), tree searches (each depth's candidates extend
one kept path), RLHF rows (nothing shared), prefixes of other rows, duplicates within a request and repeats of
earlier requests (from any client), 1 to 8 rows per request, for --requests requests or --minutes. The server runs
with prefix sharing, a small prefix cache (2,000 tokens: it gives tokens up over and over) and, by default, 2
data-parallel replicas on the CPU. Afterwards every distinct sequence is scored by plain transformers (the oracle:
alone, or with --oracle-batch in right-padded batches of about equal lengths, checked against forwards alone on a
sample) and each reward the server returned for it is compared:
  float32 (CPU): |served - oracle| <= --atol (1e-5);
  bfloat16 (GPU, --model an 8B checkpoint): per reward, |served - float32| <= 1.25 x (|plain bfloat16 - float32| +
  the sample's mean of that distance), the check command's rule (reward_server/check.py) applied per reward with
  the sample's mean as slack, so a reward where plain bfloat16 happens to land on float32 is not a mismatch.
With --prm the model is a causal LM served as a math-shepherd PRM (step tag id 7, candidates 11 / 12): every step
reward and the aggregate (min) are checked.

    PYTHONPATH=.:benchmarks python benchmarks/soak.py --requests 100000 --clients 48        # CPU, tiny model
    PYTHONPATH=.:benchmarks python benchmarks/soak.py --requests 2000 --prm
    PYTHONPATH=.:benchmarks python benchmarks/soak.py --model /tmp/rm8b --nproc 1 --device cuda --minutes 20 \\
        batching.prefix_cache_tokens=8192                                                      # GPU, 8B, bf16
Prints one JSON object (also written to --json); exit status 1 on any mismatch or failed request.
"""

import argparse
import hashlib
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from live import Client, LiveServer

TAG, GOOD, BAD = 7, 11, 12  # --prm: the step tag and candidate token ids
BF16_SLACK = 1.25  # reward_server/check.py's


def tiny_checkpoint(path: Path, prm: bool) -> Path:
    """A tiny random Llama (hidden 64, 2 layers, the default model's tokenizer), weights wider than the default
    (initializer_range 0.1: rewards spread, std ~0.7) yet narrow enough that a float32 forward is within ~2e-6 of
    float64 (at 0.2, plain float32 transformers itself was 1.2e-5 off float64 on 600 sequences, past the soak's
    bar): a sequence-classification head, or a causal LM for --prm."""
    if (path / "config.json").exists():
        return path
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from reward_server.loading.default_model import _train_tokenizer

    tok = _train_tokenizer(512)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=4096, num_labels=1, initializer_range=0.1,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(3)
    (LlamaForCausalLM if prm else LlamaForSequenceClassification)(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


class Traffic:
    """One client's random requests (lists of token id rows), the scenario of each drawn anew."""

    def __init__(self, seed: int, vocab: int, prm: bool, recent: list, lock: threading.Lock, scale: float):
        self.rng = np.random.default_rng(seed)
        self.vocab, self.prm, self.recent, self.lock, self.scale = vocab, prm, recent, lock, scale

    def ids(self, lo: int, hi: int) -> np.ndarray:
        n = max(1, int(self.rng.integers(lo, hi + 1) * self.scale))
        out = self.rng.integers(3, self.vocab, n)
        if self.prm:  # steps of ~20 tokens, the last token a tag; no tag elsewhere
            out[out == TAG] = TAG + 1
            out[self.rng.random(n) < 0.05] = TAG
            out[-1] = TAG
        return out.astype(np.int64)

    def requests(self):
        """A scenario: the requests to send one after the other (each a list of rows); a tree's next depth depends on
        nothing the server answers, so it is drawn up front too."""
        kind = self.rng.choice(["grpo", "grpo_apart", "tree", "rlhf", "repeat"], p=[0.25, 0.2, 0.2, 0.25, 0.1])
        if kind == "repeat":
            with self.lock:
                if self.recent:
                    return [self.recent[int(self.rng.integers(len(self.recent)))]]
            kind = "rlhf"
        if kind in ("grpo", "grpo_apart"):
            prompt = self.ids(20, 300)
            rows = [np.concatenate([prompt, self.ids(1, 120)]) for _ in range(int(self.rng.integers(2, 9)))]
            if self.rng.random() < 0.15:
                rows.append(prompt.copy())  # the prompt alone: a prefix of every other row
            if kind == "grpo":
                return [self.duplicates(rows)]
            cut = int(self.rng.integers(1, len(rows)))
            return [rows[:cut], rows[cut:]] if self.rng.random() < 0.5 else [[r] for r in rows]
        if kind == "tree":
            path, out = self.ids(30, 150), []
            for _ in range(int(self.rng.integers(2, 6))):
                candidates = [np.concatenate([path, self.ids(5, 40)]) for _ in range(int(self.rng.integers(2, 7)))]
                out.append(self.duplicates(candidates))
                path = candidates[int(self.rng.integers(len(candidates)))]
            return out
        return [self.duplicates([self.ids(5, 400) for _ in range(int(self.rng.integers(1, 5)))])]

    def duplicates(self, rows):
        if self.rng.random() < 0.1:
            rows = rows + [rows[int(self.rng.integers(len(rows)))].copy()]
        order = self.rng.permutation(len(rows))
        return [rows[i] for i in order][:8]


class Seen:
    """Every distinct sequence the server scored, with the range of what it returned for it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rows = {}  # digest -> [ids, reward min, reward max, step rewards min, step rewards max]

    def add(self, ids: np.ndarray, reward: float, steps) -> None:
        key = hashlib.blake2b(ids.tobytes(), digest_size=16).digest()
        with self.lock:
            got = self.rows.get(key)
            if got is None:
                self.rows[key] = [ids.astype(np.int32), reward, reward, steps, steps]
                return
            got[1], got[2] = min(got[1], reward), max(got[2], reward)
            if steps is not None:
                got[3], got[4] = np.minimum(got[3], steps), np.maximum(got[4], steps)


def drive(server: LiveServer, args, seen: Seen) -> dict:
    lock, recent = threading.Lock(), []
    counts = {"requests": 0, "rows": 0, "failed": 0}
    errors = []
    deadline = time.monotonic() + 60 * args.minutes if args.minutes else None

    def client(k: int):
        conn, traffic = Client(server.http_port), Traffic(args.seed * 1000 + k, args.vocab, args.prm, recent, lock,
                                                          args.scale)
        while True:
            for rows in traffic.requests():
                with lock:
                    if counts["requests"] >= args.requests or (deadline and time.monotonic() > deadline):
                        return
                    counts["requests"] += 1
                try:
                    out = conn.score(rows)
                except Exception as exc:  # noqa: BLE001 (counted; the soak goes on)
                    with lock:
                        counts["failed"] += 1
                        errors.append(repr(exc)[:300])
                    continue
                if any(e for e in out["error"].reshape(-1)):
                    with lock:
                        counts["failed"] += 1
                        errors.append(str(out["error"].reshape(-1)[:3])[:300])
                    continue
                for j, ids in enumerate(rows):
                    steps = None
                    if args.prm:
                        steps = out["step_rewards"][j, :int(out["num_steps"][j, 0])].astype(np.float64)
                    seen.add(ids, float(out["rewards"][j, 0]), steps)
                with lock:
                    counts["rows"] += len(rows)
                    if len(recent) < 2000:
                        recent.append(rows)
                    else:
                        recent[int(traffic.rng.integers(len(recent)))] = rows

    before = server.metrics()
    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(5)
        print(f"  {counts['requests']:,} requests, {counts['rows']:,} rows, {counts['failed']} failed, "
              f"{time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    wall = time.monotonic() - start
    after = server.metrics()
    engine = {k: after.get(f"reward_server_{k}", 0) - before.get(f"reward_server_{k}", 0)
              for k in ("forwards", "tokens_received", "tokens_computed", "tokens_reused")}
    return dict(**counts, seconds=round(wall, 1), requests_per_s=round(counts["requests"] / wall, 1),
                errors=errors[:5], engine=engine)


@torch.inference_mode()
def oracle(path: str, rows, prm: bool, dtype: torch.dtype, device: str, batch: int = 1):
    """Each sequence through plain transformers: its reward (and, --prm, its step rewards). `batch` > 1: sequences of
    about equal length padded on the right in batches of `batch` (the padding masked; a row's result then differs
    from its forward alone by rounding only: `judge` measures that on a sample)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if prm else AutoModelForSequenceClassification
    model = cls.from_pretrained(path, dtype=dtype).to(device).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    rewards, steps = np.empty(len(rows)), [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda k: len(rows[k]))
    for at in range(0, len(order), batch):
        part = order[at:at + batch]
        width = max(len(rows[k]) for k in part)
        ids = torch.full((len(part), width), pad, dtype=torch.int64)
        mask = torch.zeros((len(part), width), dtype=torch.int64)
        for r, k in enumerate(part):
            ids[r, :len(rows[k])] = torch.as_tensor(rows[k].astype(np.int64))
            mask[r, :len(rows[k])] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask if batch > 1 else None).logits.float()
        for r, k in enumerate(part):
            if prm:
                n = len(rows[k])
                s = logits[r, :n][ids[r, :n] == TAG][:, [GOOD, BAD]].softmax(-1)[:, 0].double().cpu().numpy()
                steps[k], rewards[k] = s, s.min()
            else:
                rewards[k] = float(logits[r, 0])
    return rewards, steps


def judge(seen: Seen, args, path: str) -> dict:
    entries = list(seen.rows.values())
    ids = [e[0] for e in entries]
    lo, hi = np.array([e[1] for e in entries]), np.array([e[2] for e in entries])
    start = time.monotonic()
    device = args.device
    if device == "cpu":
        torch.set_num_threads(1)  # small forwards: one thread is faster than two that spin against the server's
    f32, f32_steps = oracle(path, ids, args.prm, torch.float32, device, args.oracle_batch)
    alone = np.array([], dtype=np.float64)
    if args.oracle_batch > 1:  # the padded batches against forwards alone, on a sample
        sample = list(range(0, len(ids), max(1, len(ids) // 500)))
        alone = np.abs(oracle(path, [ids[k] for k in sample], args.prm, torch.float32, device)[0] - f32[sample])
    worst = np.maximum(np.abs(lo - f32), np.abs(hi - f32))
    step_worst = np.zeros(len(entries))
    if args.prm:
        step_worst = np.array([max(np.abs(e[3] - s).max(initial=0), np.abs(e[4] - s).max(initial=0))
                               if len(e[3]) == len(s) else np.inf for e, s in zip(entries, f32_steps)])
    rechecked = 0
    if device == "cpu":
        bad = (worst > args.atol) | (step_worst > args.atol)
        if args.oracle_batch > 1 and bad.any():  # the batched oracle's own rounding: each such sequence alone decides
            again = np.flatnonzero(bad)
            rechecked = len(again)
            f32[again], alone_steps = oracle(path, [ids[k] for k in again], args.prm, torch.float32, device)
            for k, st in zip(again, alone_steps):
                f32_steps[k] = st
            worst = np.maximum(np.abs(lo - f32), np.abs(hi - f32))
            if args.prm:
                step_worst[again] = [max(np.abs(entries[k][3] - f32_steps[k]).max(initial=0),
                                         np.abs(entries[k][4] - f32_steps[k]).max(initial=0)) for k in again]
            bad = (worst > args.atol) | (step_worst > args.atol)
        rule = f"float32: |served - plain float32| <= {args.atol:g}"
    else:
        bf16, bf16_steps = oracle(path, ids, args.prm, torch.bfloat16, device, args.oracle_batch)
        plain = np.abs(bf16 - f32)
        bad = worst > BF16_SLACK * (plain + plain.mean())
        if args.prm:
            plain_steps = [np.abs(b - s) for b, s in zip(bf16_steps, f32_steps)]
            mean = np.concatenate(plain_steps).mean()
            bad |= np.array([np.any(np.maximum(np.abs(e[3] - s), np.abs(e[4] - s)) > BF16_SLACK * (p + mean))
                             if len(e[3]) == len(s) else True for e, s, p in zip(entries, f32_steps, plain_steps)])
        rule = f"bfloat16: |served - float32| <= {BF16_SLACK} x (|plain bfloat16 - float32| + its mean), per reward"
    if bad.any():  # for a closer look: the sequences, what was served, the oracle
        np.savez(Path(args.out) / "mismatches.npz", lengths=[len(ids[k]) for k in np.flatnonzero(bad)],
                 ids=np.concatenate([ids[k] for k in np.flatnonzero(bad)]), lo=lo[bad], hi=hi[bad], oracle=f32[bad])
    diffs = np.sort(worst)[::-1]
    return dict(distinct_sequences=len(entries), mismatches=int(bad.sum()), rule=rule, reward_std=float(f32.std()),
                rechecked_alone=rechecked, largest_diffs=[float(x) for x in diffs[:5]],
                over_half_atol=int((worst > args.atol / 2).sum()),
                max_abs_diff=float(worst.max(initial=0)), max_step_abs_diff=float(step_worst.max(initial=0)),
                served_spread_max=float((hi - lo).max(initial=0)), oracle_seconds=round(time.monotonic() - start, 1),
                oracle_batch=args.oracle_batch, oracle_batched_vs_alone_max=float(alone.max(initial=0)),
                oracle_alone_sample=len(alone))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=100_000, help="stop after this many requests")
    p.add_argument("--minutes", type=float, default=0, help="or after this long (0: no limit)")
    p.add_argument("--clients", type=int, default=48)
    p.add_argument("--nproc", type=int, default=2, help="ranks: data-parallel replicas (tensor parallel size 1)")
    p.add_argument("--model", help="a checkpoint (default: a tiny random Llama made in --out)")
    p.add_argument("--prm", action="store_true", help="a causal LM served as a math-shepherd PRM (tag 7, candidates "
                   "11 / 12)")
    p.add_argument("--device", default="cpu", help="where the oracle runs (cuda: bfloat16 and float32, the bf16 rule)")
    p.add_argument("--vocab", type=int, default=0, help="token ids drawn below this (default: the model's vocabulary)")
    p.add_argument("--scale", type=float, default=1.0, help="sequence lengths x this")
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--oracle-batch", type=int, default=16, help="the oracle's sequences per padded batch (1: each "
                   "alone; with more, a sample is also scored alone and the largest difference reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/soak")
    p.add_argument("--json")
    p.add_argument("overrides", nargs="*", help="more server overrides")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = args.model or str(tiny_checkpoint(out / ("prm" if args.prm else "rm"), args.prm))
    args.vocab = args.vocab or json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    overrides = [f"model.path={path}", "parallel.tensor_parallel_size=1", "batching.prefix_sharing=true",
                 "batching.prefix_cache_tokens=2000", "batching.max_tokens_per_forward=4096", "server.stats_log_s=30"]
    if args.prm:
        overrides += ["reward=math_shepherd", "reward.step_tag_source=ids", f"reward.step_tag_ids=[{TAG}]",
                      f"reward.candidate_token_ids=[{GOOD},{BAD}]", "reward.max_steps=256"]
    if args.device != "cpu":
        overrides = [o for o in overrides if not o.startswith("batching.max_tokens_per_forward")]
    seen = Seen()
    with LiveServer(args.nproc, overrides + args.overrides, str(out / "server.log")).wait_ready() as server:
        result = drive(server, args, seen)
    result.update(judge(seen, args, path), overrides=overrides + args.overrides, clients=args.clients,
                  nproc=args.nproc, prm=args.prm)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    sys.exit(1 if result["mismatches"] or result["failed"] else 0)


if __name__ == "__main__":
    main()
