"""Typed configuration schema. Values live in conf/*.yaml; these dataclasses give them types, defaults and meanings.

Hydra checks every override against this schema when the config is composed: `model.dtype=bf17` (a choice is an
Enum), `server.http_port=abc` or `model.bogus=1` fail there. `validate` then checks what a type cannot say (sizes,
ports, token variables, tensor parallelism against the world size and the checkpoint's heads, the PRM rules) before
any process group or weights; `resolve` turns every "auto" / null default into the value a rank uses.
Each field's meaning is its `help` metadata; `python -m reward_server.config --doc` writes docs/configuration.md.

The choices are `StrEnum`s whose member names are their values, so code comparing a setting to a string
(`cfg.model.pooling == "last_non_pad"`) or looking it up in a dict keyed by strings keeps working.
"""

from .choices import (DType, Attention, Truncation, Pooling, Quantization, Backend, BatchLayout, OpenRLHFEos, RewardKind, StepTagSource, StepScore, Aggregate)
from .schema import (setting, DefaultModelConfig, ModelConfig, ParallelConfig, BatchingConfig, ServerConfig, RewardConfig, FaultInjectionConfig, ServeConfig, register_schema)
from .validate import (show, ConfigError, InvalidConfig, fields_of, enum_of, PORTS, reward_problems, problems, token_problems)
from .checkpoint import (checkpoint_problems, has_chat_template, validate)
from .resolve import (auto_attention, auto_compile, auto_dtype, auto_row_tokens, AUTO_ATTENTION, ATTENTION_SUPPORT_FLAGS, AUTO_INSTANCES, AUTO_QUEUED_FORWARDS, DENSE_MASK_ROW_TOKENS, LOOPBACK, ModelInfo, Resolved, resolve_backend, device_type_of, free_loopback_port, resolve)
from .doc import (SECTIONS, type_name, conf_dir, config_doc)

__all__ = ["auto_attention", "auto_compile", "auto_dtype", "auto_row_tokens", "DType", "Attention", "Truncation", "Pooling", "Quantization", "Backend", "BatchLayout", "OpenRLHFEos", "RewardKind", "StepTagSource", "StepScore", "Aggregate", "setting", "DefaultModelConfig", "ModelConfig", "ParallelConfig", "BatchingConfig", "ServerConfig", "RewardConfig", "FaultInjectionConfig", "ServeConfig", "register_schema", "show", "ConfigError", "InvalidConfig", "fields_of", "enum_of", "PORTS", "reward_problems", "problems", "token_problems", "checkpoint_problems", "has_chat_template", "validate", "AUTO_ATTENTION", "ATTENTION_SUPPORT_FLAGS", "AUTO_INSTANCES", "AUTO_QUEUED_FORWARDS", "DENSE_MASK_ROW_TOKENS", "LOOPBACK", "ModelInfo", "Resolved", "resolve_backend", "device_type_of", "free_loopback_port", "resolve", "SECTIONS", "type_name", "conf_dir", "config_doc"]
