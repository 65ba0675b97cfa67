"""The API port on a 2-label sequence reward model and on a process reward model (math_shepherd preset), end to end
(one rank each): vLLM's default activation and raw outputs, SGLang's raw outputs, and a PRM's step scores through
vLLM's /pooling (task token_classify), each equal to the Triton `reward` model's for the same text to 1e-6."""

import numpy as np
import pytest
import requests

from oracles import TAG, save_prm_checkpoint, save_seqcls_checkpoint, shepherd_texts
from servers import infer_outputs, running_server

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]

TEXTS = ["Human: What is 2 + 2?\nAssistant: 4", "The quick brown fox.", "a third, longer text " * 4]


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def two_labels(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api_two_labels")
    ckpt = save_seqcls_checkpoint(tmp / "ckpt", "llama", num_labels=2, seed=3)
    with running_server(tmp, [f"model.path={ckpt}"], nproc=1) as srv:
        yield srv


def test_two_label_head_default_activation_and_raw_outputs(two_labels):
    srv, api = two_labels, two_labels.api_url()
    out = infer_outputs(srv.url, "text", TEXTS)
    raw = out["rewards"].astype(np.float64)
    assert raw.shape == (3, 2) and all(e[0] == b"" for e in out["error"])
    default = requests.post(f"{api}/classify", json={"model": "rm", "input": TEXTS}, timeout=60).json()["data"]
    np.testing.assert_allclose([d["probs"] for d in default], softmax(raw), atol=1e-6, rtol=0)
    assert [d["label"] for d in default] == [f"LABEL_{int(np.argmax(r))}" for r in raw]
    assert all(d["num_classes"] == 2 for d in default)
    verl = requests.post(f"{api}/classify", json={"input": TEXTS[0], "use_activation": False}, timeout=60).json()
    np.testing.assert_allclose(verl["data"][-1]["probs"], raw[0], atol=1e-6, rtol=0)  # verl reads probs[-1]
    sglang = requests.post(f"{api}/classify", json={"text": TEXTS}, timeout=60).json()
    np.testing.assert_allclose([s["embedding"] for s in sglang], raw, atol=1e-6, rtol=0)
    emb = requests.post(f"{api}/v1/embeddings", json={"input": TEXTS[2]}, timeout=60).json()
    assert abs(emb["data"][-1]["embedding"][-1] - raw[2, 1]) <= 1e-6  # verl's SGLang backend reads embedding[-1]
    slime = requests.post(f"{api}/slime/reward", json={"prompt": TEXTS[1], "response": "", "label": None},
                          timeout=60).json()
    np.testing.assert_allclose(slime, raw[1], atol=1e-6, rtol=0)  # a list per sample for a multi-label head


@pytest.fixture(scope="module")
def shepherd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api_shepherd")
    ckpt = save_prm_checkpoint(tmp / "ckpt", "MistralForCausalLM", seed=3)
    with running_server(tmp, ["reward=math_shepherd", f"model.path={ckpt}", "batching.max_tokens_per_forward=1024"],
                        nproc=1) as srv:
        yield srv


def test_prm_step_scores_through_vllm_pooling(shepherd):
    srv, api = shepherd, shepherd.api_url()
    texts = shepherd_texts(4, seed=2)
    out = infer_outputs(srv.url, "text", texts)
    steps = [row[:n] for row, n in zip(out["step_rewards"], out["num_steps"][:, 0])]
    assert [len(s) for s in steps] == [t.count(TAG) for t in texts]
    # vLLM's STEP pooling for math-shepherd: per step [P(+), P(-)]; our step reward is column 0
    pooled = requests.post(f"{api}/pooling", json={"model": "prm", "input": texts, "task": "token_classify"},
                           timeout=60).json()
    for item, expected in zip(pooled["data"], steps):
        columns = np.array(item["data"])
        assert columns.shape == (len(expected), 2) and item["object"] == "pooling"
        np.testing.assert_allclose(columns[:, 0], expected, atol=1e-6, rtol=0)
        np.testing.assert_allclose(columns.sum(1), 1.0, atol=1e-6, rtol=0)
    one = requests.post(f"{api}/pooling", json={"input": texts[0]}, timeout=60).json()  # the server's own task
    np.testing.assert_allclose(np.array(one["data"][0]["data"])[:, 0], steps[0], atol=1e-6, rtol=0)
    # the aggregate (reward.aggregate=min) through SGLang's /classify; vLLM's /classify points to /pooling
    agg = requests.post(f"{api}/classify", json={"text": texts}, timeout=60).json()
    np.testing.assert_allclose([a["embedding"][0] for a in agg], out["rewards"][:, 0], atol=1e-6, rtol=0)
    refused = requests.post(f"{api}/classify", json={"input": texts[0]}, timeout=60)
    assert refused.status_code == 501 and "/pooling" in refused.json()["error"]["message"]
    no_step = requests.post(f"{api}/pooling", json={"input": "no step tag here"}, timeout=60)
    assert no_step.status_code == 400 and "no step found" in no_step.json()["error"]["message"]
    raw = requests.post(f"{api}/pooling", json={"input": texts[0], "use_activation": False}, timeout=60)
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "use_activation"
