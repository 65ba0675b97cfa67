"""The API port end to end (torchrun 2 data-parallel ranks, a real Llama reward checkpoint, real Triton): each route's
request built as its client builds it (shared engine-apis.md), the field that client reads equal to the Triton
`reward` model's reward for the same text, conversation or ids to 1e-6; 8 concurrent one-sample requests of one GRPO
group computing about the group's unique tokens once (metrics); /health, /v1/models, /get_model_info."""

import asyncio
import json
import re

import aiohttp
import numpy as np
import pytest
import requests
from transformers import AutoTokenizer

from servers import infer_outputs, metrics, running_server, value

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]

TEXTS = ["Human: What is 2 + 2?\nAssistant: 4", "The quick brown fox.", "unicode ✓ 日本語 and more"]
CONVERSATIONS = [[{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4, of course."}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."}]]


@pytest.fixture(scope="module")
def server(tmp_path_factory, llama_ckpt):
    with running_server(tmp_path_factory.mktemp("api_routes"), [f"model.path={llama_ckpt}"]) as srv:
        srv.api = srv.api_url()
        yield srv


@pytest.fixture(scope="module")
def tokenizer(llama_ckpt):
    return AutoTokenizer.from_pretrained(llama_ckpt)


def triton(server, name, rows):
    """The Triton `reward` model's rewards [n, labels] for rows of input `name`."""
    out = infer_outputs(server.url, name, rows)
    assert all(e[0] == b"" for e in out["error"]), out["error"]
    return out["rewards"]


def verl_input(tokenizer, conversation):
    """verl's _preprocess_reward_inputs: the conversation rendered with the RM's chat template, as text, with a
    leading BOS string removed (the server is to add it, as vLLM's add_special_tokens=true does)."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
    return text.removeprefix(tokenizer.bos_token)


async def post_each(url, bodies):
    """One aiohttp session and POST per body, all at once (verl's reward loop: one task per sample, gathered)."""
    async def one(body):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            async with session.post(url, json=body) as response:
                response.raise_for_status()
                return await response.json()

    return await asyncio.gather(*(one(b) for b in bodies))


def test_vllm_classify_as_verl_and_vllm_scripts_send_it(server, tokenizer):
    messages = triton(server, "messages", [json.dumps(c) for c in CONVERSATIONS])[:, 0]
    # verl (vLLM backend): one templated string per request, BOS stripped, raw head output; reads data[-1].probs[-1]
    bodies = [{"model": "/ckpt/rm", "input": verl_input(tokenizer, c), "use_activation": False} for c in CONVERSATIONS]
    answers = asyncio.run(post_each(f"{server.api}/classify", bodies))
    np.testing.assert_allclose([a["data"][-1]["probs"][-1] for a in answers], messages, atol=1e-6, rtol=0)
    # the same conversation with its BOS kept, and as vLLM's chat body
    kept = tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    for body in ({"input": kept, "use_activation": False}, {"messages": CONVERSATIONS[0], "use_activation": False}):
        answer = requests.post(f"{server.api}/classify", json=body, timeout=60).json()
        assert abs(answer["data"][0]["probs"][0] - messages[0]) <= 1e-6, answer
    # plain texts (one BOS, like Triton's text input), the default activation (1 label: sigmoid), token ids
    text = triton(server, "text", TEXTS)[:, 0]
    answer = requests.post(f"{server.api}/classify", json={"input": TEXTS}, timeout=60).json()
    np.testing.assert_allclose([d["probs"][0] for d in answer["data"]], 1 / (1 + np.exp(-text.astype(np.float64))),
                               atol=1e-6, rtol=0)
    assert answer["data"][0]["num_classes"] == 1 and answer["usage"]["prompt_tokens"] > 0
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    answer = requests.post(f"{server.api}/classify", json={"input": ids, "use_activation": False}, timeout=60).json()
    np.testing.assert_allclose([d["probs"][0] for d in answer["data"]], text, atol=1e-6, rtol=0)
    pooled = requests.post(f"{server.api}/pooling", json={"input": TEXTS[0], "use_activation": False}, timeout=60)
    assert abs(pooled.json()["data"][0]["data"][0] - text[0]) <= 1e-6


def test_sglang_routes_as_areal_and_verl_send_them(server, tokenizer):
    text = triton(server, "text", TEXTS)[:, 0]
    # SGLang's native /classify (AReaL's default URL; SGLang's docs read response[i]["embedding"][0])
    answer = requests.post(f"{server.api}/classify", json={"model": "rm", "text": TEXTS}, timeout=60).json()
    np.testing.assert_allclose([a["embedding"][0] for a in answer], text, atol=1e-6, rtol=0)
    one = requests.post(f"{server.api}/classify", json={"text": TEXTS[1]}, timeout=60).json()
    assert abs(one["embedding"][0] - text[1]) <= 1e-6 and one["meta_info"]["prompt_tokens"] > 0
    ids = tokenizer(TEXTS[2])["input_ids"]
    by_ids = requests.post(f"{server.api}/classify", json={"input_ids": ids}, timeout=60).json()
    assert abs(by_ids["embedding"][0] - text[2]) <= 1e-6
    # verl's SGLang backend: /v1/embeddings, one templated string, BOS stripped; reads data[-1].embedding[-1]
    messages = triton(server, "messages", [json.dumps(c) for c in CONVERSATIONS])[:, 0]
    bodies = [{"model": "/ckpt/rm", "input": verl_input(tokenizer, c)} for c in CONVERSATIONS]
    answers = asyncio.run(post_each(f"{server.api}/v1/embeddings", bodies))
    np.testing.assert_allclose([a["data"][-1]["embedding"][-1] for a in answers], messages, atol=1e-6, rtol=0)


def test_slime_remote_rm_as_slime_sends_it(server):
    """slime's remote_rm: {"prompt", "response", "label"} per sample; the parsed JSON is the reward."""
    messages = triton(server, "messages", [json.dumps(c) for c in CONVERSATIONS])[:, 0]
    bodies = [{"prompt": c[:-1], "response": c[-1]["content"], "label": "4"} for c in CONVERSATIONS]
    answers = asyncio.run(post_each(f"{server.api}/slime/reward", bodies))
    assert all(isinstance(a, float) for a in answers)
    np.testing.assert_allclose(answers, messages, atol=1e-6, rtol=0)
    prompt, response = "Human: What is 2 + 2?\nAssistant:", " 4"
    text = triton(server, "text", [prompt + response])[0, 0]
    answer = requests.post(f"{server.api}/slime/reward", json={"prompt": prompt, "response": response, "label": None},
                           timeout=60).json()
    assert abs(answer - text) <= 1e-6


def test_eight_one_sample_requests_of_a_group_share_their_prompt(server, capsys):
    """A GRPO group of 8 sent as 8 concurrent one-sample /classify requests (verl's per-sample tasks): gathered into
    one forward, the 600-token prompt is computed once."""
    rng = np.random.default_rng(11)
    prompt = rng.integers(4, 500, 600).tolist()
    responses = [rng.integers(4, 500, int(n)).tolist() for n in rng.integers(40, 160, 8)]
    bodies = [{"model": "rm", "input": prompt + r, "use_activation": False} for r in responses]
    before = metrics(server)
    answers = asyncio.run(post_each(f"{server.api}/classify", bodies))
    after = metrics(server)
    computed = value(after, "reward_server_tokens_computed_total") - value(before, "reward_server_tokens_computed_total")
    received = value(after, "reward_server_tokens_received_total") - value(before, "reward_server_tokens_received_total")
    unique = len(prompt) + sum(len(r) for r in responses)
    with capsys.disabled():
        print(f"\n8 concurrent one-sample /classify requests of one group: {received:.0f} tokens received, "
              f"{computed:.0f} computed, {unique} unique ({computed / unique:.2f}x)")
    assert received == len(prompt) * 8 + sum(len(r) for r in responses)
    assert computed <= 1.3 * unique, (computed, unique)
    ours = triton(server, "token_ids", [" ".join(map(str, prompt + r)) for r in responses])[:, 0]
    np.testing.assert_allclose([a["data"][0]["probs"][0] for a in answers], ours, atol=1e-6, rtol=0)


def test_health_models_and_model_info(server, llama_ckpt):
    health = requests.get(f"{server.api}/health", timeout=30)
    assert health.status_code == 200 and health.text == ""
    models = requests.get(f"{server.api}/v1/models", timeout=30).json()
    assert models["data"][0]["id"] == str(llama_ckpt) and models["data"][0]["max_model_len"] == 1024
    info = requests.get(f"{server.api}/get_model_info", timeout=30).json()
    assert info["model_path"] == str(llama_ckpt) and info["is_generation"] is False
    ready = [line for line in server.log().splitlines() if "ready after" in line][-1]
    assert re.search(r"; API http://127\.0\.0\.1:\d+ \(/classify", ready), ready


def test_the_examples_run_against_the_api_port(server):
    """examples/ for AReaL, slime, vLLM scripts and verl, each against this server's API port."""
    import os
    import subprocess
    import sys

    from servers import REPO

    env = {**os.environ, "REWARD_SERVER_API": server.api, "PYTHONPATH": str(REPO)}
    for script, args in (("areal_classify.py", [f"{server.api}/classify"]),
                         ("slime_remote_rm.py", [f"{server.api}/slime/reward"]),
                         ("vllm_classify.py", [server.api]), ("verl_api_reward_fn.py", [])):
        run = subprocess.run([sys.executable, str(REPO / "examples" / script), *args], capture_output=True, text=True,
                             timeout=120, env=env)
        assert run.returncode == 0 and re.search(r"-?\d+\.\d+", run.stdout), (script, run.stdout, run.stderr[-2000:])
