"""`python -m reward_server.check` on a model of two labels whose rewards differ in scale (label 1's head row x 10):
max / mean |diff| over every label as before, plus --label's own; --quantized judged by the rule of
reward_server/config/fidelity.py. The server is stood in for by plain transformers in bfloat16 (served_rewards
patched), so no server starts."""

import json

import numpy as np
import pytest
import torch

from oracles import save_seqcls_checkpoint
from reward_server import check


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """A 2-label checkpoint whose label 1 reads 10x label 0's scale."""
    from transformers import AutoModelForSequenceClassification

    path = save_seqcls_checkpoint(tmp_path_factory.mktemp("scaled"), num_labels=2)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        model.score.weight[1] = 10 * model.score.weight[0] + model.score.weight[1]
    model.save_pretrained(path)
    return path


def served_by(rewards):
    """A stand-in for check.served_rewards: `rewards(seqs)` of the token ids sent."""
    def served(url, model_name, name, rows, timeout_s, request_rows=64):
        return rewards([np.array(r.decode().split(), dtype=np.int64) for r in rows])
    return served


def run_check(capsys, *argv) -> dict:
    code = check.main([*map(str, argv), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == (0 if report["pass"] else 1)
    return report


def test_each_label_gets_its_own_distance_beside_every_labels(scaled, monkeypatch, capsys):
    bf16 = served_by(lambda seqs: check.plain_rewards(str(scaled), seqs, torch.bfloat16, torch.device("cpu"), False))
    monkeypatch.setattr(check, "served_rewards", bf16)
    common = ("--model", scaled, "--n", 16, "--device", "cpu", "--atol", 1)
    own = {}
    for label in (0, 1):
        report = run_check(capsys, *common, "--label", label)
        r = report["float32"]
        assert report["labels"] == 2 and report["label"] == label and report["pass"]
        own[label] = r
    assert own[0]["max_abs_diff"] == own[1]["max_abs_diff"]  # every label: the same whichever label is asked for
    assert own[1]["label_max_abs_diff"] == own[1]["max_abs_diff"]  # label 1's differences are the largest
    assert own[0]["label_max_abs_diff"] < own[0]["max_abs_diff"] / 3
    assert 3 < own[1]["label_mean_abs_diff"] / own[0]["label_mean_abs_diff"] < 30
    mean = (own[0]["label_mean_abs_diff"] + own[1]["label_mean_abs_diff"]) / 2  # every label's mean: the two's mean
    assert own[0]["mean_abs_diff"] == pytest.approx(mean)
    assert check.main([*map(str, common), "--label", "1"]) == 0
    printed = capsys.readouterr().out
    assert "(label 1: max " in printed and "2 label(s), on label 1" in printed


def test_quantized_is_judged_by_the_fidelity_rule_on_the_chosen_label(scaled, monkeypatch, capsys):
    """On a GPU's branch (references patched: bfloat16 and float32 alike), a server whose label 1 is reversed."""
    def float32(seqs):
        return check.plain_rewards(str(scaled), seqs, torch.float32, torch.device("cpu"), False)

    monkeypatch.setattr(check, "references", lambda args, seqs, device, say: dict.fromkeys(("bfloat16", "float32"),
                                                                                        float32(seqs)))
    monkeypatch.setattr(check, "served_rewards", served_by(lambda seqs: float32(seqs) * np.array([1, -1])))
    common = ("--model", scaled, "--n", 16, "--device", "cuda", "--quantized")
    kept = run_check(capsys, *common, "--label", 0)
    assert kept["pass"] and kept["rule"] == "served vs float32 on label 0: Spearman >= 0.999 and pairs ordered alike " \
                                           ">= 99.5 %"
    reversed_ = run_check(capsys, *common, "--label", 1)
    assert not reversed_["pass"]
    assert reversed_["rule"].endswith("(Spearman -1.0000 on label 1 against float32, below --min-spearman=0.999)")
    assert run_check(capsys, *common, "--label", 1, "--min-spearman", -1, "--min-pairs", 0)["pass"]
