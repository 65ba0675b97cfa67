"""model.quantization=fp8 (reward_server/quantization.py) and model.compile's auto setting: what each refuses,
in one line, before any weight loads; on a GPU with FP8 tensor cores and torchao (the device box), what gets
quantized and that the rewards stay in order. The throughput and the fidelity report on the 8B model are in
docs/performance.md."""

import importlib.util

import numpy as np
import pytest
import torch

from oracles import save_seqcls_checkpoint, sharing_cases
from reward_server.loading import quantization
from reward_server.loading.checkpoint import StartupError
from reward_server.config import BatchingConfig, ModelConfig
from reward_server.distributed import Topology
from reward_server.kinds.scalar import load_scalar_scorer
from reward_server.loading.model import resolve_compile

CPU = torch.device("cpu")


def topology(tp: int, dp: int, device=CPU) -> Topology:
    return Topology(rank=0, world_size=tp * dp, tp_size=tp, dp_size=dp, device=device)


def test_fp8_on_the_cpu_is_refused_before_the_weights_load(tmp_path):
    path = save_seqcls_checkpoint(tmp_path / "llama")
    with pytest.raises(StartupError) as err:
        load_scalar_scorer(ModelConfig(path=str(path), quantization="fp8"), BatchingConfig(), topology(1, 1))
    message = str(err.value)
    assert message.startswith("model.quantization=fp8 needs a CUDA GPU with FP8 tensor cores (compute capability "
                              "8.9 or later"), message
    assert "\n" not in message


def test_unknown_quantization_tensor_parallelism_and_other_dtypes_are_refused():
    with pytest.raises(StartupError, match=r"model.quantization='int3': expected null or fp8"):
        quantization.check("int3", CPU, 1, torch.bfloat16)
    quantization.check(None, CPU, 4, torch.float32)  # off: nothing to check anywhere
    cuda = torch.device("cuda", 0)  # checked before anything asks the GPU itself
    with pytest.raises(StartupError, match=r"not supported with tensor parallelism \(parallel.tensor_parallel_size=2"):
        quantization.check("fp8", cuda, 2, torch.bfloat16)
    with pytest.raises(StartupError, match="quantizes from bfloat16 weights; model.dtype is torch.float16"):
        quantization.check("fp8", cuda, 1, torch.float16)


def test_compile_auto_is_on_with_cuda_for_one_rank_and_tensor_parallel_replicas():
    cuda = torch.device("cuda", 0)
    auto = ModelConfig()
    assert resolve_compile(auto, topology(1, 1, cuda)) and resolve_compile(auto, topology(1, 4, cuda))
    assert resolve_compile(auto, topology(2, 1, cuda)) and resolve_compile(auto, topology(4, 1, cuda))
    assert not resolve_compile(auto, topology(2, 2, cuda))  # TP x DP: replicas wrapped for data parallelism
    assert not resolve_compile(auto, topology(1, 1))  # the CPU
    assert resolve_compile(ModelConfig(compile=True), topology(2, 2, cuda))
    assert not resolve_compile(ModelConfig(compile=False), topology(1, 1, cuda))


FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= quantization.FP8_MIN_CAPABILITY
needs_fp8 = pytest.mark.skipif(not (FP8_GPU and importlib.util.find_spec("torchao")),
                               reason="needs a GPU with FP8 tensor cores and torchao (run on the device box)")


@needs_fp8
def test_fp8_quantizes_the_decoder_linears_only_and_keeps_the_order(tmp_path):
    path = save_seqcls_checkpoint(tmp_path / "llama")
    gpu = topology(1, 1, torch.device("cuda", 0))
    seqs = [torch.from_numpy(s) for c in sharing_cases(seed=3).values() for s in c]
    rewards = {}
    for q in (None, "fp8"):
        scorer, _, _ = load_scalar_scorer(ModelConfig(path=str(path), quantization=q, compile=False),
                                          BatchingConfig(), gpu)
        layers = scorer.backbone.layers
        linears = [m for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 7 * len(layers)  # q, k, v, o, gate, up, down
        assert all(quantization.is_fp8(m.weight) for m in linears) == (q == "fp8")
        assert not quantization.is_fp8(scorer.readout.head.weight)  # the head stays in bf16
        rewards[q] = scorer(seqs)[:, 0].float().cpu().numpy()
    # finite: the pad token's zero embedding fills packed rows, and must not become a NaN scale (ACTIVATION_AMAX_FLOOR)
    assert np.isfinite(rewards["fp8"]).all(), rewards["fp8"]
    assert not np.array_equal(rewards["fp8"], rewards[None])
    correlation = np.corrcoef(rewards["fp8"], rewards[None])[0, 1]
    assert correlation > 0.95, correlation
