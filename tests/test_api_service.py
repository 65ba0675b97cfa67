"""The API port in-process (serving/api.py and its routes): each route's request, as its client builds it, through a
real ApiServer, RewardService and Leader (a group of one over gloo, a stand-in scorer with a real tokenizer), answered
in that engine's shape with the value the service gives the same rows; gathering of concurrent requests; withdrawal
(client disconnects, request_timeout_s) taking queued rows out uncomputed; one-line errors; /health. Seconds, no
server process."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch

from oracles import build_tokenizer
from reward_server.config import ServeConfig
from reward_server.engine import Engine, Leader
from reward_server.engine.errors import Overloaded
from reward_server.engine.admission import Withdrawn
from reward_server.kinds.scalar import ScalarOutputs
from reward_server.serving.api import ApiServer
from reward_server.serving.api_routes import api_server
from reward_server.serving.drain import Admission
from reward_server.serving.inputs import RequestDecoder, SequenceRules
from reward_server.serving.metrics import Metrics
from reward_server.serving.openrlhf import OpenRLHFRoute
from reward_server.serving.requests import ScoreRequest, ScoreResult
from reward_server.serving.service import RewardService

pytestmark = pytest.mark.timeout(120)
TOKEN = "api-test-token"
WIDTH = 2


class Scorer:
    """reward row = [sum(ids) / 1000 + label for each label]; records each forward's sequences; sleeps `delay`."""

    def __init__(self):
        self.computed_tokens = self.reused_tokens = 0
        self.delay = 0.0
        self.forwards = []

    def output_width(self, seqs):
        return WIDTH

    def __call__(self, seqs):
        time.sleep(self.delay)
        self.forwards.append([s.tolist() for s in seqs])
        self.computed_tokens += sum(len(s) for s in seqs)
        return torch.tensor([[float(s.sum()) / 1000 + k for k in range(WIDTH)] for s in seqs])


def expected(ids):
    return [float(np.float32(sum(ids) / 1000 + k)) for k in range(WIDTH)]


def softmax(row):
    e = np.exp(np.asarray(row, dtype=np.float64) - max(row))
    return e / e.sum()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def stack(topo, tokenizer):
    """(service, scorer, metrics): a running leader; closed and joined at the end."""
    scorer, metrics = Scorer(), Metrics()
    leader = Leader(Engine(scorer, topo), heartbeat_s=1, tokens_per_forward=4096, metrics=metrics)
    rules = SequenceRules(vocab_size=512, max_length=200, truncation="error", max_row_bytes=4096,
                          max_request_bytes=1 << 16)
    service = RewardService(leader, RequestDecoder(tokenizer, rules, add_special_tokens=True), ScalarOutputs(WIDTH),
                            metrics)
    thread = threading.Thread(target=leader.run)
    thread.start()
    yield service, scorer, metrics
    leader.close()
    thread.join(timeout=60)
    assert not thread.is_alive()


def start_api(service, tokenizer, token=None, timeout_s=None, delay_us=20000, slime_key=None):
    cfg = ServeConfig()
    cfg.server.slime_reward_key = slime_key
    cfg.server.api_port, cfg.server.request_timeout_s, cfg.batching.max_queue_delay_us = 0, timeout_s, delay_us
    model = SimpleNamespace(num_labels=WIDTH, id2label={0: "bad", 1: "good"}, problem_type=None)
    api = api_server(cfg, service, tokenizer, model, token, 200)
    api.start()
    return api


@pytest.fixture
def api(stack, tokenizer):
    server = start_api(stack[0], tokenizer)
    yield server, f"http://127.0.0.1:{server.port}"
    server.stop()


def post(url, body, **kwargs):
    return requests.post(url, data=body if isinstance(body, (bytes, str)) else json.dumps(body), timeout=60, **kwargs)


def one_line_error(response, shape):
    """The error's message, checked to be one line in the route's shape."""
    body = response.json()
    message = {"vllm": lambda b: b["error"]["message"], "sglang": lambda b: b["error"]["message"],
               "openai": lambda b: b["message"], "plain": lambda b: b["error"]}[shape](body)
    assert "\n" not in message and "Traceback" not in response.text, response.text
    if shape == "vllm":
        assert body["error"]["code"] == response.status_code and body["error"]["type"]
    if shape == "openai":
        assert body["object"] == "error" and body["code"] == response.status_code
    return message


def test_each_route_answers_in_its_engines_shape_with_the_services_value(api, stack, tokenizer):
    server, url = api
    server.ready()
    text, texts = "The answer is 4.", ["Hello world", "Step 1: x = 4"]
    ids = [tokenizer(t)["input_ids"] for t in [text] + texts]  # the BOS the tokenizer adds, once
    conversation = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    chat_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert rendered.startswith(tokenizer.bos_token) and chat_ids[0] == tokenizer.bos_token_id

    # vLLM /classify: verl's body (raw head outputs), the default activation (softmax over 2 labels), lists, ids, chat
    verl = post(f"{url}/classify", {"model": "/ckpt/rm", "input": text, "use_activation": False}).json()
    assert verl["model"] == "/ckpt/rm" and verl["object"] == "list" and verl["usage"]["prompt_tokens"] == len(ids[0])
    assert verl["data"][0]["probs"] == expected(ids[0]) and verl["data"][0]["num_classes"] == WIDTH
    assert verl["data"][-1]["label"] == "good"
    default = post(f"{url}/classify", {"input": texts}).json()["data"]
    for item, i in zip(default, ids[1:]):
        np.testing.assert_allclose(item["probs"], softmax(expected(i)), rtol=1e-6)
    as_ids = post(f"{url}/classify", {"input": ids[0], "use_activation": False}).json()["data"]
    assert as_ids[0]["probs"] == expected(ids[0])
    # the BOS rule: a templated text, with its BOS (as rendered) or without (verl strips it), scores as `messages`
    for sent in (rendered, rendered[len(tokenizer.bos_token):]):
        got = post(f"{url}/classify", {"input": sent, "use_activation": False}).json()["data"][0]["probs"]
        assert got == expected(chat_ids)
    chat = post(f"{url}/classify", {"messages": conversation, "use_activation": False}).json()["data"][0]["probs"]
    assert chat == expected(chat_ids)
    no_special = post(f"{url}/classify", {"input": text, "add_special_tokens": False, "use_activation": False})
    assert no_special.json()["data"][0]["probs"] == expected(ids[0][1:])
    pooled = post(f"{url}/pooling", {"input": text, "use_activation": False}).json()
    assert pooled["data"][0] == {"index": 0, "object": "pooling", "data": expected(ids[0])}

    # SGLang: /classify native (raw outputs, a list for a list), /v1/embeddings (verl reads embedding[-1])
    one = post(f"{url}/classify", {"model": "m", "text": text}).json()
    assert one["embedding"] == expected(ids[0]) and one["meta_info"]["prompt_tokens"] == len(ids[0])
    many = post(f"{url}/classify", {"text": texts, "rid": ["a", "b"]}).json()
    assert [m["embedding"] for m in many] == [expected(i) for i in ids[1:]] and many[1]["meta_info"]["id"] == "b"
    assert post(f"{url}/classify", {"input_ids": [ids[1], ids[2]]}).json()[0]["embedding"] == expected(ids[1])
    emb = post(f"{url}/v1/embeddings", {"model": "m", "input": rendered[len(tokenizer.bos_token):]}).json()
    assert emb["data"][-1]["embedding"][-1] == expected(chat_ids)[-1] and emb["object"] == "list"

    # slime: a bare number; a list prompt is a conversation with the response as the assistant's turn
    slime = post(f"{url}/slime/reward", {"prompt": conversation[:1], "response": "4", "label": "4"})
    assert slime.json() == expected(chat_ids)  # 2 labels: a list per sample
    assert post(f"{url}/slime/reward", {"prompt": "The answer", "response": " is 4.", "label": None}).json() == \
        expected(ids[0])

    # OpenRLHF: an empty query list (the 2nd..nth URL's share) answers empty lists
    assert post(f"{url}/get_reward", {"query": [], "prompts": [], "labels": []}).json() == \
        {"rewards": [], "scores": [], "extra_logs": {}, "errors": []}
    orl = post(f"{url}/get_reward", {"query": [text + tokenizer.eos_token + tokenizer.pad_token]}).json()
    assert orl["rewards"] == [expected(tokenizer(text + tokenizer.eos_token)["input_ids"])]

    models = requests.get(f"{url}/v1/models", timeout=30).json()
    assert models["data"][0]["object"] == "model" and models["data"][0]["max_model_len"] == 200
    assert requests.get(f"{url}/get_model_info", timeout=30).json()["is_generation"] is False


def test_errors_are_one_line_in_each_routes_shape(api, stack):
    server, url = api
    cases = [
        ("/classify", b"{oops", 400, "vllm", "the body is not JSON"),
        ("/classify", {"inputs": "typo"}, 400, "vllm", '"input"'),
        ("/classify", {"input": ""}, 400, "vllm", "empty text"),
        ("/classify", {"input": []}, 400, "vllm", '"input" is empty'),
        ("/classify", {"input": "a", "text": "b"}, 400, "vllm", "not both"),
        ("/classify", {"input": "word " * 300}, 400, "vllm", "more than the limit of 200"),
        ("/classify", {"input": [[5, 6], [1, 99999]]}, 400, "vllm", "row=1] token id 99999 outside"),
        ("/classify", {"text": ""}, 400, "sglang", '"text" is empty'),
        ("/classify", {"text": ["ok", "word " * 300]}, 400, "sglang", "row=1]"),
        ("/pooling", {"input": "a", "task": "token_classify"}, 400, "vllm", 'pooling task is "classify"'),
        ("/v1/embeddings", {"inputs": "typo"}, 400, "openai", 'expected "input"'),
        ("/v1/embeddings", b"[1, 2", 400, "openai", "not JSON"),
        ("/slime/reward", {"prompt": "a"}, 400, "plain", '"response"'),
        ("/slime/reward", {"prompt": [], "response": "a"}, 400, "plain", '"prompt" must be'),
        ("/get_reward", {"queries": ["typo"]}, 400, "plain", '"query"'),
        ("/get_reward", b"not json", 400, "plain", "not JSON"),
        ("/classify", json.dumps({"input": "x" * (3 << 20)}), 413, "vllm", "Too Large"),  # 4 x max_request_bytes
        ("/get_reward", json.dumps({"query": ["x" * (3 << 20)]}), 413, "plain", "Too Large"),
    ]
    for path, body, status, shape, words in cases:
        response = post(f"{url}{path}", body)
        assert response.status_code == status, (path, body, response.text)
        message = one_line_error(response, shape)
        assert words in message and message.startswith("[reward_server:INVALID_ARG]"), (path, message)


def test_token_is_required_when_set_bearer_or_triton_header(stack, tokenizer):
    server = start_api(stack[0], tokenizer, token=TOKEN)
    url = f"http://127.0.0.1:{server.port}"
    try:
        server.ready()
        for path, body, shape in [("/classify", {"input": "a"}, "vllm"), ("/classify", {"text": "a"}, "vllm"),
                                  ("/v1/embeddings", {"input": "a"}, "openai"), ("/slime/reward",
                                  {"prompt": "a", "response": "b"}, "plain"), ("/get_reward", {"query": ["a"]}, "plain")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"triton-access-token": "wrong"}):
                response = post(f"{url}{path}", body, headers=headers)
                assert response.status_code == 401, (path, headers, response.text)
                assert "Authorization: Bearer" in one_line_error(response, shape)
            for headers in ({"Authorization": f"Bearer {TOKEN}"}, {"triton-access-token": TOKEN}):
                assert post(f"{url}{path}", body, headers=headers).status_code == 200
        assert requests.get(f"{url}/health", timeout=30).status_code == 200  # open, like vLLM's and SGLang's
        assert requests.get(f"{url}/v1/models", timeout=30).status_code == 401
    finally:
        server.stop()


def test_health_fails_before_ready_and_from_the_start_of_a_drain():
    service = SimpleNamespace(admission=Admission(), decoder=SimpleNamespace(rules=None))
    server = ApiServer(service, "127.0.0.1", 0, None, None, 0.0, 1, 2)
    server.add_health()
    server.start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        starting = requests.get(f"{url}/health", timeout=30)
        assert starting.status_code == 503 and starting.json() == {"error": "the reward server is starting"}
        assert starting.headers["Retry-After"]
        server.ready()
        assert requests.get(f"{url}/health", timeout=30).status_code == 200
        assert requests.get(f"{url}/health_generate", timeout=30).status_code == 200
        service.admission.not_ready("the reward server is draining")  # app.py's signal handler, before refusals
        assert service.admission.refusing is None
        assert requests.get(f"{url}/health", timeout=30).json() == {"error": "the reward server is draining"}
    finally:
        server.stop()


def test_concurrent_one_sample_requests_meet_in_one_forward(api, stack, tokenizer):
    """8 callers of one GRPO group, one sample each, sent at once: gathered into one batch for the leader, so the
    group is one forward (where the prefix trie computes the prompt once)."""
    server, url = api
    service, scorer, metrics = stack
    prompt = "Question: what is two plus two? " * 3
    bodies = [json.dumps({"input": prompt + f"Answer {i}.", "use_activation": False}) for i in range(8)]
    before = len(scorer.forwards)
    barrier = threading.Barrier(8)

    def send(body):
        barrier.wait()
        return post(f"{url}/classify", body).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(send, bodies)) == [200] * 8
    forwards = scorer.forwards[before:]
    assert len(forwards) == 1 and len(forwards[0]) == 8, [len(f) for f in forwards]


def _ids(n, start):
    return list(range(start, start + n))


def test_a_request_past_its_deadline_gets_504_and_its_queued_rows_are_never_computed(stack, tokenizer):
    service, scorer, metrics = stack
    server = start_api(service, tokenizer, timeout_s=0.6, delay_us=0)
    url = f"http://127.0.0.1:{server.port}"
    try:
        scorer.delay = 3.0
        busy = threading.Thread(target=service.score, args=(ScoreRequest([np.array(_ids(20, 10))]),))
        busy.start()  # its forward holds the leader for 3 s
        time.sleep(0.3)
        late = [_ids(30, 100), _ids(31, 200)]
        started = time.monotonic()
        response = post(f"{url}/classify", {"input": late})
        assert response.status_code == 504 and time.monotonic() - started < 2.5, response.text
        message = one_line_error(response, "vllm")
        assert message.startswith("[reward_server:UNAVAILABLE:timeout] not scored within server.request_timeout_s")
        busy.join()
        scorer.delay = 0.0
        service.score(ScoreRequest([np.array(_ids(5, 300))]))  # one more forward: the leader has pruned by now
        seen = [s for f in scorer.forwards for s in f]
        assert not any(s in seen for s in late)
        assert metrics.withdrawn_sequences._value.get() >= 2 and service.leader.queued_tokens == 0
        assert metrics.api_withdrawn.labels("timeout")._value.get() >= 1
    finally:
        scorer.delay = 0.0
        server.stop()


def test_a_client_that_disconnects_takes_its_queued_rows_out(api, stack):
    server, url = api
    service, scorer, metrics = stack
    withdrawn = metrics.withdrawn_sequences._value.get()
    scorer.delay = 1.5
    try:
        busy = threading.Thread(target=service.score, args=(ScoreRequest([np.array(_ids(20, 10))]),))
        busy.start()
        time.sleep(0.3)
        gone = [_ids(40, 400), _ids(41, 450)]
        body = json.dumps({"input": gone}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.4)  # gathered and queued behind the busy forward
        sock.close()  # the client gives up (slime after 120 s, OpenRLHF after 180 s)
        busy.join()
        scorer.delay = 0.0
        service.score(ScoreRequest([np.array(_ids(5, 300))]))
        seen = [s for f in scorer.forwards for s in f]
        assert not any(s in seen for s in gone)
        assert metrics.withdrawn_sequences._value.get() - withdrawn == 2
        assert metrics.api_withdrawn.labels("disconnected")._value.get() >= 1
        assert service.leader.queued_tokens == 0
    finally:
        scorer.delay = 0.0


def test_overload_is_503_with_retry_after_in_the_routes_shape():
    class Refusing:
        admission = Admission()
        decoder = SimpleNamespace(rules=None, add_special_tokens=False, text_rows=lambda raw: [np.array([5])])

        def score(self, request):
            return ScoreResult(error=Overloaded("the reward server is overloaded (9 tokens queued, limit 8); retry"))

    service = Refusing()
    server = ApiServer(service, "127.0.0.1", 0, None, None, 0.0, 1, 2)
    OpenRLHFRoute(server, SimpleNamespace(pad_token=None, eos_token=None), "as_is").add_to(server)
    server.start()
    try:
        response = post(f"http://127.0.0.1:{server.port}/get_reward", {"query": ["a"]})
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert one_line_error(response, "plain").startswith("[reward_server:UNAVAILABLE:overloaded]")
    finally:
        server.stop()


def test_leader_withdraw_drops_untaken_sequences_only(stack):
    """Leader.withdraw from another thread: the work's future fails at once and its tokens leave the queue's count;
    its sequences still queued are never computed."""
    service, scorer, metrics = stack
    leader = service.leader
    scorer.delay = 1.0
    try:
        first = leader.submit([torch.tensor(_ids(10, 10))])
        time.sleep(0.3)  # in its forward now
        futures = []
        with leader.submitting(futures.extend):
            queued = leader.submit([torch.tensor(_ids(12, 600)), torch.tensor(_ids(13, 700))])
        assert futures == [queued] and leader.queued_tokens == 10 + 25
        assert leader.withdraw(queued, Withdrawn("gave up", "disconnected"))
        assert leader.queued_tokens == 10 and not leader.withdraw(queued, Withdrawn("again", "disconnected"))
        with pytest.raises(Withdrawn):
            queued.result(timeout=1)
        first.result(timeout=10)
        scorer.delay = 0.0
        leader.submit([torch.tensor(_ids(3, 900))]).result(timeout=10)
        seen = [s for f in scorer.forwards for s in f]
        assert _ids(12, 600) not in seen and _ids(13, 700) not in seen
    finally:
        scorer.delay = 0.0


def test_vllm_activation_follows_problem_type_and_label_count():
    from reward_server.serving.vllm_api import activation

    one, two = np.array([[0.5], [-2.0]], dtype=np.float32), np.array([[0.5, 1.5], [3.0, -1.0]], dtype=np.float32)
    np.testing.assert_allclose(activation(one, None, None), 1 / (1 + np.exp(-one.astype(np.float64))), rtol=1e-6)
    np.testing.assert_allclose(activation(two, None, None), np.array([softmax(r) for r in two]), rtol=1e-6)
    np.testing.assert_allclose(activation(two, "single_label_classification", True),
                               np.array([softmax(r) for r in two]), rtol=1e-6)
    np.testing.assert_allclose(activation(two, "multi_label_classification", None),
                               1 / (1 + np.exp(-two.astype(np.float64))), rtol=1e-6)
    assert (activation(two, "regression", None) == two).all() and (activation(two, None, False) == two).all()


def test_slime_reward_key_wraps_the_number(stack, tokenizer):
    server = start_api(stack[0], tokenizer, slime_key="score")
    try:
        answer = post(f"http://127.0.0.1:{server.port}/slime/reward", {"prompt": "The answer", "response": " is 4.",
                                                                      "label": "4"}).json()
        assert answer == {"score": expected(tokenizer("The answer is 4.")["input_ids"])}
    finally:
        server.stop()
