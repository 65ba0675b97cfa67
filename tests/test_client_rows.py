"""Issue #29 (1): per-row results. A call with rows the server refuses keeps every other row's reward: by default it
raises (RewardInputError / RewardServerError as ever) with every row's reward attached (NaN in the failed rows) and
the failed rows' reasons; with on_row_error="nan" it returns them, NaN in the failed rows and the reasons in
handle.errors(). A request refused whole (HTTP 400) fails only its own rows; a server's failure (500, 503 past the
budget) still raises, with the rows scored so far attached.

In-process: a fake Triton (http.server on a loopback port) whose error texts are written by the server's own code
(statuses.failure, statuses.row_text, service.row_failure), exact and fast. Then one real server (torchrun, 2
ranks, a tiny Llama): a bad token id among 64 sequences, an empty text, a request all of whose rows are bad; the
rewards of the good rows equal scoring them alone (1e-6) and a plain transformers forward (1e-4)."""

import json
import pickle

import numpy as np
import pytest
import torch
from tritonclient.utils import serialize_byte_tensor

from oracles import reference_rewards
import servers
from servers import running_server
from reward_server.client import (RemoteGPTRMClient, RewardInputError, RewardServerError, RewardServerUnavailable,
                                  RowError, Scores)
from reward_server.protocol import INTERNAL, INVALID_ARG, UNAVAILABLE

pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------------------------------- a fake Triton


def binary_response(outputs) -> tuple:
    """(body, Inference-Header-Content-Length) of a Triton binary answer of `outputs` [(name, array)]."""
    header, blobs = [], []
    for name, array in outputs:
        if array.dtype == object:
            blob, datatype = serialize_byte_tensor(array.reshape(-1)).item(), "BYTES"
        else:
            blob = np.ascontiguousarray(array).tobytes()
            datatype = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32"}[array.dtype]
        header.append({"name": name, "datatype": datatype, "shape": list(array.shape),
                       "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    head = json.dumps({"model_name": "reward", "model_version": "1", "outputs": header}).encode()
    return head + b"".join(blobs), len(head)


def steps_of(text: str) -> np.ndarray:
    """The fake PRM's step rewards of a text: one per character."""
    return np.arange(1, len(text) + 1, dtype=np.float32) / 10


class FakeTriton(servers.FakeTriton):
    """Scores `text` rows: reward = the text's length (`labels` columns: length, length + 1, ...); with `prm`, one
    step reward per character too. A row "bad" (or the token ids "0") fails the checks; a request holding "boom" fails as a server fault
    (500), one holding "busy" is refused as overloaded (503), always. The error texts are the server's own."""

    def __init__(self, labels: int = 1, prm: bool = False):
        self.labels, self.prm, self.calls = labels, prm, 0
        super().__init__()

    def config(self) -> dict:
        outputs = [{"name": "rewards", "data_type": "TYPE_FP32", "dims": [str(self.labels)]},
                   {"name": "error", "data_type": "TYPE_STRING", "dims": ["1"]}]
        if self.prm:
            outputs += [{"name": "step_rewards", "data_type": "TYPE_FP32", "dims": ["-1"]},
                        {"name": "num_steps", "data_type": "TYPE_INT32", "dims": ["1"]}]
        return {"name": "reward", "max_batch_size": 4, "output": outputs}

    def answer(self, rows):
        from reward_server.engine.errors import Overloaded
        from reward_server.protocol import InputError
        from reward_server.serving import proxy_status
        from reward_server.serving.service import row_failure
        from reward_server.serving.statuses import failure, row_text

        self.calls += 1

        def status_answer(exc):
            _, text = proxy_status.status_of(failure(exc))
            status = {InputError: 400, Overloaded: 503}.get(type(exc), 500)
            return status, json.dumps({"error": text}).encode(), None

        if "boom" in rows:
            return status_answer(RuntimeError("the server failed this batch (see its log); retry"))
        if "busy" in rows:
            return status_answer(Overloaded("the reward server is overloaded: 50 tokens queued, limit 40; retry"))
        excs = [InputError(f"row {i}: not a good text") if r in ("bad", "0") else None for i, r in enumerate(rows)]
        if all(excs):
            return status_answer(row_failure(excs))
        rewards = np.array([[len(r) + k for k in range(self.labels)] for r in rows], np.float32)
        rewards[[i for i, e in enumerate(excs) if e]] = np.nan
        errors = np.array([row_text(i, e).encode() if e else b"" for i, e in enumerate(excs)], dtype=object)
        outputs = [("rewards", rewards)]
        if self.prm:
            counts = [0 if e else len(r) for r, e in zip(rows, excs)]
            steps = np.full((len(rows), max(max(counts), 1)), np.nan, np.float32)
            for i, (r, k) in enumerate(zip(rows, counts)):
                steps[i, :k] = steps_of(r)[:k]
            outputs += [("step_rewards", steps), ("num_steps", np.array(counts, np.int32).reshape(-1, 1))]
        return (200, *binary_response(outputs + [("error", errors.reshape(-1, 1))]))


@pytest.fixture
def fake():
    server = FakeTriton()
    yield server
    server.close()


def client(fake, **kw):
    return RemoteGPTRMClient(fake.url, concurrency=1, retry_backoff_s=0.01, max_backoff_s=0.02, **kw)


# 12 texts in 3 requests of 4: row 2 bad among good ones (a 200 with its error), rows 8..11 all bad (HTTP 400)
TEXTS = ["a", "bb", "bad", "dddd", "eeeee", "f", "gg", "hhh", "bad", "bad", "bad", "bad"]
GOOD = [i for i, t in enumerate(TEXTS) if t != "bad"]
FAILED = [2, 8, 9, 10, 11]


def expected_rewards(texts, labels=1):
    return np.array([[np.nan if t == "bad" else len(t) + k for k in range(labels)] for t in texts], np.float32)


def test_default_raises_with_every_good_reward_attached(fake):
    with client(fake) as c:
        with pytest.raises(RewardInputError) as info:
            c.score(TEXTS)
    exc = info.value
    assert (exc.index, exc.code) == (2, INVALID_ARG)
    assert str(exc) == ("sequence 2 rejected by the reward server: not a good text "
                        "(4 more of the 12 sequences failed too: 8, 9, 10, 11)")
    np.testing.assert_array_equal(exc.rewards, expected_rewards(TEXTS))  # NaN where failed, equal_nan
    assert exc.rewards.dtype == np.float32 and exc.rewards.shape == (12, 1)
    assert sorted(exc.errors) == FAILED and exc.scored.tolist() == [t != "bad" for t in TEXTS]
    assert exc.errors[2] == "not a good text" and exc.errors[2].code == INVALID_ARG
    # rows 8..11: a request refused whole; the server named its first rows, the last one gets the request's text
    assert exc.errors[8] == "not a good text" and exc.errors[11].startswith("its request (sequences 8..11) was "
                                                                            "refused as a whole: ")
    assert all(isinstance(e, RowError) and e.code == INVALID_ARG for e in exc.errors.values())
    assert exc.step_rewards is None
    # one failed request alone: the message as before per-row results
    with client(fake) as c, pytest.raises(RewardInputError, match=r"^sequence 6 rejected by the reward server: "
                                                                  r"not a good text$") as info:
        c.score(["a"] * 6 + ["bad", "x"])
    np.testing.assert_array_equal(info.value.rewards, expected_rewards(["a"] * 6 + ["bad", "x"]))


def test_nan_returns_the_rewards_and_the_reasons(fake):
    with client(fake, on_row_error="nan") as c:
        handle = c.infer_rm(TEXTS)
        rewards = handle.result(timeout=30)
        np.testing.assert_array_equal(rewards, expected_rewards(TEXTS))
        assert sorted(handle.errors()) == FAILED and handle.errors()[2].code == INVALID_ARG
        scores = handle.scores()
        assert isinstance(scores, Scores) and scores.errors == handle.errors() and scores.step_rewards is None
        clean = c.infer_rm(["a", "bb"])
        assert clean.result().tolist() == [[1.0], [2.0]] and clean.errors() == {}
        # a whole batch refused: every row NaN, the width from the model's config
        everything = c.infer_rm(["bad"] * 5)
        assert everything.result().shape == (5, 1) and np.isnan(everything.result()).all()
        assert sorted(everything.errors()) == [0, 1, 2, 3, 4]
        # per call: "raise" on a "nan" client
        with pytest.raises(RewardInputError):
            c.score(TEXTS, on_row_error="raise")
    with client(fake) as c:  # and "nan" on a "raise" client, in every form
        np.testing.assert_array_equal(c.score(TEXTS, on_row_error="nan"), expected_rewards(TEXTS))
        import asyncio

        got = asyncio.run(c.ainfer_rm(TEXTS, on_row_error="nan"))
        np.testing.assert_array_equal(got, expected_rewards(TEXTS))


def test_normalization_torch_and_labels(fake):
    fake.labels = 3
    want = expected_rewards(TEXTS, 3)
    with client(fake, on_row_error="nan", reward_mean=[1.0, 2.0, 3.0], reward_std=2.0) as c:
        np.testing.assert_allclose(c.score(TEXTS), (want - [1.0, 2.0, 3.0]) / 2.0, rtol=0, atol=1e-6)  # NaN kept
        assert c.score(["bad"] * 6).shape == (6, 3)  # nothing scored: the width from the config
    ids = [torch.tensor([1, 2]), torch.tensor([0]), torch.tensor([3])]  # token ids "0": the fake's bad row
    with client(fake, on_row_error="nan") as c:  # torch in, torch out, NaN rows included
        out = c.score(ids)
        assert isinstance(out, torch.Tensor) and out.shape == (3, 3) and out.dtype == torch.float32
        assert torch.isnan(out[1]).all() and out[[0, 2], 0].tolist() == [3.0, 1.0]
    with client(fake) as c, pytest.raises(RewardInputError) as info:
        c.score(ids)
    assert isinstance(info.value.rewards, torch.Tensor) and torch.isnan(info.value.rewards[1]).all()


def test_a_prms_failed_rows_get_empty_step_arrays(fake):
    fake.prm = True
    with client(fake, on_row_error="nan") as c:
        handle = c.infer_rm(TEXTS)
        steps = handle.step_rewards()
        assert len(steps) == 12
        for i, text in enumerate(TEXTS):
            if text == "bad":
                assert steps[i].dtype == np.float32 and steps[i].shape == (0,)
            else:
                np.testing.assert_array_equal(steps[i], steps_of(text))
        assert [len(s) for s in c.infer_rm(["bad"] * 3).step_rewards()] == [0, 0, 0]  # PRM known from the config
    with client(fake) as c, pytest.raises(RewardInputError) as info:
        c.score(TEXTS)
    assert [len(s) for s in info.value.step_rewards] == [0 if t == "bad" else len(t) for t in TEXTS]


def test_server_failures_still_raise_with_the_rows_scored_so_far(fake):
    texts = ["a", "bb", "ccc", "dddd", "boom", "x", "y", "z", "e", "f"]  # request 4..7 fails with HTTP 500
    for mode in ("raise", "nan"):
        with client(fake, on_row_error=mode) as c, pytest.raises(RewardServerError) as info:
            c.score(texts)
        exc = info.value
        assert type(exc) is RewardServerError and exc.code == INTERNAL and exc.index is None, (mode, exc)
        assert exc.scored[:4].all() and not exc.scored[4:8].any()  # concurrency 1: request 0..3 came back first
        np.testing.assert_array_equal(exc.rewards[:4, 0], [1, 2, 3, 4])
        assert np.isnan(exc.rewards[4:8]).all() and exc.errors == {}
    texts[4] = "busy"  # request 4..7 overloaded until restart_budget_s
    with client(fake, on_row_error="nan", restart_budget_s=0.3) as c, pytest.raises(RewardServerUnavailable) as info:
        c.score(texts)
    exc = info.value
    assert (exc.code, exc.reason) == (UNAVAILABLE, "overloaded")
    assert exc.scored[:4].all() and not exc.scored[4:].any() and np.isnan(exc.rewards[4:]).all()
    with client(fake, on_row_error="nan", restart_budget_s=0.3) as c, pytest.raises(RewardServerUnavailable) as info:
        c.score(["busy"] * 5)  # nothing scored: NaN rows, the width from the config the client read
    assert info.value.rewards.shape == (5, 1) and np.isnan(info.value.rewards).all() and not info.value.scored.any()
    with client(fake, restart_budget_s=0.3, max_batch_size=4) as c, pytest.raises(RewardServerUnavailable) as info:
        c.score(["busy"] * 5)  # nothing scored and the config never read: the width is not known
    assert info.value.rewards is None and not info.value.scored.any()


def test_argument_mistakes_and_the_exception_pickle(fake):
    with pytest.raises(ValueError, match="on_row_error"):
        RemoteGPTRMClient(fake.url, on_row_error="ignore")
    with client(fake) as c:
        with pytest.raises(ValueError, match="on_row_error"):
            c.infer_rm(["a"], on_row_error="skip")
        with pytest.raises(TypeError):
            c.infer_rm(42, on_row_error="nan")
        with pytest.raises(RewardInputError) as info:
            c.score(TEXTS)
    again = pickle.loads(pickle.dumps(info.value.errors))
    assert again == info.value.errors and again[2].code == INVALID_ARG and isinstance(again[2], RowError)


# ------------------------------------------------------------------------------------------ a real server

SERVER_BATCH = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory, llama_ckpt):
    with running_server(tmp_path_factory.mktemp("client_rows"),
                        [f"model.path={llama_ckpt}", f"batching.max_batch_size={SERVER_BATCH}"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def sequences(llama_ckpt):
    rng = np.random.default_rng(29)
    seqs = [rng.integers(4, 500, int(n)).astype(np.int64) for n in rng.integers(2, 40, 64)]
    return seqs, reference_rewards(llama_ckpt, seqs)


@pytest.mark.server
def test_a_bad_token_among_64_both_ways(server, sequences):
    seqs, reference = sequences
    batch = list(seqs)
    batch[37] = np.array([5, 9999])  # outside the vocabulary [0, 512)
    good = [i for i in range(64) if i != 37]
    with RemoteGPTRMClient(server.url) as c:
        assert c.max_batch_size == SERVER_BATCH  # 4 requests; 48..63 holds the bad row among 15 good ones
        alone = c.score([seqs[i] for i in good])
        with pytest.raises(RewardInputError) as info:
            c.score(batch)
        nan = c.infer_rm(batch, on_row_error="nan")
        rewards = nan.result(timeout=60)
    exc = info.value
    assert str(exc) == "sequence 37 rejected by the reward server: token id 9999 outside the vocabulary [0, 512)"
    assert exc.index == 37 and list(exc.errors) == [37] and exc.errors[37].code == INVALID_ARG
    assert exc.scored.sum() == 63 and not exc.scored[37]
    for got in (exc.rewards, rewards):
        assert got.shape == (64, 1) and np.isnan(got[37]).all() and np.isfinite(got[good]).all()
        np.testing.assert_allclose(got[good], alone, atol=1e-6, rtol=0)  # as scored without the bad row
        np.testing.assert_allclose(got[good], reference[good], atol=1e-4, rtol=0)
    assert nan.errors() == {37: "token id 9999 outside the vocabulary [0, 512)"}


@pytest.mark.server
def test_an_empty_text_and_a_request_refused_whole(server, sequences):
    seqs, reference = sequences
    with RemoteGPTRMClient(server.url, on_row_error="nan") as c:
        handle = c.infer_rm(["fine", "", "also fine"])
        rewards = handle.result(timeout=60)
        assert np.isnan(rewards[1]).all() and np.isfinite(rewards[[0, 2]]).all()
        assert handle.errors() == {1: "empty text"}
        np.testing.assert_allclose(rewards[[0, 2]], c.score(["fine", "also fine"]), atol=1e-6, rtol=0)
    batch = list(seqs[:24])
    bad = [2, 8, 9, 10, 11]
    for i in bad:
        batch[i] = np.array([], dtype=np.int64)
    good = [i for i in range(24) if i not in bad]
    # requests of 4: 8..11 all bad, so the server refuses that request whole (HTTP 400); 0..3 has one bad row
    with RemoteGPTRMClient(server.url, max_batch_size=4, on_row_error="nan") as c:
        handle = c.infer_rm(batch)
        rewards = handle.result(timeout=60)
        errors = handle.errors()
        alone = c.score([seqs[i] for i in good])
    assert sorted(errors) == bad and all(e.code == INVALID_ARG for e in errors.values())
    assert errors[2] == "empty sequence" and errors[8] == "empty sequence"
    assert np.isnan(rewards[bad]).all() and np.isfinite(rewards[good]).all()
    np.testing.assert_allclose(rewards[good], alone, atol=1e-6, rtol=0)
    np.testing.assert_allclose(rewards[good], reference[good], atol=1e-4, rtol=0)
    with RemoteGPTRMClient(server.url, max_batch_size=4) as c, pytest.raises(RewardInputError) as info:
        c.score(batch)
    assert info.value.index == 2 and sorted(info.value.errors) == bad
    assert str(info.value) == ("sequence 2 rejected by the reward server: empty sequence "
                               "(4 more of the 24 sequences failed too: 8, 9, 10, 11)")
    np.testing.assert_allclose(info.value.rewards[good], alone, atol=1e-6, rtol=0)
