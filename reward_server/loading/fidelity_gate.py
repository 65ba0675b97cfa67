"""The start-up fidelity gate of model.quantization, and the comparison it shares with `python -m reward_server.check`.

After the loader has quantized the model (keeping each quantized weight's original: quantization.unquantized), every
rank scores the same calibration sample through its real scorer (layout, masks, prefix sharing, readout: the forward
the server serves) twice: with the original weights, then quantized. Both passes run the decoder layers eagerly (a
compiled layer compiles in the warm-up that follows, so a refusal costs no compilation). Per label (a PRM: its step
scores) it compares them: Spearman's rank correlation, the share of pairs ordered alike, max and mean |difference|;
each rank's figures are reduced to the worst over the ranks, so every rank reaches the same verdict. It refuses to
start (StartupError, one line) unless every label passes model.quantization_min_spearman and
model.quantization_min_pairs (defaults: config/fidelity.py, the rule of check --quantized); a reward that is not
finite always refuses.

The sample: model.calibration_path (check's --texts or --inputs format), else CALIBRATION_SEQUENCES built-in texts
(arithmetic questions with worked answers of 1 to 48 steps, 8 answers per question, so groups share a prompt as in
GRPO traffic) through the checkpoint's tokenizer and chat template; a PRM's steps end in its step tag. Why 256:
Spearman's coefficient over n sequences scatters around its true value near the bar (0.999) with a standard
deviation of 0.00087 at n = 64, 0.00023 at 256 and 0.00009 at 1,000 (simulated: y = x + Gaussian noise, 2,000 draws);
at 256 that is a fifth of the bar's distance from 1, for two forwards over the sample (125,655 tokens each
through the embedded 512-token byte-level tokenizer; about half that through a Llama-3 tokenizer)."""

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import StartupError
from . import quantization

log = logging.getLogger(__name__)

CALIBRATION_SEQUENCES = 256  # sequences in the gate's sample (see the module's docstring for why)
MIN_CALIBRATION = 64  # fewer in model.calibration_path refuses (Spearman's noise would reach the bar)
GROUP = 8  # built-in sample: answers per question
MAX_STEPS = 48  # built-in sample: steps of the longest answer
PAIRS = 10_000  # pairs of sequences whose order is compared (all pairs when there are fewer)


# ------------------------------------------------------------------------------------------ comparing two scorings

def ranks(x: np.ndarray) -> np.ndarray:
    out = np.empty(len(x))
    out[np.argsort(x, kind="stable")] = np.arange(len(x))
    return out


def compare(a: np.ndarray, b: np.ndarray, label: int = 0, seed: int = 0) -> dict:
    """Distance, and whether the order of the sequences is kept (what RL uses): Spearman's rank correlation and
    the share of pairs ordered alike (every pair, or PAIRS random ones), on one label; the distance over all labels."""
    d = np.abs(a - b)
    x, y = a[:, label].astype(np.float64), b[:, label].astype(np.float64)
    n = len(x)
    if n * (n - 1) // 2 <= PAIRS:
        i, j = np.triu_indices(n, 1)
    else:
        rng = np.random.default_rng(seed)
        i, j = rng.integers(0, n, PAIRS), rng.integers(0, n, PAIRS)
        i, j = i[i != j], j[i != j]
    spearman = float(np.corrcoef(ranks(x), ranks(y))[0, 1]) if n > 1 else 1.0
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()), "spearman": spearman,
            "pair_agreement": float(np.mean(np.sign(x[i] - x[j]) == np.sign(y[i] - y[j]))) if len(i) else 1.0}


def label_distance(a: np.ndarray, b: np.ndarray, label: int) -> dict:
    """max and mean |difference| of one label alone (compare's distance is over every label)."""
    d = np.abs(a[:, label] - b[:, label])
    return {"label_max_abs_diff": float(d.max()), "label_mean_abs_diff": float(d.mean())}


def judge(stats: Dict[str, dict], min_spearman: float, min_pairs: float, against: str = "",
          names=("model.quantization_min_spearman", "model.quantization_min_pairs")) -> Optional[str]:
    """The quantized-fidelity rule (config/fidelity.py) on each label's compare(): None when every label passes,
    else what fails first, in words (`against`: what the rewards were compared with; `names`: of the two bars)."""
    for label, r in stats.items():
        where = f"on label {label}{' ' + against if against else ''}"
        if r.get("nonfinite"):
            return f"{r['nonfinite']} of {r['n']} quantized rewards {where} are not finite"
        if not r["spearman"] >= min_spearman:
            return f"Spearman {r['spearman']:.4f} {where}, below {names[0]}={min_spearman:g}"
        if not r["pair_agreement"] >= min_pairs:
            return f"pairs ordered alike {100 * r['pair_agreement']:.2f} % {where}, below {names[1]}={min_pairs:g}"
    return None


# ------------------------------------------------------------------------------------------ samples

def read_texts(path: str, n: int) -> List[str]:
    """check --texts: the first n non-empty lines."""
    return [t for t in Path(path).read_text().splitlines() if t.strip()][:n]


def read_inputs(path: str, n: int) -> List[str]:
    """check --inputs: the token_ids rows (space-separated ids) of a perf_analyzer input file, the first n."""
    return [d["token_ids"]["content"][0] for d in json.loads(Path(path).read_text())["data"][:n]]


def is_inputs_file(path: str) -> bool:
    try:
        return "data" in json.loads(Path(path).read_text())
    except (ValueError, TypeError):
        return False


def built_in(n: int = CALIBRATION_SEQUENCES, seed: int = 0):
    """n (question, steps) pairs: GROUP answers per question, of 1 to MAX_STEPS steps (log-uniform), some wrong."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        a, b = (int(v) for v in rng.integers(12, 999, 2))
        question = f"What is {a} times {b}? Work it out step by step and give the final answer."
        for _ in range(GROUP):
            k = int(np.exp(rng.uniform(0, np.log(MAX_STEPS))))
            total, steps, slip = 0, [], int(rng.integers(0, 3)) * int(rng.integers(1, 50))
            for i in range(1, k + 1):
                part = b * (i * a // k - (i - 1) * a // k)
                total += part
                steps.append(f"Step {i}: add {part} to the running total, which makes {total}.")
            steps.append(f"So {a} times {b} is {total + slip}.")
            out.append((question, steps))
    return out[:n]


def calibration(cfg, tokenizer, tag_ids: Optional[List[int]], max_tokens: int, vocab_size: int) -> List[np.ndarray]:
    """The gate's sample as token ids, each cut to max_tokens: model.calibration_path, else the built-in texts
    (a PRM's steps each end in its step tag `tag_ids`)."""
    add = cfg.add_special_tokens
    path, n = cfg.calibration_path, CALIBRATION_SEQUENCES
    if path and is_inputs_file(path):
        ids = [np.array(row.split(), dtype=np.int64) for row in read_inputs(path, n)]
    elif path:
        ids = tokenizer(read_texts(path, n), add_special_tokens=add)["input_ids"]
    elif tag_ids:
        ids = [tokenizer(q + "\n\n", add_special_tokens=add)["input_ids"]
               + sum((tokenizer(" " + s, add_special_tokens=False)["input_ids"] + tag_ids for s in steps), [])
               for q, steps in built_in()]
    elif getattr(tokenizer, "chat_template", None):  # as a `messages` row is tokenized
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": q},
                                                {"role": "assistant", "content": "\n".join(steps)}], tokenize=False)
                 for q, steps in built_in()]
        ids = tokenizer(chats, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer([q + "\n\n" + "\n".join(steps) for q, steps in built_in()], add_special_tokens=add)["input_ids"]
    seqs = [np.asarray(s, dtype=np.int64)[:max_tokens] for s in ids]
    seqs = [s for s in seqs if len(s) and s.max() < vocab_size]
    if len(seqs) < MIN_CALIBRATION:
        raise StartupError(f"model.calibration_path={path}: {len(seqs)} usable sequences; the fidelity gate needs "
                           f"at least {MIN_CALIBRATION} (it reads the first {n})")
    return seqs


# ------------------------------------------------------------------------------------------ the gate

@contextmanager
def eager(model: torch.nn.Module):
    """Within: compiled modules (model.compile's decoder layers) run their eager forward; nothing compiles."""
    compiled = [(m, m._compiled_call_impl) for m in model.modules() if getattr(m, "_compiled_call_impl", None)]
    for m, _ in compiled:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, impl in compiled:
            m._compiled_call_impl = impl


def score(scorer, seqs: List[np.ndarray], budget: int) -> np.ndarray:
    """Rewards [n, width] through the scorer, in forwards of at most `budget` tokens, the prefix cache emptied
    before and after (the other pass must not read this one's keys and values)."""
    tensors = [torch.from_numpy(s) for s in seqs]
    out = np.zeros((len(seqs), scorer.output_width(tensors)), dtype=np.float32)
    if scorer.cache is not None:
        scorer.cache.clear()
    at = 0
    while at < len(seqs):
        end, tokens = at, 0
        while end < len(seqs) and (end == at or tokens + len(seqs[end]) <= budget):
            tokens += len(seqs[end])
            end += 1
        rows = scorer(tensors[at:end]).cpu().numpy()
        out[at:end, :rows.shape[1]] = rows
        at = end
    if scorer.cache is not None:
        scorer.cache.clear()
    return out


def per_label(before: np.ndarray, after: np.ndarray, seqs, readout) -> Dict[str, dict]:
    """compare() per label: each column of a scalar head; a PRM's step scores (every step of every sequence) as
    one label, `steps`."""
    tag = getattr(readout, "tag", None)
    if tag is not None:
        valid = np.arange(before.shape[1])[None, :] < tag.counts(seqs)[:, None]
        columns = {"steps": (before[valid][:, None], after[valid][:, None])}
    else:
        columns = {str(k): (before[:, [k]], after[:, [k]]) for k in range(before.shape[1])}
    stats = {}
    for label, (a, b) in columns.items():
        finite = np.isfinite(b[:, 0])
        r = compare(a[finite], b[finite]) if finite.sum() > 1 else {
            "max_abs_diff": float("nan"), "mean_abs_diff": float("nan"), "spearman": -1.0, "pair_agreement": 0.0}
        stats[label] = {**r, "n": int(len(a)), "nonfinite": int((~finite).sum())}
    return stats


def worst_over_ranks(stats: Dict[str, dict], device: torch.device) -> Dict[str, dict]:
    """Every rank's figures -> the worst of any rank (min of Spearman and pairs, max of the rest), on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return stats
    keys = (("spearman", 1), ("pair_agreement", 1), ("max_abs_diff", -1), ("mean_abs_diff", -1), ("nonfinite", -1))
    # NaN (constant rewards, no finite reward) counts as the worst value
    values = torch.tensor([[-np.inf if np.isnan(r[k]) else sign * float(r[k]) for k, sign in keys]
                           for r in stats.values()], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    for r, row in zip(stats.values(), values.cpu().tolist()):
        for (k, sign), v in zip(keys, row):
            r[k] = int(sign * v) if k == "nonfinite" else sign * v
    return stats


def run(scorer, tokenizer, cfg, device: torch.device, budget: int, max_length: int, vocab_size: int,
        is_leader: bool = True) -> dict:
    """The gate (module docstring) on one rank, every rank alike; returns its report, or raises StartupError."""
    started = time.monotonic()
    readout = scorer.readout
    tag = getattr(readout, "tag", None)
    seqs = calibration(cfg, tokenizer, list(tag.ids) if tag is not None else None, min(max_length, budget),
                       vocab_size)
    with eager(scorer.backbone):
        with quantization.unquantized(scorer.backbone) as n:
            if not n:
                raise StartupError(f"model.quantization={cfg.quantization}: the fidelity gate finds no quantized "
                                   "layer")
            before = score(scorer, seqs, budget)
        after = score(scorer, seqs, budget)
    quantization.release(scorer.backbone)
    stats = worst_over_ranks(per_label(before, after, seqs, readout), device)
    report = {"sequences": len(seqs), "tokens": int(sum(len(s) for s in seqs)), "labels": stats,
              "sample": cfg.calibration_path or "built-in", "seconds": round(time.monotonic() - started, 2),
              "min_spearman": cfg.quantization_min_spearman, "min_pairs": cfg.quantization_min_pairs}
    failed = judge(stats, cfg.quantization_min_spearman, cfg.quantization_min_pairs, "against the unquantized model")
    if is_leader:
        log.info("fidelity gate, model.quantization=%s: %d sequences (%d tokens, %s) unquantized and quantized in "
                 "%.1f s: %s; %s", cfg.quantization, report["sequences"], report["tokens"], report["sample"],
                 report["seconds"], "; ".join(describe(k, r) for k, r in stats.items()),
                 "FAIL" if failed else f"PASS (Spearman >= {cfg.quantization_min_spearman:g} and pairs ordered alike "
                 f">= {100 * cfg.quantization_min_pairs:g} % on every label)")
    if failed:
        figures = "; ".join(describe(k, r) for k, r in stats.items())
        raise StartupError(f"model.quantization={cfg.quantization}: {failed} ({report['sequences']} calibration "
                           f"sequences: {figures}); measure your own data with `python -m reward_server.check "
                           "--quantized`, or lower model.quantization_min_spearman / model.quantization_min_pairs to "
                           "serve it anyway")
    return report


def describe(label: str, r: dict) -> str:
    return (f"label {label} Spearman {r['spearman']:.4f}, pairs ordered alike {100 * r['pair_agreement']:.2f} %, "
            f"max |diff| {r['max_abs_diff']:.3g}, mean {r['mean_abs_diff']:.3g}")
