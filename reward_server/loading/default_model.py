"""The embedded default reward model: a small random Llama and a real byte-level BPE tokenizer.

Both are built deterministically (fixed seed, fixed training text) and saved once with save_pretrained to
a cache directory; the server then loads them through the same from_pretrained path as any checkpoint.
The rewards are meaningless. The model exists so that the server, the tests and the examples run with no
download.
"""

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict

from ..config import DefaultModelConfig

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
)
# Fixed training text for the tokenizer's merges: English, code and math, so common text splits into
# multi-byte tokens. Any UTF-8 text still tokenizes (byte-level alphabet).
_TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. A reward model scores each response to a prompt.
Reinforcement learning from human feedback trains a policy against the reward model's scores.
Step 1: Let x be the number of apples. Step 2: Then 2x + 3 = 11, so x = 4. The answer is 4.
def reward(sequence): return model(sequence).logits[-1]  # the score of the last token
User: What is the capital of France? Assistant: The capital of France is Paris.
Question: If a train travels 60 miles per hour for 3 hours, how far does it go? Answer: 180 miles.
"""


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT.strip().splitlines() * 4, trainer=trainer)
    from tokenizers import processors

    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build(cfg: DefaultModelConfig, out_dir: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = _train_tokenizer(cfg.vocab_size)
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def default_model_path(cfg: DefaultModelConfig, cache_dir: str) -> str:
    """Directory of the default model for this config, built on first use. Safe when several ranks race:
    each builds into a temporary directory and the first rename wins."""
    key = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]
    root = os.path.expanduser(cache_dir)
    path = os.path.join(root, f"default-llama-rm-{key}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=".building-")
    try:
        _build(cfg, tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another rank finished first
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
