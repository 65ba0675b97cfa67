"""What the right answer is, without our server: tiny real checkpoints saved with save_pretrained (scalar reward
models of every family we serve, PRMs with a real tokenizer), the plain transformers forwards the tests compare
with, the in-process scorers built on them, and the sequences the tests send (shared prefixes, search trees)."""

from pathlib import Path
from typing import Dict

import numpy as np
import torch

# ---------------------------------------------------------------- scalar reward models

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3")
WINDOW = 48  # sliding window of the families that have one: shorter than the test sequences, so that it matters


def build_tokenizer(vocab_size: int = 512):
    from reward_server.loading.default_model import _train_tokenizer

    return _train_tokenizer(vocab_size)


def family_model(arch: str, **common):
    """A tiny random *ForSequenceClassification of one family (the config features that set it apart on)."""
    import transformers as tf

    if arch == "llama":
        return tf.LlamaForSequenceClassification(tf.LlamaConfig(**common))
    if arch == "qwen2":  # sliding window on its upper layer only (config.layer_types)
        return tf.Qwen2ForSequenceClassification(tf.Qwen2Config(**common, use_sliding_window=True,
                                                                 sliding_window=WINDOW, max_window_layers=1))
    if arch == "qwen3":  # q/k norms
        return tf.Qwen3ForSequenceClassification(tf.Qwen3Config(**common, head_dim=16))
    if arch == "mistral":  # sliding window on every layer
        return tf.MistralForSequenceClassification(tf.MistralConfig(**common, sliding_window=WINDOW))
    if arch == "gemma2":  # attention logit soft-capping, alternating sliding / full layers, scaled embeddings
        return tf.Gemma2ForSequenceClassification(tf.Gemma2Config(**common, head_dim=16, sliding_window=WINDOW,
                                                                   attn_logit_softcapping=50.0, query_pre_attn_scalar=16))
    if arch == "gemma3":  # q/k norms, local / global layers with their own rotary bases
        return tf.Gemma3TextForSequenceClassification(tf.Gemma3TextConfig(
            **common, head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=16))
    raise ValueError(f"unknown family {arch!r}; expected one of {FAMILIES}")


def save_seqcls_checkpoint(path: Path, arch: str = "llama", num_labels: int = 1, seed: int = 0) -> Path:
    """A tiny random sequence-classification model of the given family plus a real tokenizer."""
    tok = build_tokenizer()
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  num_labels=num_labels, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = family_model(arch, **common)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_family_checkpoints(root: Path) -> Dict[str, Path]:
    """One checkpoint per family, and a Llama with a 19-label head."""
    ckpts = {arch: save_seqcls_checkpoint(root / arch, arch, seed=i) for i, arch in enumerate(FAMILIES)}
    ckpts["llama-19-labels"] = save_seqcls_checkpoint(root / "llama19", "llama", num_labels=19, seed=7)
    return ckpts


def load_model(path):
    """The model with the attention implementation the server picks for it on the CPU."""
    from transformers import AutoModelForSequenceClassification

    from reward_server.loading.checkpoint import model_class_for, resolve_attn

    attn = resolve_attn("auto", torch.device("cpu"), model_class_for(AutoModelForSequenceClassification, str(path)))
    return AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation=attn).eval()


def reference_rewards(path, seqs):
    """Plain single-process transformers forward, one unpadded sequence at a time."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return np.stack([model(input_ids=torch.as_tensor(s)[None]).logits[0].float().numpy() for s in seqs])


# ---------------------------------------------------------------- in-process scorers

def scalar_scorer(model, layout="packed", sharing=True, budget=512, row_tokens=0, pooling="last_non_pad"):
    from reward_server.config import BatchingConfig
    from reward_server.scoring.readout import LastToken
    from reward_server.scoring.scorer import build_scorer

    batching = BatchingConfig(layout=layout, prefix_sharing=sharing, max_tokens_per_forward=budget,
                              packed_row_tokens=row_tokens)
    pad = model.config.pad_token_id if pooling == "last_non_pad" else None
    return build_scorer(model, LastToken(model.score, model.config.num_labels, pad), batching,
                        model.config.pad_token_id, torch.device("cpu"))


def scorer_with_cache(model, capacity, budget=512):
    """A scalar scorer whose prefix cache holds `capacity` tokens."""
    from reward_server.config import BatchingConfig
    from reward_server.scoring.readout import LastToken
    from reward_server.scoring.scorer import build_scorer

    batching = BatchingConfig(max_tokens_per_forward=budget, prefix_cache_tokens=capacity)
    return build_scorer(model, LastToken(model.score, model.config.num_labels, model.config.pad_token_id), batching,
                        model.config.pad_token_id, torch.device("cpu"))


class TinyPRM:
    """A tiny random causal LM read as a math-shepherd-style PRM (softmax over two candidate tokens at each tag),
    its steps, and the plain forward's step scores to compare with."""

    def __init__(self, path, tag=7, good=11, bad=12, seed=5):
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                     initializer_range=0.2, pad_token_id=0)).save_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.tag, self.good, self.bad = tag, good, bad
        self.rng = np.random.default_rng(seed)

    def steps(self, n):
        return np.concatenate([np.append(self.rng.integers(20, 500, self.rng.integers(5, 30)), self.tag)
                               for _ in range(n)])

    def scorer(self, batching):
        from reward_server.kinds.steps import StepTag
        from reward_server.scoring.readout import StepScores
        from reward_server.scoring.scorer import build_scorer

        weight = self.model.lm_head.weight[[self.good, self.bad]]
        readout = StepScores(lambda h: h @ weight.T, lambda logits: logits.softmax(-1)[:, 0], StepTag([self.tag]))
        return build_scorer(self.model, readout, batching, 0, torch.device("cpu"))

    def check(self, got, seqs, atol=1e-5):
        with torch.no_grad():
            for row, s in zip(got, seqs):
                logits = self.model(input_ids=torch.as_tensor(s)[None]).logits[0]
                expected = logits[torch.as_tensor(s) == self.tag][:, [self.good, self.bad]].softmax(-1)[:, 0].numpy()
                np.testing.assert_allclose(row[:len(expected)], expected, atol=atol, rtol=0)
                assert (row[len(expected):] == 0).all()


# ---------------------------------------------------------------- sequences

def sharing_cases(seed=0, vocab=512):
    """Named lists of sequences: what RL traffic shares, and the edge cases of a trie."""
    rng = np.random.default_rng(seed)

    def ids(n):
        return rng.integers(4, vocab, n).astype(np.int64)

    prompt, question = ids(200), ids(60)
    tree = []
    for a in range(3):  # a candidate tree 3 levels deep: every node's path is a sequence
        la = np.concatenate([question, ids(20 + a)])
        tree.append(la)
        for b in range(2):
            lb = np.concatenate([la, ids(15 + b)])
            tree.append(lb)
            tree += [np.concatenate([lb, ids(10 + c)]) for c in range(2)]
    long_prefix = ids(600)
    base = ids(120)
    return {
        "grpo group": [np.concatenate([prompt, ids(n)]) for n in (10, 80, 33, 1, 57, 20)],
        "tree 3 deep": tree,
        "prefix of another": [base[:50].copy(), base.copy(), base[:51].copy()],
        "duplicates": [base.copy(), base.copy(), ids(40), base.copy()],
        "prefix longer than budget": [np.concatenate([long_prefix, ids(n)]) for n in (5, 30, 12)],
        "nothing shared": [ids(n) for n in (30, 200, 7, 90)],
    }


def tree_depths(rng, trees=8, beams=3, depths=5):
    """A beam search over `trees` questions (150-400 tokens), shaped like benchmarks/workload.py's tree: depth d's
    requests are each kept path plus a new step of 30-120 tokens, 2 per path; each tree keeps its first `beams`
    candidates."""
    def ids(n):
        return rng.integers(4, 500, n).astype(np.int64)

    paths = [[ids(int(rng.integers(150, 400)))] for _ in range(trees)]
    out = []
    for _ in range(depths):
        candidates = [[np.concatenate([p, ids(int(rng.integers(30, 120)))]) for p in kept for _ in range(2)]
                      for kept in paths]
        out.append([c for tree in candidates for c in tree])
        paths = [c[:beams] for c in candidates]
    return out


def mixed_sequences(n, seed=0, max_len=512, vocab=512):
    """`n` random sequences, the lengths 1, max_len, 2 and max_len - 1 among them."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([[1, max_len, 2, max_len - 1], rng.integers(1, max_len + 1, n - 4)])
    return [rng.integers(4, vocab, int(n_tok)).astype(np.int64) for n_tok in lengths]


# ---------------------------------------------------------------- process reward models (the presets in conf/reward/)

TAG = "ки"
SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]
EXTRA_SPECIALS = ["<extra_0>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama-3-like: a header per turn, and a generation prompt (the RLHFlow preset scores where it predicts the reply).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Training text for the test tokenizer's merges: "ки" is learnt both alone and merged with a leading space
# (" ки" is one token), like real tokenizers whose tag token depends on the character before it.
TRAINING_TEXT = """Step 1: Let x be the number of apples ки
Step 2: Then 2x + 3 = 11, so x = 4 ки
ки The answer is 4. ки
Question: what is 3 + 5 - 2? Answer: 6.
User: What is the capital of France? Assistant: The capital of France is Paris.
"""


def build_prm_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_TEXT.strip().splitlines() * 4, trainer=trainer)
    tok.add_special_tokens(EXTRA_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_prm_checkpoint(path, model_class: str, seed: int, **extra):
    """A tiny random `model_class` (e.g. MistralForCausalLM, Qwen2ForTokenClassification) with the PRM tokenizer."""
    import transformers

    tok = build_prm_tokenizer()
    arch = model_class.split("For")[0]
    cfg = getattr(transformers, f"{arch}Config")(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
        initializer_range=0.2, **extra)  # wide weights: step scores spread over (0, 1)
    torch.manual_seed(seed)
    getattr(transformers, model_class)(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def load_tokenizer(ckpt):
    """The checkpoint's tokenizer as the server loads it (a saved and reloaded tokenizer may split text
    differently from the object that was saved: here, digits)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


def one_id(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def ref_lm_softmax(path, ids_list, tag_id, good, bad):
    """math-shepherd's model card: one forward, at every step-tag position softmax over [good, bad] logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in ids_list:
            ids = torch.as_tensor(ids)
            logits = model(input_ids=ids[None]).logits[0]
            out.append(logits[ids == tag_id][:, [good, bad]].softmax(-1)[:, 0].numpy())
    return out


def ref_token_classification(path, ids_list, sep_id):
    """Qwen2.5-Math-PRM's card: P(positive) = softmax(logits[pos])[1] at every separator."""
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in ids_list:
            ids = torch.as_tensor(ids)
            logits = model(input_ids=ids[None]).logits[0]
            out.append(logits[ids == sep_id].softmax(-1)[:, 1].numpy())
    return out


def ref_rlhflow(path, tok, conversations):
    """RLHFlow's script: one forward per step over the conversation so far, logits at -3 (the token before
    the "+" reply and <|eot_id|>), softmax over ["+", "-"], P("+")."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    plus, minus = one_id(tok, "+"), one_id(tok, "-")
    out = []
    with torch.no_grad():
        for conv in conversations:
            scores = []
            for k in range(2, len(conv) + 1, 2):
                text = tok.apply_chat_template(conv[:k], tokenize=False)
                ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
                scores.append(model(input_ids=ids).logits[0, -3, [plus, minus]].softmax(-1)[0].item())
            out.append(np.array(scores))
    return out


def shepherd_texts(n, seed, glue=""):
    """Solutions of 1..7 steps, each ended by the tag; `glue` is what stands between a step and its tag."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        steps = [f"Step {i + 1}: x = {rng.integers(100)} + {rng.integers(100)}{glue}{TAG}"
                 for i in range(int(rng.integers(1, 8)))]
        texts.append(f"Question: what is {rng.integers(10)} + 5?\n" + "\n".join(steps))
    return texts


def shepherd_reference(ckpt, tok, ids_list):
    """A math-shepherd checkpoint's step scores: softmax over "+" / "-" at every tag."""
    return ref_lm_softmax(ckpt, ids_list, one_id(tok, TAG), one_id(tok, "+"), one_id(tok, "-"))
