"""What the server expects of a checkpoint, checked at start-up with one-line errors that say what to change:
its own modeling code only with model.trust_remote_code, an attention implementation its class supports, a
linear `score` head for scalar rewards, and a chat template (its own or model.chat_template) for `messages`."""

import json
import pathlib
from typing import Optional

import torch

from ..config import ConfigError, ModelInfo, auto_attention



class StartupError(ValueError):
    """The checkpoint or the configuration cannot be served as asked; the message says what to change."""


def read_config(path: str) -> dict:
    """config.json as stored (no code runs)."""
    file = pathlib.Path(path) / "config.json"
    if not file.is_file():
        raise StartupError(f"model.path={path}: no config.json there; expected a Hugging Face checkpoint directory")
    return json.loads(file.read_text())


def check_remote_code(path: str, trust_remote_code: bool) -> None:
    """A checkpoint whose model type transformers does not know ships its own code (config.json `auto_map`);
    transformers would stop with a long message, or ask on a terminal."""
    from transformers import CONFIG_MAPPING

    config = read_config(path)
    if trust_remote_code or config.get("model_type") in CONFIG_MAPPING:
        return
    code = sorted({c for v in (config.get("auto_map") or {}).values() for c in (v if isinstance(v, list) else [v])
                   if c})  # AutoTokenizer's entry is a [slow, fast] pair
    if code:
        raise StartupError(f"model.path={path}: the checkpoint's model type {config.get('model_type')!r} needs its own "
                           f"code ({', '.join(code)}); set model.trust_remote_code=true if you trust that code")
    raise StartupError(f"model.path={path}: transformers does not know model type {config.get('model_type')!r}; "
                       f"upgrade transformers or use a checkpoint of a supported family")


def model_class_for(auto_class, path: str, trust_remote_code: bool = False):
    """The class an Auto* class will build for this checkpoint: transformers' own, or with model.trust_remote_code
    the checkpoint's (config.json auto_map); None when neither is known."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if type(config) in auto_class._model_mapping:
            return auto_class._model_mapping[type(config)]
        own = (getattr(config, "auto_map", None) or {}).get(auto_class.__name__)
        if trust_remote_code and own:
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            return get_class_from_dynamic_module(own, path)
    except (AttributeError, KeyError, ValueError, OSError):
        pass
    return None


def supports(model_class, attn: str) -> bool:
    return attn in ModelInfo.of({}, model_class).attention


def resolve_attn(name: str, device: torch.device, model_class=None) -> str:
    """model.attn_implementation for this model class (the rule: config.auto_attention)."""
    try:
        return auto_attention(name, device.type, ModelInfo.of({}, model_class))
    except ConfigError as exc:
        raise StartupError(f"{exc.key}={exc.shown}: {exc.message}") from None


def probe_attn(model) -> str:
    """An implementation for a one-off few-token forward that compiles nothing: sdpa where supported, else eager."""
    return "sdpa" if supports(type(model), "sdpa") else "eager"


def check_score_head(model) -> None:
    """Scalar rewards read `model.score` (a linear layer, as every transformers *ForSequenceClassification has)
    applied to the backbone's hidden state at the pooled token."""
    score = getattr(model, "score", None)
    if isinstance(score, torch.nn.Linear):
        return
    heads = [name for name, m in model.named_children() if isinstance(m, torch.nn.Linear)]
    found = f"its linear layers at the top: {', '.join(heads)}" if heads else "it has no linear layer at the top"
    what = "no `score` head" if score is None else f"a `score` that is a {type(score).__name__}"
    raise StartupError(f"{type(model).__name__} has {what} ({found}); the server serves sequence classifiers laid "
                       f"out as transformers' *ForSequenceClassification: a backbone and a linear `score` head "
                       f"reading the pooled token. Convert the checkpoint to that layout (e.g. "
                       f"LlamaForSequenceClassification with its head weights as score.weight)")


def load_tokenizer(path: str, trust_remote_code: bool, chat_template: Optional[str] = None):
    """The checkpoint's tokenizer; model.chat_template (a file, a directory holding a tokenizer, or the template
    itself) replaces its chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template, trust_remote_code)
    return tokenizer


def read_chat_template(value: str, trust_remote_code: bool = False) -> str:
    from transformers import AutoTokenizer

    where = pathlib.Path(value).expanduser()
    if where.is_dir():
        template = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code).chat_template
        if not template:
            raise StartupError(f"model.chat_template={value}: the tokenizer there has no chat template")
        return template
    if where.is_file():
        return where.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise StartupError(f"model.chat_template={value!r}: not a file, not a directory with a tokenizer, and not a "
                       f"Jinja template")
