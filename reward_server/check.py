"""Parity check: score a sample through a running reward server and through plain transformers, and print how
far apart they are.

    python -m reward_server.check --model PATH [--url http://localhost:8000] [--n 64] [--texts FILE | --inputs FILE]
                                  [--quantized | --invariance]

The sample is token ids drawn from the model's vocabulary: independent sequences of many lengths, and groups that
share a prompt (the server computes a shared prefix once), each sent as `token_ids` so that both sides see the
same tokens. With --texts (one text per line) the texts are sent as `text` instead, so the server's tokenization
is checked too (the reference tokenizes them with the checkpoint's tokenizer and add_special_tokens=True, the
server's default); with --inputs, the token ids of a perf_analyzer input file (benchmarks/workload.py's) are sent.
The reference runs each sequence alone, unpadded, in float32 on the CPU; on a GPU in bfloat16
(what the server serves there) and in float32, and the verdict asks whether the server is as close to float32 as
plain bfloat16 transformers is. A quantized server (--quantized, model.quantization=fp8) is judged on the order of
the sequences instead: Spearman and the share of pairs ordered alike against float32 (--label: on which label of
a multi-label head), by the rule the server's start-up fidelity gate applies (reward_server/config/fidelity.py).
The distances are given over every label and for --label alone. Exit status 0 when the check passes, 1 when it does
not.
--invariance (batching.batch_invariant=true): no reference; the sample alone, shuffled in random batches, by groups
and again (cache hits); a sequence whose rewards differ in a bit from alone is a mismatch (exit 1).

The references of a large sample take minutes on a GPU (1,000 sequences of 8B in float32: about 3); --references
FILE keeps them (computed and saved when FILE is missing, loaded when it holds the same sequences), and
--references-only computes them without a server, e.g. while the server starts:

    python -m reward_server.check --model M --inputs rlhf.json --n 1000 --references refs.npz --references-only &
    python -m reward_server.check --model M --inputs rlhf.json --n 1000 --references refs.npz --quantized
"""

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from .config.fidelity import QUANTIZED_PAIRS, QUANTIZED_SPEARMAN
from .loading.fidelity_gate import compare, judge, label_distance, read_inputs, read_texts

GROUP = 8  # sequences per shared prompt in the sample
MAX_SAMPLE_TOKENS = 1024  # longest sampled sequence (and never past the model's max_position_embeddings)
FP32_ATOL = 1e-4  # float32 server vs float32 transformers: same arithmetic up to summation order
BF16_SLACK = 1.25  # bfloat16 server vs float32 may be this much further than plain bfloat16 transformers is
REQUEST_ROWS = 64  # sequences per request (the server's default batching.max_batch_size)


def sample(n: int, vocab: int, max_len: int, seed: int = 0) -> List[np.ndarray]:
    """n sequences: half independent with log-uniform lengths in [8, max_len], half in groups sharing a prompt."""
    rng = np.random.default_rng(seed)

    def ids(k: int) -> np.ndarray:
        return rng.integers(3, vocab, k).astype(np.int64)

    def length(lo: int, hi: int) -> int:
        return int(np.exp(rng.uniform(np.log(lo), np.log(max(lo, hi)))))

    seqs = [ids(length(8, max_len)) for _ in range(n - n // 2)]
    while len(seqs) < n:
        prompt = ids(length(8, max_len // 2))
        seqs += [np.concatenate([prompt, ids(length(1, max_len - len(prompt)))]) for _ in range(GROUP)]
    return seqs[:n]


def plain_rewards(model_path: str, seqs: List[np.ndarray], dtype: torch.dtype, device: torch.device,
                  trust_remote_code: bool) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=dtype,
                                                               trust_remote_code=trust_remote_code)
    model = model.to(device).eval()
    with torch.inference_mode():
        out = np.stack([model(input_ids=torch.as_tensor(s, device=device)[None]).logits[0].float().cpu().numpy()
                        for s in seqs])
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def fingerprint(seqs: List[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for seq in seqs:
        digest.update(np.asarray(seq, dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()


def references(args, seqs: List[np.ndarray], device: torch.device, say) -> dict:
    """Plain transformers' rewards, one sequence at a time: float32 (CPU) or bfloat16 and float32 (GPU); from
    --references when it holds these sequences of this model, else computed (and saved there)."""
    dtypes = {"float32": torch.float32} if device.type == "cpu" else {"bfloat16": torch.bfloat16,
                                                                      "float32": torch.float32}
    key = f"{Path(args.model).resolve()}|{device.type}|{fingerprint(seqs)}"
    path = Path(args.references) if args.references else None
    if path is not None and path.exists():
        saved = np.load(path)
        if str(saved["key"]) == key and all(name in saved for name in dtypes):
            say(f"references from {path}")
            return {name: saved[name] for name in dtypes}
        say(f"{path} holds references of other sequences or another model: computing them again")
    out = {}
    for name, dtype in dtypes.items():
        started = time.monotonic()
        out[name] = plain_rewards(args.model, seqs, dtype, device, args.trust_remote_code)
        say(f"plain transformers, {name} on {device.type}: {time.monotonic() - started:.0f} s")
    if path is not None:
        with open(path, "wb") as f:  # np.savez would append .npz to a name without it
            np.savez(f, key=np.array(key), **out)
        say(f"references saved to {path}")
    return out


def served_rewards(url: str, model_name: str, name: str, rows: List[bytes], timeout_s: float,
                   request_rows: int = REQUEST_ROWS) -> np.ndarray:
    import tritonclient.http as http

    client = http.InferenceServerClient(url.removeprefix("http://"), network_timeout=timeout_s,
                                        connection_timeout=timeout_s)
    outputs = {o["name"] for o in client.get_model_metadata(model_name).get("outputs", [])}
    if "step_rewards" in outputs:
        raise SystemExit(f"{url} serves a process reward model ({model_name!r} answers step_rewards); this check "
                         f"compares scalar rewards with a *ForSequenceClassification forward only")
    out = []
    for at in range(0, len(rows), request_rows):
        data = np.array([[r] for r in rows[at:at + request_rows]], dtype=object)
        tensor = http.InferInput(name, list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        result = client.infer(model_name, [tensor])
        errors = [e for e in result.as_numpy("error").reshape(-1) if e]
        if errors:
            raise SystemExit(f"the server failed {len(errors)} of {len(data)} rows, e.g. {errors[0].decode()}")
        out.append(result.as_numpy("rewards"))
    return np.concatenate(out)


def run(args) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    def say(message: str) -> None:  # progress, on stderr (--json prints the report on stdout)
        print(message, file=sys.stderr, flush=True)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    if args.inputs:
        data = read_inputs(args.inputs, args.n)
        seqs = [np.array(row.split(), dtype=np.int64) for row in data]
        name, rows = "token_ids", [row.encode() for row in data]
    elif args.texts:
        texts = read_texts(args.texts, args.n)
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        seqs = [np.asarray(ids, dtype=np.int64) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
        name, rows = "text", [t.encode() for t in texts]
    else:
        max_len = min(MAX_SAMPLE_TOKENS, getattr(config, "max_position_embeddings", MAX_SAMPLE_TOKENS))
        seqs = sample(args.n, config.vocab_size, max_len, args.seed)
        name, rows = "token_ids", [" ".join(map(str, s.tolist())).encode() for s in seqs]
    tokens = sum(len(s) for s in seqs)
    if args.references_only:
        references(args, seqs, device, say)
        return {"model": args.model, "sequences": len(seqs), "tokens": tokens, "references": args.references,
                "pass": True, "rule": "references only"}
    labels = config.num_labels
    if not 0 <= args.label < labels:
        raise SystemExit(f"--label {args.label}: {args.model} has {labels} label(s)")
    say(f"scoring {len(seqs)} sequences ({tokens} tokens, as {name}) through {args.url} ...")
    started = time.monotonic()
    served = served_rewards(args.url, args.model_name, name, rows, args.timeout_s, args.request_rows)
    report = {"model": args.model, "url": args.url, "sequences": len(seqs), "tokens": tokens, "input": name,
              "served_s": round(time.monotonic() - started, 2), "labels": int(served.shape[1]), "label": args.label}
    say(f"... {report['served_s']} s; plain transformers on {device.type}, one sequence at a time ...")
    plain = references(args, seqs, device, say)
    on = args.label

    def versus(a: np.ndarray, b: np.ndarray) -> dict:  # every label's distance, then --label's own
        return {**compare(a, b, on), **label_distance(a, b, on)}

    if device.type == "cpu":
        report["float32"] = versus(served, plain["float32"])
        report["reward_std"] = float(plain["float32"][:, on].std())
        report["pass"] = report["float32"]["max_abs_diff"] <= args.atol
        report["rule"] = f"served vs float32 transformers: max |diff| <= {args.atol}"
    else:
        bf16, fp32 = plain["bfloat16"], plain["float32"]
        report["served_vs_bfloat16"] = versus(served, bf16)
        report["served_vs_float32"] = versus(served, fp32)
        report["bfloat16_vs_float32"] = versus(bf16, fp32)
        report["reward_std"] = float(fp32[:, on].std())
        if args.quantized:
            failed = judge({str(on): report["served_vs_float32"]}, args.min_spearman, args.min_pairs,
                           "against float32", ("--min-spearman", "--min-pairs"))
            report["pass"] = failed is None
            report["rule"] = (f"served vs float32 on label {on}: Spearman >= {args.min_spearman:g} and pairs ordered "
                              f"alike >= {100 * args.min_pairs:g} %" + (f" ({failed})" if failed else ""))
        else:
            limit = BF16_SLACK * report["bfloat16_vs_float32"]["mean_abs_diff"]
            report["pass"] = report["served_vs_float32"]["mean_abs_diff"] <= limit
            report["rule"] = (f"served vs float32 mean |diff| <= {BF16_SLACK} x plain bfloat16 vs float32 "
                              f"({limit:.3g})")
    return report


def invariance(args) -> dict:
    """--invariance: the sample alone, in random batches, by groups and repeated; the sequences whose bits differ."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    seqs = sample(args.n, config.vocab_size, min(MAX_SAMPLE_TOKENS, config.max_position_embeddings), args.seed)
    rows = [" ".join(map(str, s.tolist())).encode() for s in seqs]
    rng = np.random.default_rng(args.seed + 1)

    def score(order: List[int], sizes) -> np.ndarray:  # rewards in sample order, requests of the given sizes
        out, at = np.zeros((len(seqs), config.num_labels), dtype=np.float32), 0
        for size in sizes:
            got = served_rewards(args.url, args.model_name, "token_ids", [rows[i] for i in order[at:at + size]],
                                 args.timeout_s, size)
            out[order[at:at + size]], at = got, at + size
        return out
    every = list(range(len(seqs)))
    alone = score(every, [1] * len(seqs))
    cuts = np.sort(rng.choice(np.arange(1, len(seqs)), max(1, len(seqs) // GROUP), replace=False))
    sizes = np.diff(np.concatenate([[0], cuts, [len(seqs)]])).tolist()  # random request sizes, summing to n
    shuffled, groups = [int(i) for i in rng.permutation(len(seqs))], [GROUP] * -(-len(seqs) // GROUP)
    ways = {"random batches": score(shuffled, sizes), "by groups": score(every, groups),  # the last: cache hits
            "repeated": score(every, [args.request_rows] * -(-len(seqs) // args.request_rows))}
    bad = {way: [i for i in every if got[i].tobytes() != alone[i].tobytes()] for way, got in ways.items()}
    return {"model": args.model, "url": args.url, "sequences": len(seqs), "pass": not any(bad.values()),
            "mismatches": {w: len(b) for w, b in bad.items()},
            "max_abs_diff": {w: float(np.abs(ways[w] - alone).max()) for w in ways},
            "rule": "every sequence's rewards the same bits alone, in random batches, by groups and repeated"}


def print_report(report: dict) -> None:
    if "mismatches" in report:
        for way, n in report["mismatches"].items():
            print(f"  {way:16s} {n} of {report['sequences']} sequences differ from alone (max |diff| "
                  f"{report['max_abs_diff'][way]:.3g})")
        print(f"{'PASS' if report['pass'] else 'FAIL'}: {report['rule']}")
        return
    if "labels" not in report:
        print(f"{report['sequences']} sequences, {report['tokens']} tokens: references saved to {report['references']}")
        return
    print(f"{report['sequences']} sequences, {report['tokens']} tokens, {report['labels']} label(s), on label "
          f"{report['label']}: reward std {report['reward_std']:.3g}")
    for key in ("float32", "served_vs_bfloat16", "served_vs_float32", "bfloat16_vs_float32"):
        if key in report:
            what = "served vs float32 transformers" if key == "float32" else key.replace("_", " ")
            r = report[key]
            own = f"label {report['label']}: max {r['label_max_abs_diff']:.3g}   mean {r['label_mean_abs_diff']:.3g}"
            print(f"  {what:34s} max |diff| {r['max_abs_diff']:.3g}   mean {r['mean_abs_diff']:.3g}   ({own})   "
                  f"Spearman {r['spearman']:.5f}   pairs ordered alike {100 * r['pair_agreement']:.2f} %")
    print(f"{'PASS' if report['pass'] else 'FAIL'}: {report['rule']}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reward_server.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the checkpoint directory the server serves")
    p.add_argument("--url", default="http://localhost:8000")
    p.add_argument("--model-name", default="reward", help="the server's native model (server.model_name)")
    p.add_argument("--n", type=int, default=64, help="sequences in the sample")
    p.add_argument("--texts", help="a file of texts, one per line, sent as `text` (tokenization checked too)")
    p.add_argument("--inputs", help="a perf_analyzer input file of token_ids (benchmarks/workload.py's): its first "
                   "--n sequences")
    p.add_argument("--quantized", action="store_true", help="the server is quantized (model.quantization): judge "
                   "the order of the rewards (Spearman >= --min-spearman, pairs >= --min-pairs)")
    p.add_argument("--invariance", action="store_true", help="bits alone vs batched (batching.batch_invariant)")
    p.add_argument("--min-spearman", type=float, default=QUANTIZED_SPEARMAN, help="--quantized: the bar (the "
                   "default is the server's model.quantization_min_spearman; pass the value your server runs with)")
    p.add_argument("--min-pairs", type=float, default=QUANTIZED_PAIRS, help="--quantized: the share of pairs "
                   "ordered alike (default: model.quantization_min_pairs's)")
    p.add_argument("--label", type=int, default=0, help="the label whose order (Spearman, pairs) and own distance "
                   "are reported (a multi-label head); max / mean |diff| are also given over every label")
    p.add_argument("--references", help="an .npz file that keeps the plain references (loaded when it holds the "
                   "same sequences of the same model, else computed and saved)")
    p.add_argument("--references-only", action="store_true", help="compute and save --references; no server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-rows", type=int, default=REQUEST_ROWS,
                   help="sequences per request, sent one request after the other (1: a group sharing a prompt reaches "
                        "the server over several forwards, so the prefix cache serves the later ones)")
    p.add_argument("--device", help="where the reference runs (default: cuda if there is one, else cpu)")
    p.add_argument("--atol", type=float, default=FP32_ATOL, help="float32 (CPU) pass limit on max |diff|")
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    args = p.parse_args(argv)
    if args.references_only and not args.references:
        p.error("--references-only needs --references FILE")
    report = invariance(args) if args.invariance else run(args)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
