"""Overload, metrics and the start-up log, on one server (torchrun 2 data-parallel ranks, gloo): every forward
sleeps 2 s and rank 0 holds at most 40 queued tokens, so a burst is partly refused with 503 at once, a
RemoteGPTRMClient rides it out by backing off, and the metrics port shows our counters beside Triton's. One
request per Triton batch and an instance for each of the burst's 12 requests (the NeMo model off): an instance waits
for its batch's rewards, so a refused request that shared a batch with an admitted one, or waited for a free
instance, was answered only after a forward (4.0 s for 2 s forwards, seen on CI)."""

import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from oracles import reference_rewards
from reward_server.client import RemoteGPTRMClient
from servers import metrics, running_server, value

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]

QUEUED_TOKENS = 40
FORWARD_S = 2.0  # a refusal must come well before one forward could end, even on a loaded machine


@pytest.fixture(scope="module")
def server(tmp_path_factory, llama_ckpt):
    overrides = [f"model.path={llama_ckpt}", "parallel.tensor_parallel_size=1", f"fault_injection.forward_delay_s={FORWARD_S}",
                 f"batching.max_queued_tokens={QUEUED_TOKENS}", "batching.max_batch_size=1",
                 "batching.max_queue_delay_us=0", "batching.instances=12", "server.nemo_model_name="]
    with running_server(tmp_path_factory.mktemp("overload"), overrides, models=("reward",)) as srv:
        yield srv


def post(url, ids):
    body = json.dumps({"inputs": [{"name": "token_ids", "shape": [1, 1], "datatype": "BYTES",
                                   "data": [" ".join(map(str, ids))]}]}).encode()
    request = urllib.request.Request(f"{url}/v2/models/reward/infer", data=body, method="POST")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())["outputs"][0]["data"][0], time.monotonic() - started
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["error"], time.monotonic() - started


def test_a_burst_beyond_the_queue_limit_is_refused_at_once(server, llama_ckpt):
    seqs = [np.arange(5 + i, 15 + i) for i in range(12)]  # 10 tokens each: 4 fit the queue
    with ThreadPoolExecutor(len(seqs)) as pool:
        results = list(pool.map(lambda s: post(server.url, s), seqs))
    refused = [r for r in results if r[0] == 503]
    scored = [(s, r) for s, r in zip(seqs, results) if r[0] == 200]
    print(f"{len(scored)} scored, {len(refused)} refused in at most {max([r[2] for r in refused] or [0]):.2f} s")
    assert refused and scored and len(refused) + len(scored) == len(seqs), results
    for status, message, seconds in refused:
        assert "overloaded" in message and f"limit {QUEUED_TOKENS}" in message, message
        assert seconds < FORWARD_S, seconds  # refused without waiting for a forward
    want = reference_rewards(llama_ckpt, [s for s, _ in scored])[:, 0]
    np.testing.assert_allclose([r[1] for _, r in scored], want, atol=1e-4, rtol=0)


def test_the_client_backs_off_and_retries_until_scored(server, llama_ckpt):
    seqs = [np.arange(5 + i, 15 + i) for i in range(12)]
    client = RemoteGPTRMClient(server.url.removeprefix("http://"), retries=8, retry_backoff_s=0.2)
    try:
        with ThreadPoolExecutor(len(seqs)) as pool:
            rewards = list(pool.map(lambda s: client.score([s]), seqs))
    finally:
        client.close()
    np.testing.assert_allclose(np.concatenate(rewards), reference_rewards(llama_ckpt, seqs), atol=1e-4, rtol=0)


def test_metrics_port_has_ours_and_tritons(server):
    post(server.url, [5, 6, 7])
    post(server.url, [5, 6, 999999])  # an input error
    text = metrics(server)
    assert value(text, "reward_server_tokens_received_total") >= 3
    assert value(text, "reward_server_tokens_computed_total") >= 3
    assert value(text, "reward_server_forwards_total") >= 1
    assert value(text, 'reward_server_errors_total{kind="input"}') >= 1
    assert value(text, 'reward_server_errors_total{kind="unavailable"}') >= 1  # the burst's refusals
    assert value(text, "reward_server_queue_batches") == 0 and value(text, "reward_server_queue_tokens") == 0
    assert "reward_server_forward_fill_bucket" in text
    assert re.search(r"^nv_inference_request_success(_total)?\{[^}]*model=\"reward\"[^}]*\} [1-9]", text, re.M), \
        "Triton's own metrics missing"


def test_start_up_log_is_quiet_and_ends_with_the_ready_line(server):
    log = server.log()
    for noise in ("Failed to initialize NVML", "CudaDriverHelper", "Failed to set config modification time",
                  "+----", "Infer function available", "Traceback"):
        assert noise not in log, noise
    ready = [line for line in log.splitlines() if line.startswith("ready after")]
    assert len(ready) == 1 and f":{server.http_port}/v2/models/reward/infer" in ready[0], ready
    for line in ("loading AutoModelForSequenceClassification", "model loaded in",
                 "warm-up skipped: nothing to compile on the cpu with sdpa attention"):
        assert line in log, line
