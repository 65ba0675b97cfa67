"""Load: 64 concurrent clients send 2,048 requests (RELIABILITY_LOAD_PER_CLIENT scales it) of mixed size: 1-4
sequences of 1-32 tokens, native token_ids and NeMo tokens + sequence_lengths. Every request must be answered
with the rewards of a plain transformers forward, and rank 0's memory must stay flat after warm-up (VmRSS from
/proc, sampled throughout).

Bounded for a 2-core machine: the tiny test Llama, short sequences, torchrun 2 data-parallel ranks.
"""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as httpclient

from oracles import reference_rewards
from servers import rank_pids, rss_mb, running_server

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]

CLIENTS = 64
# 2,048 requests by default (about 5 s here); RELIABILITY_LOAD_PER_CLIENT=2000 runs 128,000 (about 4 minutes)
PER_CLIENT = int(os.environ.get("RELIABILITY_LOAD_PER_CLIENT", 32))
POOL = 256  # distinct sequences; the reference forward runs once per sequence
NEMO_PAD = 32
MAX_GROWTH_MB = 25.0


@pytest.fixture(scope="module")
def server(tmp_path_factory, llama_ckpt):
    overrides = [f"model.path={llama_ckpt}", "parallel.tensor_parallel_size=1"]
    with running_server(tmp_path_factory.mktemp("load"), overrides) as srv:
        yield srv


def client_loop(url, pool, rng, done):
    """One client: PER_CLIENT requests over one connection; returns (sequence indices, rewards) per request."""
    client = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
    answers = []
    try:
        for _ in range(PER_CLIENT):
            idx = rng.integers(0, POOL, int(rng.integers(1, 5)))
            seqs = [pool[i] for i in idx]
            if rng.random() < 0.25:  # NeMo contract: right-padded tokens + lengths
                tokens = np.zeros((len(seqs), NEMO_PAD), dtype=np.int64)
                for row, s in enumerate(seqs):
                    tokens[row, :len(s)] = s
                inputs = [httpclient.InferInput("tokens", list(tokens.shape), "INT64"),
                          httpclient.InferInput("sequence_lengths", [len(seqs), 1], "INT64")]
                inputs[0].set_data_from_numpy(tokens)
                inputs[1].set_data_from_numpy(np.array([[len(s)] for s in seqs], dtype=np.int64))
                model = "reward_model"
            else:
                data = np.array([[" ".join(map(str, s)).encode()] for s in seqs], dtype=object)
                inputs = [httpclient.InferInput("token_ids", list(data.shape), "BYTES")]
                inputs[0].set_data_from_numpy(data)
                model = "reward"
            result = client.infer(model, inputs)
            assert all(e[0] == b"" for e in result.as_numpy("error"))
            answers.append((idx, result.as_numpy("rewards")))
            done.append(1)
    finally:
        client.close()
    return answers


def test_64_clients_2048_requests_all_answered_right_and_memory_flat(server, llama_ckpt):
    rng = np.random.default_rng(0)
    pool = [rng.integers(4, 500, int(n)) for n in rng.integers(1, 33, POOL)]
    expected = reference_rewards(llama_ckpt, pool)
    rank0 = rank_pids(server.proc.pid)[0]

    done, samples, stop = [], [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((len(done), rss_mb(rank0)))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.monotonic()
    try:
        with ThreadPoolExecutor(CLIENTS) as clients:
            futures = [clients.submit(client_loop, server.url, pool, np.random.default_rng(1 + c), done)
                       for c in range(CLIENTS)]
            answers = [a for f in futures for a in f.result()]
    finally:
        stop.set()
        sampler.join()
    elapsed = time.monotonic() - start

    assert len(answers) == CLIENTS * PER_CLIENT
    for idx, rewards in answers:
        np.testing.assert_allclose(rewards, expected[idx], atol=1e-4, rtol=0)

    total = CLIENTS * PER_CLIENT
    warm = [rss for n, rss in samples if total // 4 <= n < total // 2]  # after the first quarter
    late = [rss for n, rss in samples if n >= 3 * total // 4]
    growth = np.median(late) - np.median(warm)
    print(f"{total} requests in {elapsed:.1f} s ({total / elapsed:.0f}/s); rank 0 RSS: start {samples[0][1]:.0f} MB, "
          f"after warm-up {np.median(warm):.0f} MB, last quarter {np.median(late):.0f} MB, "
          f"max {max(r for _, r in samples):.0f} MB ({len(samples)} samples)")
    assert growth < MAX_GROWTH_MB, growth
