"""model.quantization's start-up fidelity gate (reward_server/loading/fidelity_gate.py) on the CPU, with the
TEST-ONLY stand-in quantizer (fault_injection.quantization_noise: each weight the recipe picks times
(1 + noise x N(0, 1))): the recipes pick the right layers; a small perturbation passes and a large one is refused
in one line naming the figure, the label and the setting; a PRM is judged on its step scores; the figures reach the
metrics; through torchrun every rank exits and the log holds the one line and no traceback of ours."""

import json
import subprocess
import urllib.request

import numpy as np
import pytest
import torch

from oracles import build_tokenizer, save_prm_checkpoint, save_seqcls_checkpoint
from reward_server.config import BatchingConfig, ModelConfig
from reward_server.config.fidelity import QUANTIZED_PAIRS, QUANTIZED_SPEARMAN
from reward_server.distributed import Topology
from reward_server.kinds.scalar import load_scalar_scorer
from reward_server.loading import fidelity_gate, quantization
from reward_server.loading.checkpoint import StartupError
from servers import REPO, Server, torchrun

CPU_1 = Topology(rank=0, world_size=1, tp_size=1, dp_size=1, device=torch.device("cpu"))


@pytest.fixture
def stand_in():
    """quantization.use_stand_in(noise) for one test; torchao again after it."""
    yield quantization.use_stand_in
    quantization.use_stand_in(0)


@pytest.fixture(scope="module")
def two_labels(tmp_path_factory):
    return save_seqcls_checkpoint(tmp_path_factory.mktemp("two_labels"), num_labels=2)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    """64 short sequences in perf_analyzer's format (check --inputs): a quick sample for the CPU."""
    rng = np.random.default_rng(0)
    rows = [" ".join(map(str, rng.integers(3, 512, int(rng.integers(16, 48))))) for _ in range(64)]
    path = tmp_path_factory.mktemp("calibration") / "inputs.json"
    path.write_text(json.dumps({"data": [{"token_ids": {"content": [r], "shape": [1]}} for r in rows]}))
    return path


def gate(path, noise, calibration, stand_in, **settings):
    stand_in(noise)
    cfg = ModelConfig(path=str(path), quantization="fp8", calibration_path=str(calibration), **settings)
    scorer, tokenizer, config = load_scalar_scorer(cfg, BatchingConfig(), CPU_1)
    return fidelity_gate.run(scorer, tokenizer, cfg, CPU_1.device, 16384, 1024, config.vocab_size), scorer


def test_the_rule_is_the_check_commands_and_the_settings_defaults():
    from reward_server import check

    cfg = ModelConfig()
    assert (cfg.quantization_min_spearman, cfg.quantization_min_pairs) == (QUANTIZED_SPEARMAN, QUANTIZED_PAIRS)
    assert (check.QUANTIZED_SPEARMAN, check.QUANTIZED_PAIRS) == (QUANTIZED_SPEARMAN, QUANTIZED_PAIRS)
    good = {"spearman": 0.9995, "pair_agreement": 0.996}
    assert fidelity_gate.judge({"0": good}, QUANTIZED_SPEARMAN, QUANTIZED_PAIRS) is None
    assert fidelity_gate.judge({"0": good, "1": {**good, "pair_agreement": 0.99}}, 0.999, 0.995) == \
        "pairs ordered alike 99.00 % on label 1, below model.quantization_min_pairs=0.995"
    assert fidelity_gate.judge({"0": {**good, "spearman": float("nan")}}, 0.999, 0.995).startswith("Spearman nan")
    assert fidelity_gate.judge({"0": {**good, "nonfinite": 3, "n": 256}}, -1, 0) == \
        "3 of 256 quantized rewards on label 0 are not finite"  # never served, whatever the bars


@pytest.mark.parametrize("overrides,expected", [
    (["model.quantization=fp8_mlp", "parallel.tensor_parallel_size=2"],
     "model.quantization=fp8_mlp: fp8_mlp is not supported with tensor parallelism"),
    (["model.quantization_min_spearman=1.5"], "model.quantization_min_spearman=1.5: a rank correlation is between"),
    (["model.quantization_min_pairs=-0.1"], "model.quantization_min_pairs=-0.1: a share of pairs is between 0 and 1"),
    (["model.calibration_path=/nonexistent/cal.txt"], "model.calibration_path=/nonexistent/cal.txt: no such file"),
    (["fault_injection.quantization_noise=0.1"],
     "fault_injection.quantization_noise=0.1: stands in for the quantizer of model.quantization; set"),
    (["model.quantization=fp8", "fault_injection.quantization_noise=-1"],
     "fault_injection.quantization_noise=-1.0: must not be negative"),
])
def test_settings_that_cannot_work_are_one_line(overrides, expected):
    from reward_server import cli

    line = cli.check(overrides, {"WORLD_SIZE": "2"}, checkpoint=False)
    assert line is not None and line.startswith(f"cannot start: {expected}"), line


def test_the_stand_in_starts_where_fp8_cannot(calibration_file):
    from reward_server import cli

    fp8_on_cpu = ["model.quantization=fp8", "parallel.backend=gloo", "model.dtype=float32"]
    assert cli.check(fp8_on_cpu, {}, checkpoint=False).startswith("cannot start: model.quantization=fp8: fp8 ")
    stand_in = ["fault_injection.quantization_noise=0.01", f"model.calibration_path={calibration_file}",
                "model.quantization_min_spearman=-1", "model.quantization_min_pairs=0"]
    assert cli.check(fp8_on_cpu + stand_in, {}, checkpoint=False) is None


@pytest.mark.parametrize("recipe,per_layer", [("fp8", [7, 7, 7, 7]), ("fp8_tensor", [7, 7, 7, 7]),
                                              ("fp8_mlp", [3, 3, 3, 3]), ("fp8_skip_ends", [0, 7, 7, 0]),
                                              ("fp8_mlp_skip_ends", [0, 3, 3, 0])])
def test_recipes_pick_their_layers_and_the_originals_come_back(stand_in, recipe, per_layer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=4, num_attention_heads=4,
                                                       num_key_value_heads=2, num_labels=1))
    layers = list(model.model.layers)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    stand_in(0.01)
    assert quantization.quantize(layers, recipe) == sum(per_layer)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert [sum(f"layers.{i}." in n for n in changed) for i in range(4)] == per_layer
    assert all(".mlp." in n for n in changed) == recipe.startswith("fp8_mlp")
    assert all(n.endswith(".weight") and "layers." in n for n in changed)  # no embedding, norm or head
    with quantization.unquantized(model) as n:
        assert n == sum(per_layer) and all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert {name for name, p in model.named_parameters() if not torch.equal(p, before[name])} == changed
    quantization.release(model)
    with quantization.unquantized(model) as n:
        assert n == 0


def test_a_recipe_that_finds_nothing_and_unknown_recipes_are_refused(stand_in):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2))
    stand_in(0.01)
    with pytest.raises(StartupError, match=r"model.quantization=fp8_skip_ends: no linear layer .* \(2 decoder layers"):
        quantization.quantize(list(model.model.layers), "fp8_skip_ends")
    with pytest.raises(StartupError, match=r"expected null or fp8, fp8_tensor, fp8_mlp, fp8_skip_ends"):
        quantization.check("int4", torch.device("cpu"), 1, torch.float32)
    quantization.check("fp8_mlp", torch.device("cpu"), 1, torch.float32)  # the stand-in runs anywhere


def test_a_small_perturbation_passes_and_the_figures_reach_the_metrics(two_labels, calibration_file, stand_in):
    from prometheus_client import generate_latest

    from reward_server.serving.metrics import Metrics

    report, scorer = gate(two_labels, 1e-4, calibration_file, stand_in)
    assert report["sequences"] == 64 and set(report["labels"]) == {"0", "1"}
    for r in report["labels"].values():
        assert r["spearman"] > 0.9999 and r["pair_agreement"] > 0.999 and 0 < r["mean_abs_diff"] <= r["max_abs_diff"]
    with quantization.unquantized(scorer.backbone) as n:
        assert n == 0  # the originals were released
    metrics = Metrics()
    metrics.quantization_fidelity(report["labels"])
    text = generate_latest(metrics.registry).decode()
    for name in ("spearman", "pairs_alike", "max_abs_diff", "mean_abs_diff"):
        for label in "01":
            assert f'reward_server_quantization_{name}{{label="{label}"}}' in text


def test_a_large_perturbation_is_refused_in_one_line_unless_the_bars_are_lowered(two_labels, calibration_file,
                                                                                   stand_in):
    with pytest.raises(StartupError) as refused:
        gate(two_labels, 0.3, calibration_file, stand_in)
    line = str(refused.value)
    assert line.startswith("model.quantization=fp8: Spearman 0.") and "\n" not in line, line
    assert " on label 0 against the unquantized model, below model.quantization_min_spearman=0.999 (64 " \
           "calibration sequences: label 0 Spearman" in line, line
    report, _ = gate(two_labels, 0.3, calibration_file, stand_in, quantization_min_spearman=-1,
                     quantization_min_pairs=0)
    assert report["labels"]["0"]["spearman"] < 0.999


def test_the_built_in_sample_groups_answers_and_ends_prm_steps_in_the_tag(monkeypatch):
    tokenizer = build_tokenizer()
    cfg = ModelConfig()
    seqs = fidelity_gate.calibration(cfg, tokenizer, None, 4096, 512)
    assert len(seqs) == fidelity_gate.CALIBRATION_SEQUENCES == 256
    assert all(np.array_equal(seqs[0][:20], s[:20]) for s in seqs[:fidelity_gate.GROUP])  # a shared question
    assert not np.array_equal(seqs[0][:20], seqs[fidelity_gate.GROUP][:20])
    again = fidelity_gate.calibration(cfg, tokenizer, None, 4096, 512)
    assert [s.tolist() for s in again] == [s.tolist() for s in seqs]  # the same sample every time
    tag = [7, 8]
    tagged = fidelity_gate.calibration(cfg, tokenizer, tag, 100_000, 512)
    steps = [len(s) for _, s in fidelity_gate.built_in()]
    assert [sum(1 for i in range(len(s) - 1) if s[i] == 7 and s[i + 1] == 8) for s in tagged] == steps
    with pytest.raises(StartupError, match=r"model.calibration_path=None: 0 usable sequences; .* at least 64"):
        fidelity_gate.calibration(cfg, tokenizer, None, 4096, 3)  # every id past a vocabulary of 3


def test_a_prm_is_judged_on_its_step_scores(tmp_path, stand_in, monkeypatch):
    from reward_server.cli import compose
    from reward_server.kinds.prm import load_step_scorer

    monkeypatch.setattr(fidelity_gate, "MAX_STEPS", 4)  # short answers: a quick sample on the CPU
    path = save_prm_checkpoint(tmp_path / "prm", "MistralForCausalLM", seed=3)
    serve, _ = compose(["reward=math_shepherd", f"model.path={path}", "model.quantization=fp8"])
    stand_in(1e-4)
    scorer, tokenizer, config = load_step_scorer(serve.model, serve.reward, BatchingConfig(), CPU_1)
    report = fidelity_gate.run(scorer, tokenizer, serve.model, CPU_1.device, 16384, 1024, config.vocab_size)
    steps = report["labels"]["steps"]
    assert list(report["labels"]) == ["steps"] and steps["n"] > report["sequences"]  # several steps a sequence
    assert steps["spearman"] > 0.999 and steps["nonfinite"] == 0


# ---------------------------------------------------------------- through torchrun (2 ranks, gloo)

@pytest.mark.server
def test_refusal_through_torchrun_is_one_line_and_every_rank_exits(tmp_path, two_labels, calibration_file):
    cmd = torchrun(2, REPO / "serve_reward_model.py", f"model.path={two_labels}", "model.quantization=fp8",
                   "fault_injection.quantization_noise=0.3", f"model.calibration_path={calibration_file}",
                   f"model.cache_dir={tmp_path / 'cache'}")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    log = run.stdout + run.stderr
    assert run.returncode != 0
    lines = [line for line in log.splitlines() if line.startswith("cannot start: ")]
    assert len(lines) == 1 and lines[0].startswith("cannot start: model.quantization=fp8: Spearman 0."), log
    assert "below model.quantization_min_spearman=0.999" in lines[0]
    assert "reward_server/" not in log, log  # no traceback through our code
    assert log.count("TEST-ONLY stand-in quantizer") == 2  # each rank warns


@pytest.mark.server
def test_a_passing_gate_serves_and_exports_its_figures(tmp_path, two_labels, calibration_file):
    srv = Server(2, [f"model.path={two_labels}", "model.quantization=fp8_mlp",
                     "fault_injection.quantization_noise=1e-4", f"model.calibration_path={calibration_file}",
                     f"model.cache_dir={tmp_path / 'cache'}"], tmp_path / "server.log")
    try:
        srv.wait_ready()
        log = srv.log()
        assert "fidelity gate, model.quantization=fp8_mlp: 64 sequences" in log and "PASS (Spearman >= 0.999" in log
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        for label in "01":
            value = float(text.split(f'reward_server_quantization_spearman{{label="{label}"}} ')[1].split()[0])
            assert 0.9999 < value <= 1.0
    finally:
        srv.stop()
