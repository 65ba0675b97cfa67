"""Bad input never takes the server down nor fails other requests or rows. Each bad request (checked by us,
rejected by Triton itself, or slipping past the checks and failing the forward) gets one status and a one-line
message, never a traceback: the same when sent alone as when Triton batches it with 35 good requests, whose
rewards must equal a plain transformers forward. Requests with good and bad rows keep their good rows' rewards.

One server for the module: torchrun 2 ranks, tensor parallel, model.max_length=64 (so rows over 1 KiB and requests
over 64 KiB are refused before parsing), truncation=error, a long queue delay so that requests share batches, and
the test-only poison token (fault_injection.poison_token_id): every rank raises while scoring a batch that
contains it, standing in for a request that slipped validation.
"""

import json
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from oracles import reference_rewards
import time

from servers import rank_pids, rss_mb, running_server

pytestmark = pytest.mark.timeout(600)

MAX_LEN = 64
MAX_BATCH = 64
POISON = 3  # <unk>: byte-level BPE never produces it, our checks accept it (it is in the vocabulary)


@pytest.fixture(scope="module")
def server(tmp_path_factory, llama_ckpt):
    overrides = [f"model.path={llama_ckpt}", "parallel.tensor_parallel_size=2", f"model.max_length={MAX_LEN}",
                 "model.truncation=error", f"batching.max_batch_size={MAX_BATCH}",
                 "batching.max_queue_delay_us=200000", f"fault_injection.poison_token_id={POISON}"]
    with running_server(tmp_path_factory.mktemp("bad_input"), overrides) as srv:
        yield srv


def send(url, model, inputs):
    """inputs: [(name, array, triton dtype)] -> (rewards, errors) or the InferenceServerException."""
    client = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
    try:
        tensors = []
        for name, data, dtype in inputs:
            t = httpclient.InferInput(name, list(data.shape), dtype)
            t.set_data_from_numpy(data)
            tensors.append(t)
        result = client.infer(model, tensors)
        return result.as_numpy("rewards"), result.as_numpy("error")
    except InferenceServerException as exc:
        return exc
    finally:
        client.close()


def post_json(url, model, body: bytes):
    request = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return InferenceServerException(f"HTTP {exc.code}: {exc.read().decode(errors='replace')}")


def column(*rows):
    return np.array([[r] for r in rows], dtype=object)


def ids_text(ids):
    return " ".join(str(int(i)) for i in ids).encode()


def nemo_tokens(seqs, pad_to=None):
    pad_to = pad_to or max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), pad_to), dtype=np.int64)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    return [("tokens", tokens, "INT64"),
            ("sequence_lengths", np.array([[len(s)] for s in seqs], dtype=np.int64), "INT64")]


def bad_cases():
    """(model, inputs or raw JSON bytes, expected error text: a regular expression)."""
    text, ids, msgs, R, N = "text", "token_ids", "messages", "reward", "reward_model"
    long_ids = ids_text(range(4, 4 + MAX_LEN + 1))
    bad_utf8 = b"caf\xc3\x28 \xff\xfe"
    return [
        (R, [(text, column(b""), "BYTES")], r"\[reward_server:INVALID_ARG:row=0\] empty text"),
        (R, [(text, column(bad_utf8), "BYTES")], "not valid UTF-8"),
        (R, [(text, column(b"the answer is four. " * 40), "BYTES")], "more than the limit of 64"),
        (R, [(ids, column(b""), "BYTES")], "empty sequence"),
        (R, [(ids, column(b"[ , ]"), "BYTES")], "empty sequence"),
        (R, [(ids, column(b"5 6 -3"), "BYTES")], "token id -3 outside the vocabulary"),
        (R, [(ids, column(b"5 512"), "BYTES")], "token id 512 outside the vocabulary"),
        (R, [(ids, column(b"5 abc"), "BYTES")], "must be integers"),
        (R, [(ids, column(b"1.5 2"), "BYTES")], "must be integers"),
        (R, [(ids, column(b"nan inf"), "BYTES")], "must be integers"),
        (R, [(ids, column(b"99999999999999999999999"), "BYTES")], "must be integers"),
        (R, [(ids, column(long_ids), "BYTES")], "65 tokens, more than the limit of 64"),
        (R, [(msgs, column(b"not json"), "BYTES")], "not JSON"),
        (R, [(msgs, column(b"[]"), "BYTES")], "non-empty list"),
        (R, [(msgs, column(b'[{"role": "user"}]'), "BYTES")], "non-empty list"),
        (R, [(msgs, column(b'[{"role": 1, "content": "x"}]'), "BYTES")], "non-empty list"),
        (R, [(msgs, column(b'{"role": "user", "content": "x"}'), "BYTES")], "non-empty list"),
        (R, [(msgs, column(bad_utf8), "BYTES")], "not valid UTF-8"),
        (R, [(text, column(b"a"), "BYTES"), (ids, column(b"5"), "BYTES")], "exactly one of"),
        (R, [], "request has 0 inputs"),
        (R, [("foo", column(b"a"), "BYTES")], "unexpected inference input 'foo'"),
        (R, [(text, np.array([[5]], dtype=np.int64), "INT64")],
         "data-type is 'INT64', but model 'reward' expects 'BYTES'"),
        (R, [(text, np.array([[b"a", b"b"]], dtype=object), "BYTES")], "unexpected shape"),
        (R, [(text, np.array([b"a", b"b"], dtype=object), "BYTES")], "unexpected shape"),
        (R, [(text, column(*[b"hello"] * (MAX_BATCH + 1)), "BYTES")], "batch-size must be <= 64"),
        (R, [(text, column(b"x" * 1025), "BYTES")], r"\[reward_server:INVALID_ARG:row=0\] 1025 bytes, more than the limit of 1024 \(server"),
        (R, [(ids, column(*[b"5 " * 1000] * 40), "BYTES")],
         r"request of 80000 bytes, more than the limit of 65536 \(server.max_request_bytes\)"),
        (N, [("sentences", column(b"x" * 2000, b"y" * 2000), "BYTES")], r"row=0\] 2000 bytes.*; \[reward_server:INVALID_ARG:row=1\] 2000 bytes"),
        (R, b'{"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["a"]',
         "failed to parse the request JSON"),
        (R, b'{"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": ["a"]}]}',
         "expected 2 string elements"),
        (N, b'{"inputs": [{"name": "tokens", "shape": [1, 2], "datatype": "INT64", "data": [5, NaN]}]}',
         "Unable to parse 'data'"),
        (N, [("tokens", np.array([[5.0, np.nan, np.inf]], dtype=np.float32), "FP32")], "is 'FP32', but .* 'INT64'"),
        (N, [("tokens", np.array([[5, 6, 7]], dtype=np.float64), "FP64")], "is 'FP64', but .* 'INT64'"),
        (N, nemo_tokens([np.array([5, -6, 7])]), "token id -6 outside the vocabulary"),
        (N, nemo_tokens([np.array([5, 10**6])]), "token id 1000000 outside the vocabulary"),
        (N, nemo_tokens([np.array([5, 6])])[:1] + [("sequence_lengths", np.array([[0]]), "INT64")],
         r"sequence_lengths 0 outside \[1, 2\]"),
        (N, nemo_tokens([np.array([5, 6])])[:1] + [("sequence_lengths", np.array([[3]]), "INT64")],
         r"sequence_lengths 3 outside \[1, 2\]"),
        (N, nemo_tokens([np.array([5, 6])])[:1] + [("sequence_lengths", np.array([[-1]]), "INT64")],
         r"sequence_lengths -1 outside"),
        (N, nemo_tokens([np.array([5, 6])])[:1] + [("sequence_lengths", np.array([[2, 2]]), "INT64")],
         "sequence_lengths has 2 rows, tokens has 1"),
        (N, nemo_tokens([np.array([5, 6])])[:1] + [("sequence_lengths", np.array([[2]], dtype=np.int32),
                                                    "INT32")], "is 'INT32', but .* 'INT64'"),
        (N, [("sequence_lengths", np.array([[2]]), "INT64")], "send sentences, or tokens"),
        (N, [("sentences", column(b"hi"), "BYTES"), ("sequence_lengths", np.array([[2]]), "INT64")],
         "sequence_lengths without tokens"),
        (N, [("sentences", column(b"hi"), "BYTES")] + nemo_tokens([np.array([5, 6])]),
         "either sentences or tokens"),
        (N, [("sentences", column(b""), "BYTES")], "empty text"),
        (N, [("sentences", column(bad_utf8), "BYTES")], "not valid UTF-8"),
        (N, [("tokens", np.full((1, 4, 1), 5, dtype=np.int64), "INT64")], "unexpected shape"),
        (N, nemo_tokens([np.arange(4, 104)]), "100 tokens, more than the limit of 64"),
        (N, [("tokens", np.zeros((1, 0), dtype=np.int64), "INT64"),
             ("sequence_lengths", np.array([[0]]), "INT64")], r"input 'tokens' has no elements \(shape \[1, 0\]\)"),
        (R, [(text, np.zeros((0, 1), dtype=object), "BYTES")], "expected 1 string elements"),
        (N, [("tokens", np.zeros((0, 4), dtype=np.int64), "INT64")], "byte size mismatch"),
        # slipped past the checks: the forward raises on every rank; only these requests may fail
        (R, [(ids, column(f"5 6 {POISON} 7".encode()), "BYTES")], r"\[reward_server:INTERNAL:row=0\] the forward failed"),
        (R, [(ids, column(f"{POISON} 5".encode()), "BYTES")], r"\[reward_server:INTERNAL:row=0\] the forward failed"),
    ]


def mixed_cases():
    """Requests with good and bad rows: (model, inputs, {bad row: expected error}, good rows' token ids)."""
    bad_utf8 = b"caf\xc3\x28"
    rows64 = [ids_text([5 + i % 50, 6, 7]) for i in range(64)]
    rows64[37] = b"5 6 99999"
    return [
        ("reward", [("text", column(b"fine", b""), "BYTES")], {1: "[reward_server:INVALID_ARG:row=1] empty text"}, None),
        ("reward", [("token_ids", column(b"5 6", bad_utf8), "BYTES")], {1: "[reward_server:INVALID_ARG:row=1] token_ids must be integers"},
         [np.array([5, 6])]),
        ("reward", [("token_ids", column(*rows64), "BYTES")], {37: "[reward_server:INVALID_ARG:row=37] token id 99999 outside"},
         [np.array([5 + i % 50, 6, 7]) for i in range(64) if i != 37]),
        ("reward", [("token_ids", column(b"8 9", f"{POISON}".encode(), b"x" * 1500), "BYTES")],
         {1: "[reward_server:INTERNAL:row=1] the forward failed", 2: "[reward_server:INVALID_ARG:row=2] 1500 bytes"}, [np.array([8, 9])]),
        ("reward_model", nemo_tokens([np.array([9, POISON, 9]), np.array([9, 9])]), {0: "[reward_server:INTERNAL:row=0] the forward failed"},
         [np.array([9, 9])]),
    ]


TEXTS = ["Hello", "The answer is 4.", "unicode: 日本語 ✓ ки", "nul \x00 inside", "  spaces  ",
         "Step 1: 2x + 3 = 11. Step 2: x = 4."]


def good_cases(ckpt, rng):
    """(model, inputs, token sequences the rewards belong to)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    cases = []
    for t in TEXTS:
        seq = np.array(tok(t)["input_ids"])
        cases.append(("reward", [("text", column(t.encode()), "BYTES")], [seq]))
        cases.append(("reward_model", [("sentences", column(t.encode()), "BYTES")], [seq]))
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    cases.append(("reward", [("messages", column(json.dumps(messages).encode()), "BYTES")],
                  [np.array(tok(rendered, add_special_tokens=False)["input_ids"])]))
    for i in range(22):
        seqs = [rng.integers(4, 500, int(rng.integers(1, MAX_LEN + 1))) for _ in range(int(rng.integers(1, 4)))]
        if i % 2:
            cases.append(("reward", [("token_ids", column(*[ids_text(s) for s in seqs]), "BYTES")], seqs))
        else:
            cases.append(("reward_model", nemo_tokens(seqs, pad_to=MAX_LEN), seqs))
    for seqs in cases[-1][2], cases[-2][2]:
        assert not any((s == POISON).any() for s in seqs)
    return cases


def submit(url, case):
    model, inputs = case[0], case[1]
    return post_json(url, model, inputs) if isinstance(inputs, bytes) else send(url, model, inputs)


def outcome(result):
    """(HTTP status, message) of a request that failed whole."""
    if not isinstance(result, Exception):
        return 200, f"answered 200: {result}"
    status = result.status() or ""
    message = result.message()
    if status.startswith("HTTP ") or message.startswith("HTTP "):  # post_json's
        status, _, message = message.removeprefix("HTTP ").partition(": ")
        message = json.loads(message).get("error", message) if message.startswith("{") else message
    return int(status), message


@pytest.mark.server
def test_bad_requests_fail_alone_and_good_ones_in_the_same_batches_are_scored(server, llama_ckpt):
    rng = np.random.default_rng(0)
    bad, good, mixed = bad_cases(), good_cases(llama_ckpt, rng), mixed_cases()
    assert len(bad) >= 30
    alone = [outcome(submit(server.url, case)) for case in bad]  # one at a time: each alone in its batch

    expected = reference_rewards(llama_ckpt, [s for case in good for s in case[2]])
    jobs = [("bad", i) for i in range(len(bad))] + [("good", i) for i in range(len(good))] + \
        [("mixed", i) for i in range(len(mixed))]
    rng.shuffle(jobs)
    cases = {"bad": bad, "good": good, "mixed": mixed}
    with ThreadPoolExecutor(24) as pool:  # all at once: the 200 ms queue delay merges them into batches
        futures = {job: pool.submit(submit, server.url, cases[job[0]][job[1]]) for job in jobs}
        results = {job: f.result() for job, f in futures.items()}

    at = 0
    for i, (model, _, seqs) in enumerate(good):
        result = results[("good", i)]
        assert not isinstance(result, Exception), f"good request {i} ({model}) failed: {result}"
        rewards, errors = result
        assert all(e[0] == b"" for e in errors), errors
        np.testing.assert_allclose(rewards, expected[at:at + len(seqs)], atol=1e-4, rtol=0)
        at += len(seqs)

    mismatches = []
    for i, (model, inputs, pattern) in enumerate(bad):
        status, message = outcome(results[("bad", i)])
        # Triton's own HTTP front end answers a body it cannot parse as JSON with 500, before any model runs
        want = 500 if "forward failed" in pattern or "parse" in pattern else 400
        if (status, message) != alone[i]:
            mismatches.append(f"bad case {i} ({model}): alone {alone[i]}, batched {(status, message)}")
        if status != want or not re.search(pattern, message) or "\n" in message or "Traceback" in message \
                or ".py" in message:
            mismatches.append(f"bad case {i} ({model}): expected {want} /{pattern}/, got {status}: {message[-300:]}")
    assert not mismatches, "\n".join(mismatches)

    for i, (model, _, errors_at, good_seqs) in enumerate(mixed):
        result = results[("mixed", i)]
        assert not isinstance(result, Exception), f"mixed request {i} ({model}) failed whole: {result}"
        rewards, errors = result
        errors = [e.decode() for e in errors[:, 0]]
        for row, message in enumerate(errors):
            if row in errors_at:
                assert message.startswith(errors_at[row]) and np.isnan(rewards[row]).all(), (i, row, message)
            else:
                assert message == "" and not np.isnan(rewards[row]).any(), (i, row, message)
        if good_seqs is not None:
            kept = [row for row in range(len(errors)) if row not in errors_at]
            np.testing.assert_allclose(rewards[kept], reference_rewards(llama_ckpt, good_seqs), atol=1e-4, rtol=0)

    # the batches holding a poisoned request were scored again apart
    assert "scoring them apart" in server.log()
    # still serving, on both ranks
    assert len(rank_pids(server.proc.pid)) == 2
    rewards, _ = send(server.url, "reward", [("token_ids", column(b"5 6 7"), "BYTES")])
    np.testing.assert_allclose(rewards, reference_rewards(llama_ckpt, [np.array([5, 6, 7])]), atol=1e-4, rtol=0)


@pytest.mark.server
def test_grpc_gets_the_same_statuses(server):
    """gRPC: INVALID_ARGUMENT for input errors, INTERNAL for a row that fails the forward, with the same messages."""
    import grpc
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        for rows, code, pattern in [([b""], grpc.StatusCode.INVALID_ARGUMENT, r"^\[reward_server:INVALID_ARG\] \[reward_server:INVALID_ARG:row=0\] empty text$"),
                                    ([b"x" * 5000], grpc.StatusCode.INVALID_ARGUMENT, r"^\[reward_server:INVALID_ARG\] \[reward_server:INVALID_ARG:row=0\] 5000 bytes"),
                                    ([f"{POISON}".encode()], grpc.StatusCode.INTERNAL, r"^\[reward_server:INTERNAL\] \[reward_server:INTERNAL:row=0\] the forward failed")]:
            tensor = grpcclient.InferInput("text" if rows[0] != f"{POISON}".encode() else "token_ids", [1, 1], "BYTES")
            tensor.set_data_from_numpy(column(*rows))
            with pytest.raises(InferenceServerException) as info:
                client.infer("reward", [tensor])
            assert info.value.status() == str(code), (rows, info.value.status(), info.value.message())
            assert re.search(pattern, info.value.message()), info.value.message()
    finally:
        client.close()


@pytest.mark.server
def test_huge_bodies_are_refused_at_once_and_leave_no_memory_behind(server):
    """Two 50 MB texts at once, beside good traffic: refused within seconds (400) and good requests still
    answered; four rounds of them leave rank 0's memory where the first round left it (nothing of a refused
    request is kept)."""
    rank0 = rank_pids(server.proc.pid)[0]
    huge = column(b"a" * 50_000_000)
    rss = [rss_mb(rank0)]
    for _ in range(4):
        with ThreadPoolExecutor(10) as pool:
            started = time.monotonic()
            big = [pool.submit(lambda: (outcome(send(server.url, "reward", [("text", huge, "BYTES")])),
                                        time.monotonic() - started)) for _ in range(2)]
            small = [pool.submit(lambda: (send(server.url, "reward", [("token_ids", column(b"5 6 7"), "BYTES")]),
                                          time.monotonic() - started)) for _ in range(8)]
            big, small = [f.result() for f in big], [f.result() for f in small]
        for (status, message), seconds in big:
            assert status == 400 and "request of 50000000 bytes, more than the limit" in message, message
            print(f"50 MB text refused in {seconds:.2f} s")
            assert seconds < 5, seconds  # includes sending 50 MB over HTTP and Triton's copy to the Python backend
        for result, seconds in small:
            assert not isinstance(result, Exception) and result[1][0, 0] == b"", result
        print(f"good requests answered within {max(s for _, s in small):.2f} s")
        time.sleep(1)
        rss.append(rss_mb(rank0))
    print("rank 0 memory (MB) before and after each round:", [round(m) for m in rss])
    assert rss[4] < rss[1] + 30, rss


def test_truncation_keeps_the_end_or_the_start():
    from oracles import build_tokenizer
    from reward_server.protocol import InputError
    from reward_server.serving.inputs import RequestDecoder, SequenceRules

    ids = np.arange(10, 20)
    for truncation, kept in ("left", ids[-4:]), ("right", ids[:4]):
        decoder = RequestDecoder(build_tokenizer(), SequenceRules(512, 4, truncation, 1024, 4096),
                                 add_special_tokens=True)
        np.testing.assert_array_equal(decoder.native({"token_ids": column(ids_text(ids))})[0], kept)
        tokens, lengths = nemo_tokens([ids])[0][1], np.array([[10]])
        np.testing.assert_array_equal(decoder.nemo({"tokens": tokens, "sequence_lengths": lengths})[0], kept)
    decoder = RequestDecoder(build_tokenizer(), SequenceRules(512, 4, "error", 1024, 4096), add_special_tokens=True)
    [error] = decoder.native({"token_ids": column(ids_text(ids))})
    assert isinstance(error, InputError) and "10 tokens, more than the limit of 4" in str(error)
