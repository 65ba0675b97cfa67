"""The service's typed API and its two front doors, in-process: decoded requests -> RewardService.score(_batch) ->
the real leader (a group of one over gloo, a fake scorer) -> ScoreResult -> Triton response dicts
(serving/triton_infer.py) and OpenRLHF's JSON (serving/openrlhf.py). Seconds, no server."""

import socket
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch

from reward_server.engine import Engine, Leader
from reward_server.kinds.scalar import ScalarOutputs
from reward_server.protocol import INTERNAL, INVALID_ARG, UNAVAILABLE, InputError, Unavailable, code_of
from reward_server.serving import proxy_status
from reward_server.serving.drain import Admission
from reward_server.serving.inputs import RequestDecoder, SequenceRules
from reward_server.serving.openrlhf import OpenRLHFEndpoint
from reward_server.serving.requests import ScoreRequest, ScoreResult
from reward_server.serving.service import RewardService
from reward_server.serving.triton_infer import TritonInfer

POISON = 3


class PoisonScorer:
    """reward = 1000 * sum + length; a forward holding POISON fails on the rank (like fault_injection's token)."""

    computed_tokens = reused_tokens = 0

    def output_width(self, seqs):
        return 1

    def __call__(self, seqs):
        if any(bool((s == POISON).any()) for s in seqs):
            raise ValueError("poisoned forward")
        return torch.tensor([[float(s.sum()) * 1000 + len(s)] for s in seqs])


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reward(ids):
    return np.float32(float(sum(ids)) * 1000 + len(ids))


class Counts:
    def __init__(self):
        self.by_kind = {}

    def error(self, kind, n=1):
        self.by_kind[kind] = self.by_kind.get(kind, 0) + n


@pytest.fixture
def running(topo):
    """A RewardService over a running leader; closed and joined after the test."""
    leader = Leader(Engine(PoisonScorer(), topo), heartbeat_s=1, tokens_per_forward=64)
    rules = SequenceRules(vocab_size=500, max_length=32, truncation="error", max_row_bytes=256, max_request_bytes=4096)
    service = RewardService(leader, RequestDecoder(None, rules, add_special_tokens=False), ScalarOutputs(1), Counts())
    thread = threading.Thread(target=leader.run)
    thread.start()
    yield service
    leader.close()
    thread.join(timeout=60)
    assert not thread.is_alive()


def ids_column(*rows):
    return np.array([[r.encode()] for r in rows], dtype=object)


def test_score_gives_typed_results_per_row(running):
    """ScoreResult: the scored rows' outputs, per-row errors (input errors as decoded, a row that fails the forward
    alone with its row named), or the request's own error when no row could be scored."""
    service = running
    bad_row = InputError("row 1: empty sequence")
    mixed, poisoned, refused = service.score_batch([
        ScoreRequest([np.array([5, 6, 7]), bad_row, np.array([8, POISON]), np.array([9])]),
        ScoreRequest([np.array([POISON, 4])]),
        ScoreRequest(error=Unavailable("draining")),
    ])
    assert mixed.error is None and mixed.scored == [0, 3]
    assert mixed.errors[1] is bad_row
    assert code_of(mixed.errors[2]) == INTERNAL and str(mixed.errors[2]).startswith("row 2: the forward failed")
    np.testing.assert_array_equal(mixed.outputs["rewards"], [[reward([5, 6, 7])], [reward([9])]])
    rewards = mixed.rewards()
    assert rewards.shape == (4, 1) and np.isnan(rewards[[1, 2]]).all()
    np.testing.assert_array_equal(rewards[[0, 3]], mixed.outputs["rewards"])
    assert poisoned.outputs is None and code_of(poisoned.error) == INTERNAL
    assert "the forward failed" in str(poisoned.error) and "row 0: the forward failed" in str(poisoned.errors[0])
    assert isinstance(refused.error, Unavailable)
    assert service.metrics.by_kind == {"input": 1, "internal": 2, "unavailable": 1}
    one = service.score(ScoreRequest([np.array([10, 11])]))
    assert one.errors == [None] and one.outputs["rewards"][0, 0] == reward([10, 11])


def test_triton_infer_answers_each_request_of_a_batch_and_only_bad_rows_fail(running):
    """One Triton batch: rows of a forward that failed are scored again apart by the leader; each request gets its
    rewards with NaN and the reason in `error` for its bad rows, or a status of its own when none was scored."""
    infer = TritonInfer(running)
    good, mixed, poisoned, wrong = infer.native([
        {"token_ids": ids_column("12 13", "14")},
        {"token_ids": ids_column("5 6 7", f"8 {POISON} 9", "", "10 11")},
        {"token_ids": ids_column(f"{POISON}")},
        {"token_ids": ids_column("5"), "text": ids_column("hi")},
    ])
    np.testing.assert_array_equal(good["rewards"], [[reward([12, 13])], [reward([14])]])
    assert [e[0] for e in good["error"]] == [b"", b""]
    assert mixed["rewards"].shape == (4, 1) and np.isnan(mixed["rewards"][[1, 2]]).all()
    np.testing.assert_array_equal(mixed["rewards"][[0, 3]], [[reward([5, 6, 7])], [reward([10, 11])]])
    errors = [bytes(e[0]).decode() for e in mixed["error"]]
    assert errors[0] == errors[3] == "" and "the forward failed" in errors[1] and "empty sequence" in errors[2]
    code, message = proxy_status.status_of(poisoned)
    assert code == INTERNAL and "the forward failed" in message
    code, message = proxy_status.status_of(wrong)
    assert code == INVALID_ARG and "send exactly one of" in message
    running.admission.drain(Unavailable("shutting down"), {}, dequeued_before=0.0)
    code, message = proxy_status.status_of(infer.nemo([{"sentences": ids_column("x")}])[0])
    assert code == UNAVAILABLE and "shutting down" in message


class _Request:
    def __init__(self, dequeued=None):
        self.parameters = {} if dequeued is None else {proxy_status.DEQUEUED: dequeued}


class _RecordingService:
    """What TritonInfer needs of RewardService; records what reached score_batch."""

    def __init__(self):
        self.admission = Admission()
        self.decoder = SimpleNamespace(native=lambda r: [np.array([5])], nemo=lambda r: [np.array([5])])
        self.outputs = ScalarOutputs(1)
        self.scored = []

    def score_batch(self, batch):
        self.scored += [r for r in batch if r.error is None]
        return [ScoreResult(error=r.error) if r.error is not None else
                ScoreResult([None], {"rewards": np.ones((1, 1), dtype=np.float32)}) for r in batch]

    def count(self, exc):
        pass


def test_drain_admits_requests_taken_from_the_queue_before_the_signal_and_the_counted_queue_only():
    """The drain's rule at Triton's infer functions (drain.py): requests that left Triton's queue before the signal,
    then as many as its queue held; nothing after."""
    service = _RecordingService()
    infer = TritonInfer(service)

    def ok(answers):
        return [proxy_status.status_of(a) is None for a in answers]

    assert ok(infer.native([_Request(8.0)])) == [True]  # not draining yet
    service.admission.drain(Unavailable("shutting down"), {"native": 2, "nemo": 1}, dequeued_before=10.0)
    before = [_Request(dequeued=9.0), _Request(dequeued=9.5)]  # left Triton's queue before: still on their way
    queued = [_Request(dequeued=11.0), _Request(dequeued=11.2)]  # in Triton's queue at the signal (counted)
    after = [_Request(dequeued=12.0), _Request()]  # sent after the signal (the second without a stamp)
    answers = infer.native([before[0], queued[0]]) + infer.native([queued[1], before[1], after[0]])
    answers += infer.native([after[1]])
    assert ok(answers) == [True, True, True, True, False, False], answers
    assert service.admission.admitting()  # one counted request of the NeMo model still to come
    assert ok(infer.nemo([_Request(13.0), _Request(13.1)])) == [True, False]
    assert not service.admission.admitting()
    assert proxy_status.status_of(answers[-1]) == (UNAVAILABLE, proxy_status.status_of(answers[-1])[1])
    assert "shutting down" in proxy_status.status_of(answers[-1])[1]
    assert len(service.scored) == 1 + 4 + 1


class _FakeService:
    """What OpenRLHFEndpoint needs of RewardService: the decoder's limits and text rows, admission, score."""

    def __init__(self, result):
        self.decoder = SimpleNamespace(rules=SimpleNamespace(max_request_bytes=10 ** 6),
                                       text_rows=lambda raw: [np.array([len(r)]) for r in raw])
        self.admission = Admission()
        self.result, self.seen = result, []

    def score(self, request):
        self.seen.append(request)
        return ScoreResult(error=request.error) if request.error is not None else self.result


def test_openrlhf_endpoint_maps_score_results_to_json():
    """JSON -> ScoreRequest (text rows, serve_rm's EOS rule) -> ScoreResult -> JSON with the code's HTTP status;
    no Triton-shaped request, no stub status fields. Refused at once while draining (never in Triton's queue)."""
    tokenizer = SimpleNamespace(pad_token="<pad>", eos_token="</s>")
    rewards = {"rewards": np.array([[0.5]], dtype=np.float32)}
    service = _FakeService(ScoreResult([None, InputError("row 1: empty text")], rewards))
    port = free_port()
    OpenRLHFEndpoint(service, tokenizer, "127.0.0.1", port, "strip_and_append", 4, "secret",
                     "triton-access-token").start()
    url, auth = f"http://127.0.0.1:{port}/get_reward", {"triton-access-token": "secret"}
    assert requests.post(url, json={"query": ["a"]}, timeout=30).status_code == 401 and not service.seen
    ok = requests.post(url, json={"query": ["a</s><pad>", "b"]}, headers=auth, timeout=30)
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["rewards"][0] == 0.5 and np.isnan(body["rewards"][1]) and body["scores"] == body["rewards"]
    assert body["errors"][0] == "" and "empty text" in body["errors"][1] and body["extra_logs"] == {}
    assert [len(r) for r in service.seen[0].rows] == [1, 1] and service.seen[0].rows[0][0] == len("a</s>")
    for error, status in [(Unavailable("the reward server is shutting down; retry"), 503),
                          (InputError("row 0: empty text"), 400), (RuntimeError("boom"), 500)]:
        service.result = ScoreResult(error=error)
        answer = requests.post(url, json={"query": ["b"]}, headers=auth, timeout=30)
        assert answer.status_code == status and str(error) in answer.json()["error"], answer.text
    service.seen.clear()
    service.result = ScoreResult([None], rewards)
    service.admission.drain(Unavailable("shutting down"), {"native": 5}, dequeued_before=1e12)
    refused = requests.post(url, json={"query": ["b"]}, headers=auth, timeout=30)
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
    assert service.seen[0].error is not None and service.seen[0].rows == []
