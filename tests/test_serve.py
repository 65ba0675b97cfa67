"""End to end: torchrun 2 ranks (gloo), real PyTriton server, rewards equal a plain transformers forward."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from pytriton.client import ModelClient

from oracles import mixed_sequences, reference_rewards
from servers import infer_rewards, score_tokens

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]


def tokenize(ckpt, texts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    return [np.array(ids) for ids in tok(texts)["input_ids"]]


TEXTS = ["Hello", "The answer is 4.", "Step 1: 2x + 3 = 11. Step 2: x = 4. " * 20, "unicode: 日本語 ✓ ки",
         "User: What is the capital of France?\nAssistant: Paris."]


def check_server(url, ckpt, n_seqs=40):
    seqs = mixed_sequences(n_seqs)
    expected = reference_rewards(ckpt, seqs)
    np.testing.assert_allclose(score_tokens(url, seqs), expected, atol=1e-4, rtol=0)

    text_rewards = infer_rewards(url, "reward", "text", [t.encode() for t in TEXTS])
    np.testing.assert_allclose(text_rewards, reference_rewards(ckpt, tokenize(ckpt, TEXTS)), atol=1e-4, rtol=0)

    # NeMo-Aligner's contract: tokens right-padded to a fixed length, plus lengths, through PyTriton's client
    pad_to = 512
    tokens = np.zeros((8, pad_to), dtype=np.int64)
    for i, s in enumerate(seqs[:8]):
        tokens[i, :len(s)] = s
    lengths = np.array([[len(s)] for s in seqs[:8]], dtype=np.int64)
    with ModelClient(url, "reward_model", inference_timeout_s=120) as client:
        out = client.infer_batch(tokens=tokens, sequence_lengths=lengths)
    np.testing.assert_allclose(out["rewards"], expected[:8], atol=1e-4, rtol=0)


@pytest.mark.parametrize("tp,layout", [(2, "packed"), (1, "padded")], ids=["tp2-packed", "dp2-padded"])
def test_llama_two_ranks_match_plain_forward(start_server, llama_ckpt, tp, layout):
    srv = start_server(2, [f"model.path={llama_ckpt}", f"parallel.tensor_parallel_size={tp}",
                           "batching.max_tokens_per_forward=2048", f"batching.layout={layout}"], models=("reward", "reward_model"))
    check_server(srv.url, llama_ckpt)


def test_qwen2_checkpoint_by_path_and_the_parity_command(start_server, qwen2_ckpt, tmp_path):
    """Then `python -m reward_server.check` (README) against the same tensor-parallel server: a sample of token ids
    with shared prompts, and texts (the server's tokenization too), each against plain float32 transformers."""
    srv = start_server(2, [f"model.path={qwen2_ckpt}", "parallel.tensor_parallel_size=2"],
                       models=("reward", "reward_model"))
    check_server(srv.url, qwen2_ckpt, n_seqs=12)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS))
    inputs = tmp_path / "workload.json"  # perf_analyzer's input format (benchmarks/workload.py): more sequences than
    rng = np.random.default_rng(1)      # one request of the check holds
    inputs.write_text(json.dumps({"data": [{"token_ids": {"content": [" ".join(map(str, rng.integers(
        3, 500, rng.integers(4, 80))))], "shape": [1]}} for _ in range(90)]}))
    lines = len("\n".join(TEXTS).splitlines())  # one text per line
    for extra, n, kind in (([], 24, "token_ids"), (["--texts", str(texts)], lines, "text"),
                           (["--inputs", str(inputs), "--n", "80"], 80, "token_ids")):
        run = subprocess.run([sys.executable, "-m", "reward_server.check", "--model", str(qwen2_ckpt), "--url",
                              srv.url, "--n", "24", "--json", *extra], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr[-3000:]
        report = json.loads(run.stdout)
        assert report["pass"] and report["float32"]["max_abs_diff"] < 1e-4, report
        assert report["sequences"] == n and report["input"] == kind, report
    # the references kept in a file: computed without the server, then read back instead of recomputed
    refs, common = tmp_path / "refs.npz", ["--model", str(qwen2_ckpt), "--url", srv.url, "--inputs", str(inputs),
                                           "--n", "80", "--references", str(tmp_path / "refs.npz")]
    check = [sys.executable, "-m", "reward_server.check", *common]
    run = subprocess.run([*check, "--references-only"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and refs.exists(), run.stdout + run.stderr[-3000:]
    run = subprocess.run([*check, "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and f"references from {refs}" in run.stderr, run.stdout + run.stderr[-3000:]
    assert json.loads(run.stdout)["float32"]["max_abs_diff"] < 1e-4
    run = subprocess.run([*check, "--label", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "--label 1: " in run.stderr and "has 1 label(s)" in run.stderr, run.stderr[-3000:]


def test_default_model_serves_and_sigterm_exits_cleanly(start_server):
    srv = start_server(2)
    rewards = infer_rewards(srv.url, "reward", "text", [b"hello", b"world"])
    assert rewards.shape == (2, 1) and np.isfinite(rewards).all()
    start = time.monotonic()
    srv.terminate(timeout=30)
    assert time.monotonic() - start < 30
    log = srv.log()
    assert "rank 0 exited cleanly" in log and "rank 1 exited cleanly" in log, log[-3000:]
    assert "exitcode  : 1" not in log
    assert "Triton: 2 model instances per model, batches of up to 64 sequences (preferred [16])" in log  # CPU auto


def test_four_ranks_two_replicas_of_tensor_parallel_two(start_server, llama_ckpt):
    """world 4 = 2 data-parallel replicas x tensor parallel 2 (transformers' TP inside each replica); with the
    start-up warm-up (on by default on the GPU), whose synthetic forwards must line up across the ranks."""
    srv = start_server(4, [f"model.path={llama_ckpt}", "parallel.tensor_parallel_size=2", "batching.instances=1",
                           "batching.warmup=true"])
    seqs = mixed_sequences(12, seed=3, max_len=256)
    np.testing.assert_allclose(score_tokens(srv.url, seqs, per_request=6, clients=2),
                               reference_rewards(llama_ckpt, seqs), atol=1e-4, rtol=0)
    assert "warm-up done in" in srv.log()
