"""reward.kind=scalar: a sequence-classification head at each sequence's pooled token, one value per label."""

import numpy as np

from ..config import BatchingConfig, ModelConfig, ServeConfig
from ..distributed import Topology
from ..loading.checkpoint import check_score_head, load_tokenizer
from ..loading.model import load_pretrained, pad_token_id, plain_head, quantize_and_compile
from ..scoring.readout import POOLINGS, LastToken
from ..scoring.scorer import build_scorer
from ..serving.inputs import RequestDecoder


def load_scalar_scorer(cfg: ModelConfig, batching: BatchingConfig, topo: Topology):
    """A sequence-classification model's scorer: its head at each sequence's pooled token (model.pooling:
    transformers' rule, the last token that is not the pad token, by default; or the true last token)."""
    from transformers import AutoModelForSequenceClassification

    model, path = load_pretrained(AutoModelForSequenceClassification, cfg, topo)
    check_score_head(model)
    tokenizer = load_tokenizer(path, cfg.trust_remote_code, cfg.chat_template)
    quantize_and_compile(model, cfg, topo)
    if cfg.pooling not in POOLINGS:
        raise ValueError(f"model.pooling={cfg.pooling!r}: expected one of {POOLINGS}")
    pad = model.config.pad_token_id if cfg.pooling == "last_non_pad" else None
    readout = LastToken(plain_head(model.score), model.config.num_labels, pad)
    scorer = build_scorer(model, readout, batching, pad_token_id(model, tokenizer), topo.device)
    return scorer, tokenizer, model.config


class ScalarOutputs:
    """`rewards` FP32 [batch, width]: one value per label."""

    specs = [("rewards", np.float32, (-1,))]

    def __init__(self, width: int):
        self.width = width

    def scored(self, values: np.ndarray, seqs) -> dict:
        return {"rewards": values}

    def failed(self, n: int) -> dict:
        return {"rewards": np.full((n, self.width), np.nan, dtype=np.float32)}


class Scalar:
    """reward.kind=scalar."""

    @staticmethod
    def load(cfg: ServeConfig, topo: Topology):
        return load_scalar_scorer(cfg.model, cfg.batching, topo)

    @staticmethod
    def decoder(cfg: ServeConfig, scorer, tokenizer, rules) -> RequestDecoder:
        return RequestDecoder(tokenizer, rules, cfg.model.add_special_tokens)

    @staticmethod
    def outputs(cfg: ServeConfig, scorer, model_config) -> ScalarOutputs:
        return ScalarOutputs(model_config.num_labels)
