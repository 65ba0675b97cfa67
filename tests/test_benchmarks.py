"""Smoke tests so the benchmark scripts do not rot: each runs for a few seconds on CPU with a tiny model."""

import json
import os
import subprocess
import sys

import pytest

from servers import REPO

pytestmark = [pytest.mark.server, pytest.mark.timeout(300)]  # each runs benchmark scripts as processes
BENCH = REPO / "benchmarks"


def run(args, **env):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": f"{REPO}:{BENCH}", **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_workload_and_inprocess_baselines(tmp_path, llama_ckpt):
    out = tmp_path / "w.json"
    assert "40 sequences" in run([BENCH / "workload.py", "--out", out, "--n", 40, "--vocab", 512])
    rows = json.load(open(out))["data"]
    assert len(rows) == 40 and all(64 + 16 <= len(r["token_ids"]["content"][0].split()) <= 3072 for r in rows)
    report = tmp_path / "inprocess.json"
    run([BENCH / "inprocess.py", "--model", llama_ckpt, "--n", 12, "--chunk", 4, "--dense", "2x64",
         "--budget", 4096, "--schedule", "chunk", "leader", "--sharing", "on", "off", "--json", report])
    results = {r["name"]: r for r in json.load(open(report)) if "name" in r}
    assert results["dense 2x64"]["tokens_per_s"] > 0
    workload = [r for r in results.values() if "calls" in r]
    assert {"packed", "padded"} == {r["name"].split()[1] for r in workload}
    assert len(workload) == 6  # packed with and without sharing, padded; chunk and leader each
    assert {"chunk", "leader"} == {"leader" if r["name"].endswith("leader") else "chunk" for r in workload}
    sys.path.insert(0, str(BENCH))
    from workload import lengths

    total = int(sum(lengths(12, 0)))
    for r in workload:  # chunks of 4 sequences; leader: forwards filled to the 4,096-token budget
        expected = (3, 3) if not r["name"].endswith("leader") else (-(-total // 4096), total // 4096 + 3)
        assert expected[0] <= r["calls"] <= expected[1], (r, total)
    assert all(r["max_abs_diff_vs_plain"] < 1e-4 for r in workload)


def test_shared_workloads_and_sharing_in_process(tmp_path, llama_ckpt):
    """grpo and tree workloads: consecutive requests share prefixes; in-process forwards cut by the leader with
    sharing need fewer forwards than without, with the same rewards."""
    for kind, least in (("grpo", 1.5), ("tree", 3.0)):
        out = run([BENCH / "workload.py", "--kind", kind, "--out", tmp_path / f"{kind}.json", "--n", 64,
                   "--vocab", 512])
        assert float(out.split("shared within each 64 consecutive requests: ")[1].split("x")[0]) > least, out
    tagged = run([BENCH / "workload.py", "--kind", "tree", "--out", tmp_path / "t.json", "--n", 16, "--vocab", 512,
                  "--step-tag", 7])
    rows = json.load(open(tmp_path / "t.json"))["data"]
    assert all(r["token_ids"]["content"][0].split()[-1] == "7" for r in rows), tagged
    report = tmp_path / "inprocess.json"
    run([BENCH / "inprocess.py", "--model", llama_ckpt, "--n", 48, "--dense", "2x64", "--budget", 2048,
         "--layouts", "packed", "--schedule", "leader", "--workload", "grpo", "--sharing", "on", "off",
         "--json", report])
    rows = {r["name"].split(" sharing ")[1].split()[0]: r for r in json.load(open(report)) if "calls" in r}
    assert rows["on"]["calls"] < rows["off"]["calls"] * 0.7, rows
    assert rows["on"]["max_abs_diff_vs_plain"] < 1e-4


def test_perf_analyzer_against_live_server(tmp_path, start_server, llama_ckpt):
    token = "smoke-test-token"
    srv = start_server(2, [f"model.path={llama_ckpt}"], env={"REWARD_SERVER_ACCESS_TOKEN": token})
    data = tmp_path / "w.json"
    run([BENCH / "workload.py", "--out", data, "--n", 16, "--vocab", 512, "--fixed", 64])
    out = run([BENCH / "perf.py", "--url", srv.url.removeprefix("http://"), "--input", data, "--concurrency", 2,
               "--requests", 16, "--label", "smoke"], REWARD_SERVER_ACCESS_TOKEN=token)
    row = [line for line in out.splitlines() if line.startswith("| smoke |")]
    assert row, out
    _, _, conc, req_s, tok_s, p50, p99, analyzer_req_s, _ = row[0].split("|")
    assert int(conc) == 2 and float(req_s) > 0 and float(tok_s) == pytest.approx(64 * float(req_s), rel=0.01)
    assert float(analyzer_req_s) > 0 and 0 < float(p50) <= float(p99)


def test_replica_affinity_counts_tokens_with_and_without_the_record():
    out = run([BENCH / "replica_affinity.py", "--replicas", 2, "--workloads", "tree", "rlhf", "--n", 96,
               "--clients", 32, "--vocab", 512])
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| tree")
            or line.startswith("| rlhf")]
    assert [(r[0], r[2]) for r in rows] == [("tree", "off"), ("tree", "on"), ("rlhf", "off"), ("rlhf", "on")], out
    computed = {(r[0], r[2]): int(r[4].replace(",", "")) for r in rows}
    assert computed["tree", "on"] <= computed["tree", "off"] < int(rows[0][3].replace(",", "")), out
    assert computed["rlhf", "on"] == computed["rlhf", "off"], out  # nothing shared: spread as before
