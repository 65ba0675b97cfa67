"""batching.max_queued_tokens holds under concurrent admission: each request of a Triton batch is admitted on its
own, so the queue at rank 0 never holds more than the limit, or one request alone (a request alone is never
refused for its size). Before, a whole Triton batch (up to 64 requests) was admitted or refused at once, and a
flood of 64 senders drove a 4,000-token limit to 25-26 k tokens queued."""

import json
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from reward_server.engine import Leader, Overloaded


def idle_leader(limit: int) -> Leader:
    """A leader whose run loop never starts: what it admits stays queued."""
    return Leader(SimpleNamespace(), heartbeat_s=1.0, tokens_per_forward=1024, max_queued_tokens=limit)


def test_each_request_of_a_batch_is_admitted_on_its_own():
    leader = idle_leader(4000)
    batch = [[torch.arange(4, 54)] * 2 for _ in range(64)]  # 64 requests of 100 tokens
    futures = leader.submit_batch(batch)
    refused = [f for f in futures if f.done() and isinstance(f.exception(), Overloaded)]
    assert len(refused) == 24 and leader.queued_tokens == 4000, (len(refused), leader.queued_tokens)
    assert "retry later" in str(refused[0].exception())
    assert all(isinstance(f.exception(timeout=0), Overloaded) for f in leader.submit_batch([[torch.arange(4, 5)]]))
    assert leader.peak_queued_tokens == 4000


def test_a_request_alone_is_never_refused_for_its_size():
    leader = idle_leader(100)
    (future,) = leader.submit_batch([[torch.arange(4, 504)]])  # 500 tokens, the queue empty
    assert not future.done() and leader.queued_tokens == 500
    later = leader.submit_batch([[torch.arange(4, 6)]])[0]  # anything more waits for the queue to drain
    assert isinstance(later.exception(timeout=0), Overloaded)


def post(url: str, seqs) -> int:
    body = json.dumps({"inputs": [{"name": "token_ids", "shape": [len(seqs), 1], "datatype": "BYTES",
                                   "data": [" ".join(map(str, s)) for s in seqs]}]}).encode()
    request = urllib.request.Request(f"{url}/v2/models/reward/infer", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.server
def test_a_64_sender_flood_never_queues_more_than_the_limit_plus_one_request(start_server, llama_ckpt):
    limit, rows, length = 4000, 8, 60  # a request: 480 tokens
    srv = start_server(2, [f"model.path={llama_ckpt}", f"batching.max_queued_tokens={limit}",
                           "batching.max_tokens_per_forward=2048"])
    rng = np.random.default_rng(0)
    requests = [[rng.integers(4, 500, length) for _ in range(rows)] for _ in range(512)]
    with ThreadPoolExecutor(64) as pool:
        statuses = list(pool.map(lambda r: post(srv.url, r), requests))
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    peak = float(re.search(r"^reward_server_queue_tokens_peak (\S+)$", text, re.M).group(1))
    print(f"{statuses.count(200)} scored, {statuses.count(503)} refused (503); peak queue {peak:.0f} tokens")
    assert set(statuses) <= {200, 503}, set(statuses)
    assert statuses.count(503) > 0, "the flood never met the limit: the test shows nothing"
    assert peak <= limit + rows * length, peak
