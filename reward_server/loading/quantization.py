"""model.quantization: the decoder layers' linear layers in FP8 (e4m3) on Hopper-class GPUs, through torchao's
float8 inference config: weights quantized once at load, activations quantized on the fly, and the matrix
multiplies on the FP8 tensor cores. Embeddings, norms, attention and the reward head stay in the model's dtype.

Recipes (RECIPES): `fp8` every linear layer of every decoder layer, one scale per weight row and per token;
`fp8_tensor` the same with one scale per weight and per activation tensor; `fp8_mlp` the MLP's linear layers only
(attention's projections stay bf16); `fp8_skip_ends` / `fp8_mlp_skip_ends` the same as fp8 / fp8_mlp with the first
and the last decoder layer kept in bf16. Opt-in: it changes rewards by more than bf16 rounding does; the start-up
fidelity gate (fidelity_gate.py) measures by how much on a calibration sample and refuses to serve a model whose
order it does not keep, and `python -m reward_server.check --quantized` measures it on your own data.

TEST ONLY: `fault_injection.quantization_noise` (use_stand_in) replaces torchao with a stand-in that multiplies
each chosen weight by (1 + noise x N(0, 1)), seeded, on any device and dtype, so that CPU tests exercise the
recipes and the gate."""

import importlib
import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch

from .checkpoint import StartupError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    rows: bool  # one scale per weight row and per token (else one per tensor)
    mlp_only: bool  # only the linear layers under the decoder layer's `mlp`
    keep_ends: bool  # the first and the last decoder layer stay unquantized


RECIPES = {"fp8": Recipe(rows=True, mlp_only=False, keep_ends=False),
           "fp8_tensor": Recipe(rows=False, mlp_only=False, keep_ends=False),
           "fp8_mlp": Recipe(rows=True, mlp_only=True, keep_ends=False),
           "fp8_skip_ends": Recipe(rows=True, mlp_only=False, keep_ends=True),
           "fp8_mlp_skip_ends": Recipe(rows=True, mlp_only=True, keep_ends=True)}
CHOICES = (None, *RECIPES)
# FP8 tensor cores: compute capability 8.9 (Ada) and 9.0 (Hopper) and later
FP8_MIN_CAPABILITY = (8, 9)
TORCHAO_HINT = "pip install -e '.[fp8]' in the repository, or torchao built for your torch (docs/performance.md, FP8)"
# Floor of a token's largest |activation| when its FP8 scale is computed. A token whose activations are all zero
# (the pad token of a checkpoint whose pad embedding is zero, which fills packed rows) would get scale 0 and NaN,
# and attention carries a NaN value to every token of its block (0 x NaN); with the floor it quantizes to zeros.
ACTIVATION_AMAX_FLOOR = 1e-12

_stand_in: Optional[float] = None  # fault_injection.quantization_noise, TEST ONLY (use_stand_in)
# each quantized linear layer -> its weight before quantization, kept for the fidelity gate (released by it)
_originals: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Parameter]" = weakref.WeakKeyDictionary()


def use_stand_in(noise: float) -> None:
    """TEST ONLY (fault_injection.quantization_noise): from now on quantize() perturbs instead of calling torchao,
    and check() accepts any device and dtype; noise 0 restores torchao."""
    global _stand_in
    _stand_in = noise if noise > 0 else None
    if _stand_in is not None:
        log.warning("TEST-ONLY stand-in quantizer: model.quantization multiplies the chosen weights by "
                    "(1 + %g x N(0, 1)) instead of quantizing them (fault_injection.quantization_noise)", noise)


def check(quantization: Optional[str], device: torch.device, tp_size: int, dtype: torch.dtype) -> None:
    """Before the weights load: a configuration the quantization cannot serve fails with what to change."""
    if quantization not in CHOICES:
        raise StartupError(f"model.quantization={quantization!r}: expected null or {', '.join(RECIPES)}")
    if quantization is None:
        return
    q = f"model.quantization={quantization}"
    if tp_size > 1:
        raise StartupError(f"{q} is not supported with tensor parallelism "
                           f"(parallel.tensor_parallel_size={tp_size}); use data parallelism (one GPU per replica)")
    if _stand_in is not None:
        return
    if device.type != "cuda":
        raise StartupError(f"{q} needs a CUDA GPU with FP8 tensor cores (compute capability "
                           f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or later: Ada, Hopper); this server "
                           f"runs on the {device.type}")
    if dtype != torch.bfloat16:
        raise StartupError(f"{q} quantizes from bfloat16 weights; model.dtype is {dtype}")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise StartupError(f"{q}: {torch.cuda.get_device_name(device)} (compute capability "
                           f"{capability[0]}.{capability[1]}) has no FP8 tensor cores; 8.9 or later is needed")
    try:
        importlib.import_module("torchao.quantization")
    except ImportError as exc:
        raise StartupError(f"{q} needs torchao: {TORCHAO_HINT} ({exc})") from exc


def chosen(layers: List[torch.nn.Module], recipe: Recipe) -> List[List[torch.nn.Linear]]:
    """Per decoder layer, the linear layers the recipe quantizes (none in a kept first or last layer)."""
    out = []
    for at, layer in enumerate(layers):
        if recipe.keep_ends and at in (0, len(layers) - 1):
            out.append([])
            continue
        out.append([m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)
                    and (not recipe.mlp_only or name.split(".")[0] == "mlp")])
    return out


def quantize(layers: Iterable[torch.nn.Module], name: str = "fp8") -> int:
    """The linear layers that recipe `name` picks inside `layers` (the decoder layers), to FP8 weights with dynamic
    activation scales. Each one's weight before quantization is kept (unquantized(), release()) for the fidelity
    gate. Returns how many were quantized (torchao leaves a layer whose sizes are not multiples of 16 as it is)."""
    recipe, layers = RECIPES[name], list(layers)
    picked = chosen(layers, recipe)
    if not any(picked):
        raise StartupError(f"model.quantization={name}: no linear layer of the decoder layers fits the recipe "
                           f"({'mlp only, ' if recipe.mlp_only else ''}{len(layers)} decoder layers)")
    before = {m: m.weight for linears in picked for m in linears}
    if _stand_in is not None:
        _perturb([m for linears in picked for m in linears], _stand_in)
    else:
        _torchao(layers, picked, recipe)
    n = 0
    for m, weight in before.items():
        if m.weight is not weight:
            _originals[m] = weight
            n += 1
    return n


def _torchao(layers, picked, recipe: Recipe) -> None:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow() if recipe.rows else PerTensor(),
                                                       activation_value_lb=ACTIVATION_AMAX_FLOOR)
    for layer, linears in zip(layers, picked):
        if linears:
            ids = {id(m) for m in linears}
            quantize_(layer, config, filter_fn=lambda m, _fqn: id(m) in ids)


def _perturb(linears: List[torch.nn.Linear], noise: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in linears:
        w = m.weight.detach()
        factor = 1 + noise * torch.randn(w.shape, generator=gen, dtype=torch.float32)
        m.weight = torch.nn.Parameter((w.float() * factor.to(w.device)).to(w.dtype), requires_grad=False)


@contextmanager
def unquantized(model: torch.nn.Module):
    """Within: every quantized linear layer of `model` holds its weight from before quantization again (the same
    tensor, no copy)."""
    swapped = [(m, m.weight) for m in model.modules() if m in _originals]
    for m, _ in swapped:
        m.weight = _originals[m]
    try:
        yield len(swapped)
    finally:
        for m, quantized in swapped:
            m.weight = quantized


def release(model: torch.nn.Module) -> None:
    """Forget `model`'s weights from before quantization (their memory is freed)."""
    for m in model.modules():
        _originals.pop(m, None)


def is_fp8(weight: torch.Tensor) -> bool:
    """A weight torchao has quantized (a tensor subclass holding FP8 data)."""
    data = getattr(weight, "qdata", None)
    return data is not None and data.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
