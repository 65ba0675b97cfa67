"""resolve(): every "auto" / null default turned, in one place, into the value a rank uses; rank 0 logs them once."""

import logging
import socket
from dataclasses import dataclass
from typing import Callable, FrozenSet


from .choices import Attention
from .schema import ServeConfig
from .validate import ConfigError, show

log = logging.getLogger("reward_server.config")


# ------------------------------------------------------------------------------------------------- auto values

# attention implementations tried for model.attn_implementation=auto, best first
AUTO_ATTENTION = {"cuda": ("flex_attention", "sdpa", "eager"), "cpu": ("sdpa", "eager")}
# the model class's flag for each implementation (transformers' own); the others every class supports
ATTENTION_SUPPORT_FLAGS = {"flex_attention": "_supports_flex_attn", "sdpa": "_supports_sdpa"}
# batching.instances=0: Triton model instances by the device rank 0 computes on. Each instance holds its batch until
# every request of it is scored, so instances x batch size (preferred_batch_sizes, 16) bounds the requests rank 0 sees
# at once. On GPU, 16: at 64 one-sample GRPO clients under the stand-in scorer 8 left the forwards 78-84 % full (the
# rest waited in Triton's queue), 16 filled them 93-95 % (docs/results/2026-12-06-instances-cpu/). On the CPU, where
# forwards are slow and small, 2 are enough and each instance less is one Python stub process less to start.
AUTO_INSTANCES = {"cuda": 16, "cpu": 2}
AUTO_QUEUED_FORWARDS = 32  # batching.max_queued_tokens=null: this many forwards' token budgets
# Longest packed row with a dense attention mask (sdpa, eager), whose memory and work grow with the row length
# squared; flex_attention skips masked blocks, so its rows take the whole token budget.
DENSE_MASK_ROW_TOKENS = 2048
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ModelInfo:
    """What the checkpoint says that an auto value depends on: its config (config.json) and its model class."""

    max_position_embeddings: int
    # attention implementations the model class supports (ATTENTION_SUPPORT_FLAGS; every one without a flag)
    attention: FrozenSet[str] = frozenset(a.value for a in Attention if a != "auto")
    class_name: str = "the model class"

    @classmethod
    def of(cls, config, model_class=None) -> "ModelInfo":
        """From a transformers config (or config.json as a dict) and the class an Auto class will build (None:
        unknown, taken to support everything)."""
        get = config.get if isinstance(config, dict) else lambda k, default=None: getattr(config, k, default)
        def supports(attn: str) -> bool:  # as transformers' class flags say; no flag: supported
            flag = ATTENTION_SUPPORT_FLAGS.get(attn)
            return model_class is None or flag is None or bool(getattr(model_class, flag, True))

        supported = frozenset(a.value for a in Attention if a != "auto" and supports(a.value))
        name = model_class.__name__ if model_class is not None else "the model class"
        return cls(max_position_embeddings=get("max_position_embeddings"), attention=supported, class_name=name)


@dataclass(frozen=True)
class Resolved:
    """Every auto / null default of a ServeConfig made concrete for one rank (see `resolve`)."""

    device_type: str  # cuda | cpu
    tp_size: int
    dp_size: int
    backend: str  # parallel.backend: nccl | gloo
    dtype: str  # model.dtype: float32 | bfloat16 | float16
    attn_implementation: str  # model.attn_implementation
    compile: bool  # model.compile
    warmup: bool  # batching.warmup
    max_length: int  # model.max_length
    packed_row_tokens: int  # batching.packed_row_tokens
    overlap: bool  # batching.overlap (GPU only)
    max_queued_tokens: int  # batching.max_queued_tokens, 0: no limit
    instances: int  # batching.instances
    max_row_bytes: int  # server.max_row_bytes
    max_request_bytes: int  # server.max_request_bytes
    triton_metrics_port: int  # server.triton_metrics_port

    KEYS = {"backend": "parallel.backend", "dtype": "model.dtype", "attn_implementation": "model.attn_implementation",
            "compile": "model.compile", "warmup": "batching.warmup", "max_length": "model.max_length",
            "packed_row_tokens": "batching.packed_row_tokens", "overlap": "batching.overlap",
            "max_queued_tokens": "batching.max_queued_tokens", "instances": "batching.instances",
            "max_row_bytes": "server.max_row_bytes", "max_request_bytes": "server.max_request_bytes",
            "triton_metrics_port": "server.triton_metrics_port"}

    def line(self) -> str:
        settings = ", ".join(f"{key}={show(getattr(self, name))}" for name, key in self.KEYS.items())
        return f"settings on the {self.device_type} (tp {self.tp_size} x dp {self.dp_size}): {settings}"


def resolve_backend(backend: str, cuda_available: bool) -> str:
    """parallel.backend; auto: nccl when CUDA is available, gloo otherwise. Ranks compute on CUDA with nccl, on the
    CPU with gloo (device_type_of)."""
    if backend != "auto":
        return str(backend)
    return "nccl" if cuda_available else "gloo"


def device_type_of(backend: str) -> str:
    return "cuda" if backend == "nccl" else "cpu"


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def auto_dtype(dtype: str, device_type: str) -> str:
    """model.dtype; auto: bfloat16 on GPU, float32 on CPU."""
    return str(dtype) if dtype != "auto" else ("bfloat16" if device_type == "cuda" else "float32")


def auto_attention(name: str, device_type: str, model: ModelInfo) -> str:
    """model.attn_implementation; auto: the first of AUTO_ATTENTION[device] that the model class supports (Gemma2 has
    no sdpa: eager on the CPU, flex_attention on the GPU, both with its attention soft-capping). An explicit choice
    the class lacks raises ConfigError."""
    if name != "auto":
        if str(name) not in model.attention:
            raise ConfigError("model.attn_implementation", name, f"{model.class_name} does not support it; use auto")
        return str(name)
    return next(a for a in AUTO_ATTENTION.get(device_type, AUTO_ATTENTION["cuda"]) if a in model.attention)


def auto_compile(compile_, device_type: str, tp_size: int, dp_size: int) -> bool:
    """model.compile; auto: on with CUDA, except for tensor-parallel replicas wrapped for data parallelism (TP x DP,
    not measured); measured faster with one rank and with TP=2 (docs/performance.md)."""
    if compile_ is not None:
        return bool(compile_)
    return device_type == "cuda" and (tp_size == 1 or dp_size == 1)


def auto_row_tokens(packed_row_tokens: int, max_tokens_per_forward: int, attn: str) -> int:
    """batching.packed_row_tokens; 0: the whole budget with flex_attention (its block mask skips other sequences'
    blocks), DENSE_MASK_ROW_TOKENS with a dense mask, whose attention work grows with the row length squared."""
    return packed_row_tokens or (max_tokens_per_forward if attn == "flex_attention" else DENSE_MASK_ROW_TOKENS)


def resolve(cfg: ServeConfig, device_type: str, tp_size: int, dp_size: int, model: ModelInfo, *, rank: int = 0,
            pick_port: Callable[[], int] = free_loopback_port) -> Resolved:
    """Every "auto" rule in one place: the values a rank of `device_type` ("cuda" / "cpu") in a world of `tp_size`
    x `dp_size` ranks uses for `cfg` and a checkpoint described by `model`. Logs them on rank 0. A setting given
    explicitly is kept; an explicit attention implementation the model class lacks raises ConfigError."""
    m, b, s = cfg.model, cfg.batching, cfg.server
    cuda = device_type == "cuda"
    backend = resolve_backend(cfg.parallel.backend, cuda)
    dtype = auto_dtype(m.dtype, device_type)
    attn = auto_attention(m.attn_implementation, device_type, model)
    compile_ = auto_compile(m.compile, device_type, tp_size, dp_size)
    # batching.warmup auto: when there is something to compile or tune before the first request (CUDA kernels,
    # torch.compile, flex_attention); not on the CPU with eager/sdpa attention, where a warm-up only costs start-up
    # time (measured, tiny model, 2 ranks on 2 cores: ready after 12.5 s instead of 24.6 s, first requests as fast)
    warmup = b.warmup if b.warmup is not None else cuda or compile_ or attn == "flex_attention"
    # model.max_length null (or 0): the model's max_position_embeddings
    max_length = m.max_length or model.max_position_embeddings
    row_tokens = auto_row_tokens(b.packed_row_tokens, b.max_tokens_per_forward, attn)
    # batching.overlap: on the CPU a forward runs to its end inside the launch: overlapping would only delay each
    # answer by a forward
    overlap = b.overlap and cuda
    # batching.max_queued_tokens null: AUTO_QUEUED_FORWARDS forwards' token budgets over all replicas; 0: no limit
    budget = b.max_tokens_per_forward * dp_size
    queued = AUTO_QUEUED_FORWARDS * budget if b.max_queued_tokens is None else b.max_queued_tokens
    # batching.instances 0: AUTO_INSTANCES by device
    instances = b.instances or AUTO_INSTANCES.get(device_type, AUTO_INSTANCES["cuda"])
    # server.max_row_bytes / max_request_bytes null (or 0): bytes_per_token x max_length per row, the row limit x
    # max_batch_size per request (a token of text is rarely more than a few bytes)
    row_bytes = s.max_row_bytes or s.bytes_per_token * max_length
    request_bytes = s.max_request_bytes or row_bytes * b.max_batch_size
    # server.triton_metrics_port 0: any free port on the loopback
    triton_metrics_port = s.triton_metrics_port or pick_port()
    resolved = Resolved(device_type=device_type, tp_size=tp_size, dp_size=dp_size, backend=backend, dtype=dtype,
                        attn_implementation=attn, compile=bool(compile_), warmup=bool(warmup), max_length=max_length,
                        packed_row_tokens=row_tokens, overlap=bool(overlap), max_queued_tokens=queued,
                        instances=instances, max_row_bytes=row_bytes, max_request_bytes=request_bytes,
                        triton_metrics_port=triton_metrics_port)
    if rank == 0:
        log.info(resolved.line())
    return resolved
