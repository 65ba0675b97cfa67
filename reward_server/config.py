"""Typed configuration schema. Values live in conf/*.yaml; these dataclasses give them types, defaults and meanings.

Hydra checks every override against this schema when the config is composed: `model.dtype=bf17` (a choice is an
Enum), `server.http_port=abc` or `model.bogus=1` fail there. `validate` then checks what a type cannot say (sizes,
ports, token variables, tensor parallelism against the world size and the checkpoint's heads, the PRM rules) before
any process group or weights; `resolve` turns every "auto" / null default into the value a rank uses.
Each field's meaning is its `help` metadata; `python -m reward_server.config --doc` writes docs/configuration.md.

The choices are `StrEnum`s whose member names are their values, so code comparing a setting to a string
(`cfg.model.pooling == "last_non_pad"`) or looking it up in a dict keyed by strings keeps working.
"""

import dataclasses
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Callable, FrozenSet, List, Mapping, Optional, Tuple, Union, get_args, get_origin

from hydra.core.config_store import ConfigStore

log = logging.getLogger(__name__)


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Optional[Callable[[], Any]] = None):
    """A dataclass field with its meaning (`help` metadata, shown in docs/configuration.md)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": doc})
    return field(default=default, metadata={"help": doc})


# ------------------------------------------------------------------------------------------------- choices


class DType(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Attention(StrEnum):
    auto = "auto"
    flex_attention = "flex_attention"
    sdpa = "sdpa"
    eager = "eager"
    # padded layout only (the packed layout's masks take flex_attention, sdpa or eager); CUDA, with their packages
    flash_attention_2 = "flash_attention_2"
    flash_attention_3 = "flash_attention_3"


class Truncation(StrEnum):
    error = "error"
    left = "left"
    right = "right"


class Pooling(StrEnum):
    last_non_pad = "last_non_pad"
    last = "last"


class Quantization(StrEnum):
    fp8 = "fp8"


class Backend(StrEnum):
    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


class BatchLayout(StrEnum):
    packed = "packed"
    padded = "padded"


class OpenRLHFEos(StrEnum):
    strip_and_append = "strip_and_append"
    as_is = "as_is"


class RewardKind(StrEnum):
    scalar = "scalar"
    prm = "prm"


class StepTagSource(StrEnum):
    text = "text"
    ids = "ids"
    generation_prompt = "generation_prompt"


class StepScore(StrEnum):
    softmax = "softmax"
    logit = "logit"
    classifier = "classifier"


class Aggregate(StrEnum):
    min = "min"
    last = "last"
    mean = "mean"
    product = "product"


# ------------------------------------------------------------------------------------------------- schema


@dataclass
class DefaultModelConfig:
    """The embedded default reward model: a tiny random Llama built from this config, saved once, then
    loaded with from_pretrained like any checkpoint. Its rewards are meaningless; it exists so that
    everything runs offline."""

    seed: int = setting(0, "Seed of the random weights.")
    vocab_size: int = setting(512, "Vocabulary of its byte-level BPE tokenizer (trained on a fixed text).")
    hidden_size: int = setting(64, "LlamaConfig.hidden_size.")
    intermediate_size: int = setting(128, "LlamaConfig.intermediate_size.")
    num_hidden_layers: int = setting(2, "LlamaConfig.num_hidden_layers.")
    num_attention_heads: int = setting(4, "LlamaConfig.num_attention_heads.")
    num_key_value_heads: int = setting(2, "LlamaConfig.num_key_value_heads.")
    max_position_embeddings: int = setting(4096, "LlamaConfig.max_position_embeddings.")


@dataclass
class ModelConfig:
    """The checkpoint and how it is run. Presets: conf/model/ (`model=llama3_8b`)."""

    path: Optional[str] = setting(
        None, "Hugging Face format directory; null serves the embedded default model (built into cache_dir).")
    dtype: DType = setting(DType.auto, "auto: bfloat16 on GPU, float32 on CPU. Else float32 | bfloat16 | float16.")
    attn_implementation: Attention = setting(
        Attention.auto,
        "auto: flex_attention on GPU (sparse block masks for packed rows), sdpa on CPU; eager for a model class that "
        "supports neither (e.g. Gemma2 has no sdpa: eager on the CPU, like transformers' own default for it). "
        "flash_attention_2 / flash_attention_3: batching.layout=padded only, on CUDA with their packages.")
    max_length: Optional[int] = setting(
        None, "Longest sequence accepted, in tokens; null takes the model's max_position_embeddings.")
    truncation: Truncation = setting(
        Truncation.error, "What to do with a longer sequence: error | left (keep the end) | right (keep the start).")
    pooling: Pooling = setting(
        Pooling.last_non_pad,
        "Scalar rewards: the token whose hidden state the head reads. last_non_pad: transformers' rule for "
        "*ForSequenceClassification (the last token that is not config.pad_token_id; the last token when the model "
        "has no pad token), so a sequence ending in the pad token (a pad token that is also EOS, a chat template "
        "ending in EOS) gets the reward the checkpoint gives in transformers. last: each sequence's true last token.")
    add_special_tokens: bool = setting(
        True, "Passed to the tokenizer for `text` inputs (chat-formatted `messages` get the template's own tokens).")
    chat_template: Optional[str] = setting(
        None, "Replaces the tokenizer's chat template for `messages`: a file holding the template, a directory "
        "holding a tokenizer whose template to use, or the Jinja template itself; null keeps the checkpoint's own.")
    trust_remote_code: bool = setting(
        False, "Run the checkpoint's own modeling code (config.json auto_map) for a model type transformers does "
        "not know.")
    compile: Optional[bool] = setting(
        None, "torch.compile each decoder layer (fuses the norms, rotary embedding, activation and residual adds "
        "around the matrix multiplies); null = auto: on with CUDA, unless tensor parallelism and data parallelism are "
        "combined (TP x DP, not measured). Compilation happens during the start-up warm-up (batching.warmup), tens of "
        "seconds.")
    quantization: Optional[Quantization] = setting(
        None, "fp8: the decoder layers' linear layers in FP8 (e4m3; per-row weight scales, activations scaled per "
        "token on the fly) through torchao, on GPUs with FP8 tensor cores (Ada, Hopper), one GPU per replica, bf16 "
        "weights. Embeddings, norms, attention and the head stay in bf16. Faster, and less exact than bf16: check "
        "the ranking of your own data with `python -m reward_server.check` (README, FP8). null: the model's dtype.")
    cache_dir: str = setting(
        "~/.cache/reward_server", "Where the embedded default model (model.path=null) is built on first use.")
    default: DefaultModelConfig = setting(doc="The embedded default model's shape.", factory=DefaultModelConfig)


@dataclass
class ParallelConfig:
    """Ranks: torchrun starts them; tensor parallelism within a replica, data parallelism across replicas."""

    tensor_parallel_size: int = setting(
        1, "world size = tensor_parallel_size x data-parallel size; each data-parallel replica scores its share.")
    backend: Backend = setting(Backend.auto, "auto: nccl when CUDA is available, gloo otherwise.")
    timeout_s: float = setting(
        60.0, "Collective timeout: a rank that stops answering for this long fails the whole group.")
    heartbeat_s: float = setting(
        5.0, "Rank 0 sends a heartbeat this often while idle, so subscribers notice a dead rank 0.")


@dataclass
class BatchingConfig:
    """How requests become forwards: Triton's dynamic batcher, then rank 0's token budget per forward."""

    max_batch_size: int = setting(
        64, "Triton dynamic batcher: the most requests merged into one execution (with max_queue_delay_us, how long "
        "one may wait).")
    max_queue_delay_us: int = setting(2000, "Triton dynamic batcher: how long a request may wait for others.")
    preferred_batch_sizes: List[int] = setting(
        doc="Triton cuts its batches at these sizes (in sequences, capped at max_batch_size) when more are queued "
        "(empty: Triton's default, which is the max batch size). A batch is answered only when all its requests are "
        "scored, so small batches get clients their rewards sooner and keep more requests queued for rank 0 to fill "
        "the next forward with: 16 (with 8 instances) gave 9 % more tokens/s at 64 clients than 64 "
        "(docs/results/tuning/).", factory=lambda: [16])
    max_tokens_per_forward: int = setting(
        16384, "Token budget of one forward (rows x padded length, or one packed row) on each data-parallel "
        "replica. Rank 0 fills each forward up to it from every queued request, across Triton's batches; the budget "
        "also bounds the memory a forward needs.")
    layout: BatchLayout = setting(
        BatchLayout.packed, "packed: sequences laid out padding-free in rows, each token attending to its own sequence "
        "only (our own attention mask; flex_attention, sdpa or eager); padded: length-sorted rows padded to the "
        "longest in their micro-batch (transformers' own masks: any attention implementation). See "
        "scoring/layout.py.")
    prefix_sharing: bool = setting(
        True, "packed layout: within each forward, a prefix that several sequences share (a GRPO group's prompt, a "
        "search tree's path so far, duplicates) is computed once; every sequence still gets exactly the hidden states "
        "of a forward over it alone. The token budget counts tokens computed, so a forward takes more sequences. Off: "
        "each sequence is computed in full (for comparison, or as an escape hatch).")
    prefix_min_tokens: int = setting(
        32, "With prefix_sharing: sequences whose first this-many tokens are the same are kept together: in one "
        "forward (the scheduler pulls in the rest of a group when it takes one), one data-parallel replica and one "
        "packed row. Shorter common prefixes (a BOS token, a chat header) are still shared when they land together.")
    prefix_cache_tokens: int = setting(
        32768, "With prefix_sharing: keys and values of the tokens of recent forwards kept on the device (a ring of "
        "this many tokens; KV memory per token: 2 x layers x kv heads x head dim x 2 bytes, 128 KiB for an 8B Llama "
        "in bf16) so that a sequence sharing a prefix with one scored in an earlier forward computes only the rest (a "
        "GRPO group split over forwards, a search's next depth). 0: off. See scoring/prefix_cache.py.")
    replica_affinity: bool = setting(
        True, "With the prefix cache and several data-parallel replicas: a group of sequences goes to the replica "
        "whose cache probably holds its prefix, where that keeps the replicas' tokens computed about equal (every "
        "rank keeps the same record of what each replica was given). False: spread by size alone. See "
        "scoring/affinity.py.")
    packed_row_tokens: int = setting(
        0, "Longest packed row, in tokens; 0 = auto: max_tokens_per_forward with flex_attention (its block mask "
        "skips other sequences' blocks), 2048 with a dense mask (sdpa, eager), whose attention work grows with the "
        "square of the row length.")
    warmup: Optional[bool] = setting(
        None, "Run the forward on synthetic batches of a few shapes at start-up, so that kernel selection and "
        "flex_attention's / torch.compile's compilation happen before the first request. null = auto: on with CUDA, "
        "model.compile or flex_attention; off on the CPU with eager / sdpa attention (nothing to compile or tune).")
    overlap: bool = setting(
        True, "Launch the next forward (sent to the ranks, queued on the GPU) before the current one's rewards are "
        "read back, so the GPU never waits for rank 0's Python between forwards. Rewards are the same either way. GPU "
        "only: on the CPU a forward runs to its end when launched, so there is nothing to overlap.")
    max_queued_tokens: Optional[int] = setting(
        None, "Overload: tokens of the requests at rank 0 not answered yet (queued or in a forward) beyond which a "
        "new request is refused at once with HTTP 503 / gRPC UNAVAILABLE (RemoteGPTRMClient backs off and retries), "
        "so that latency stays bounded instead of growing with the backlog. null = auto: 32 forwards' budgets (32 x "
        "max_tokens_per_forward x data-parallel replicas); 0: no limit. A request alone is never refused for its "
        "size.")
    instances: int = setting(
        0, "Triton model instances per model: the batches that can be handed to rank 0 at once; with small batches "
        "(preferred_batch_sizes) enough of them for the requests of several forwards. 0 = auto: 8 with CUDA, 2 on "
        "the CPU.")


@dataclass
class ServerConfig:
    """Rank 0's front doors: Triton (HTTP, gRPC), metrics, OpenRLHF; tokens, request limits, shutdown."""

    model_name: str = setting("reward", "Native model (text / messages / token_ids, any lengths batch together).")
    nemo_model_name: str = setting(
        "reward_model", "NeMo-Aligner compatible model (sentences / tokens + sequence_lengths). Empty string disables "
        "it.")
    host: str = setting(
        "127.0.0.1", "Loopback by default: a reward server has no authentication on inference unless configured.")
    http_port: int = setting(8000, "Triton's HTTP port.")
    grpc_port: int = setting(8001, "Triton's gRPC port.")
    metrics_port: int = setting(
        8002, "Prometheus metrics: ours and Triton's (docs/operations.md, Metrics). Triton's own metrics endpoint "
        "moves to triton_metrics_port on the loopback; each scrape of metrics_port includes them.")
    triton_metrics_port: int = setting(0, "Triton's own metrics endpoint, on the loopback; 0: any free port.")
    openrlhf_port: Optional[int] = setting(
        None, "OpenRLHF's remote reward model contract, POST /get_reward on this port (reward_server/openrlhf.py); "
        "null: off.")
    openrlhf_eos: OpenRLHFEos = setting(
        OpenRLHFEos.strip_and_append, "strip_and_append: like OpenRLHF's serve_rm, pad and EOS tokens off both ends "
        "of each query, then one EOS; as_is: the query as sent.")
    openrlhf_concurrency: int = setting(
        64, "OpenRLHF requests scored at once (each waits on the engine on a thread of its own).")
    metrics_scrape_timeout_s: float = setting(2.0, "How long a scrape of metrics_port waits for Triton's metrics.")
    access_token_env: str = setting(
        "REWARD_SERVER_ACCESS_TOKEN", "Token for Triton's protected endpoints (model-repository, statistics, trace, "
        "logging, shared-memory). Read from this environment variable, else from access_token_file, else generated "
        "and written to access_token_file if that is set. Clients send it in the `triton-access-token` header. Never "
        "logged.")
    access_token_file: Optional[str] = setting(
        None, "See access_token_env: read from this file, or the generated token written to it.")
    inference_token_env: Optional[str] = setting(
        None, "Optional token for inference (Triton's `inference` API category, HTTP and gRPC), same header. Read "
        "from this environment variable, else from inference_token_file; both null: inference is open to anyone who "
        "can reach the port. When either is set but yields no token the server refuses to start.")
    inference_token_file: Optional[str] = setting(None, "See inference_token_env.")
    drain_timeout_s: int = setting(
        20, "SIGTERM: how long requests already accepted may take to finish before Triton gives up on them (Triton's "
        "exit timeout). Keep it under torchrun's 30 s between SIGTERM and SIGKILL.")
    drain_refuse_s: float = setting(
        1.0, "SIGTERM: once the accepted requests are answered, keep answering new ones with 503 this long before "
        "Triton stops (while Triton stops, a request can meet a reset; after it, its port refuses connections).")
    port_wait_s: float = setting(
        60.0, "At start-up (e.g. a torchrun restart) wait this long for a previous server to release the ports.")
    start_attempts: int = setting(
        3, "Tries to start Triton before the rank gives up (PyTriton's start-up handshake can fail under CPU load).")
    log_verbose: int = setting(0, "Triton's --log-verbose level.")
    triton_log_info: bool = setting(
        False, "Triton's own info-level log (its option and model tables, per-model load lines); warnings and errors "
        "are always on.")
    max_row_bytes: Optional[int] = setting(
        None, "Size limits checked before a request is parsed or tokenized: a BYTES row (text, messages, token_ids, "
        "sentences) longer than max_row_bytes fails that row, a request whose BYTES inputs hold more than "
        "max_request_bytes fails whole (HTTP 400). null = auto: bytes_per_token x model.max_length per row, the row "
        "limit x batching.max_batch_size per request. A token of text is rarely more than a few bytes, so the auto "
        "limits refuse only what could never fit (or is far beyond what truncation keeps).")
    max_request_bytes: Optional[int] = setting(None, "See max_row_bytes.")
    bytes_per_token: int = setting(16, "See max_row_bytes.")
    stats_log_s: float = setting(
        60.0, "Log the engine's counts (forwards, tokens per forward, tokens/s, busy share) this often; 0: only at "
        "exit.")


@dataclass
class RewardConfig:
    """What is scored. Presets live in conf/reward/ (`reward=math_shepherd`); docs/prm.md explains each field."""

    kind: RewardKind = setting(
        RewardKind.scalar, "scalar: a sequence-classification head at the last token, one value per label. prm: a "
        "process reward model, one score per reasoning step (see docs/prm.md).")
    step_tag_source: StepTagSource = setting(
        StepTagSource.text, "prm: where the steps are. text: every occurrence of `step_tag` in the text (tokenized "
        "with the model's tokenizer at load time); ids: the token id sequence `step_tag_ids`; generation_prompt: the "
        "tokens the chat template writes before an assistant reply (each step is a user turn answered by the "
        "assistant). A step is scored at the last token of its tag.")
    step_tag: str = setting("ки", "prm, step_tag_source=text: the tag that ends each step.")
    step_tag_ids: List[int] = setting(doc="prm, step_tag_source=ids: the tag's token ids.", factory=list)
    score: StepScore = setting(
        StepScore.softmax, "prm: how a step's score is read from the logits at its position. softmax: softmax over "
        "the candidate tokens' logits, probability of the first (P(good) for [good, bad]); logit: the raw logit of "
        "the one candidate; classifier: a token-classification head, softmax over its labels, probability of "
        "positive_label.")
    candidate_tokens: List[str] = setting(
        doc="prm: candidate tokens as text (each must be one token of the model's tokenizer), or ids (win when set).",
        factory=lambda: ["+", "-"])
    candidate_token_ids: List[int] = setting(doc="prm: candidate token ids (win over candidate_tokens).",
                                             factory=list)
    positive_label: int = setting(1, "prm, score=classifier: the label whose probability is the step's score.")
    model_class: str = setting(
        "", "prm: the transformers Auto class to load; empty: AutoModelForTokenClassification for score=classifier, "
        "else AutoModelForCausalLM.")
    aggregate: Aggregate = setting(
        Aggregate.min, "prm: the single value returned in `rewards`: min | last | mean | product of the step scores.")
    max_steps: int = setting(64, "prm: a sequence with more steps than this is refused (per-request error).")


@dataclass
class FaultInjectionConfig:
    """TEST ONLY (reward_server/faults.py): make failures happen on purpose. All off by default."""

    oom_file: Optional[str] = setting(
        None, "While this file exists, rank `oom_rank` raises torch.OutOfMemoryError in its next forward (and "
        "removes it).")
    oom_rank: int = setting(1, "See oom_file.")
    poison_token_id: Optional[int] = setting(
        None, "Every rank raises ValueError while scoring a batch containing this token id: a bad request that "
        "slipped past the checks.")
    forward_delay_s: float = setting(
        0.0, "Every forward sleeps this long first, so that requests are in flight when a test sends SIGTERM.")


@dataclass
class ServeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    fault_injection: FaultInjectionConfig = field(default_factory=FaultInjectionConfig)


def register_schema() -> None:
    ConfigStore.instance().store(name="serve_schema", node=ServeConfig)


# ------------------------------------------------------------------------------------------------- validation


def show(value: Any) -> str:
    """A value as it is written in an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


class ConfigError(ValueError):
    """One setting that cannot work: `cannot start: <key>=<value>: <what is wrong and what to do>`."""

    def __init__(self, key: str, value: Any, message: str, shown: Optional[str] = None, bare: bool = False):
        """shown: the value as the user wrote it (default: show(value)); bare: `key` alone is the whole setting
        (an override without `=`)."""
        self.key, self.value, self.message = key, value, message
        self.shown = show(value) if shown is None else shown
        self.bare = bare
        super().__init__(self.line())

    def line(self) -> str:
        setting = self.key if self.bare else f"{self.key}={self.shown}"
        return f"cannot start: {setting}: {' '.join(self.message.split())}"


class InvalidConfig(ValueError):
    """Every problem found; str() is one `cannot start:` line per problem."""

    def __init__(self, errors: List[ConfigError]):
        self.errors = list(errors)
        super().__init__("\n".join(e.line() for e in self.errors))


def fields_of(node) -> List[Tuple[str, Any, dataclasses.Field]]:
    return [(f.name, getattr(node, f.name), f) for f in dataclasses.fields(node)]


def enum_of(annotation) -> Optional[type]:
    """The Enum class of a field's type (also inside Optional[...]), else None."""
    for t in (annotation, *get_args(annotation)):
        if isinstance(t, type) and issubclass(t, Enum):
            return t
    return None


def _choices(errors: List[ConfigError], node, prefix: str) -> None:
    """A config built in Python (not composed by Hydra) may hold any string where a choice is expected."""
    for name, value, f in fields_of(node):
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(value):
            _choices(errors, value, key + ".")
            continue
        choices = enum_of(f.type)
        if choices is not None and value is not None and value not in {m.value for m in choices}:
            optional = " or null" if type(None) in get_args(f.type) else ""
            errors.append(ConfigError(key, value, f"expected one of {', '.join(m.value for m in choices)}{optional}"))


PORTS = ("http_port", "grpc_port", "metrics_port", "openrlhf_port", "triton_metrics_port")


def reward_problems(cfg: RewardConfig) -> List[ConfigError]:
    """A process reward model's settings that cannot work (reward.kind=prm; no tokenizer or model needed)."""
    errors: List[ConfigError] = []

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            errors.append(ConfigError(f"reward.{key}", getattr(cfg, key), message))

    need(cfg.step_tag_source != "text" or cfg.step_tag != "", "step_tag",
         "step_tag_source=text needs a step_tag (or set reward.step_tag_source=ids with reward.step_tag_ids)")
    need(cfg.step_tag_source != "ids" or len(cfg.step_tag_ids) > 0, "step_tag_ids",
         "step_tag_source=ids needs step_tag_ids")
    need(all(i >= 0 for i in cfg.step_tag_ids), "step_tag_ids", "token ids are never negative")
    need(all(i >= 0 for i in cfg.candidate_token_ids), "candidate_token_ids", "token ids are never negative")
    need(cfg.max_steps >= 1, "max_steps", "must be at least 1")
    n_candidates = len(cfg.candidate_token_ids or cfg.candidate_tokens)
    candidates = "candidate_token_ids" if cfg.candidate_token_ids else "candidate_tokens"
    need(cfg.score != "softmax" or n_candidates >= 2, candidates, "score=softmax needs at least two candidate tokens")
    need(cfg.score != "logit" or n_candidates == 1, candidates, "score=logit needs exactly one candidate token")
    need(cfg.score != "classifier" or cfg.positive_label >= 0, "positive_label", "a label index is never negative")
    return errors


def problems(cfg: ServeConfig, env: Optional[Mapping[str, str]] = None) -> List[ConfigError]:
    """Every setting of `cfg` that cannot work, checked without torch, a process group or the checkpoint."""
    env = os.environ if env is None else env
    errors: List[ConfigError] = []
    _choices(errors, cfg, "")

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            section, name = key.split(".", 1)
            node = getattr(cfg, section)
            for part in name.split("."):
                node = getattr(node, part)
            errors.append(ConfigError(key, node, message))

    m, p, b, s, r, f = cfg.model, cfg.parallel, cfg.batching, cfg.server, cfg.reward, cfg.fault_injection
    # sizes
    need(m.max_length is None or m.max_length >= 0, "model.max_length",
         "expected a number of tokens (null: the model's max_position_embeddings)")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings"):
        need(getattr(m.default, name) >= 1, f"model.default.{name}", "must be at least 1")
    d = m.default
    if d.num_attention_heads >= 1 and d.num_key_value_heads >= 1:
        need(d.hidden_size % d.num_attention_heads == 0, "model.default.hidden_size",
             f"must be a multiple of model.default.num_attention_heads={d.num_attention_heads}")
        need(d.num_attention_heads % d.num_key_value_heads == 0, "model.default.num_key_value_heads",
             f"must divide model.default.num_attention_heads={d.num_attention_heads}")
    need(p.tensor_parallel_size >= 1, "parallel.tensor_parallel_size", "must be at least 1")
    need(p.timeout_s > 0, "parallel.timeout_s", "must be positive (seconds)")
    need(p.heartbeat_s > 0, "parallel.heartbeat_s", "must be positive (seconds)")
    need(b.max_batch_size >= 1, "batching.max_batch_size", "must be at least 1")
    need(b.max_queue_delay_us >= 0, "batching.max_queue_delay_us", "must not be negative (microseconds)")
    need(all(n >= 1 for n in b.preferred_batch_sizes), "batching.preferred_batch_sizes",
         "every size must be at least 1 (an empty list: Triton's default)")
    need(b.max_tokens_per_forward >= 1, "batching.max_tokens_per_forward", "must be at least 1 (tokens)")
    need(b.prefix_min_tokens >= 0, "batching.prefix_min_tokens", "must not be negative (tokens)")
    need(b.prefix_cache_tokens >= 0, "batching.prefix_cache_tokens",
         "expected a number of tokens (0: no prefix cache)")
    need(b.packed_row_tokens >= 0, "batching.packed_row_tokens", "expected a number of tokens (0: auto)")
    need(b.max_queued_tokens is None or b.max_queued_tokens >= 0, "batching.max_queued_tokens",
         "expected a number of tokens (null: auto, 0: no limit)")
    need(b.instances >= 0, "batching.instances", "expected a number of Triton model instances (0: auto)")
    # server
    need(s.host != "", "server.host", "expected an address to listen on (127.0.0.1: this machine only)")
    need(s.model_name != "", "server.model_name", "the native model needs a name")
    need(s.model_name != s.nemo_model_name, "server.nemo_model_name",
         "the same name as server.model_name; give the two models different names (empty: no NeMo model)")
    ports = {}
    for name in PORTS:
        port = getattr(s, name)
        if port is None:
            continue
        if not 0 <= port <= 65535:
            need(False, f"server.{name}", "a port is between 0 and 65535 (0: any free port)")
        elif port and port in ports:
            need(False, f"server.{name}", f"the same port as server.{ports[port]}; give each endpoint its own port")
        elif port:
            ports[port] = name
    need(s.openrlhf_concurrency >= 1, "server.openrlhf_concurrency", "must be at least 1")
    need(s.metrics_scrape_timeout_s > 0, "server.metrics_scrape_timeout_s", "must be positive (seconds)")
    need(s.drain_timeout_s >= 0, "server.drain_timeout_s", "must not be negative (seconds)")
    need(s.drain_refuse_s >= 0, "server.drain_refuse_s", "must not be negative (seconds)")
    need(s.port_wait_s >= 0, "server.port_wait_s", "must not be negative (seconds)")
    need(s.start_attempts >= 1, "server.start_attempts", "must be at least 1")
    need(s.log_verbose >= 0, "server.log_verbose", "must not be negative")
    need(s.max_row_bytes is None or s.max_row_bytes >= 0, "server.max_row_bytes", "expected a number of bytes "
         "(null: auto)")
    need(s.max_request_bytes is None or s.max_request_bytes >= 0, "server.max_request_bytes",
         "expected a number of bytes (null: auto)")
    need(s.bytes_per_token >= 1, "server.bytes_per_token", "must be at least 1")
    need(s.stats_log_s >= 0, "server.stats_log_s", "must not be negative (seconds; 0: only at exit)")
    errors += token_problems(s, env)
    need(f.forward_delay_s >= 0, "fault_injection.forward_delay_s", "must not be negative (seconds)")
    # the world torchrun starts (WORLD_SIZE; 1 without torchrun)
    world = env.get("WORLD_SIZE", "1")
    tp = p.tensor_parallel_size
    if tp >= 1 and world.isdigit() and int(world) % tp:
        need(False, "parallel.tensor_parallel_size",
             f"must divide the world size {world} (torchrun's --nnodes x --nproc_per_node); start a multiple of "
             f"{tp} ranks or pick a divisor of {world}")
    # model.quantization=fp8 (the device-dependent checks run at load: reward_server/loading/quantization.py)
    if m.quantization == "fp8":
        need(tp == 1, "model.quantization", f"fp8 is not supported with tensor parallelism "
             f"(parallel.tensor_parallel_size={tp}); use data parallelism (one GPU per replica)")
        need(m.dtype in ("auto", "bfloat16"), "model.quantization",
             f"fp8 quantizes from bfloat16 weights; set model.dtype=bfloat16 (or auto), not {show(m.dtype)}")
        need(p.backend != "gloo", "model.quantization",
             "fp8 needs a CUDA GPU with FP8 tensor cores; parallel.backend=gloo runs on the CPU")
    if m.chat_template is not None:
        where = Path(m.chat_template).expanduser()
        need(where.exists() or "{{" in m.chat_template or "{%" in m.chat_template, "model.chat_template",
             "not a file, not a directory with a tokenizer, and not a Jinja template")
    if r.kind == "prm":
        errors += reward_problems(r)
    return errors


def token_problems(s: ServerConfig, env: Mapping[str, str]) -> List[ConfigError]:
    """The inference token must be found when asked for; the access token is generated when absent, but then its
    file (if set) must be writable."""
    errors = []
    if s.inference_token_env or s.inference_token_file:
        found = bool(s.inference_token_env and env.get(s.inference_token_env))
        file = Path(s.inference_token_file).expanduser() if s.inference_token_file else None
        if not found and file is not None and file.is_file():
            found = bool(file.read_text().strip())
            if not found:
                errors.append(ConfigError("server.inference_token_file", s.inference_token_file,
                                          "the file is empty; write the inference token to it"))
                return errors
        if not found and file is not None:
            env_part = f" and ${s.inference_token_env} is unset or empty" if s.inference_token_env else ""
            errors.append(ConfigError("server.inference_token_file", s.inference_token_file,
                                      f"no such file{env_part}; write the inference token to it"
                                      f"{' or export it in ' + s.inference_token_env if s.inference_token_env else ''}"
                                      ))
        elif not found:
            errors.append(ConfigError(
                "server.inference_token_env", s.inference_token_env,
                f"the environment variable {s.inference_token_env} is unset or empty; export the inference token in "
                f"it, or set server.inference_token_file, or server.inference_token_env=null for open inference"))
    if s.access_token_file and not (s.access_token_env and env.get(s.access_token_env)):
        file = Path(s.access_token_file).expanduser()
        if not file.exists() and not file.parent.is_dir():
            errors.append(ConfigError("server.access_token_file", s.access_token_file,
                                      f"the directory {file.parent} does not exist; the generated access token is "
                                      "written there"))
        elif file.exists() and not file.is_file():
            errors.append(ConfigError("server.access_token_file", s.access_token_file, "not a file"))
    return errors


def _from_config(config: dict, key: str) -> Any:
    """A value of config.json, at its top or in its text_config (multimodal checkpoints)."""
    if key in config:
        return config[key]
    return (config.get("text_config") or {}).get(key)


def checkpoint_problems(cfg: ServeConfig) -> List[ConfigError]:
    """What the checkpoint's config.json (json only: no weights, no model code, no torch) says cannot work; the
    embedded default model (model.path=null) is judged by model.default without building it."""
    m, tp, r = cfg.model, cfg.parallel.tensor_parallel_size, cfg.reward
    if m.path is None:
        config, where = dataclasses.asdict(m.default), "model.default"
    else:
        path = Path(m.path)
        if not path.is_dir():
            return [ConfigError("model.path", m.path, "no such directory; expected a Hugging Face checkpoint "
                                "directory (config.json, weights, tokenizer)")]
        file = path / "config.json"
        if not file.is_file():
            return [ConfigError("model.path", m.path,
                                "no config.json there; expected a Hugging Face checkpoint directory")]
        try:
            config = json.loads(file.read_text())
        except (ValueError, OSError) as exc:
            return [ConfigError("model.path", m.path, f"config.json is not readable JSON ({exc})")]
        where = f"{file}"
    errors = []
    for name in ("num_attention_heads", "num_key_value_heads"):
        heads = _from_config(config, name)
        if tp > 1 and isinstance(heads, int) and heads % tp:
            errors.append(ConfigError("parallel.tensor_parallel_size", tp,
                                      f"must divide the model's {name}={heads} ({where}); use a divisor of it, or "
                                      f"data parallelism"))
            break
    if r.kind == "prm":
        vocab = _from_config(config, "vocab_size")
        for key in ("step_tag_ids", "candidate_token_ids"):
            ids = getattr(r, key)
            if isinstance(vocab, int) and not all(0 <= i < vocab for i in ids):
                errors.append(ConfigError(f"reward.{key}", ids, f"outside the vocabulary [0, {vocab}) ({where})"))
        if r.score == "classifier":
            labels = len(config["id2label"]) if isinstance(config.get("id2label"), dict) else config.get(
                "num_labels", 2)
            if not 0 <= r.positive_label < labels:
                errors.append(ConfigError("reward.positive_label", r.positive_label,
                                          f"the model has {labels} labels ({where})"))
        if r.model_class:
            import transformers  # lazy: names only, no torch

            if r.model_class not in dir(transformers):
                errors.append(ConfigError("reward.model_class", r.model_class,
                                          "not a transformers class; e.g. AutoModelForCausalLM or "
                                          "AutoModelForTokenClassification (empty: chosen by reward.score)"))
        if r.step_tag_source == "generation_prompt" and not m.chat_template and m.path is not None:
            if not has_chat_template(Path(m.path)):
                errors.append(ConfigError("reward.step_tag_source", r.step_tag_source,
                                          f"needs a chat template and the tokenizer at {m.path} has none; set "
                                          "model.chat_template"))
    return errors


def has_chat_template(path: Path) -> bool:
    """Whether the tokenizer files of a checkpoint hold a chat template (as transformers saves it)."""
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    if (path / "additional_chat_templates").is_dir():
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def validate(cfg: ServeConfig, env: Optional[Mapping[str, str]] = None, checkpoint: bool = True) -> None:
    """Raises InvalidConfig listing every setting that cannot work: first the settings alone, then (when they are
    fine, and `checkpoint`) against the checkpoint's config.json. Starts nothing, loads no weights, builds nothing."""
    errors = problems(cfg, env)
    if not errors and checkpoint:
        errors = checkpoint_problems(cfg)
    if errors:
        raise InvalidConfig(errors)


# ------------------------------------------------------------------------------------------------- auto values

# attention implementations tried for model.attn_implementation=auto, best first
AUTO_ATTENTION = {"cuda": ("flex_attention", "sdpa", "eager"), "cpu": ("sdpa", "eager")}
# the model class's flag for each implementation (transformers' own); the others every class supports
ATTENTION_SUPPORT_FLAGS = {"flex_attention": "_supports_flex_attn", "sdpa": "_supports_sdpa"}
# batching.instances=0: Triton model instances by the device rank 0 computes on. On GPU, 8 (with batches of 16)
# keep enough requests at rank 0 to fill the next forward (docs/results/tuning/); on the CPU, where forwards are slow
# and small, 2 are enough and each instance less is one Python stub process less to start.
AUTO_INSTANCES = {"cuda": 8, "cpu": 2}
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


def resolve(cfg: ServeConfig, device_type: str, tp_size: int, dp_size: int, model: ModelInfo, *, rank: int = 0,
            pick_port: Callable[[], int] = free_loopback_port) -> Resolved:
    """Every "auto" rule in one place: the values a rank of `device_type` ("cuda" / "cpu") in a world of `tp_size`
    x `dp_size` ranks uses for `cfg` and a checkpoint described by `model`. Logs them on rank 0. A setting given
    explicitly is kept; an explicit attention implementation the model class lacks raises ConfigError."""
    m, b, s = cfg.model, cfg.batching, cfg.server
    cuda = device_type == "cuda"
    backend = resolve_backend(cfg.parallel.backend, cuda)
    # model.dtype auto: bfloat16 on GPU, float32 on CPU
    dtype = str(m.dtype) if m.dtype != "auto" else ("bfloat16" if cuda else "float32")
    # model.attn_implementation auto: the first of AUTO_ATTENTION[device] that the model class supports (Gemma2 has
    # no sdpa: eager on the CPU, flex_attention on the GPU, both with its attention soft-capping)
    if m.attn_implementation != "auto":
        attn = str(m.attn_implementation)
        if attn not in model.attention:
            raise ConfigError("model.attn_implementation", attn, f"{model.class_name} does not support it; use auto")
    else:
        attn = next(a for a in AUTO_ATTENTION.get(device_type, AUTO_ATTENTION["cuda"]) if a in model.attention)
    # model.compile auto: on with CUDA, except for tensor-parallel replicas wrapped for data parallelism (TP x DP,
    # not measured); measured faster with one rank and with TP=2 (docs/performance.md)
    compile_ = m.compile if m.compile is not None else cuda and (tp_size == 1 or dp_size == 1)
    # batching.warmup auto: when there is something to compile or tune before the first request (CUDA kernels,
    # torch.compile, flex_attention); not on the CPU with eager/sdpa attention, where a warm-up only costs start-up
    # time (measured, tiny model, 2 ranks on 2 cores: ready after 12.5 s instead of 24.6 s, first requests as fast)
    warmup = b.warmup if b.warmup is not None else cuda or compile_ or attn == "flex_attention"
    # model.max_length null (or 0): the model's max_position_embeddings
    max_length = m.max_length or model.max_position_embeddings
    # batching.packed_row_tokens 0: the whole budget with flex_attention (its block mask skips other sequences'
    # blocks), DENSE_MASK_ROW_TOKENS with a dense mask, whose attention work grows with the row length squared
    flex = attn == "flex_attention"
    row_tokens = b.packed_row_tokens or (b.max_tokens_per_forward if flex else DENSE_MASK_ROW_TOKENS)
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


# ------------------------------------------------------------------------------------------------- documentation

SECTIONS = [("model", ModelConfig), ("model.default", DefaultModelConfig), ("reward", RewardConfig),
            ("parallel", ParallelConfig), ("batching", BatchingConfig), ("server", ServerConfig),
            ("fault_injection", FaultInjectionConfig)]


def type_name(annotation) -> str:
    """A field's type in words: `int`, `int or null`, `one of: a, b`, `list of int`."""
    args = get_args(annotation)
    if get_origin(annotation) is Union and type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        if isinstance(inner, type) and issubclass(inner, Enum):
            return "null or " + type_name(inner)
        return f"{type_name(inner)} or null"
    if get_origin(annotation) in (list, List):
        return f"list of {type_name(args[0])}"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "one of: " + ", ".join(m.value for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def _default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(value, str) and not isinstance(value, Enum):
        return json.dumps(value, ensure_ascii=False)
    return show(value)


def _cell(text: str) -> str:
    """Text for a Markdown table cell (outside code spans)."""
    return _text(text).replace("|", "\\|").replace("\n", " ")


def _text(text: str) -> str:
    """Markdown text: `<tag>` shown as written, not taken for HTML."""
    return text.replace("<", "\\<")


def conf_dir() -> Path:
    """conf/ of the source checkout, else the packaged copy (reward_server.conf)."""
    source = Path(__file__).resolve().parents[1] / "conf"
    if (source / "serve_reward_model.yaml").is_file():
        return source
    from importlib.resources import files

    return Path(str(files("reward_server.conf")))


def _presets(group: str) -> List[str]:
    lines = []
    for path in sorted((conf_dir() / group).glob("*.yaml")):
        text = path.read_text()
        comment = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
        values = ", ".join(f"`{line.strip()}`" for line in text.splitlines()
                           if line.strip() and not line.startswith("#"))
        lines.append(f"- `{group}={path.stem}`: {_text(comment)} Sets {values}.".replace("  ", " "))
    return lines


def config_doc() -> str:
    """docs/configuration.md: every key (dotted), its type, default and meaning; then the presets."""
    out = ["# Configuration", "",
           "<!-- Generated by `python -m reward_server.config --doc > docs/configuration.md` from the dataclasses "
           "of reward_server/config.py and the presets in conf/; do not edit. tests/test_config.py fails when it is "
           "stale. -->", "",
           "Every setting of `torchrun --nproc_per_node N serve_reward_model.py [overrides]` (or `reward-server "
           "[torchrun options] [overrides]`). Override any key on the command line, e.g. `model.path=/ckpt/rm "
           "parallel.tensor_parallel_size=2`; pick a preset with `model=llama3_8b` or `reward=math_shepherd`. "
           "Before any rank starts, the settings are checked (`reward_server.config.validate`): a value that cannot "
           "work stops the server with one line `cannot start: <key>=<value>: <what to change>` and exit code 2. "
           "Settings with an automatic default (auto, null or 0 as described) are resolved in one place "
           "(`reward_server.config.resolve`), and rank 0 logs the values used.", ""]
    for prefix, schema in SECTIONS:
        out += [f"## {prefix}", "", " ".join((schema.__doc__ or "").split()), "",
                "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for f in dataclasses.fields(schema):
            if dataclasses.is_dataclass(f.type):
                continue
            default = _default(f).replace("|", "\\|")
            out.append(f"| `{prefix}.{f.name}` | {_cell(type_name(f.type))} | `{default}` | "
                       f"{_cell(f.metadata.get('help', ''))} |")
        out.append("")
    out += ["## Presets", "",
            "conf/serve_reward_model.yaml picks `model: default` and `reward: scalar`; each preset sets only the keys "
            "listed.", ""]
    out += _presets("model") + _presets("reward")
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--doc"]:
        sys.exit("usage: python -m reward_server.config --doc > docs/configuration.md")
    sys.stdout.write(config_doc())
