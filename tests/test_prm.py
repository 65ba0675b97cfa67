"""Process reward models end to end: torchrun 2 ranks (gloo), real PyTriton server, every step score equal to
a reference computed from a plain transformers forward (tests/oracles.py), for each preset in conf/reward/.

One server per preset for the whole module: math_shepherd (Mistral, TP=2), qwen_prm (Qwen2 token
classification, DP=2), rlhflow (Llama chat, TP=2)."""

from concurrent.futures import ThreadPoolExecutor
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from pytriton.client import ModelClient
from tritonclient.utils import InferenceServerException

from oracles import (TAG, load_tokenizer, one_id, ref_rlhflow, ref_token_classification, save_prm_checkpoint,
                     shepherd_reference, shepherd_texts)
from reward_server.client import RemoteGPTRMClient
from reward_server.protocol import INVALID_ARG, error_token
from servers import Server, infer_outputs

pytestmark = pytest.mark.timeout(600)

# a request whose every row failed: its token, then the row's (protocol.py)
BAD_ROW_0 = re.escape(f"{error_token(INVALID_ARG)} {error_token(INVALID_ARG, row=0)}")
AGG = {"min": np.min, "last": lambda v: v[-1], "mean": np.mean, "product": np.prod}


# ---------------------------------------------------------------- client helpers

def infer_many(url, name, requests):
    """Requests sent at once from threads, so the dynamic batcher merges rows of different step counts."""
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda rows: infer_outputs(url, name, rows), requests))


def check(out, expected, aggregate):
    assert (out["error"][:, 0] == b"").all(), out["error"]
    assert out["num_steps"].dtype == np.int32
    np.testing.assert_array_equal(out["num_steps"][:, 0], [len(e) for e in expected])
    assert out["step_rewards"].shape == (len(expected), max(len(e) for e in expected))
    for row, e in zip(out["step_rewards"], expected):
        np.testing.assert_allclose(row[:len(e)], e, atol=1e-5, rtol=0)
        assert np.isnan(row[len(e):]).all()
    np.testing.assert_allclose(out["rewards"][:, 0], [AGG[aggregate](e) for e in expected], atol=1e-5, rtol=0)


def check_many(outs, requests_expected, aggregate):
    for out, expected in zip(outs, requests_expected):
        check(out, expected, aggregate)


def split(flat, sizes):
    out, at = [], 0
    for n in sizes:
        out.append(flat[at:at + n])
        at += n
    return out


def start(tmp_path_factory, name, ckpt, tp, overrides=()):
    log = tmp_path_factory.mktemp(name) / "server.log"
    srv = Server(2, [f"reward={name}", f"model.path={ckpt}", f"parallel.tensor_parallel_size={tp}",
                     "batching.max_tokens_per_forward=1024", *overrides], log)
    try:
        return srv.wait_ready(("reward", "reward_model"))
    except BaseException:
        srv.kill()
        raise


# ---------------------------------------------------------------- math-shepherd: Mistral causal LM, TP=2

@pytest.fixture(scope="module")
def shepherd(tmp_path_factory):
    ckpt = save_prm_checkpoint(tmp_path_factory.mktemp("shepherd"), "MistralForCausalLM", seed=3)
    srv = start(tmp_path_factory, "math_shepherd", ckpt, tp=2,
                overrides=["reward.max_steps=8", "batching.max_queue_delay_us=100000"])
    yield srv, ckpt, load_tokenizer(ckpt)
    srv.stop()


@pytest.mark.server
def test_math_shepherd_tp2_text_and_token_ids(shepherd):
    srv, ckpt, tok = shepherd
    requests = [shepherd_texts(n, seed) for seed, n in enumerate([3, 1, 5, 2])]
    flat = [t for r in requests for t in r]
    ids = [tok(t)["input_ids"] for t in flat]
    # the tag follows a digit here, so the plain tokenizer already makes it its own token (the card's way)
    assert [i.count(one_id(tok, TAG)) for i in ids] == [t.count(TAG) for t in flat]
    expected = split(shepherd_reference(ckpt, tok, ids), [len(r) for r in requests])
    check_many(infer_many(srv.url, "text", requests), expected, "min")
    id_requests = split([" ".join(map(str, i)) for i in ids], [len(r) for r in requests])
    check_many(infer_many(srv.url, "token_ids", id_requests), expected, "min")

    # NeMo-Aligner's contract serves the same step scores (tokens right-padded + lengths)
    tokens = np.zeros((len(ids), max(map(len, ids))), dtype=np.int64)
    for i, row in enumerate(ids):
        tokens[i, :len(row)] = row
    lengths = np.array([[len(r)] for r in ids], dtype=np.int64)
    with ModelClient(srv.url, "reward_model", inference_timeout_s=120) as client:
        out = client.infer_batch(tokens=tokens, sequence_lengths=lengths)
    check(out, [e for r in expected for e in r], "min")


@pytest.mark.server
def test_step_tag_found_whatever_the_tokenizer_does_around_it(shepherd):
    """" ки" is one merged token (id != the tag's), "\\nки" and "4ки" are not: the server still puts the tag's
    id at every occurrence, and the rest of the text keeps its tokens."""
    srv, ckpt, tok = shepherd
    tag_id = one_id(tok, TAG)
    assert tok.encode(" " + TAG, add_special_tokens=False) != [tag_id]  # the merged variant exists
    texts = shepherd_texts(3, seed=7, glue=" ") + [
        f"{TAG} Step 1: a ки\nки\nStep 3: 2+2=4{TAG} Step 4: x {TAG}  Step 5 {TAG}{TAG}",
        f"Step 1: x = 4 {TAG}\nStep 2: ки is the tag{TAG}",
    ]
    plain = [tok(t)["input_ids"] for t in texts]
    assert all(p.count(tag_id) < t.count(TAG) for p, t in zip(plain, texts))  # the card's way misses steps

    def tag_as_own_token(text):  # independent construction: tokenize the pieces between tags
        pieces = text.split(TAG)
        ids = tok(pieces[0])["input_ids"]
        for piece in pieces[1:]:
            ids += [tag_id] + (tok.encode(piece, add_special_tokens=False) if piece else [])
        return ids

    ids = [tag_as_own_token(t) for t in texts]
    assert [i.count(tag_id) for i in ids] == [t.count(TAG) for t in texts]
    expected = shepherd_reference(ckpt, tok, ids)
    check(infer_outputs(srv.url, "text", texts), expected, "min")
    check(infer_outputs(srv.url, "token_ids", [" ".join(map(str, i)) for i in ids]), expected, "min")


@pytest.mark.server
def test_no_step_or_too_many_steps_is_a_row_error(shepherd):
    srv, ckpt, tok = shepherd
    no_tag = "Step 1: x = 4\nStep 2: no tag here"
    too_many = "\n".join(f"Step {i}: x{TAG}" for i in range(9))  # reward.max_steps=8
    with pytest.raises(InferenceServerException, match="no step found") as info:
        infer_outputs(srv.url, "text", [no_tag])
    assert info.value.status() == "400"
    with pytest.raises(InferenceServerException, match="9 steps, more than reward.max_steps=8"):
        infer_outputs(srv.url, "text", [too_many])
    bad_ids = " ".join(map(str, tok(no_tag)["input_ids"]))
    with pytest.raises(InferenceServerException, match="no step found"):
        infer_outputs(srv.url, "token_ids", [bad_ids])

    # in one dynamic batch (the server waits 100 ms for more requests): the bad request still gets its 400, the
    # good request is scored, and a request with a bad and a good row keeps the good row's step scores
    good = shepherd_texts(2, seed=11)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(infer_outputs, srv.url, "text", rows) for rows in ([no_tag], good, [too_many, good[0]])]
        with pytest.raises(InferenceServerException, match=rf"^\[400\] {BAD_ROW_0} no step found") as info:
            futures[0].result()
        assert info.value.status() == "400"
        outs = [futures[1].result(), futures[2].result()]
    expected = shepherd_reference(ckpt, tok, [tok(t)["input_ids"] for t in good])
    check(outs[0], expected, "min")
    mixed = outs[1]
    assert mixed["error"][0, 0].decode().startswith(f"{error_token(INVALID_ARG, row=0)} 9 steps")
    assert mixed["error"][1, 0] == b""
    assert np.isnan(mixed["rewards"][0]).all() and np.isnan(mixed["step_rewards"][0]).all()
    assert mixed["num_steps"][0, 0] == 0 and mixed["num_steps"][1, 0] == len(expected[0])
    np.testing.assert_allclose(mixed["step_rewards"][1, :len(expected[0])], expected[0], atol=1e-5, rtol=0)


@pytest.mark.server
def test_step_rewards_through_the_client(shepherd):
    """RemoteGPTRMClient against a PRM: each sequence's step rewards (numpy, or torch for torch input) and its
    reward, their minimum; a call of 11 sequences goes as 3 requests of at most 4."""
    srv, ckpt, tok = shepherd
    texts = shepherd_texts(11, seed=5)
    ids = [tok(t)["input_ids"] for t in texts]
    expected = shepherd_reference(ckpt, tok, ids)
    with RemoteGPTRMClient(srv.url, max_batch_size=4) as client:
        handle = client.infer_rm(texts)  # 3 requests of at most 4
        steps = handle.step_rewards()
        assert [len(s) for s in steps] == [len(e) for e in expected]
        for got, want in zip(steps, expected):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(handle.result()[:, 0], [e.min() for e in expected], atol=1e-5, rtol=0)
        torch_steps = client.infer_rm([torch.tensor(i) for i in ids]).step_rewards()
        assert all(isinstance(s, torch.Tensor) for s in torch_steps)
        np.testing.assert_allclose(torch.cat(torch_steps).numpy(), np.concatenate(expected), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- Qwen2.5-Math-PRM style: token classification, DP=2

def qwen_messages(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        steps = [f"Step {i + 1}: {rng.integers(50)} + {rng.integers(50)}" for i in range(int(rng.integers(1, 7)))]
        out.append([{"role": "system", "content": "Please reason step by step."},
                    {"role": "user", "content": f"What is {rng.integers(10)} + 3?"},
                    {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}])
    return out


@pytest.mark.server
def test_qwen_prm_dp2_messages_and_text(tmp_path_factory):
    ckpt = save_prm_checkpoint(tmp_path_factory.mktemp("qwen"), "Qwen2ForTokenClassification", seed=4, num_labels=2)
    srv = start(tmp_path_factory, "qwen_prm", ckpt, tp=1, overrides=["reward.aggregate=product"])
    try:
        tok = load_tokenizer(ckpt)
        requests = [qwen_messages(n, seed) for seed, n in enumerate([4, 2, 3])]
        rendered = [tok.apply_chat_template(m, tokenize=False) for r in requests for m in r]
        ids = [tok.encode(t, add_special_tokens=False) for t in rendered]
        expected = split(ref_token_classification(ckpt, ids, one_id(tok, "<extra_0>")), [len(r) for r in requests])
        check_many(infer_many(srv.url, "messages", [[json.dumps(m) for m in r] for r in requests]), expected,
                   "product")
        # the same conversations as text, tokenized like tokenizer(text) (model.add_special_tokens: a second BOS)
        text_requests = split(rendered, [len(r) for r in requests])
        srv_text = [infer_outputs(srv.url, "text", r) for r in text_requests]
        for out, exp, rows in zip(srv_text, expected, text_requests):
            ids_bos = [tok(t)["input_ids"] for t in rows]
            check(out, ref_token_classification(ckpt, ids_bos, one_id(tok, "<extra_0>")), "product")
    finally:
        srv.stop()


# ---------------------------------------------------------------- RLHFlow chat PRM: Llama causal LM, TP=2

def rlhflow_conversations(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        steps = [f"Step {i + 1}: x = {rng.integers(100)} - {rng.integers(10)}" for i in range(int(rng.integers(1, 6)))]
        conv = []
        for k, step in enumerate(steps):
            conv.append({"role": "user", "content": (f"What is {rng.integers(9)} + 2? " if k == 0 else "") + step})
            conv.append({"role": "assistant", "content": "+"})
        out.append(conv)
    return out


@pytest.mark.server
def test_rlhflow_tp2_matches_one_forward_per_prefix(tmp_path_factory):
    ckpt = save_prm_checkpoint(tmp_path_factory.mktemp("rlhflow"), "LlamaForCausalLM", seed=5)
    srv = start(tmp_path_factory, "rlhflow", ckpt, tp=2, overrides=["reward.aggregate=last"])
    try:
        tok = load_tokenizer(ckpt)
        requests = [rlhflow_conversations(n, seed) for seed, n in enumerate([3, 4])]
        expected = split(ref_rlhflow(ckpt, tok, [c for r in requests for c in r]), [len(r) for r in requests])
        check_many(infer_many(srv.url, "messages", [[json.dumps(c) for c in r] for r in requests]), expected, "last")
    finally:
        srv.stop()


# ---------------------------------------------------------------- step tags without a server

def test_step_tag_counts_and_multi_token_tags():
    from reward_server.kinds.steps import StepTag

    tag = StepTag([7, 8])
    seqs = [np.array([1, 7, 8, 7]), np.array([8, 7, 8, 7, 8]), np.array([7])]
    # [.., 7] | [8, ..] across the boundary is not a step
    assert tag.counts(seqs).tolist() == [1, 2, 0]
    seq, position, step = tag.positions(seqs)  # scored at the tag's last token
    assert (seq.tolist(), position.tolist(), step.tolist()) == ([0, 1, 1], [2, 2, 4], [0, 0, 1])
    assert tag.counts([np.array([7])]).tolist() == [0]


def test_step_outputs_aggregates_and_padding():
    from reward_server.kinds.steps import StepOutputs, StepTag

    tag = StepTag([5])
    seqs = [np.array([1, 5, 2, 5, 5]), np.array([5, 1])]
    values = np.array([[0.5, 0.2, 0.8], [0.9, 0.0, 0.0]], dtype=np.float32)
    for name, expected in [("min", [0.2, 0.9]), ("last", [0.8, 0.9]), ("mean", [0.5, 0.9]),
                           ("product", [0.08, 0.9])]:
        out = StepOutputs(tag, name).scored(values, seqs)
        np.testing.assert_allclose(out["rewards"][:, 0], expected, rtol=1e-6)
    assert out["num_steps"].tolist() == [[3], [1]]
    np.testing.assert_array_equal(out["step_rewards"], np.array([[0.5, 0.2, 0.8], [0.9, np.nan, np.nan]], np.float32))


def test_bad_reward_config_fails_before_loading():
    from reward_server.config import RewardConfig
    from reward_server.kinds.steps import check_config

    for bad, message in [(dict(score="sigmoid"), "score="), (dict(aggregate="max"), "aggregate="),
                         (dict(score="logit"), "exactly one candidate"), (dict(step_tag=""), "needs a step_tag"),
                         (dict(step_tag_source="ids"), "needs step_tag_ids"), (dict(max_steps=0), "max_steps")]:
        with pytest.raises(ValueError, match=message):
            check_config(RewardConfig(kind="prm", **bad))


@pytest.mark.server
def test_the_parity_command_says_it_checks_scalar_rewards_only(shepherd):
    srv, ckpt, _ = shepherd
    run = subprocess.run([sys.executable, "-m", "reward_server.check", "--model", str(ckpt), "--url", srv.url],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "serves a process reward model" in run.stderr, run.stderr[-2000:]
