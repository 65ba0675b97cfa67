"""The typed schema: one dataclass per section, each field with its default and its meaning (`help` metadata,
shown in docs/configuration.md). Values live in conf/*.yaml; Hydra checks every override against these types."""

import logging
from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore

from .fidelity import QUANTIZED_PAIRS, QUANTIZED_SPEARMAN
from .choices import Aggregate, Attention, Backend, BatchLayout, DType, Pooling, Quantization, RewardKind, StepScore, StepTagSource, Truncation
from .fields import setting
from .server import ServerConfig
from .standin import StandInConfig

log = logging.getLogger("reward_server.config")


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
        None, "Decoder linear layers in FP8 (torchao; FP8 GPUs, one per replica, bf16 weights). fp8: every one, "
        "scales per weight row and token; fp8_tensor: per tensor; fp8_mlp: the MLP's only; fp8_skip_ends, "
        "fp8_mlp_skip_ends: first and last layers kept bf16. Gated at start-up (quantization_min_spearman).")
    quantization_min_spearman: float = setting(
        QUANTIZED_SPEARMAN, "With model.quantization the start-up fidelity gate scores a calibration sample "
        "unquantized and quantized on every rank, logs and exports (reward_server_quantization_*) Spearman, pairs "
        "ordered alike and max / mean |diff| per label, and refuses to start unless every label has Spearman >= this "
        "and pairs >= quantization_min_pairs (check --quantized's rule). -1 and 0: never refuse. docs/performance.md")
    quantization_min_pairs: float = setting(QUANTIZED_PAIRS, "See quantization_min_spearman.")
    calibration_path: Optional[str] = setting(
        None, "The fidelity gate's sample: texts one per line or a perf_analyzer file of token_ids (check --texts / "
        "--inputs), its first 256 (64 at least). null: 256 built-in texts (loading/fidelity_gate.py).")
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
        "(docs/results/2026-11-26-tuning-h100/).", factory=lambda: [16])
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
        32768, "With prefix_sharing: keys and values of the tokens of recent forwards kept on the device (this many "
        "token slots; a prefix that several sequences share is kept past the responses that branch off it; KV memory "
        "per token: 2 x layers x kv heads x head dim x 2 bytes, 128 KiB for an 8B Llama in bf16) so that a sequence "
        "sharing a prefix with one scored in an earlier forward computes only the rest (a GRPO group split over "
        "forwards, a search's next depth). 0: off. See scoring/prefix_cache.py.")
    replica_affinity: bool = setting(
        True, "With the prefix cache and several data-parallel replicas: a group of sequences goes to the replica "
        "whose cache probably holds its prefix, where that keeps the replicas' tokens computed about equal (every "
        "rank keeps the same record of what each replica was given). False: spread by size alone. See "
        "scoring/affinity.py.")
    packed_row_tokens: int = setting(
        0, "Longest packed row, in tokens; 0 = auto: max_tokens_per_forward with flex_attention (its block mask "
        "skips other sequences' blocks), 2048 with a dense mask (sdpa, eager), whose attention work grows with the "
        "square of the row length.")
    batch_invariant: bool = setting(
        False, "packed layout: every sequence's rewards and step rewards are the same bits whether it is scored alone, "
        "beside others, in a shared-prefix group, again, or on any data-parallel replica: the attention is our own, "
        "reading each sequence's keys by position in fixed 128-token tiles, so prefix_sharing and the prefix cache "
        "(prefix_cache_tokens, its own store: scoring/blocks.py) stay on; the head runs one row at a time. A "
        "self-test at start-up refuses to start if this machine's kernels still differ. Measured on the CPU only "
        "(docs/invariance.md).")
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
        "(preferred_batch_sizes) enough of them for the requests of several forwards. 0 = auto: 16 with CUDA, 2 on "
        "the CPU.")


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
    quantization_noise: float = setting(0.0, "With model.quantization: instead of torchao, each weight the recipe "
                                        "picks times (1 + this x N(0, 1)), seeded, on any device. 0: off.")
    standin: StandInConfig = setting(doc="The stand-in scorer (benchmarks/standin.py).", factory=StandInConfig)


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
