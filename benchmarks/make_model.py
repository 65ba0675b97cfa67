"""Save a random-init reward model of a real shape (default: Llama-3-8B) with the default model's tokenizer,
for timing runs. Initialized on the GPU when there is one (seconds instead of minutes).

    python benchmarks/make_model.py --out /tmp/rm8b              # 8B, bf16
    python benchmarks/make_model.py --out /tmp/rm-tiny --shape tiny
    python benchmarks/make_model.py --out /tmp/prm8b --head lm   # a causal LM, served as a math-shepherd-style PRM
"""

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--head", default="seqcls", choices=["seqcls", "lm"],
                   help="seqcls: a scalar reward model; lm: a causal LM (process reward model)")
    a = p.parse_args()
    from reward_server.default_model import _train_tokenizer

    tok = _train_tokenizer(512)
    config = LlamaConfig(**SHAPES[a.shape], num_labels=1, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    start = time.monotonic()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        cls = LlamaForSequenceClassification if a.head == "seqcls" else LlamaForCausalLM
        model = cls._from_config(config, dtype=getattr(torch, a.dtype))
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {n / 1e9:.2f} B parameters to {a.out} in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
