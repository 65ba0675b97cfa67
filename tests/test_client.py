"""RemoteGPTRMClient against a real server (torchrun 2 ranks, gloo, PyTriton), compared with a plain
transformers forward. One server for the module: max batch 16, so every large batch is split into many requests."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from oracles import reference_rewards
from servers import DelayedProxy, REPO, Server, free_port, rank_pids
from reward_server.client import (RemoteGPTRMClient, RewardInputError, RewardServerError, RewardServerUnavailable,
                                  RewardTimeout)

pytestmark = pytest.mark.timeout(300)

SERVER_BATCH = 16


@pytest.fixture(scope="module")
def server(llama_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client_server")
    srv = Server(2, [f"model.path={llama_ckpt}", f"batching.max_batch_size={SERVER_BATCH}",
                     "batching.max_queue_delay_us=20000", f"model.cache_dir={tmp / 'cache'}"], tmp / "server.log")
    try:
        yield srv.wait_ready(models=("reward", "reward_model"))
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def sequences(llama_ckpt):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(4, 512, int(n)).astype(np.int64) for n in rng.integers(1, 48, 1000)]
    return seqs, reference_rewards(llama_ckpt, seqs)


def padded(seqs):
    tokens = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.int64)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.from_numpy(s)
    return tokens, torch.tensor([len(s) for s in seqs])


@pytest.mark.server
def test_order_preserved_1000_sequences_16_concurrent_callers(server, sequences):
    seqs, expected = sequences
    with RemoteGPTRMClient(server.url) as client:
        assert client.max_batch_size == SERVER_BATCH  # read from the server: 1,000 sequences -> 63 requests
        np.testing.assert_allclose(client.infer_rm(seqs).result(), expected, atol=1e-4, rtol=0)

        def caller(k):
            """Each caller scores its own shuffled 250 of the sequences, in one of the accepted forms."""
            order = np.random.default_rng(100 + k).permutation(len(seqs))[:250]
            mine = [seqs[i] for i in order]
            if k % 3 == 0:
                handle = client.infer_rm(mine)
            elif k % 3 == 1:
                handle = client.infer_rm(*padded(mine))
            else:
                tokens, lengths = padded(mine)
                handle = client.infer_rm({"response_tokens": tokens, "response_lengths": lengths})
            return order, handle.result(timeout=120)

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(caller, range(16)))
    for k, (order, rewards) in enumerate(results):
        assert isinstance(rewards, torch.Tensor) == (k % 3 != 0)
        np.testing.assert_allclose(np.asarray(rewards), expected[order], atol=1e-4, rtol=0)


@pytest.mark.server
def test_text_torch_async_and_normalization(server, llama_ckpt, sequences):
    from transformers import AutoTokenizer

    seqs, expected = sequences
    texts = ["Hello", "The answer is 4.", "unicode: 日本語 ✓ ки"]
    ids = [np.array(x) for x in AutoTokenizer.from_pretrained(llama_ckpt)(texts)["input_ids"]]
    with RemoteGPTRMClient(server.url) as client:
        np.testing.assert_allclose(client.score(texts), reference_rewards(llama_ckpt, ids), atol=1e-4, rtol=0)
        one_by_one = np.concatenate([client.score([torch.from_numpy(s)]).numpy() for s in seqs[:20]])
        np.testing.assert_allclose(one_by_one, expected[:20], atol=1e-4, rtol=0)

        async def actor():
            return await asyncio.gather(*(client.ainfer_rm(seqs[i:i + 30]) for i in range(0, 90, 30)))
        np.testing.assert_allclose(np.concatenate(asyncio.run(actor())), expected[:90], atol=1e-4, rtol=0)
        with pytest.raises(RewardServerError, match="not a process reward model"):
            client.infer_rm(seqs[:3]).step_rewards()
    with RemoteGPTRMClient(server.url, reward_mean=0.25, reward_std=2.0) as client:
        np.testing.assert_allclose(client.score(seqs[:50]), (expected[:50] - 0.25) / 2.0, atol=1e-4, rtol=0)


@pytest.mark.server
def test_malformed_sequence_error_names_its_index(server, sequences):
    seqs = list(sequences[0][:100])
    seqs[37] = np.array([5, 9999])
    # one request at a time: the bad request is alone in its batch, so the server fails the HTTP call
    with RemoteGPTRMClient(server.url, concurrency=1) as client:
        with pytest.raises(RewardInputError) as info:
            client.infer_rm(seqs).result(timeout=60)
    assert info.value.index == 37
    assert str(info.value) == "sequence 37 rejected by the reward server: token id 9999 outside the vocabulary [0, 512)"
    assert "Traceback" not in str(info.value)
    # one sequence per request, 16 in flight: the bad request shares a dynamic batch with good ones
    # (NaN rewards + `error` output); the client reports it the same way
    seqs = list(sequences[0][:16])
    seqs[11] = np.array([], dtype=np.int64)
    with RemoteGPTRMClient(server.url, max_batch_size=1, concurrency=16) as client:
        with pytest.raises(RewardInputError, match=r"^sequence 11 rejected by the reward server: empty sequence$"):
            client.infer_rm(seqs).result(timeout=60)
        with pytest.raises(RewardInputError, match=r"^sequence 1 rejected by the reward server: empty text$"):
            client.infer_rm(["fine", ""]).result(timeout=60)
        assert np.isfinite(client.score(sequences[0][:16])).all()  # nothing left behind


@pytest.mark.server
def test_timeout_when_a_rank_stops_mid_request(server, sequences):
    seqs = sequences[0][:40]
    subscriber = rank_pids(server.proc.pid)[1]
    with RemoteGPTRMClient(server.url, request_timeout_s=2.0) as client, \
            RemoteGPTRMClient(server.url, request_timeout_s=600.0) as patient:
        client.score(seqs[:2])  # connected, config read
        patient.score(seqs[:2])
        os.kill(subscriber, signal.SIGSTOP)  # rank 0 now waits for rank 1 inside the forward
        try:
            start = time.monotonic()
            with pytest.raises(RewardTimeout, match=r"did not answer sequences \d+\.\.\d+ within 2s"):
                client.infer_rm(seqs).result(timeout=30)
            assert 1.5 < time.monotonic() - start < 8
            stuck = patient.infer_rm(seqs)
            time.sleep(0.5)
            start = time.monotonic()
            patient.close()  # aborts the request in flight: its handle fails at once
            with pytest.raises(RewardServerError, match="closed"):
                stuck.result(timeout=10)
            assert time.monotonic() - start < 5
        finally:
            os.kill(subscriber, signal.SIGCONT)
        np.testing.assert_allclose(client.score(seqs), sequences[1][:40], atol=1e-4, rtol=0)  # server recovered


@pytest.mark.server
def test_refused_connection_is_retried_then_reported(server, sequences):
    port = free_port()  # nothing listens here
    start = time.monotonic()
    with RemoteGPTRMClient(f"127.0.0.1:{port}", retries=3, retry_backoff_s=0.2) as client:
        with pytest.raises(RewardServerUnavailable) as info:
            client.infer_rm(["hello"]).result(timeout=30)
    elapsed = time.monotonic() - start
    assert 0.2 + 0.4 + 0.8 <= elapsed < 5  # three backoffs, then a clear report
    message = str(info.value)
    assert f"reward server http://127.0.0.1:{port} unavailable" in message, message
    assert "Connection refused" in message and "4 attempts" in message, message

    # the same, but the server shows up while the client is retrying: the client gets its rewards
    proxy = DelayedProxy(port, server.http_port, delay_s=0.5)
    try:
        sent = time.monotonic()
        with RemoteGPTRMClient(f"127.0.0.1:{port}", retries=5, retry_backoff_s=0.2) as client:
            rewards = client.score(sequences[0][:40], timeout=30)
        assert proxy.listening_since is not None and proxy.listening_since - sent > 0.3  # first attempts refused
        np.testing.assert_allclose(rewards, sequences[1][:40], atol=1e-4, rtol=0)
    finally:
        proxy.stop()


@pytest.mark.server
def test_a_wrong_model_name_is_reported_after_the_load_grace(server):
    start = time.monotonic()
    with RemoteGPTRMClient(server.url, model_name="no_such_model", max_batch_size=4, model_load_grace_s=1.0) as client:
        with pytest.raises(RewardServerError, match="HTTP 404.*no_such_model") as info:
            client.score(["hello"], timeout=60)
    assert not isinstance(info.value, RewardServerUnavailable)
    assert 1.0 <= time.monotonic() - start < 10


def test_imports_without_torch_and_an_unclosed_client_does_not_hold_exit():
    """A process that never closes its client exits at once even with a request hanging on a silent server."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        code = (f"import sys, reward_server.client as c; assert 'torch' not in sys.modules, 'torch imported'\n"
                f"h = c.RemoteGPTRMClient('127.0.0.1:{silent.getsockname()[1]}', max_batch_size=4).infer_rm(['x'])\n"
                f"import time; time.sleep(0.5); assert not h.done()")
        start = time.monotonic()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
        assert time.monotonic() - start < 20
