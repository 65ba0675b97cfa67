"""model.quantization=fp8: the decoder layers' linear layers in FP8 (e4m3) on Hopper-class GPUs, through torchao's
float8 inference config: weights quantized once at load with one scale per output row, activations quantized on
the fly with one scale per token (row), and the matrix multiplies on the FP8 tensor cores. Embeddings, norms,
attention and the reward head stay in the model's dtype. Opt-in: it changes rewards by more than bf16 rounding does
(`python -m reward_server.check` measures by how much, and whether the ranking of sequences is kept)."""

import importlib
from typing import Iterable, Optional

import torch

from .checkpoint import StartupError

CHOICES = (None, "fp8")
# FP8 tensor cores: compute capability 8.9 (Ada) and 9.0 (Hopper) and later
FP8_MIN_CAPABILITY = (8, 9)
TORCHAO_HINT = "pip install -e '.[fp8]' in the repository, or torchao built for your torch (docs/performance.md, FP8)"
# Floor of a token's largest |activation| when its FP8 scale is computed. A token whose activations are all zero
# (the pad token of a checkpoint whose pad embedding is zero, which fills packed rows) would get scale 0 and NaN,
# and attention carries a NaN value to every token of its block (0 x NaN); with the floor it quantizes to zeros.
ACTIVATION_AMAX_FLOOR = 1e-12


def check(quantization: Optional[str], device: torch.device, tp_size: int, dtype: torch.dtype) -> None:
    """Before the weights load: a configuration the quantization cannot serve fails with what to change."""
    if quantization not in CHOICES:
        raise StartupError(f"model.quantization={quantization!r}: expected null or fp8")
    if quantization is None:
        return
    if device.type != "cuda":
        raise StartupError("model.quantization=fp8 needs a CUDA GPU with FP8 tensor cores (compute capability "
                           f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or later: Ada, Hopper); this server "
                           f"runs on the {device.type}")
    if tp_size > 1:
        raise StartupError("model.quantization=fp8 is not supported with tensor parallelism "
                           f"(parallel.tensor_parallel_size={tp_size}); use data parallelism (one GPU per replica)")
    if dtype != torch.bfloat16:
        raise StartupError(f"model.quantization=fp8 quantizes from bfloat16 weights; model.dtype is {dtype}")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise StartupError(f"model.quantization=fp8: {torch.cuda.get_device_name(device)} (compute capability "
                           f"{capability[0]}.{capability[1]}) has no FP8 tensor cores; 8.9 or later is needed")
    try:
        importlib.import_module("torchao.quantization")
    except ImportError as exc:
        raise StartupError(f"model.quantization=fp8 needs torchao: {TORCHAO_HINT} ({exc})") from exc


def quantize(layers: Iterable[torch.nn.Module]) -> int:
    """Every linear layer inside `layers` (the decoder layers) to FP8 weights with dynamic per-row activation
    scales. Returns how many were quantized (torchao leaves a layer whose sizes are not multiples of 16 as it is)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
                                                       activation_value_lb=ACTIVATION_AMAX_FLOOR)
    n = 0
    for layer in layers:
        quantize_(layer, config)
        n += sum(1 for m in layer.modules() if isinstance(m, torch.nn.Linear) and is_fp8(m.weight))
    return n


def is_fp8(weight: torch.Tensor) -> bool:
    """A weight torchao has quantized (a tensor subclass holding FP8 data)."""
    data = getattr(weight, "qdata", None)
    return data is not None and data.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
