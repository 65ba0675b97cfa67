"""Load a Hugging Face model on every rank (optionally tensor-parallel, quantized, compiled); kinds/ make scorers of it."""

import logging
import time
from typing import List

import torch

from .checkpoint import check_remote_code, model_class_for, resolve_attn
from ..config import ModelConfig, auto_compile, auto_dtype
from .default_model import default_model_path
from .. import distributed as d
from . import quantization
from ..distributed import Topology

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    return _DTYPES[auto_dtype(name, device.type)]


def resolve_compile(cfg: ModelConfig, topo: Topology) -> bool:
    return auto_compile(cfg.compile, topo.device.type, topo.tp_size, topo.dp_size)


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
    check_remote_code(path, cfg.trust_remote_code)
    dtype = resolve_dtype(cfg.dtype, topo.device)
    quantization.check(cfg.quantization, topo.device, topo.tp_size, dtype)
    model_type = model_class_for(model_class, path, cfg.trust_remote_code)
    attn = resolve_attn(cfg.attn_implementation, topo.device, model_type)
    kwargs = dict(dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code)
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
    return model, path


def quantize_and_compile(model, cfg: ModelConfig, topo: Topology) -> None:
    """model.quantization, then model.compile (auto: resolve_compile). Called once a loader's own checks have run,
    so that they do not compile graphs the forwards never use."""
    if cfg.quantization:
        n = quantization.quantize(decoder_layers(model, f"model.quantization={cfg.quantization}"), cfg.quantization)
        if topo.rank == 0:
            log.info("model.quantization=%s: %d linear layers of the decoder quantized", cfg.quantization, n)
    if resolve_compile(cfg, topo):
        n = compile_layers(model)
        if topo.rank == 0:
            log.info("model.compile: %d decoder layers compiled with torch.compile (on first use: the warm-up)", n)


def decoder_layers(model, setting: str) -> List[torch.nn.Module]:
    """The decoder layers: modules of the classes transformers names in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{setting}: no decoder layers ({sorted(names)}) found in {type(model).__name__}")
    return layers


def compile_layers(model) -> int:
    """torch.compile every decoder layer, with dynamic shapes so that one graph serves every forward length.
    Returns how many layers; they compile on first use."""
    layers = decoder_layers(model, "model.compile (set model.compile=false)")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def head_tensors(head: torch.nn.Module):
    """A linear head's weight and bias (or None) as ordinary tensors. With tensor parallelism transformers may hold
    them as DTensors (sharded by its tp_plan, or wrapped by FSDP with tensor x data parallelism, which gathers the
    root's own parameters only inside the root's forward); we call the backbone and the head separately, so gather
    them once here (a collective within each replica: every rank calls this at load)."""
    from torch.distributed.tensor import DTensor

    weight, bias = head.weight, getattr(head, "bias", None)
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    if isinstance(bias, DTensor):
        bias = bias.full_tensor()
    return weight, bias


def plain_head(head: torch.nn.Module):
    """The head as a function of ordinary tensors (see head_tensors)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(getattr(head, "weight", None), DTensor):
        return head
    weight, bias = head_tensors(head)
    return lambda hidden: torch.nn.functional.linear(hidden, weight, bias)


def pad_token_id(model, tokenizer) -> int:
    """The id written into padding (never attended to): the model's pad token, else the tokenizer's, else 0."""
    pad = model.config.pad_token_id
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pad
