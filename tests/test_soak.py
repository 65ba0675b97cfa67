"""A short run of benchmarks/soak.py: random GRPO, tree and RLHF traffic with duplicates and repeats through a real
server (2 data-parallel replicas, prefix sharing, a 2,000-token prefix cache that wraps), every reward (and a PRM's
every step reward) against plain float32 transformers on the sequence alone."""

import json
import os
import subprocess
import sys

import pytest

from servers import REPO

pytestmark = pytest.mark.server


@pytest.mark.parametrize("prm", [False, True], ids=["scalar", "prm"])
def test_a_short_soak_finds_every_reward_as_scored_alone(tmp_path, prm):
    report = tmp_path / "soak.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--requests", "200" if prm else "400",
           "--clients", "8", "--out", str(tmp_path), "--json", str(report), f"model.cache_dir={tmp_path / 'cache'}"]
    if prm:
        cmd.insert(2, "--prm")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'benchmarks'}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert report.exists(), proc.stderr[-3000:]
    got = json.loads(report.read_text())
    assert proc.returncode == 0 and got["mismatches"] == 0 and got["failed"] == 0, (got, proc.stderr[-2000:])
    assert got["requests"] >= (200 if prm else 400) and got["distinct_sequences"] > 100
    assert got["max_abs_diff"] <= 1e-5 and got["served_spread_max"] <= 1e-5
    engine = got["engine"]
    assert engine["tokens_reused"] > 0 and engine["tokens_computed"] < engine["tokens_received"]  # cache and sharing
