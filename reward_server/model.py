"""Load a Hugging Face reward model (optionally tensor-parallel) and score token sequences with it."""

import logging
import time
from typing import List, Sequence

import torch

from .config import ModelConfig
from .default_model import default_model_path
from . import distributed as d
from .distributed import Topology

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"model.dtype={name!r}: expected auto or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def resolve_path(cfg: ModelConfig, topo: Topology) -> str:
    """The checkpoint directory; for the embedded default, rank 0 builds it on first use while the others wait
    (transformers' save_pretrained writes weights from rank 0 only)."""
    if cfg.path:
        return cfg.path
    path = default_model_path(cfg.default, cfg.cache_dir) if topo.is_leader else None
    d.barrier()
    return path or default_model_path(cfg.default, cfg.cache_dir)


def load_pretrained(model_class, cfg: ModelConfig, topo: Topology, **extra):
    """from_pretrained on every rank: whole model per rank (data parallel) or transformers' own tensor
    parallelism over all ranks (DistributedConfig(tp_size=...))."""
    path = resolve_path(cfg, topo)
    dtype = resolve_dtype(cfg.dtype, topo.device)
    kwargs = dict(dtype=dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    kwargs.update(extra)
    if topo.rank == 0:
        log.info("loading %s from %s (dtype %s, tp %d x dp %d)", model_class.__name__, path, dtype,
                 topo.tp_size, topo.dp_size)
    start = time.monotonic()
    if topo.tp_size > 1:
        if topo.dp_size > 1:
            raise NotImplementedError(
                f"tensor_parallel_size={topo.tp_size} with {topo.dp_size} data-parallel replicas: transformers' "
                "tensor parallelism spans the whole torchrun world, so use tensor_parallel_size=1 (data parallel) "
                "or tensor_parallel_size=<nproc_per_node> (tensor parallel)."
            )
        from transformers import DistributedConfig

        model = model_class.from_pretrained(path, distributed_config=DistributedConfig(tp_size=topo.tp_size), **kwargs)
    else:
        model = model_class.from_pretrained(path, **kwargs).to(topo.device)
    model.eval()
    if topo.rank == 0:
        log.info("model loaded in %.1f s", time.monotonic() - start)
    return model, path


def micro_batches(lengths: Sequence[int], budget: int) -> List[List[int]]:
    """Indices grouped longest first so that rows x longest length stays within `budget` tokens
    (a sequence longer than the budget runs alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: List[List[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class SequenceScorer:
    """Scalar (or multi-attribute) reward of a sequence-classification model: the head applied to the hidden
    state of each sequence's last token. Pools by length, not by searching for pad tokens, so a sequence
    that ends in the pad token id is still scored at its true end."""

    def __init__(self, model, pad_token_id: int, max_tokens_per_forward: int, device: torch.device):
        self.backbone = model.base_model
        self.head = model.score
        self.width = model.config.num_labels
        self.pad_token_id = pad_token_id
        self.budget = max_tokens_per_forward
        self.device = device

    def output_width(self, seqs: List[torch.Tensor]) -> int:
        return self.width

    @torch.inference_mode()
    def __call__(self, seqs: List[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(len(seqs), self.width, dtype=torch.float32, device=self.device)
        for idx in micro_batches([len(s) for s in seqs], self.budget):
            rows = [seqs[i] for i in idx]
            lengths = torch.tensor([len(r) for r in rows], device=self.device)
            ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.pad_token_id)
            mask = torch.arange(ids.shape[1], device=self.device)[None, :] < lengths[:, None]
            hidden = self.backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            last = hidden[torch.arange(len(rows), device=self.device), lengths - 1]
            out[torch.tensor(idx, device=self.device)] = self.head(last).float()
        return out


def load_scalar_scorer(cfg: ModelConfig, max_tokens_per_forward: int, topo: Topology):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, path = load_pretrained(AutoModelForSequenceClassification, cfg, topo)
    if not hasattr(model, "score"):
        raise ValueError(f"{type(model).__name__} has no `score` head; expected a *ForSequenceClassification model")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    pad = model.config.pad_token_id
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return SequenceScorer(model, pad, max_tokens_per_forward, topo.device), tokenizer, model.config
