"""Load a Hugging Face reward model (optionally tensor-parallel) and score token sequences with it."""

import logging
import time
from typing import List, Sequence

import torch

from .config import BatchingConfig, ModelConfig
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


DENSE_MASK_ROW_TOKENS = 2048


def resolve_attn(name: str, device: torch.device) -> str:
    if name == "auto":
        return "flex_attention" if device.type == "cuda" else "sdpa"
    return name


def resolve_path(cfg: ModelConfig, topo: Topology) -> str:
    """The checkpoint directory; for the embedded default, rank 0 builds it on first use while the others wait
    (transformers' save_pretrained writes weights from rank 0 only)."""
    if cfg.path:
        return cfg.path
    path = default_model_path(cfg.default, cfg.cache_dir) if topo.is_leader else None
    d.barrier()
    return path or default_model_path(cfg.default, cfg.cache_dir)


def tensor_parallel_kwargs(topo: Topology) -> dict:
    """from_pretrained arguments for transformers' own tensor parallelism, with tensor_parallel_size ranks per
    replica and world / tensor_parallel_size data-parallel replicas (ranks r*tp .. r*tp+tp-1 form replica r)."""
    from transformers import DistributedConfig

    if topo.dp_size == 1:
        return {"distributed_config": DistributedConfig(tp_size=topo.tp_size)}
    if "dp_replicate_size" in DistributedConfig.__dataclass_fields__:
        # transformers >= 5.18 builds one (pp, dp_replicate, fsdp, tp) mesh over the world: replicas become
        # unsharded HSDP replicas, which exchange nothing in a forward, so each may score its own share.
        return {"distributed_config": DistributedConfig(tp_size=topo.tp_size, dp_replicate_size=topo.dp_size)}
    # transformers <= 5.17 takes a mesh and applies tensor parallelism on its "tp" dimension only.
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(topo.device.type, (topo.dp_size, topo.tp_size), mesh_dim_names=("fsdp", "tp"))
    return {"distributed_config": DistributedConfig(tp_size=topo.tp_size, fsdp_size=topo.dp_size), "device_mesh": mesh}


def load_pretrained(model_class, cfg: ModelConfig, topo: Topology, **extra):
    """from_pretrained on every rank: whole model per rank (data parallel) or transformers' own tensor
    parallelism within each replica (see tensor_parallel_kwargs)."""
    path = resolve_path(cfg, topo)
    dtype = resolve_dtype(cfg.dtype, topo.device)
    kwargs = dict(dtype=dtype, attn_implementation=resolve_attn(cfg.attn_implementation, topo.device),
                  trust_remote_code=cfg.trust_remote_code)
    kwargs.update(extra)
    if topo.rank == 0:
        log.info("loading %s from %s (dtype %s, tp %d x dp %d)", model_class.__name__, path, dtype,
                 topo.tp_size, topo.dp_size)
    start = time.monotonic()
    if topo.tp_size > 1:
        model = model_class.from_pretrained(path, **kwargs, **tensor_parallel_kwargs(topo))
    else:
        model = model_class.from_pretrained(path, **kwargs).to(topo.device)
    model.eval()
    if topo.rank == 0:
        log.info("model loaded in %.1f s", time.monotonic() - start)
    use_compile = cfg.compile if cfg.compile is not None else (topo.device.type == "cuda" and topo.tp_size == 1)
    if use_compile:
        n = compile_layers(model)
        if topo.rank == 0:
            log.info("model.compile: %d decoder layers compiled with torch.compile (on first use: the warm-up)", n)
    return model, path


def compile_layers(model) -> int:
    """torch.compile every decoder layer (the classes transformers names in `_no_split_modules`), with dynamic
    shapes so that one graph serves every forward length. Returns how many layers; they compile on first use."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"model.compile: no decoder layers ({sorted(names)}) found in {type(model).__name__}; "
                         "set model.compile=false")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


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


def plain_head(head: torch.nn.Module):
    """The head as a function of ordinary tensors. With tensor x data parallelism transformers wraps the model in
    FSDP, which gathers the root's own parameters (the head) only inside the root's forward; we call the backbone
    and the head separately, so gather the head's weights once here (a gather within each replica)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(getattr(head, "weight", None), DTensor):
        return head
    weight = head.weight.full_tensor()
    bias = head.bias.full_tensor() if getattr(head, "bias", None) is not None else None
    return lambda hidden: torch.nn.functional.linear(hidden, weight, bias)


class SequenceScorer:
    """Scalar (or multi-attribute) reward of a sequence-classification model: the head applied to the hidden
    state of each sequence's last token. Pools by length, not by searching for pad tokens, so a sequence
    that ends in the pad token id is still scored at its true end."""

    def __init__(self, model, pad_token_id: int, max_tokens_per_forward: int, device: torch.device):
        self.backbone = model.base_model
        self.head = plain_head(model.score)
        self.width = model.config.num_labels
        self.pad_token_id = pad_token_id
        self.budget = max_tokens_per_forward
        self.device = device

    def output_width(self, seqs: List[torch.Tensor]) -> int:
        return self.width

    @torch.no_grad()  # not inference_mode: FSDP-wrapped replicas (TP x DP) cannot unshard inference tensors
    def __call__(self, seqs: List[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(len(seqs), self.width, dtype=torch.float32, device=self.device)
        for idx in micro_batches([len(s) for s in seqs], self.budget):
            rows = [seqs[i] for i in idx]
            lengths = d.to_device(torch.tensor([len(r) for r in rows]), self.device)
            ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.pad_token_id)
            mask = torch.arange(ids.shape[1], device=self.device)[None, :] < lengths[:, None]
            hidden = self.backbone(input_ids=ids, attention_mask=mask.long(), use_cache=False).last_hidden_state
            last = hidden[torch.arange(len(rows), device=self.device), lengths - 1]
            out[d.to_device(torch.tensor(idx), self.device)] = self.head(last).float()
        return out


def pack(lengths: Sequence[int], budget: int) -> List[List[int]]:
    """First-fit decreasing: indices grouped into rows of at most `budget` tokens in total (a longer sequence
    gets a row of its own)."""
    rows: List[List[int]] = []
    room: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return rows


class PackedSequenceScorer(SequenceScorer):
    """Padding-free: sequences concatenated into rows of at most `row_tokens` tokens (first-fit decreasing),
    positions restarting at each sequence and no attention mask, so transformers builds a block-diagonal causal
    mask from position_ids. Rows are grouped into forwards of at most `budget` tokens; a group's shorter rows get
    a tail of pad tokens that is a segment of its own. The head reads each sequence's own last token.

    Attention work grows with row length squared for a dense mask (sdpa, eager), so keep rows short there;
    flex_attention's BlockMask skips the masked blocks and takes long rows."""

    def __init__(self, model, pad_token_id: int, max_tokens_per_forward: int, device: torch.device,
                 row_tokens: int = 0):
        super().__init__(model, pad_token_id, max_tokens_per_forward, device)
        self.row_tokens = row_tokens or max_tokens_per_forward

    @torch.no_grad()  # not inference_mode: FSDP-wrapped replicas (TP x DP) cannot unshard inference tensors
    def __call__(self, seqs: List[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(len(seqs), self.width, dtype=torch.float32, device=self.device)
        lengths = [len(s) for s in seqs]
        rows = pack(lengths, self.row_tokens)
        row_len = [sum(lengths[i] for i in r) for r in rows]
        for group in micro_batches(row_len, self.budget):
            width = max(row_len[g] for g in group)
            ids, members, sizes, real = [], [], [], []  # positions and pooling indices built on the CPU
            for g in group:
                pad = width - row_len[g]
                parts = [seqs[i] for i in rows[g]] + ([seqs[rows[g][0]].new_full((pad,), self.pad_token_id)] if pad else [])
                ids.append(torch.cat(parts))
                members += rows[g]
                sizes += [len(p) for p in parts]
                real += [True] * len(rows[g]) + ([False] if pad else [])
            positions = torch.cat([torch.arange(n) for n in sizes]).view(len(group), width)
            last = (torch.cumsum(torch.tensor(sizes), 0) - 1)[torch.tensor(real)]  # each sequence's last token
            hidden = self.backbone(input_ids=torch.stack(ids), position_ids=d.to_device(positions, self.device),
                                   attention_mask=None, use_cache=False).last_hidden_state
            pooled = hidden.reshape(-1, hidden.shape[-1])[d.to_device(last, self.device)]
            out[d.to_device(torch.tensor(members), self.device)] = self.head(pooled).float()
        return out


SCORERS = {"packed": PackedSequenceScorer, "padded": SequenceScorer}


def warm_up(scorer, vocab_size: int, budget: int, device: torch.device) -> None:
    """A few synthetic batches of different shapes through the scorer on every rank (same data everywhere, so
    tensor-parallel collectives line up), so that the first requests do not pay for compilation."""
    gen = torch.Generator().manual_seed(0)
    for lengths in ([7], [budget // 8] * 3, [budget // 2, budget // 3, 100], [budget // 4] * 5):
        scorer([torch.randint(3, vocab_size, (n,), generator=gen).to(device) for n in lengths])


def load_scalar_scorer(cfg: ModelConfig, batching: BatchingConfig, topo: Topology):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, path = load_pretrained(AutoModelForSequenceClassification, cfg, topo)
    if not hasattr(model, "score"):
        raise ValueError(f"{type(model).__name__} has no `score` head; expected a *ForSequenceClassification model")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    pad = model.config.pad_token_id
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if batching.layout not in SCORERS:
        raise ValueError(f"batching.layout={batching.layout!r}: expected one of {sorted(SCORERS)}")
    row_tokens = batching.packed_row_tokens or (
        batching.max_tokens_per_forward if model.config._attn_implementation == "flex_attention" else DENSE_MASK_ROW_TOKENS)
    extra = {"row_tokens": row_tokens} if batching.layout == "packed" else {}
    scorer = SCORERS[batching.layout](model, pad, batching.max_tokens_per_forward, topo.device, **extra)
    return scorer, tokenizer, model.config
