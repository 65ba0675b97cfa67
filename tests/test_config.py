"""The config is checked before anything starts (issue #27): choices are Enums Hydra checks at composition, every
other setting that cannot work is one `cannot start: <key>=<value>: ...` line (reward_server.config.validate), auto
values are resolved in one place (reward_server.config.resolve), and docs/configuration.md is generated from the
dataclasses. In-process through reward_server.cli.check; a few cases through a real torchrun (marked `server`)."""

import dataclasses
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers import free_port
from reward_server import cli, launcher
from reward_server.config import (AUTO_INSTANCES, AUTO_QUEUED_FORWARDS, DENSE_MASK_ROW_TOKENS, ConfigError, ModelInfo,
                                  RewardConfig, ServeConfig, config_doc, problems, resolve, resolve_backend)

REPO = Path(__file__).resolve().parents[1]
NO_ENV = {}  # no WORLD_SIZE (a world of one), no token variables
WORLD_2 = {"WORLD_SIZE": "2"}  # torchrun --nproc_per_node 2


def check(overrides, env=NO_ENV, checkpoint=True):
    return cli.check(list(overrides), env, checkpoint=checkpoint)


def save_tiny_llama(path: Path, **config) -> Path:
    """A tiny random LlamaForSequenceClassification saved with save_pretrained (no tokenizer)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    small = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)
    LlamaForSequenceClassification(LlamaConfig(**{**small, **config})).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def config_json_only(path: Path, **config) -> Path:
    """A checkpoint directory with a config.json and nothing else: validation must need no more."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 128, "num_attention_heads": 4,
                                                  "num_key_value_heads": 2, **config}))
    return path


# ------------------------------------------------------------------------------------------ Enums and composition


def test_choices_are_enums_that_compare_as_strings():
    cfg, _ = cli.compose(["reward=math_shepherd", "server.openrlhf_eos=as_is", "model.quantization=fp8"])
    assert type(cfg.model.pooling).__name__ == "Pooling"
    assert cfg.model.pooling == "last_non_pad" and cfg.model.pooling in ("last_non_pad", "last")
    assert {"last_non_pad": 1, "last": 2}[cfg.model.pooling] == 1
    assert {"scalar": 0, "prm": 1}[cfg.reward.kind] == 1 and cfg.reward.score == "softmax"
    assert f"{cfg.batching.layout}" == "packed" and "%s" % cfg.server.openrlhf_eos == "as_is"
    assert str(cfg.model.dtype) == "auto" and json.dumps(cfg.reward.aggregate) == '"min"'
    assert cfg.model.quantization in (None, "fp8") and cfg.model.quantization == "fp8"
    assert cfg.parallel.backend.upper() == "AUTO"  # str methods give plain strings (torch's Backend() calls upper())


def test_every_leaf_setting_has_a_meaning():
    def leaves(schema, prefix):
        for f in dataclasses.fields(schema):
            if dataclasses.is_dataclass(f.type):
                yield from leaves(f.type, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", f.metadata.get("help", "")

    missing = [key for key, text in leaves(ServeConfig, "") if not text.strip()]
    assert missing == []


def test_configuration_md_is_generated_from_the_dataclasses():
    doc = (REPO / "docs" / "configuration.md").read_text()
    assert doc == config_doc(), "docs/configuration.md is stale: python -m reward_server.config --doc > " \
                                "docs/configuration.md"
    assert "| `batching.max_tokens_per_forward` | int | `16384` |" in doc
    assert "| `model.pooling` | one of: last_non_pad, last | `last_non_pad` |" in doc


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml")))
def test_every_model_preset_composes_and_validates(preset, tiny_ckpt):
    # llama3_8b asks for model.path (`path: ???`): a tiny Llama checkpoint stands in for the 8B one
    overrides = [f"model={preset}"] + ([f"model.path={tiny_ckpt}"] if preset == "llama3_8b" else [])
    assert check(overrides) is None


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "reward").glob("*.yaml")))
def test_every_reward_preset_composes_and_validates(preset):
    assert check([f"reward={preset}"]) is None  # the embedded default model (judged without building it)


def test_the_preset_asking_for_a_path_refuses_to_start_without_one():
    # OmegaConf's merge keeps the schema's null under a preset's `???`: without this check model=llama3_8b would
    # serve the embedded default model in bfloat16
    assert check(["model=llama3_8b"]) == ("cannot start: model.path=???: the preset model=llama3_8b needs it: set "
                                          "model.path=... (a checkpoint directory)")


# ------------------------------------------------------------------------------------------ one line per problem

TOKEN = "tok-123"

BAD = [
    # choices (Enums, refused by Hydra at composition)
    (["model.pooling=bogus"], "model.pooling=bogus: expected one of: last_non_pad, last"),
    (["model.dtype=bf17"], "model.dtype=bf17: expected one of: auto, float32, bfloat16, float16"),
    (["model.attn_implementation=magic"], "model.attn_implementation=magic: expected one of: auto, flex_attention"),
    (["model.truncation=middle"], "model.truncation=middle: expected one of: error, left, right"),
    (["model.quantization=int3"], "model.quantization=int3: expected null or one of: fp8"),
    (["parallel.backend=mpi"], "parallel.backend=mpi: expected one of: auto, nccl, gloo"),
    (["batching.layout=ragged"], "batching.layout=ragged: expected one of: packed, padded"),
    (["server.openrlhf_eos=keep"], "server.openrlhf_eos=keep: expected one of: strip_and_append, as_is"),
    (["reward.kind=pairwise"], "reward.kind=pairwise: expected one of: scalar, prm"),
    (["reward.step_tag_source=regex"], "reward.step_tag_source=regex: expected one of: text, ids, generation_prompt"),
    (["reward.score=sigmoid"], "reward.score=sigmoid: expected one of: softmax, logit, classifier"),
    (["reward.aggregate=max"], "reward.aggregate=max: expected one of: min, last, mean, product"),
    # Hydra's own errors, each named by its override
    (["server.http_port=abc"], "server.http_port=abc: expected an integer"),
    (["batching.overlap=maybe"], "batching.overlap=maybe: expected true or false"),
    (["batching.preferred_batch_sizes=[16,x]"], "batching.preferred_batch_sizes=[16,x]: expected a list of ints"),
    (["model.bogus=1"], "model.bogus=1: no such setting; model has: path, dtype,"),
    (["+model.bogus=1"], "model.bogus=1: no such setting"),
    (["modle.path=/x"], "modle.path=/x: no such setting; did you mean model?"),
    (["server.http_port"], "server.http_port: not an override; expected key=value"),
    (["model=nope"], "model=nope: no such preset; one of: default, llama3_8b (conf/model/)"),
    (["server=1"], "server=1: server is a group of settings, not a value"),
    (["~server.http_port"], "~server.http_port: a setting cannot be deleted"),
    # sizes, timeouts, ports
    (["model.max_length=-1"], "model.max_length=-1: expected a number of tokens"),
    (["model.default.num_attention_heads=3", "model.default.num_key_value_heads=1"],
     "model.default.hidden_size=64: must be a multiple of model.default.num_attention_heads=3"),
    (["model.default.num_key_value_heads=3"],
     "model.default.num_key_value_heads=3: must divide model.default.num_attention_heads=4"),
    (["parallel.tensor_parallel_size=0"], "parallel.tensor_parallel_size=0: must be at least 1"),
    (["parallel.timeout_s=0"], "parallel.timeout_s=0.0: must be positive"),
    (["parallel.heartbeat_s=-1"], "parallel.heartbeat_s=-1.0: must be positive"),
    (["batching.max_batch_size=0"], "batching.max_batch_size=0: must be at least 1"),
    (["batching.max_queue_delay_us=-1"], "batching.max_queue_delay_us=-1: must not be negative"),
    (["batching.preferred_batch_sizes=[16,0]"], "batching.preferred_batch_sizes=[16, 0]: every size must be at least"),
    (["batching.max_tokens_per_forward=0"], "batching.max_tokens_per_forward=0: must be at least 1"),
    (["batching.prefix_min_tokens=-1"], "batching.prefix_min_tokens=-1: must not be negative"),
    (["batching.prefix_cache_tokens=-1"], "batching.prefix_cache_tokens=-1: expected a number of tokens (0: no"),
    (["batching.packed_row_tokens=-1"], "batching.packed_row_tokens=-1: expected a number of tokens (0: auto)"),
    (["batching.max_queued_tokens=-1"], "batching.max_queued_tokens=-1: expected a number of tokens"),
    (["batching.instances=-2"], "batching.instances=-2: expected a number of Triton model instances"),
    (["server.http_port=70000"], "server.http_port=70000: a port is between 0 and 65535 (0: any free port)"),
    (["server.grpc_port=-1"], "server.grpc_port=-1: a port is between 0 and 65535"),
    (["server.openrlhf_port=65536"], "server.openrlhf_port=65536: a port is between 0 and 65535"),
    (["server.metrics_port=8000"], "server.metrics_port=8000: the same port as server.http_port"),
    (["server.triton_metrics_port=8001"], "server.triton_metrics_port=8001: the same port as server.grpc_port"),
    (["server.host="], "server.host=: expected an address"),
    (["server.nemo_model_name=reward"], "server.nemo_model_name=reward: the same name as server.model_name"),
    (["server.openrlhf_concurrency=0"], "server.openrlhf_concurrency=0: must be at least 1"),
    (["server.metrics_scrape_timeout_s=0"], "server.metrics_scrape_timeout_s=0.0: must be positive"),
    (["server.drain_timeout_s=-1"], "server.drain_timeout_s=-1: must not be negative"),
    (["server.drain_refuse_s=-1"], "server.drain_refuse_s=-1.0: must not be negative"),
    (["server.port_wait_s=-1"], "server.port_wait_s=-1.0: must not be negative"),
    (["server.start_attempts=0"], "server.start_attempts=0: must be at least 1"),
    (["server.log_verbose=-1"], "server.log_verbose=-1: must not be negative"),
    (["server.max_row_bytes=-1"], "server.max_row_bytes=-1: expected a number of bytes"),
    (["server.max_request_bytes=-1"], "server.max_request_bytes=-1: expected a number of bytes"),
    (["server.bytes_per_token=0"], "server.bytes_per_token=0: must be at least 1"),
    (["server.stats_log_s=-1"], "server.stats_log_s=-1.0: must not be negative"),
    (["fault_injection.forward_delay_s=-1"], "fault_injection.forward_delay_s=-1.0: must not be negative"),
    # tokens
    (["server.inference_token_env=NO_SUCH_VAR_X"],
     "server.inference_token_env=NO_SUCH_VAR_X: the environment variable NO_SUCH_VAR_X is unset or empty"),
    (["server.inference_token_file=/no/such/token"], "server.inference_token_file=/no/such/token: no such file"),
    (["server.access_token_file=/no/such/dir/token"],
     "server.access_token_file=/no/such/dir/token: the directory /no/such/dir does not exist"),
    # the world torchrun starts, quantization, chat template, checkpoint
    (["parallel.tensor_parallel_size=3"], "parallel.tensor_parallel_size=3: must divide the world size 2"),
    (["model.quantization=fp8", "parallel.tensor_parallel_size=2"],
     "model.quantization=fp8: fp8 is not supported with tensor parallelism"),
    (["model.quantization=fp8", "model.dtype=float16"], "model.quantization=fp8: fp8 quantizes from bfloat16"),
    (["model.quantization=fp8", "parallel.backend=gloo"], "model.quantization=fp8: fp8 needs a CUDA GPU"),
    (["model.chat_template=no_such_file.jinja"], "model.chat_template=no_such_file.jinja: not a file, not a directory"),
    (["model.path=/no/such/checkpoint"], "model.path=/no/such/checkpoint: no such directory"),
    # a process reward model's rules (reward_server.kinds.steps.check_config's, moved to config.reward_problems)
    (["reward=math_shepherd", "reward.step_tag="], "reward.step_tag=: step_tag_source=text needs a step_tag"),
    (["reward=math_shepherd", "reward.step_tag_source=ids"], "reward.step_tag_ids=[]: step_tag_source=ids needs"),
    (["reward=math_shepherd", "reward.max_steps=0"], "reward.max_steps=0: must be at least 1"),
    (["reward=math_shepherd", "reward.score=logit"],
     "reward.candidate_tokens=[+, -]: score=logit needs exactly one candidate token"),
    (["reward=math_shepherd", "reward.candidate_tokens=[+]"],
     "reward.candidate_tokens=[+]: score=softmax needs at least two candidate tokens"),
    (["reward=math_shepherd", "reward.candidate_token_ids=[5,-1]"],
     "reward.candidate_token_ids=[5, -1]: token ids are never negative"),
    (["reward=qwen_prm", "reward.positive_label=-1"], "reward.positive_label=-1: a label index is never negative"),
    (["reward=math_shepherd", "reward.model_class=AutoModelForNothing"],
     "reward.model_class=AutoModelForNothing: not a transformers class"),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_a_setting_that_cannot_work_is_one_line_naming_it(overrides, expected):
    line = check(overrides, WORLD_2)
    assert line is not None and line.startswith(f"cannot start: {expected}"), line
    assert "\n" not in line


GOOD = [
    [], ["server.http_port=0", "server.grpc_port=0", "server.metrics_port=0"], ["server.openrlhf_port=9000"],
    ["model.max_length=0"],  # 0 works as null today (`max_length or max_position_embeddings`)
    ["batching.preferred_batch_sizes=[]"], ["batching.max_queued_tokens=0"], ["batching.prefix_cache_tokens=0"],
    ["model.attn_implementation=flash_attention_2", "batching.layout=padded"], ["model.quantization=fp8"],
    ["server.nemo_model_name="], ["model.chat_template='{{ messages }}'"], ["reward=rlhflow"],
    ["parallel.tensor_parallel_size=2"],
    ["reward=math_shepherd", "reward.step_tag_source=ids", "reward.step_tag_ids=[7,8]"],
    ["hydra.verbose=true"],
]


@pytest.mark.parametrize("overrides", GOOD, ids=[" ".join(o) or "defaults" for o in GOOD])
def test_settings_that_work_today_still_start(overrides):
    assert check(overrides, WORLD_2) is None


def test_token_variables(tmp_path):
    over = ["server.inference_token_env=RS_TOKEN"]
    assert check(over, {"RS_TOKEN": TOKEN}) is None
    assert "is unset or empty" in check(over, {"RS_TOKEN": ""})
    file = tmp_path / "token"
    file.write_text(TOKEN + "\n")
    assert check(over + [f"server.inference_token_file={file}"], {}) is None  # the file when the variable is unset
    assert check([f"server.inference_token_file={file}"], {}) is None
    file.write_text("\n")
    assert check([f"server.inference_token_file={file}"], {}) == \
        f"cannot start: server.inference_token_file={file}: the file is empty; write the inference token to it"
    # the access token is generated when absent; its file must be writable then, not before
    assert check([f"server.access_token_file={tmp_path / 'new_token'}"]) is None
    assert check(["server.access_token_file=/no/such/dir/t"], {"REWARD_SERVER_ACCESS_TOKEN": TOKEN}) is None


def test_tensor_parallelism_against_the_world_and_the_checkpoint(tmp_path, tiny_ckpt):
    assert check(["parallel.tensor_parallel_size=2"], {"WORLD_SIZE": "4"}) is None
    assert check(["parallel.tensor_parallel_size=4"], {"WORLD_SIZE": "2"}).startswith(
        "cannot start: parallel.tensor_parallel_size=4: must divide the world size 2")
    assert check(["parallel.tensor_parallel_size=3"], {"WORLD_SIZE": ""}).startswith(  # unknown world: the
        "cannot start: parallel.tensor_parallel_size=3: must divide the model's num_attention_heads=4 (model.default")
    assert check([f"model.path={tiny_ckpt}", "parallel.tensor_parallel_size=4"], {"WORLD_SIZE": "4"}) == (
        f"cannot start: parallel.tensor_parallel_size=4: must divide the model's num_key_value_heads=2 "
        f"({tiny_ckpt / 'config.json'}); use a divisor of it, or data parallelism")
    assert check([f"model.path={tiny_ckpt}", "parallel.tensor_parallel_size=2"], {"WORLD_SIZE": "2"}) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check([f"model.path={empty}"]) == (f"cannot start: model.path={empty}: no config.json there; expected a "
                                              f"Hugging Face checkpoint directory")
    (empty / "config.json").write_text("{not json")
    assert "config.json is not readable JSON" in check([f"model.path={empty}"])


def test_prm_settings_against_the_checkpoint(tmp_path, tiny_ckpt):
    ckpt = [f"model.path={tiny_ckpt}"]
    assert check(ckpt + ["reward=qwen_prm"]) is None  # 2 labels (transformers' default), positive_label=1
    assert check(ckpt + ["reward=qwen_prm", "reward.positive_label=2"]) == (
        f"cannot start: reward.positive_label=2: the model has 2 labels ({tiny_ckpt / 'config.json'})")
    assert check(ckpt + ["reward=math_shepherd", "reward.step_tag_source=ids", "reward.step_tag_ids=[5,128]"]) == (
        f"cannot start: reward.step_tag_ids=[5, 128]: outside the vocabulary [0, 128) ({tiny_ckpt / 'config.json'})")
    assert check(ckpt + ["reward=rlhflow"]) == (  # no tokenizer saved: no chat template
        f"cannot start: reward.step_tag_source=generation_prompt: needs a chat template and the tokenizer at "
        f"{tiny_ckpt} has none; set model.chat_template")
    assert check(ckpt + ["reward=rlhflow", "model.chat_template='{{ messages }}'"]) is None
    templated = config_json_only(tmp_path / "templated")
    (templated / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert check([f"model.path={templated}", "reward=rlhflow"]) is None


def test_every_problem_is_listed_and_the_checkpoint_is_read_only_when_the_settings_are_fine(tmp_path):
    lines = check(["batching.max_batch_size=0", "server.http_port=-5", "model.path=/no/such/dir"]).splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["batching.max_batch_size=0", "server.http_port=-5"]


def test_python_built_configs_are_checked_too():
    """A ServeConfig built in Python holds plain strings where Hydra would have given Enums."""
    bad = ServeConfig(reward=RewardConfig(kind="prm", score="sigmoid", aggregate="max"))
    assert [e.line() for e in problems(bad, NO_ENV)] == [
        "cannot start: reward.score=sigmoid: expected one of softmax, logit, classifier",
        "cannot start: reward.aggregate=max: expected one of min, last, mean, product"]
    assert problems(ServeConfig(reward=RewardConfig(kind="prm", step_tag="")), NO_ENV)[0].key == "reward.step_tag"


def test_validation_builds_nothing(tmp_path):
    cache = tmp_path / "cache"
    assert check([f"model.cache_dir={cache}"]) is None
    assert not cache.exists()


# ------------------------------------------------------------------------------------------ the entry point


def test_cfg_job_prints_the_composed_config(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--cfg", "job", "model.pooling=last", "reward=math_shepherd"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "pooling: last\n" in out and "kind: prm\n" in out and "hydra" not in out


def test_config_errors_exit_2_with_the_line_on_stderr_of_rank_0_only(capsys, monkeypatch):
    monkeypatch.setattr(cli, "REPORT_GRACE_S", 0.0)
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_:
            cli.main(["model.pooling=bogus"])
        assert exit_.value.code == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == ("cannot start: model.pooling=bogus: expected one of: last_non_pad, last\n"
                                if printed else "")


def test_logging_is_hydra_job_logging_stdout():
    """As under @hydra.main with `override hydra/job_logging: stdout`: the root logger at INFO, message only, on
    stdout."""
    _, hydra_cfg = cli.compose([])
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        cli.configure_logging(hydra_cfg)
        handlers = [h for h in root.handlers if isinstance(h, logging.StreamHandler)]
        assert root.level == logging.INFO and len(handlers) == 1
        assert handlers[0].stream is sys.stdout and handlers[0].formatter._fmt == "%(message)s"
    finally:
        root.handlers[:], root.level = saved[0], saved[1]


def test_launcher_splits_torchrun_options_from_overrides():
    torchrun, overrides = launcher.split_args(["--nproc", "2", "--standalone", "model.path=/x", "--max-restarts=3",
                                               "--nnodes", "1", "~a", "reward=math_shepherd"])
    assert torchrun == ["--nproc_per_node", "2", "--standalone", "--max-restarts=3", "--nnodes", "1"]
    assert overrides == ["model.path=/x", "~a", "reward=math_shepherd"]
    assert launcher.world_size(torchrun) == 2
    assert launcher.world_size(["--nnodes=2", "--nproc-per-node=4"]) == 8
    assert launcher.world_size(["--nnodes", "1:2", "--nproc_per_node", "4"]) is None
    assert launcher.world_size(["--nproc_per_node", "gpu"]) is None
    assert launcher.torchrun_command(["--nproc", "2", "model.path=/x"])[1:] == [
        "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "reward_server.cli", "model.path=/x"]


# ------------------------------------------------------------------------------------------ resolve


def settings(*overrides):
    return cli.compose(list(overrides))[0]


INFO = ModelInfo(max_position_embeddings=1024)


def resolved(cfg=None, device="cpu", tp=1, dp=1, model=INFO):
    return resolve(cfg or settings(), device, tp, dp, model, rank=1, pick_port=lambda: 12345)


def test_resolve_dtype_and_backend():
    assert resolved(device="cpu").dtype == "float32" and resolved(device="cuda").dtype == "bfloat16"
    assert resolved(settings("model.dtype=float16"), device="cuda").dtype == "float16"
    assert resolved(device="cpu").backend == "gloo" and resolved(device="cuda").backend == "nccl"
    assert resolve_backend("auto", True) == "nccl" and resolve_backend("auto", False) == "gloo"
    assert resolve_backend(settings("parallel.backend=gloo").parallel.backend, True) == "gloo"


def test_resolve_attention():
    assert resolved(device="cuda").attn_implementation == "flex_attention"
    assert resolved(device="cpu").attn_implementation == "sdpa"

    class NoSdpa:  # e.g. Gemma2: no sdpa; eager on the CPU, flex_attention on the GPU
        _supports_sdpa = False

    gemma2 = ModelInfo.of({"max_position_embeddings": 8192}, NoSdpa)
    assert "sdpa" not in gemma2.attention and gemma2.class_name == "NoSdpa"
    assert resolved(device="cpu", model=gemma2).attn_implementation == "eager"
    assert resolved(device="cuda", model=gemma2).attn_implementation == "flex_attention"
    with pytest.raises(ConfigError) as refused:
        resolved(settings("model.attn_implementation=sdpa"), model=gemma2)
    assert refused.value.line() == "cannot start: model.attn_implementation=sdpa: NoSdpa does not support it; use auto"
    assert resolved(settings("model.attn_implementation=eager"), device="cuda").attn_implementation == "eager"


def test_resolve_compile_and_warmup():
    assert resolved(device="cuda", tp=1, dp=4).compile and resolved(device="cuda", tp=2, dp=1).compile
    assert not resolved(device="cuda", tp=2, dp=2).compile  # TP x DP: not measured
    assert not resolved(device="cpu").compile and resolved(settings("model.compile=true"), device="cpu").compile
    assert resolved(device="cuda", tp=2, dp=2).warmup  # CUDA kernels
    assert not resolved(device="cpu").warmup  # sdpa on the CPU: nothing to compile
    assert resolved(settings("model.attn_implementation=flex_attention"), device="cpu").warmup
    assert resolved(settings("model.compile=true"), device="cpu").warmup
    assert not resolved(settings("batching.warmup=false"), device="cuda").warmup


def test_resolve_sizes():
    r = resolved(device="cpu", tp=1, dp=2)
    assert r.max_length == 1024 and r.packed_row_tokens == DENSE_MASK_ROW_TOKENS and not r.overlap
    assert r.max_queued_tokens == AUTO_QUEUED_FORWARDS * 16384 * 2 and r.instances == AUTO_INSTANCES["cpu"]
    assert r.max_row_bytes == 16 * 1024 and r.max_request_bytes == 16 * 1024 * 64 and r.triton_metrics_port == 12345
    g = resolved(device="cuda")
    assert g.packed_row_tokens == 16384 and g.overlap and g.instances == AUTO_INSTANCES["cuda"]
    explicit = resolved(settings("model.max_length=100", "batching.packed_row_tokens=512",
                                 "batching.max_queued_tokens=0", "batching.instances=3", "server.max_row_bytes=99",
                                 "server.triton_metrics_port=9100", "batching.overlap=false"), device="cuda")
    assert (explicit.max_length, explicit.packed_row_tokens, explicit.max_queued_tokens, explicit.instances,
            explicit.max_row_bytes, explicit.max_request_bytes, explicit.triton_metrics_port, explicit.overlap) == \
        (100, 512, 0, 3, 99, 99 * 64, 9100, False)


def test_resolved_is_frozen_and_logged_once_by_rank_0(caplog):
    caplog.set_level(logging.INFO, logger="reward_server.config")
    r = resolve(settings(), "cpu", 1, 2, INFO, rank=0, pick_port=lambda: 1)
    resolve(settings(), "cpu", 1, 2, INFO, rank=1, pick_port=lambda: 1)
    assert [rec.getMessage() for rec in caplog.records] == [r.line()]
    assert r.line().startswith("settings on the cpu (tp 1 x dp 2): parallel.backend=gloo, model.dtype=float32, "
                               "model.attn_implementation=sdpa, model.compile=false, batching.warmup=false")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.dtype = "float16"


# ------------------------------------------------------------------------------------------ through torchrun


def torchrun(tmp_path, overrides, env=None, nproc=2):
    import os

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(REPO / "serve_reward_model.py"), *overrides,
           f"model.cache_dir={tmp_path / 'cache'}"]
    start = time.monotonic()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    return run, run.stdout + run.stderr, time.monotonic() - start


TORCHRUN_CASES = [
    (["model.pooling=bogus"], "model.pooling"),  # an Enum, refused by Hydra
    (["server.http_port=abc"], "server.http_port"),  # a malformed override
    (["model.bogus=1"], "model.bogus"),  # an unknown key
    (["server.inference_token_env=NO_SUCH_VAR_X"], "server.inference_token_env"),  # an unset token variable
    (["parallel.tensor_parallel_size=3"], "parallel.tensor_parallel_size"),  # 3 does not divide a world of 2
    (["batching.max_batch_size=0"], "batching.max_batch_size"),
    (["model=llama3_8b"], "model.path"),  # the preset's required path
    (["model.path={heads3}", "parallel.tensor_parallel_size=2"], "parallel.tensor_parallel_size"),  # config.json
]


@pytest.mark.server
@pytest.mark.parametrize("overrides,key", TORCHRUN_CASES, ids=[" ".join(o) for o, _ in TORCHRUN_CASES])
def test_torchrun_prints_one_line_and_starts_nothing(tmp_path, overrides, key):
    heads3 = config_json_only(tmp_path / "heads3", num_attention_heads=6, num_key_value_heads=3)
    run, log, seconds = torchrun(tmp_path, [o.format(heads3=heads3) for o in overrides])
    lines = [line for line in log.splitlines() if line.startswith("cannot start: ")]
    assert run.returncode != 0 and len(lines) == 1 and lines[0].startswith(f"cannot start: {key}="), log
    assert not re.search(r'File "[^"]*reward_server/', log), log  # no traceback frame of ours
    assert "loading" not in log.lower(), log  # no weights
    assert seconds < 10, (seconds, log)
    assert not (tmp_path / "cache").exists()  # the default model was not built
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()


@pytest.mark.server
def test_the_launcher_checks_before_torchrun(tmp_path):
    import os

    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "reward_server.launcher", "--nproc", "2",
                          "parallel.tensor_parallel_size=4", f"model.cache_dir={tmp_path / 'cache'}"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path, env={**os.environ})
    assert run.returncode == 2 and run.stdout == "", run.stdout + run.stderr
    assert run.stderr == ("cannot start: parallel.tensor_parallel_size=4: must divide the world size 2 (torchrun's "
                          "--nnodes x --nproc_per_node); start a multiple of 4 ranks or pick a divisor of 2\n")
    assert time.monotonic() - start < 10 and not (tmp_path / "cache").exists()
