"""Data-parallel replicas keep a group of sequences that fits one replica's forward budget on one replica, so its
shared prompt is computed once (issue: a lone GRPO group used to be split over the replicas, and each computed the
prompt). Measured through the server's own tokens-computed metric, which sums every replica's forwards."""

import re
import urllib.request

import numpy as np
import pytest

from oracles import reference_rewards
from reward_server.client import RemoteGPTRMClient

pytestmark = pytest.mark.server


def computed(srv) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(r"^reward_server_tokens_computed_total (\S+)$", text, re.M)
    assert found, "reward_server_tokens_computed_total not in the metrics"
    return float(found.group(1))


def test_a_lone_group_is_computed_once_on_one_of_two_replicas(start_server, llama_ckpt):
    srv = start_server(2, [f"model.path={llama_ckpt}", "parallel.tensor_parallel_size=1",
                           "batching.max_tokens_per_forward=4096"])
    rng = np.random.default_rng(0)
    prompt = rng.integers(4, 500, 300)
    group = [np.concatenate([prompt, rng.integers(4, 500, int(n))]) for n in rng.integers(60, 90, 8)]
    unique = len(prompt) + sum(len(s) - len(prompt) for s in group)
    with RemoteGPTRMClient(srv.url, max_batch_size=8) as client:
        before = computed(srv)
        rewards = client.score(group)
        first = computed(srv) - before
        again = client.score(group)  # the same group again: its replica's prefix cache holds all of it
        second = computed(srv) - before - first
    print(f"unique tokens {unique}, computed {first:.0f}, then {second:.0f} for the repeat")
    assert first == unique, (first, unique)  # split over the replicas, the prompt would be computed twice
    assert second == 0, second
    np.testing.assert_allclose(rewards, reference_rewards(llama_ckpt, group), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(again, rewards)
