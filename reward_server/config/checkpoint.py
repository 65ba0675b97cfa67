"""What the checkpoint's config.json says cannot work (json only: no weights, no model code, no torch), and
`validate`, which runs these checks after the settings' own."""

import dataclasses
import json
from pathlib import Path
from typing import Any, List, Mapping, Optional


from .schema import ServeConfig
from .validate import ConfigError, InvalidConfig, problems


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
