"""validate(): what a type cannot say (sizes, ports, token variables, tensor parallelism against the world size, the
PRM rules), checked before any process group or weights; each problem is one `cannot start:` line."""

import dataclasses
import importlib.util
import os
from enum import Enum
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple, get_args


from .schema import RewardConfig, ServeConfig, ServerConfig


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


PORTS = ("http_port", "grpc_port", "metrics_port", "openrlhf_port", "triton_metrics_port", "api_port")


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
    need(s.api_host is None or s.api_host != "", "server.api_host", "expected an address (null: server.host)")
    need(s.api_port is None or importlib.util.find_spec("aiohttp") is not None, "server.api_port",
         "needs the aiohttp package (pip install aiohttp), or server.api_port=null to turn the API port off")
    need(s.api_concurrency >= 1, "server.api_concurrency", "must be at least 1")
    need(s.request_timeout_s is None or s.request_timeout_s > 0, "server.request_timeout_s",
         "must be positive (seconds; null: no limit)")
    need(s.slime_reward_key is None or s.slime_reward_key != "", "server.slime_reward_key",
         "expected a key (null: answer a bare number)")
    need(s.metrics_scrape_timeout_s > 0, "server.metrics_scrape_timeout_s", "must be positive (seconds)")
    need(s.drain_timeout_s >= 0, "server.drain_timeout_s", "must not be negative (seconds)")
    need(s.drain_refuse_s >= 0, "server.drain_refuse_s", "must not be negative (seconds)")
    need(s.triton_exit_timeout_s >= 0, "server.triton_exit_timeout_s", "must not be negative (seconds)")
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
    need(f.standin.tokens_per_s >= 0, "fault_injection.standin.tokens_per_s", "must not be negative (0: off)")
    need(f.standin.shared_speed > 0, "fault_injection.standin.shared_speed", "must be positive (1: as fast as unshared)")
    need(f.standin.call_s >= 0, "fault_injection.standin.call_s", "must not be negative (seconds)")
    # the world torchrun starts (WORLD_SIZE; 1 without torchrun)
    world = env.get("WORLD_SIZE", "1")
    tp = p.tensor_parallel_size
    if tp >= 1 and world.isdigit() and int(world) % tp:
        need(False, "parallel.tensor_parallel_size",
             f"must divide the world size {world} (torchrun's --nnodes x --nproc_per_node); start a multiple of "
             f"{tp} ranks or pick a divisor of {world}")
    # model.quantization (the device-dependent checks run at load: reward_server/loading/quantization.py), its gate
    q = show(m.quantization)
    if m.quantization:
        need(tp == 1, "model.quantization", f"{q} is not supported with tensor parallelism "
             f"(parallel.tensor_parallel_size={tp}); use data parallelism (one GPU per replica)")
        need(m.dtype in ("auto", "bfloat16") or f.quantization_noise > 0, "model.quantization",
             f"{q} quantizes from bfloat16 weights; set model.dtype=bfloat16 (or auto), not {show(m.dtype)}")
        need(p.backend != "gloo" or f.quantization_noise > 0, "model.quantization",
             f"{q} needs a CUDA GPU with FP8 tensor cores; parallel.backend=gloo runs on the CPU")
    need(-1 <= m.quantization_min_spearman <= 1, "model.quantization_min_spearman",
         "a rank correlation is between -1 and 1 (-1: never refuse)")
    need(0 <= m.quantization_min_pairs <= 1, "model.quantization_min_pairs",
         "a share of pairs is between 0 and 1 (0: never refuse)")
    need(m.calibration_path is None or Path(m.calibration_path).expanduser().is_file(), "model.calibration_path",
         "no such file (texts one per line, or a perf_analyzer input file of token_ids)")
    need(f.quantization_noise >= 0, "fault_injection.quantization_noise", "must not be negative")
    need(not f.quantization_noise or m.quantization is not None, "fault_injection.quantization_noise",
         "stands in for the quantizer of model.quantization; set model.quantization too")
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
