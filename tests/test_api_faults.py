"""The API port's failure paths end to end, on one server (one rank) whose forwards each take 3 s
(fault_injection.forward_delay_s), with server.request_timeout_s=1.5, batching.max_queued_tokens=100 and an
inference token: 401 without it, 504 past the deadline, 503 with Retry-After when overloaded, and a client that
disconnects while queued: the rows of a timed-out or abandoned request are never computed (metrics)."""

import json
import socket
import threading
import time

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient

from servers import metrics, running_server, value

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]

TOKEN = "api-faults-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FORWARD_S, TIMEOUT_S = 3.0, 1.5


@pytest.fixture(scope="module")
def server(tmp_path_factory, llama_ckpt):
    overrides = [f"model.path={llama_ckpt}", f"fault_injection.forward_delay_s={FORWARD_S}",
                 f"server.request_timeout_s={TIMEOUT_S}", "batching.max_queued_tokens=100",
                 "server.inference_token_env=API_FAULTS_TOKEN"]
    with running_server(tmp_path_factory.mktemp("api_faults"), overrides, nproc=1,
                        env={"API_FAULTS_TOKEN": TOKEN}) as srv:
        srv.api = srv.api_url()
        yield srv


def ids(n, start):
    return list(range(start, start + n))


def triton_score(server, seqs):
    """Through Triton's `reward` model (no deadline there), with the token."""
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)
    data = np.array([[" ".join(map(str, s)).encode()] for s in seqs], dtype=object)
    tensor = httpclient.InferInput("token_ids", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return client.infer("reward", [tensor], headers={"triton-access-token": TOKEN}).as_numpy("rewards")


def busy(server, n_tokens, start):
    """A Triton request whose forward holds the leader for FORWARD_S; returns its thread, started."""
    thread = threading.Thread(target=triton_score, args=(server, [ids(n_tokens, start)]))
    thread.start()
    time.sleep(0.5)  # in its forward now
    return thread


def counts(server):
    text = metrics(server)
    return {name: value(text, name) for name in ("reward_server_tokens_received_total",
                                                 "reward_server_withdrawn_sequences_total",
                                                 "reward_server_withdrawn_tokens_total")}


def test_401_without_the_token_in_each_routes_shape(server):
    cases = [("/classify", {"input": "a"}, lambda b: b["error"]["message"]),
             ("/classify", {"text": "a"}, lambda b: b["error"]["message"]),
             ("/pooling", {"input": "a"}, lambda b: b["error"]["message"]),
             ("/v1/embeddings", {"input": "a"}, lambda b: b["message"]),
             ("/slime/reward", {"prompt": "a", "response": "b"}, lambda b: b["error"]),
             ("/get_reward", {"query": ["a"]}, lambda b: b["error"])]
    for path, body, message in cases:
        for headers in ({}, {"Authorization": "Bearer nope"}):
            response = requests.post(f"{server.api}{path}", json=body, headers=headers, timeout=30)
            assert response.status_code == 401, (path, response.text)
            line = message(response.json())
            assert "Authorization: Bearer <token>" in line and "\n" not in line and "Traceback" not in response.text
    assert requests.get(f"{server.api}/health", timeout=30).status_code == 200


def test_504_past_the_deadline_and_503_when_overloaded_and_the_late_rows_are_never_computed(server):
    before = counts(server)
    thread = busy(server, 80, 10)  # 80 of the 100 tokens the queue may hold
    started = time.monotonic()
    late = requests.post(f"{server.api}/classify", json={"input": ids(10, 200)}, headers=AUTH, timeout=30)
    waited = time.monotonic() - started
    assert late.status_code == 504 and TIMEOUT_S - 0.2 < waited < FORWARD_S, (late.text, waited)
    message = late.json()["error"]["message"]
    assert message.startswith("[reward_server:UNAVAILABLE:timeout] not scored within server.request_timeout_s=1.5 s")
    assert "\n" not in message
    over = requests.post(f"{server.api}/v1/embeddings", json={"input": ids(60, 300)}, headers=AUTH, timeout=30)
    assert over.status_code == 503 and over.headers["Retry-After"] == "1", over.text
    assert over.json()["message"].startswith("[reward_server:UNAVAILABLE:overloaded]") and over.json()["code"] == 503
    thread.join()
    triton_score(server, [ids(5, 400)])  # one more forward: the timed-out rows were pruned before it
    after = counts(server)
    assert after["reward_server_tokens_received_total"] - before["reward_server_tokens_received_total"] == 80 + 5
    assert after["reward_server_withdrawn_sequences_total"] - before["reward_server_withdrawn_sequences_total"] == 1
    assert after["reward_server_withdrawn_tokens_total"] - before["reward_server_withdrawn_tokens_total"] == 10
    assert 'reward_server_api_withdrawn_total{reason="timeout"}' in metrics(server)


def test_a_client_that_disconnects_while_queued_takes_its_rows_out(server):
    before = counts(server)
    thread = busy(server, 40, 10)
    gone = [ids(20, 100), ids(21, 150)]
    body = json.dumps({"input": gone}).encode()
    sock = socket.create_connection(("127.0.0.1", int(server.api.rsplit(":", 1)[1])))
    sock.sendall(b"POST /classify HTTP/1.1\r\nHost: rm\r\nContent-Type: application/json\r\nAuthorization: Bearer "
                 + TOKEN.encode() + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(0.5)  # gathered and queued behind the busy forward (its deadline is 1.5 s away)
    sock.close()  # slime gives up after 120 s, OpenRLHF after 180 s, and both retry
    thread.join()
    triton_score(server, [ids(5, 400)])
    after = counts(server)
    assert after["reward_server_tokens_received_total"] - before["reward_server_tokens_received_total"] == 40 + 5
    assert after["reward_server_withdrawn_sequences_total"] - before["reward_server_withdrawn_sequences_total"] == 2
    assert after["reward_server_withdrawn_tokens_total"] - before["reward_server_withdrawn_tokens_total"] == 41
    assert value(metrics(server), 'reward_server_api_withdrawn_total{reason="disconnected"}') == 1


def test_health_fails_before_the_first_refusal_of_a_drain(server):
    """SIGTERM drains: GET /health turns 503 first (app.py's signal handler), then requests are refused with 503;
    a caller refused at any moment finds /health already failing. Last in this module: the server exits."""
    seen = []
    server.proc.send_signal(15)  # to torchrun, which passes it on to the ranks; rank 0 drains
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.proc.poll() is None:
        try:
            answer = requests.post(f"{server.api}/classify", json={"input": [5, 6, 7]}, headers=AUTH, timeout=5)
        except requests.RequestException:
            break  # the port closed: the server is gone
        if answer.status_code == 503:
            health = requests.get(f"{server.api}/health", timeout=5)
            seen.append((answer.json()["error"]["message"], health.status_code, health.text))
            if len(seen) >= 3:
                break
    assert seen, "no request was refused during the drain"
    for message, status, text in seen:
        assert message.startswith("[reward_server:UNAVAILABLE:shutting_down]") and status == 503, (message, text)
        assert json.loads(text) == {"error": "the reward server is draining"}
