"""Rewards through a live server's HTTP endpoint versus a plain in-process transformers forward of the same
checkpoint, one unpadded sequence at a time. Prints the largest absolute difference.

    python benchmarks/check_server.py --model /tmp/rm8b --url localhost:8000 --n 64
"""

import argparse
import json

import numpy as np
import torch
import tritonclient.http as http
from transformers import AutoModelForSequenceClassification

from workload import make


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--url", default="localhost:8000")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--vocab", type=int, default=0, help="0: the model's vocabulary size")
    p.add_argument("--workload", default="rlhf", choices=["rlhf", "grpo", "tree"],
                   help="grpo / tree: sequences that share prefixes (served with prefix sharing by default)")
    p.add_argument("--fp32", action="store_true", help="also compare both with a float32 forward (the truth bf16 "
                                                        "rounds): is the server as close to it as plain bf16?")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForSequenceClassification.from_pretrained(a.model, dtype=dtype).to(device).eval()
    seqs = make(a.workload, a.n, a.vocab or model.config.vocab_size, seed=7)
    with torch.inference_mode():
        plain = np.stack([model(input_ids=torch.as_tensor(s, device=device)[None]).logits[0].float().cpu().numpy()
                          for s in seqs])
    client = http.InferenceServerClient(a.url, network_timeout=600)
    data = np.array([[" ".join(map(str, s.tolist())).encode()] for s in seqs], dtype=object)
    inp = http.InferInput("token_ids", list(data.shape), "BYTES")
    inp.set_data_from_numpy(data)
    served = client.infer("reward", [inp]).as_numpy("rewards")
    diff = np.abs(served - plain)
    report = {"n": a.n, "workload": a.workload, "dtype": str(dtype), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
              "reward_std": float(plain.std())}
    if a.fp32:
        del model
        model = AutoModelForSequenceClassification.from_pretrained(a.model, dtype=torch.float32).to(device).eval()
        with torch.inference_mode():
            exact = np.stack([model(input_ids=torch.as_tensor(s, device=device)[None]).logits[0].float().cpu().numpy()
                              for s in seqs])
        for name, values in (("served", served), ("plain", plain)):
            report[f"{name}_vs_fp32_max_abs_diff"] = float(np.abs(values - exact).max())
            report[f"{name}_vs_fp32_mean_abs_diff"] = float(np.abs(values - exact).mean())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
