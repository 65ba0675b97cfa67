"""Entry point of each rank: `torchrun --nproc_per_node N serve_reward_model.py [overrides]` (or `reward-server`,
reward_server/launcher.py, which checks the config before starting torchrun).

The config is composed with Hydra's compose API (conf/serve_reward_model.yaml, the presets in conf/model/ and
conf/reward/, the schema in config/schema.py) and checked (config.validate) before anything starts: a setting that cannot
work is one line `cannot start: <key>=<value>: <what to change>` on stderr (rank 0 only), and exit code 2, with no
process group, no weights and no torch import. `--cfg job` prints the composed config; `--help` the usage.
Nothing is written to disk (no outputs/ or .hydra/ directories).
"""

import dataclasses
import difflib
import logging
import os
import sys
import time
from pathlib import Path
from typing import List, Mapping, Optional, Tuple

from omegaconf import DictConfig, OmegaConf, open_dict

from .config import ConfigError, InvalidConfig, ServeConfig, conf_dir, register_schema, type_name, validate

CONFIG_NAME = "serve_reward_model"
EXIT_CONFIG = 2  # the exit code of a configuration that cannot work (also the loaders' StartupError, app.py)
# A rank other than 0 with a config that cannot work waits this long before exiting: torchrun SIGTERMs the other
# ranks at the first exit, which could be before rank 0 has printed why (rank 0's own exit ends the wait).
REPORT_GRACE_S = 5.0
USAGE = """usage: torchrun [torchrun options] serve_reward_model.py [key=value ...]
       reward-server [torchrun options] [key=value ...]
       python -m reward_server.cli --cfg job [key=value ...]   (print the composed config)

Overrides are Hydra's: model.path=/ckpt/rm parallel.tensor_parallel_size=2 reward=math_shepherd.
Every key, its type, default and meaning: docs/configuration.md."""

register_schema()

# A source checkout (or editable install) reads conf/ beside the package; an installed wheel its packaged copy.
_SOURCE_CONF = Path(__file__).resolve().parents[1] / "conf"
CONFIG_PATH = str(_SOURCE_CONF) if (_SOURCE_CONF / f"{CONFIG_NAME}.yaml").is_file() else "pkg://reward_server.conf"


def _initialize():
    from hydra import initialize_config_dir, initialize_config_module

    if CONFIG_PATH.startswith("pkg://"):
        return initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base=None)
    return initialize_config_dir(CONFIG_PATH, version_base=None)


def _split(override: str) -> Tuple[str, str]:
    """(key, value text) of an override as the user wrote it (`+`, `++`, `~` prefixes dropped from the key)."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _schema_field(key: str):
    """The dataclass field `key` (dotted) names in ServeConfig (a group of settings too), or None."""
    node = ServeConfig
    found = None
    for part in key.split("."):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return None
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return None
        found = fields[part]
        node = found.type
    return found


def _unknown_key(key: str, value: str) -> ConfigError:
    """`key` names no setting: say which part of it is unknown, and what is there instead."""
    parts = key.split(".")
    group, known = ServeConfig, []
    for part in parts:
        found = _schema_field(".".join(known + [part]))
        if found is None:
            break
        known.append(part)
        group = found.type
    where = ".".join(known)
    names = [f.name for f in dataclasses.fields(group)] if dataclasses.is_dataclass(group) else []
    wrong = parts[len(known)] if len(known) < len(parts) else parts[-1]
    close = difflib.get_close_matches(wrong, names, n=1)
    if close:
        hint = f"did you mean {where + '.' if where else ''}{close[0]}?"
    elif names:
        hint = f"{where or 'the config'} has: {', '.join(names)}"
    else:
        hint = f"{where} is a value, not a group of settings"
    return ConfigError(key, value, f"no such setting; {hint} (docs/configuration.md)", shown=value)


def _expected(annotation) -> str:
    words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
    text = type_name(annotation)
    for name, said in words.items():
        text = text.replace(f"list of {name}", f"a list of {name}s").replace(f"{name} or null", f"{said} or null")
    return words.get(text, text)


def _presets(group: str) -> List[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def _explain(exc: Exception, overrides: List[str]) -> ConfigError:
    """One ConfigError naming the override (or setting) a Hydra / OmegaConf error is about."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if isinstance(exc, OverrideParseException):
        bad = _unparsable(overrides)
        if bad is not None:
            if "=" not in bad:
                return ConfigError(bad, None, "not an override; expected key=value, e.g. model.path=/ckpt/rm",
                                   bare=True)
            key, value = _split(bad)
            return ConfigError(key, value, f"not a value Hydra can parse ({first}); quote it, e.g. "
                               f"'{key}=\"{value}\"'", shown=value)
    if isinstance(exc, MissingConfigException):
        for override in overrides:
            key, value = _split(override)
            if f"'{key}/{value}'" in text:
                options = _presets(key)
                return ConfigError(key, value, f"no such preset; one of: {', '.join(options)} (conf/{key}/)",
                                   shown=value)
    if isinstance(exc, MissingMandatoryValue):
        key = getattr(exc, "full_key", "") or "?"
        example = " (a checkpoint directory)" if key == "model.path" else ""
        return ConfigError(key, "???", f"required: set {key}=...{example}", shown="???")
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    for override in overrides:
        if override.startswith("~") and f"override {override}" in text:
            return ConfigError(override, None, "a setting cannot be deleted; set it instead (null where its type "
                               "allows)", bare=True)
        key, value = _split(override)
        if f"override {override}" in text or f"Could not override '{key}'" in text or \
                f"at '{key}'" in text:
            if f"Could not override '{key}'" in text or isinstance(cause, ConfigKeyError):
                return _unknown_key(key, value)
            if isinstance(cause, ValidationError):
                found = _schema_field(key)
                if found is None:  # an item inside a list: the list's field
                    found = _schema_field(key.split("[")[0])
                if found is not None:
                    if dataclasses.is_dataclass(found.type):
                        return ConfigError(key, value, f"{key} is a group of settings, not a value; set one of "
                                           f"its keys, e.g. {key}.{dataclasses.fields(found.type)[0].name}=...",
                                           shown=value)
                    return ConfigError(key, value, f"expected {_expected(found.type)}", shown=value)
            reason = str(cause).strip().splitlines()[0] if str(cause).strip() else first
            return ConfigError(key, value, reason, shown=value)
    key = getattr(cause, "full_key", None) or "config"
    return ConfigError(key, "?", first, shown="?")


def _unparsable(overrides: List[str]) -> Optional[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException:
            return override
    return None


def compose(overrides: List[str]) -> Tuple[ServeConfig, DictConfig]:
    """(the typed config, Hydra's own config node) for these overrides; InvalidConfig (one error) when Hydra or
    OmegaConf refuses them."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with _initialize():
            cfg = hydra_compose(CONFIG_NAME, overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            hydra_cfg = cfg.pop("hydra")
        typed = OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise InvalidConfig([_explain(exc, list(overrides))]) from None
    errors = [_unknown_key(*_split(o)) for o in overrides
              if o.startswith("+") and not _split(o)[0].startswith("hydra.") and _schema_field(_split(o)[0]) is None]
    errors += _required_by_presets(hydra_cfg, overrides)
    if errors:
        raise InvalidConfig(errors)
    return typed, hydra_cfg


def _required_by_presets(hydra_cfg: DictConfig, overrides: List[str]) -> List[ConfigError]:
    """A preset's `key: ???` asks for a value; OmegaConf's merge keeps the schema's default under it, so the
    override must be looked for here."""
    given = {_split(o)[0] for o in overrides}
    errors = []
    for group, choice in (hydra_cfg.runtime.choices or {}).items():
        if group.startswith("hydra/") or choice is None:
            continue
        file = conf_dir() / group / f"{choice}.yaml"
        if not file.is_file():
            continue
        preset = OmegaConf.load(file)
        for name in preset:
            key = f"{group}.{name}"
            if OmegaConf.is_missing(preset, name) and key not in given:
                errors.append(ConfigError(key, "???", f"the preset {group}={choice} needs it: set {key}=..."
                                          f"{' (a checkpoint directory)' if key == 'model.path' else ''}",
                                          shown="???"))
    return errors


def check(overrides: List[str], env: Optional[Mapping[str, str]] = None, checkpoint: bool = True) -> Optional[str]:
    """The `cannot start:` line(s) for these overrides (composition, then validation), or None when they can
    start. Starts nothing."""
    try:
        cfg, _ = compose(overrides)
        validate(cfg, env, checkpoint=checkpoint)
    except InvalidConfig as exc:
        return str(exc)
    return None


def is_rank_zero(env: Mapping[str, str] = os.environ) -> bool:
    """The rank that reports: RANK (torchrun), else LOCAL_RANK, unset or 0."""
    return env.get("RANK", env.get("LOCAL_RANK", "0")) in ("", "0")


def configure_logging(hydra_cfg: DictConfig) -> None:
    """What @hydra.main did: hydra/job_logging (stdout: our INFO lines, message only, on stdout) and hydra.verbose."""
    from hydra.core.utils import configure_log

    configure_log(hydra_cfg.job_logging, hydra_cfg.verbose)


def main(argv: Optional[List[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(USAGE)
        sys.exit(0)
    print_cfg = args[:2] == ["--cfg", "job"]
    if print_cfg:
        args = args[2:]
    try:
        cfg, hydra_cfg = compose(args)
        if print_cfg:
            print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
            sys.exit(0)
        validate(cfg)
    except InvalidConfig as exc:
        if is_rank_zero():
            print(exc, file=sys.stderr, flush=True)
        else:  # every rank finds the same; torchrun stops the others at the first exit, so let rank 0 say it first
            time.sleep(REPORT_GRACE_S)
        sys.exit(EXIT_CONFIG)
    configure_logging(hydra_cfg)
    from .app import serve  # torch and the rest: only for a config that can start

    code = serve(cfg)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: the interpreter's teardown of torch's C++ state after a clean stop can abort ("terminate called
    # without an active exception", SIGABRT seen on a subscriber), turning a clean exit 0 into torchrun's failure.
    os._exit(code)


if __name__ == "__main__":
    main()
