"""Save a random-init reward model of a real shape (default: Llama-3-8B) with the default model's tokenizer,
for timing runs. Initialized on the GPU when there is one (seconds instead of minutes).

    python benchmarks/make_model.py --out /tmp/rm8b              # 8B, bf16
    python benchmarks/make_model.py --out /tmp/rm-tiny --shape tiny
    python benchmarks/make_model.py --out /tmp/prm8b --head lm   # a causal LM, served as a math-shepherd-style PRM
    python benchmarks/make_model.py --out /tmp/rm8b --fitted-label  # a second label read along a fitted direction

Random weights make a poor stand-in for a trained reward model when numerics are judged: a random head reads a
random direction of the final hidden states, along which sequences differ little, so rounding noise reorders them
more than it would in a trained model, whose head reads a feature that separates inputs. --fitted-label adds a
second label (label 1) whose head is the direction in which the last-token hidden states of CALIBRATION random
sequences (another seed than any workload's) vary most, scaled to label 0's reward std. Label 0 is unchanged.
"""

import argparse
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
}


CALIBRATION = 256  # sequences whose final hidden states give the fitted label's direction
CALIBRATION_SEED = 12345
CALIBRATION_TOKENS = (64, 2048)  # their lengths, log-uniform


@torch.inference_mode()
def fit_second_label(model, device: str) -> None:
    """score.weight[1]: the first principal direction of the last token's final hidden state over CALIBRATION
    random sequences, scaled so that label 1's rewards spread as much as label 0's."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    lo, hi = np.log(CALIBRATION_TOKENS[0]), np.log(CALIBRATION_TOKENS[1])
    hidden = []
    for _ in range(CALIBRATION):
        ids = torch.as_tensor(rng.integers(3, model.config.vocab_size, int(np.exp(rng.uniform(lo, hi)))), device=device)
        hidden.append(model.model(input_ids=ids[None]).last_hidden_state[0, -1].float())
    h = torch.stack(hidden)
    direction = torch.linalg.svd(h - h.mean(0), full_matrices=False).Vh[0]
    w = model.score.weight
    spread = (h @ w[0].float()).std() / (h @ direction).std()
    w[1] = (direction * spread).to(w.dtype)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--head", default="seqcls", choices=["seqcls", "lm"],
                   help="seqcls: a scalar reward model; lm: a causal LM (process reward model)")
    p.add_argument("--fitted-label", action="store_true",
                   help="seqcls: a second label whose head is the first principal direction of the final hidden states")
    a = p.parse_args()
    from reward_server.loading.default_model import _train_tokenizer

    tok = _train_tokenizer(512)
    config = LlamaConfig(**SHAPES[a.shape], num_labels=2 if a.fitted_label else 1, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    start = time.monotonic()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        cls = LlamaForSequenceClassification if a.head == "seqcls" else LlamaForCausalLM
        model = cls._from_config(config, dtype=getattr(torch, a.dtype))
    if a.fitted_label:
        if a.head != "seqcls":
            p.error("--fitted-label needs --head seqcls")
        fit_second_label(model, device)
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {n / 1e9:.2f} B parameters to {a.out} in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
