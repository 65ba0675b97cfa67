"""Issue #27: the client decides by the error code in a server's text (protocol.py's token), never by its wording.

In-process: a fake Triton (http.server on a loopback port) answers what the reward server would, its error texts
written by the server's own code (statuses.failure, statuses.row_text, service.row_failure); every scenario runs
with and without REWARD_SERVER_TEST_REWORD (each human message replaced by "zzz " + itself reversed, tokens kept)
and the client must behave the same. Then one real server with rewording on: its texts carry the tokens through
Triton, and the client still finds the bad row, the bad request and rides out an overload. And the client imports
and encodes with torch, transformers and pytriton blocked."""

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from tritonclient.utils import serialize_byte_tensor

from oracles import reference_rewards
import servers
from servers import REPO, free_port
from reward_server.client import (RemoteGPTRMClient, RewardInputError, RewardServerError, RewardServerUnavailable)
from reward_server.protocol import (INTERNAL, INVALID_ARG, UNAVAILABLE, InputError, encode_error, parse_error,
                                    parse_errors)

pytestmark = pytest.mark.timeout(300)

REWORD_ENV = "REWARD_SERVER_TEST_REWORD"


def binary_response(rewards: np.ndarray, errors) -> tuple:
    """(body, Inference-Header-Content-Length) of a Triton binary answer with `rewards` and an `error` output."""
    rew = np.ascontiguousarray(rewards, dtype=np.float32).tobytes()
    err = serialize_byte_tensor(np.array([e.encode() for e in errors], dtype=object)).item()
    header = json.dumps({"model_name": "reward", "model_version": "1", "outputs": [
        {"name": "rewards", "datatype": "FP32", "shape": list(rewards.shape),
         "parameters": {"binary_data_size": len(rew)}},
        {"name": "error", "datatype": "BYTES", "shape": [len(errors), 1],
         "parameters": {"binary_data_size": len(err)}}]}).encode()
    return header + rew + err, len(header)


def test_parse_response_takes_the_row_and_code_from_the_token():
    from reward_server.client.wire import parse_response

    errors = ["", encode_error(INVALID_ARG, "zzz x", row=1), "", encode_error(INVALID_ARG, "zzz y", row=3)]
    data, length = binary_response(np.zeros((4, 1), np.float32), errors)
    with pytest.raises(RewardInputError) as info:
        parse_response(data, length, 4, 40, "w", "u")
    assert info.value.index == 41 and str(info.value).startswith("sequence 41 rejected by the reward server: zzz x")
    data, length = binary_response(np.ones((2, 1), np.float32), ["", ""])
    rewards, steps = parse_response(data, length, 2, 0, "w", "u")
    assert rewards.tolist() == [[1.0], [1.0]] and steps is None


# ------------------------------------------------------------------------------------------- a fake Triton


class FakeTriton(servers.FakeTriton):
    """Scores `text` rows (reward = the text's length); a row "bad" fails the checks. `mode` makes it answer as
    a server that is overloaded, shutting down, has lost its ranks, fails (INTERNAL), refuses the request as a
    whole, or is older than the tokens; `failures_left` limits how many requests get that answer."""

    def __init__(self):
        self.mode, self.failures_left, self.calls = "ok", None, 0
        self._lock = threading.Lock()
        super().__init__()

    def answer(self, rows):
        from reward_server.engine.errors import Overloaded, RanksFailed, ShuttingDown
        from reward_server.serving import proxy_status
        from reward_server.serving.service import row_failure
        from reward_server.serving.statuses import failure, row_text

        with self._lock:
            self.calls += 1
            mode = self.mode
            if self.failures_left is not None:
                if self.failures_left == 0:
                    mode = "ok"
                else:
                    self.failures_left -= 1
        refusal = {"overloaded": Overloaded("the reward server is overloaded: 50 tokens queued, limit 40; retry"),
                   "shutting_down": ShuttingDown("the reward server is shutting down; retry"),
                   "ranks_failed": RanksFailed("reward ranks failed: rank 1 exited; the server restarts"),
                   "internal": RuntimeError("the server failed this batch (see its log); retry"),
                   "whole_bad": InputError("send exactly one of text, messages, token_ids; got none")}.get(mode)
        if refusal is not None:  # what Triton makes of proxy_status.with_status: the code's HTTP status, the text
            response = failure(refusal)
            code, text = proxy_status.status_of(response)
            return {"INVALID_ARG": 400, "UNAVAILABLE": 503}.get(code, 500), json.dumps({"error": text}).encode(), None
        if mode == "tokenless":  # a server older than the tokens: HTTP status and words only
            bad = [i for i, r in enumerate(rows) if r == "bad"]
            if len(bad) == len(rows):
                return 400, json.dumps({"error": f"row {bad[0]}: empty text"}).encode(), None
            errors = [f"row {i}: empty text" if i in bad else "" for i in range(len(rows))]
            return (200, *binary_response(np.array([[len(r)] for r in rows], np.float32), errors))
        outcome = [InputError(f"row {i}: not a good text") if r == "bad" else np.float32(len(r))
                   for i, r in enumerate(rows)]
        excs = [r for r in outcome if isinstance(r, BaseException)]
        if len(excs) == len(rows):  # service._response: every row failed
            _, text = proxy_status.status_of(failure(row_failure(excs)))
            return 400, json.dumps({"error": text}).encode(), None
        errors = [row_text(i, r) if isinstance(r, BaseException) else "" for i, r in enumerate(outcome)]
        rewards = np.array([[np.nan if isinstance(r, BaseException) else r] for r in outcome], np.float32)
        return (200, *binary_response(rewards, errors))

        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeTriton()
    yield server
    server.close()


def outcome(fn):
    """What a client call came to, in the terms a caller may rely on (never the server's wording)."""
    try:
        return ("scored", np.asarray(fn()).reshape(-1).tolist())
    except RewardServerError as exc:
        return (type(exc).__name__, exc.index, exc.code, getattr(exc, "reason", None))


def scenarios(fake: FakeTriton) -> dict:
    texts = ["a", "bb", "ccc", "dddd", "e", "ff", "bad", "hhhhhhhh", "i", "jj"]
    seen = {}

    def client(**kw):
        return RemoteGPTRMClient(fake.url, max_batch_size=4, concurrency=1, retry_backoff_s=0.01,
                                 max_backoff_s=0.02, **kw)

    with client() as c:
        seen["bad row among good"] = outcome(lambda: c.score(texts))  # request 4..7, its row 2
        seen["every row bad"] = outcome(lambda: c.score(["a", "b", "c", "d", "bad", "bad", "bad", "bad"]))
        seen["one bad alone"] = outcome(lambda: c.score(["ok", "bad"]))
        seen["good"] = outcome(lambda: c.score(["a", "bb"]))
        for mode in ("whole_bad", "internal", "tokenless"):
            fake.mode, fake.calls = mode, 0
            seen[mode] = outcome(lambda: c.score(texts[:4]))
            seen[mode + " calls"] = fake.calls
        fake.mode = "tokenless"
        seen["tokenless row"] = outcome(lambda: c.score(texts))
        seen["tokenless all bad"] = outcome(lambda: c.score(["bad"]))
        fake.mode, fake.failures_left, fake.calls = "overloaded", 3, 0
        seen["overloaded 3 times"] = outcome(lambda: c.score(["a", "bb"]))
        seen["overloaded 3 times calls"] = fake.calls
        fake.failures_left = None
    for mode in ("overloaded", "shutting_down", "ranks_failed"):
        fake.mode = mode
        with client(restart_budget_s=0.3) as c:
            try:
                c.score(["a"])
            except RewardServerUnavailable as exc:
                hint = str(exc).rsplit("; ", 1)[-1]
                seen[mode] = (type(exc).__name__, exc.code, exc.reason, hint)
    fake.mode = "ok"
    return seen


def test_the_client_decides_by_code_and_rewording_changes_nothing(fake, monkeypatch):
    monkeypatch.delenv(REWORD_ENV, raising=False)
    plain = scenarios(fake)
    monkeypatch.setenv(REWORD_ENV, "1")
    with RemoteGPTRMClient(fake.url, max_batch_size=4) as c, pytest.raises(RewardInputError) as info:
        c.score(["a", "bad"])
    assert info.value.server_message.startswith("zzz ") and "zzz " in str(info.value)  # reworded indeed
    reworded = scenarios(fake)
    assert reworded == plain
    assert plain == {
        "bad row among good": ("RewardInputError", 6, INVALID_ARG, None),
        "every row bad": ("RewardInputError", 4, INVALID_ARG, None),
        "one bad alone": ("RewardInputError", 1, INVALID_ARG, None),
        "good": ("scored", [1.0, 2.0]),
        "whole_bad": ("RewardInputError", None, INVALID_ARG, None), "whole_bad calls": 1,
        "internal": ("RewardServerError", None, INTERNAL, None), "internal calls": 1,
        "tokenless": ("scored", [1.0, 2.0, 3.0, 4.0]), "tokenless calls": 1,
        "tokenless row": ("RewardInputError", 6, INVALID_ARG, None),  # a row's place in `error` is its row
        "tokenless all bad": ("RewardInputError", None, INVALID_ARG, None),  # by HTTP status; no row without tokens
        "overloaded 3 times": ("scored", [1.0, 2.0]), "overloaded 3 times calls": 4,
        "overloaded": ("RewardServerUnavailable", UNAVAILABLE, "overloaded", "the server stayed overloaded)"),
        "shutting_down": ("RewardServerUnavailable", UNAVAILABLE, "shutting_down", "the server was shutting down)"),
        "ranks_failed": ("RewardServerUnavailable", UNAVAILABLE, "ranks_failed",
                         "its ranks failed and it did not come back within restart_budget_s=0.3)"),
    }


def test_the_messages_stay_readable(fake, monkeypatch):
    monkeypatch.delenv(REWORD_ENV, raising=False)
    with RemoteGPTRMClient(fake.url, max_batch_size=4, restart_budget_s=0.2, retry_backoff_s=0.01) as c:
        with pytest.raises(RewardInputError, match=r"^sequence 6 rejected by the reward server: not a good text$"):
            c.score(["a", "b", "c", "d", "e", "f", "bad"])
        with pytest.raises(RewardInputError, match=r"^sequence 4 rejected by the reward server: not a good text "
                                                   r"\(every sequence of 4\.\.5 failed\)$"):
            c.score(["a", "b", "c", "d", "bad", "bad"])
        fake.mode = "overloaded"
        with pytest.raises(RewardServerUnavailable) as info:
            c.score(["a"])
    message = str(info.value)
    assert message.startswith(f"reward server http://{fake.url} unavailable for sequences 0..0: HTTP 503: the "
                              f"reward server is overloaded: 50 tokens queued, limit 40; retry (")
    assert "[reward_server" not in message


def test_a_refused_connection_is_the_transports_own_reason():
    with RemoteGPTRMClient(f"127.0.0.1:{free_port()}", retries=2, retry_backoff_s=0.01) as c:
        with pytest.raises(RewardServerUnavailable) as info:
            c.score(["a"])
    assert (info.value.code, info.value.reason) == (None, "cannot_connect")
    assert "is the server running there?" in str(info.value)


def test_the_client_imports_and_encodes_with_torch_transformers_and_pytriton_blocked():
    code = """
import sys
BLOCKED = ("torch", "transformers", "pytriton")

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
import numpy as np
from reward_server.client import RemoteGPTRMClient, encode_batch
from reward_server.client.wire import request_body
client = RemoteGPTRMClient("127.0.0.1:1", max_batch_size=4)
for batch, lengths in ((["hello", "world"], None), ([[1, 2, 3], np.array([4, 5])], None),
                       (np.array([[1, 2, 0], [3, 0, 0]]), [2, 1]), ([[{"role": "user", "content": "hi"}]], None)):
    name, rows, as_torch = encode_batch(batch, lengths)
    body, headers = request_body(name, rows)
    assert body and not as_torch, name
client.close()
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], "a blocked module got in"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# ------------------------------------------------------------------------------------------ a real server


def post(url: str, rows) -> tuple:
    """(HTTP status, the error text or the JSON answer) of one native request of token-id rows."""
    body = json.dumps({"inputs": [{"name": "token_ids", "shape": [len(rows), 1], "datatype": "BYTES",
                                   "data": [" ".join(map(str, r)) for r in rows]}]}).encode()
    request = urllib.request.Request(f"{url}/v2/models/reward/infer", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["error"]


@pytest.mark.server
def test_a_real_server_with_every_message_reworded(start_server, llama_ckpt):
    srv = start_server(1, [f"model.path={llama_ckpt}", "fault_injection.forward_delay_s=0.3",
                           "batching.max_queued_tokens=40", "batching.max_batch_size=4",
                           "batching.max_queue_delay_us=0", "batching.instances=4"],
                       env={REWORD_ENV: "1"})
    # the texts as Triton sends them: the token first, the words scrambled
    status, answer = post(srv.url, [[5, 6, 7], [], [8, 9]])
    assert status == 200, answer
    errors = {o["name"]: o["data"] for o in answer["outputs"]}["error"]
    assert errors[0] == errors[2] == ""
    row = parse_error(errors[1])
    assert (row.code, row.row) == (INVALID_ARG, 1) and errors[1].startswith("[reward_server:INVALID_ARG:row=1] zzz ")
    status, text = post(srv.url, [[5, 99999], []])
    assert status == 400 and text.startswith("[reward_server:INVALID_ARG] [reward_server:INVALID_ARG:row=0] zzz ")
    assert [(p.code, p.row) for p in parse_errors(text)] == [(INVALID_ARG, None), (INVALID_ARG, 0), (INVALID_ARG, 1)]
    burst = [np.arange(5 + i, 15 + i) for i in range(12)]  # 10 tokens each, 4 fit the queue
    with ThreadPoolExecutor(len(burst)) as pool:
        answers = list(pool.map(lambda s: post(srv.url, [s]), burst))
    refused = [text for status, text in answers if status == 503]
    assert refused, answers
    for text in refused:
        parsed = parse_error(text)
        assert (parsed.code, parsed.reason) == (UNAVAILABLE, "overloaded") and parsed.message.startswith("zzz "), text

    # the client: the bad row and the bad request found by code; the overload ridden out, or reported as one
    rng = np.random.default_rng(3)
    seqs = [rng.integers(4, 500, int(n)) for n in rng.integers(2, 12, 10)]
    with RemoteGPTRMClient(srv.url, concurrency=1) as client:
        bad = list(seqs)
        bad[6] = np.array([], dtype=np.int64)
        with pytest.raises(RewardInputError) as info:
            client.score(bad)
        assert info.value.index == 6 and info.value.server_message.startswith("zzz ")
        with pytest.raises(RewardInputError) as info:
            client.score(seqs[:4] + [np.array([5, 99999])])  # a request of one row, which fails: HTTP 400
        assert info.value.index == 4 and info.value.code == INVALID_ARG
    expected = reference_rewards(llama_ckpt, burst)
    with RemoteGPTRMClient(srv.url, concurrency=12, retries=30, retry_backoff_s=0.2) as client, ThreadPoolExecutor(12) as pool:
        rewards = list(pool.map(lambda s: client.score([s]), burst))
    np.testing.assert_allclose(np.concatenate(rewards), expected, atol=1e-4, rtol=0)
    with RemoteGPTRMClient(srv.url, concurrency=12, restart_budget_s=0.2, retry_backoff_s=0.05) as client, \
            ThreadPoolExecutor(12) as pool:
        seen = list(pool.map(lambda s: outcome(lambda: client.score([s])), burst))
    gave_up = [s for s in seen if s[0] != "scored"]
    assert gave_up and all(s == ("RewardServerUnavailable", None, UNAVAILABLE, "overloaded") for s in gave_up), seen
