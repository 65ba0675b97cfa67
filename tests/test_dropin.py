"""Drop-in for OpenRLHF and verl users, on one server (torchrun 2 data-parallel ranks) with the OpenRLHF endpoint on
(its own port, server.openrlhf_port, and the API port's /get_reward): OpenRLHF's request shapes sent with `requests`
exactly as its remote_rm_fn sends them get the rewards of our `reward` model for the same texts (and of a plain
transformers forward); an empty query list (OpenRLHF's share for its 2nd..nth URL) gets empty lists; bad queries get
clear errors; 64 concurrent callers are all answered. verl's custom reward function (examples/verl_reward_fn.py) called the way
verl's reward loop and batch reward manager call it."""

import asyncio
import importlib.util
import json
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from transformers import AutoTokenizer

from oracles import reference_rewards
from reward_server.client import RemoteGPTRMClient
from reward_server.serving.openrlhf import BadRequest, openrlhf_text, parse
from servers import REPO, free_port, running_server

pytestmark = pytest.mark.timeout(600)

MAX_LEN = 96
QUERIES = ["Human: What is 2 + 2?\nAssistant: 4", "Human: Name a colour.\nAssistant: Blue, like the sky.",
           "a short one", "Human: Say the end.\nAssistant: the end", "unicode ✓ 日本語"]


def test_queries_are_prepared_like_serve_rm_with_whole_tokens():
    pad, eos = "<pad>", "</s>"
    assert openrlhf_text("hello</s><pad><pad>", pad, eos) == "hello</s>"
    assert openrlhf_text("<pad><pad>hello", pad, eos) == "hello</s>"
    assert openrlhf_text("hello</s></s>", pad, eos) == "hello</s>"
    # serve_rm's str.strip("</s>") removes characters, so "the answer is yes" would lose its final "s"
    assert openrlhf_text("the answer is yes", pad, eos) == "the answer is yes</s>"
    assert openrlhf_text("as is", None, None) == "as is"


@pytest.mark.parametrize("body,message", [
    (b"{not json", "the body is not JSON"),
    (b'{"prompts": ["a"]}', 'expected a JSON object with "query"'),
    (b'{"query": ["a", 3]}', '"query" must be a list of texts'),
    (b'{"query": ["a", "b"], "prompts": ["a"]}', '"prompts" has 1 entries, "query" has 2'),
])
def test_bad_bodies_are_named(body, message):
    with pytest.raises(BadRequest, match=message):
        parse(body)


def test_an_empty_query_list_is_a_request_of_no_rows():
    """OpenRLHF splits its queries over the URLs of --remote_rm_url and sends the 2nd..nth an empty list: 200 with
    empty lists, not 400 (this test expected 400 before the API port)."""
    assert parse(b'{"query": [], "prompts": [], "labels": []}') == []


@pytest.fixture(scope="module")
def server(tmp_path_factory, llama_ckpt):
    tmp = tmp_path_factory.mktemp("dropin")
    port = free_port()
    overrides = [f"model.path={llama_ckpt}", f"server.openrlhf_port={port}", f"model.max_length={MAX_LEN}"]
    with running_server(tmp, overrides) as srv:
        srv.openrlhf_url = f"http://127.0.0.1:{port}/get_reward"
        srv.urls = [srv.openrlhf_url, f"{srv.api_url()}/get_reward"]  # its own port, the API port
        yield srv


@pytest.fixture(scope="module")
def tokenizer(llama_ckpt):
    return AutoTokenizer.from_pretrained(llama_ckpt)


def prepared(tokenizer, queries):
    return [openrlhf_text(q, tokenizer.pad_token, tokenizer.eos_token) for q in queries]


def remote_rm_fn(url, payload):
    """OpenRLHF's request_api_wrapper, as it sends and reads."""
    response = requests.post(url=url, json=payload, headers={"Content-Type": "application/json"}, timeout=180)
    return response.status_code, response.json()


@pytest.mark.server
def test_old_and_new_request_shapes_get_our_reward_models_rewards(server, tokenizer, llama_ckpt):
    queries = [q + tokenizer.eos_token + tokenizer.pad_token * 2 for q in QUERIES]  # as OpenRLHF's actors send
    with RemoteGPTRMClient(server.url) as client:
        ours = client.score(prepared(tokenizer, queries))[:, 0]
    ids = [np.array(x) for x in tokenizer(prepared(tokenizer, queries))["input_ids"]]
    np.testing.assert_allclose(ours, reference_rewards(llama_ckpt, ids)[:, 0], atol=1e-4, rtol=0)
    for url in server.urls:
        for payload in ({"query": queries},
                        {"query": queries, "prompts": ["p"] * len(queries), "labels": [""] * len(queries)}):
            status, answer = remote_rm_fn(url, payload)
            assert status == 200, answer
            np.testing.assert_allclose(answer["rewards"], ours, atol=1e-6, rtol=0)
            assert answer["scores"] == answer["rewards"] and answer["extra_logs"] == {}
            assert answer["errors"] == [""] * len(queries)
        assert remote_rm_fn(url, {"query": [], "prompts": [], "labels": []}) == \
            (200, {"rewards": [], "scores": [], "extra_logs": {}, "errors": []})


@pytest.mark.server
def test_a_bad_query_gets_nan_and_its_reason_and_the_others_are_scored(server, tokenizer):
    long = "word " * 200  # within server.max_row_bytes, past model.max_length
    for url in server.urls:
        status, answer = remote_rm_fn(url, {"query": [QUERIES[0], long, QUERIES[1]]})
        assert status == 200, answer
        assert math.isnan(answer["rewards"][1]) and not math.isnan(answer["rewards"][0] + answer["rewards"][2])
        assert answer["errors"][0] == answer["errors"][2] == ""
        assert answer["errors"][1].startswith("[reward_server:INVALID_ARG:row=1] ")
        assert f"tokens, more than the limit of {MAX_LEN}" in answer["errors"][1]
    with RemoteGPTRMClient(server.url) as client:
        ours = client.score(prepared(tokenizer, [QUERIES[0], QUERIES[1]]))[:, 0]
    np.testing.assert_allclose([answer["rewards"][0], answer["rewards"][2]], ours, atol=1e-6, rtol=0)


@pytest.mark.server
def test_requests_no_query_can_be_scored_from_get_a_one_line_400(server):
    for url in server.urls:
        status, answer = remote_rm_fn(url, {"query": ["word " * 400]})
        assert status == 400 and "\n" not in answer["error"], answer
        assert answer["error"].startswith("[reward_server:INVALID_ARG] [reward_server:INVALID_ARG:row=0] "), answer
        response = requests.post(url, data=b"{oops", timeout=60)
        assert response.status_code == 400
        assert response.json()["error"].startswith("[reward_server:INVALID_ARG] the body is not JSON")
        status, answer = remote_rm_fn(url, {"queries": ["typo in the key"]})
        assert status == 400 and '"query"' in answer["error"]


@pytest.mark.server
def test_sixty_four_concurrent_callers_are_all_answered(server, tokenizer):
    rng = np.random.default_rng(3)
    batches = [[f"Human: question {i}.{j}\nAssistant: " + " ".join(map(str, rng.integers(0, 99, rng.integers(1, 20))))
                for j in range(4)] for i in range(64)]
    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(lambda b: remote_rm_fn(server.openrlhf_url, {"query": b}), batches))
    assert all(status == 200 for status, _ in answers)
    with RemoteGPTRMClient(server.url) as client:
        ours = client.score(prepared(tokenizer, [q for b in batches for q in b]))[:, 0]
    np.testing.assert_allclose([r for _, a in answers for r in a["rewards"]], ours, atol=1e-6, rtol=0)


def load_verl_fn():
    spec = importlib.util.spec_from_file_location("verl_reward_fn", REPO / "examples" / "verl_reward_fn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.server
def test_verl_custom_reward_function_as_verls_reward_loop_calls_it(server, monkeypatch):
    monkeypatch.setenv("REWARD_SERVER_URL", server.url)
    fn = load_verl_fn()
    samples = [dict(data_source="gsm8k", solution_str=f"The answer is {i}.", ground_truth=str(i),
                    extra_info={"question": f"What is {i} + 0?", "index": i}) for i in range(12)]
    samples.append(dict(data_source="other", solution_str="no prompt here", ground_truth=None, extra_info=None))

    async def reward_loop():  # per sample, concurrently, extra keyword arguments included
        return await asyncio.gather(*(fn.compute_score(**s, reward_router_address=None, reward_model_tokenizer=None)
                                      for s in samples))

    scores = asyncio.run(reward_loop())
    conversations = [[{"role": "user", "content": s["extra_info"]["question"]},
                      {"role": "assistant", "content": s["solution_str"]}] for s in samples[:-1]]
    with RemoteGPTRMClient(server.url) as client:
        expected = list(client.score(conversations)[:, 0]) + [float(client.score(["no prompt here"])[0, 0])]
    assert all(isinstance(s, float) for s in scores)
    np.testing.assert_allclose(scores, expected, atol=1e-6, rtol=0)
    batch = fn.compute_score_batch([s["data_source"] for s in samples], [s["solution_str"] for s in samples],
                                   [s["ground_truth"] for s in samples], [s["extra_info"] for s in samples])
    np.testing.assert_allclose(batch, expected, atol=1e-6, rtol=0)
    json.dumps(batch)  # plain floats
