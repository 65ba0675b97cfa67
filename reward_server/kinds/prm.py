"""Process reward models: one score per reasoning step, read in a single forward pass over the whole solution.

A step is marked by a step tag: a token id sequence found in the token ids themselves, so every rank finds
the same steps in the ids it received (`StepTag.counts`), and the engine stays generic. A step is scored at
the last token of its tag: the hidden state there goes through the model's own head (the LM head restricted
to the candidate tokens, or a token-classification head) and becomes a number (`step_head`). The forward is the
scalar scorer's (scoring/scorer.py: same layouts, same prefix sharing) with another readout.
The formats (math-shepherd, Qwen2.5-Math-PRM, RLHFlow) are presets in conf/reward/; see docs/prm.md.
"""

import logging
from typing import List

import torch

from ..config import BatchingConfig, ModelConfig, RewardConfig, ServeConfig
from ..distributed import Topology
from ..loading.checkpoint import load_tokenizer, probe_attn
from ..loading.model import head_tensors, load_pretrained, pad_token_id, plain_head, quantize_and_compile
from ..scoring.readout import StepScores
from ..scoring.scorer import build_scorer
from .steps import StepDecoder, StepOutputs, candidate_ids, check_config, make_step_tag

log = logging.getLogger(__name__)


def step_head(cfg: RewardConfig, module, full_head, candidates: List[int]):
    """The head applied at step positions, and what turns its output into a score. A token-classification head
    (`full_head`, already a function of plain tensors) is used whole; a causal LM's head `module` is cut down to the
    candidate tokens' rows, so the vocabulary projection is never computed in full."""
    if cfg.score == "classifier":
        label = cfg.positive_label
        return full_head, lambda logits: logits.softmax(-1)[:, label]
    weight, bias = head_tensors(module)
    rows = torch.tensor(candidates, dtype=torch.int64, device=weight.device)
    weight = weight[rows].contiguous()
    bias = bias[rows].contiguous() if bias is not None else None

    def head(hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, weight, bias)

    if cfg.score == "softmax":  # P(first candidate) among the candidates
        return head, lambda logits: logits.softmax(-1)[:, 0]
    return head, lambda logits: logits[:, 0]


def check_head(model, backbone, head, probe: List[int], device: torch.device) -> None:
    """The scorer applies `head` to the backbone's hidden states itself (to skip the vocabulary projection
    everywhere but at the steps); refuse a model whose own logits are something else (e.g. soft-capped)."""
    ids = torch.tensor([probe], device=device)
    # sdpa (or eager) for the probe: flex_attention compiles on first use, and compiling it (and its block mask) for a
    # few-token eager forward cost start-up seconds and a recompile in the warm-up, for shapes no forward uses
    attn = model.config._attn_implementation
    if attn == "flex_attention":
        model.set_attn_implementation(probe_attn(model))
    try:
        with torch.no_grad():  # no KV cache: a cache object per layer would make compiled layers recompile
            full = model(input_ids=ids, use_cache=False).logits.float()
            fast = head(backbone(input_ids=ids, use_cache=False).last_hidden_state).float()
    finally:
        if attn == "flex_attention":
            model.set_attn_implementation(attn)
    if not torch.allclose(fast, full, rtol=1e-2, atol=1e-2):
        raise ValueError(f"{type(model).__name__}: its logits are not its head applied to the last hidden state "
                         f"(max difference {(fast - full).abs().max().item():.3g}); this model is not supported")


def load_step_scorer(model_cfg: ModelConfig, cfg: RewardConfig, batching: BatchingConfig, topo: Topology):
    """(scorer, tokenizer, model config) of a process reward model."""
    import transformers

    check_config(cfg)
    default = "AutoModelForTokenClassification" if cfg.score == "classifier" else "AutoModelForCausalLM"
    model, path = load_pretrained(getattr(transformers, cfg.model_class or default), model_cfg, topo)
    tokenizer = load_tokenizer(path, model_cfg.trust_remote_code, model_cfg.chat_template)
    vocab_size = model.config.vocab_size
    tag = make_step_tag(cfg, tokenizer, vocab_size)
    if cfg.score == "classifier":
        if not 0 <= cfg.positive_label < model.config.num_labels:
            raise ValueError(f"reward.positive_label={cfg.positive_label} but the model has "
                             f"{model.config.num_labels} labels")
        candidates, module = [], model.score if hasattr(model, "score") else model.classifier
    else:
        candidates, module = candidate_ids(cfg, tokenizer, vocab_size), model.get_output_embeddings()
    full_head = plain_head(module)
    check_head(model, model.base_model, full_head, tag.ids + candidates + tag.ids, topo.device)
    quantize_and_compile(model, model_cfg, topo)  # after the check: its one-off shape compiles nothing
    if topo.rank == 0:
        log.info("process reward model: %s, score=%s, candidate token ids %s, aggregate=%s",
                 tag, cfg.score, candidates, cfg.aggregate)
    head, read = step_head(cfg, module, full_head, candidates)
    scorer = build_scorer(model, StepScores(head, read, tag), batching, pad_token_id(model, tokenizer), topo.device)
    return scorer, tokenizer, model.config


class PRM:
    """reward.kind=prm: one score per reasoning step (docs/prm.md)."""

    @staticmethod
    def load(cfg: ServeConfig, topo: Topology):
        return load_step_scorer(cfg.model, cfg.reward, cfg.batching, topo)

    @staticmethod
    def decoder(cfg: ServeConfig, scorer, tokenizer, rules) -> StepDecoder:
        return StepDecoder(tokenizer, rules, cfg.model.add_special_tokens, scorer.readout.tag, cfg.reward.max_steps)

    @staticmethod
    def outputs(cfg: ServeConfig, scorer, model_config) -> StepOutputs:
        return StepOutputs(scorer.readout.tag, cfg.reward.aggregate)
