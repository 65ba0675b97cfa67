"""The stand-in scorer (reward_server/faults.py, fault_injection.standin; TEST / BENCHMARK ONLY): it counts the tokens
the real scorer computes (the same layout and prefix cache bookkeeping), takes a GPU's time for them on a clock of
its own, and returns fixed rewards; the leader overlaps its forwards as on a GPU."""

import threading
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from oracles import scalar_scorer, sharing_cases, tree_depths
from reward_server.config import ServeConfig, problems
from reward_server.config.standin import StandInConfig
from reward_server.engine import Engine, Leader
from reward_server.faults import StandInEngine, StandInScorer, standin_enabled, standin_reward


@pytest.fixture(scope="module")
def model(llama_ckpt):
    return AutoModelForSequenceClassification.from_pretrained(llama_ckpt, dtype=torch.float32).eval()


def forwards():
    """GRPO groups split over forwards, a search's depths, duplicates and traffic that shares nothing."""
    cases = sharing_cases(seed=3)
    group = cases["grpo group"]
    rng = np.random.default_rng(4)
    depths = tree_depths(rng, trees=2, beams=3, depths=3)
    return [group[:2], group[2:] + cases["nothing shared"], *depths, group[:3] + group[:1]]


def test_off_by_default_and_checked():
    cfg = ServeConfig()
    assert not standin_enabled(cfg.fault_injection)
    cfg.fault_injection.standin = StandInConfig(tokens_per_s=-1, shared_speed=0, call_s=-1)
    assert {e.key for e in problems(cfg, {})} >= {"fault_injection.standin.tokens_per_s",
                                                   "fault_injection.standin.shared_speed",
                                                   "fault_injection.standin.call_s"}


def test_counts_the_real_scorers_tokens_and_rewards_depend_on_the_sequence_alone(model):
    cfg = StandInConfig(tokens_per_s=1e6)
    real, stand = scalar_scorer(model, budget=512), StandInScorer(scalar_scorer(model, budget=512), cfg, rank=1)
    plain = StandInScorer(scalar_scorer(model, budget=512, sharing=False), cfg, rank=1)
    for seqs in forwards():
        tensors = [torch.from_numpy(s) for s in seqs]
        real(tensors)
        got = stand(tensors).numpy()
        assert real.computed_tokens == stand.computed_tokens and real.reused_tokens == stand.reused_tokens
        assert got.shape == (len(seqs), 1)
        np.testing.assert_array_equal(got[:, 0], [standin_reward(s, len(s) - 1, 0) for s in seqs])
        alone = np.concatenate([plain([t]).numpy() for t in tensors])  # each scored alone: the same values
        np.testing.assert_array_equal(got, alone)
    assert real.reused_tokens > 0 and len(stand.cache) == len(real.cache)


def test_the_clock_runs_the_forwards_in_turn_and_shared_calls_run_slower(topo, model):
    cfg = StandInConfig(tokens_per_s=4_000, shared_speed=0.5, call_s=0.01)  # slow enough for a loaded machine
    stand = StandInScorer(scalar_scorer(model, budget=4096), cfg, rank=1)
    engine = StandInEngine(Engine(stand, topo), stand)
    rng = np.random.default_rng(0)
    alone = [torch.from_numpy(rng.integers(4, 500, 1000)) for _ in range(2)]  # shares nothing: 2,000 tokens
    prompt = rng.integers(4, 500, 500)
    group = [torch.from_numpy(np.concatenate([prompt, rng.integers(4, 500, 250)])) for _ in range(2)]  # 1,000 computed
    start = time.monotonic()
    engine.forward(alone)
    first = engine.pending
    engine.forward(group)
    assert time.monotonic() - start < 0.25  # both launched at once
    assert first.at - start == pytest.approx(2000 / 4_000 + 0.01, abs=0.2)
    assert engine.pending.at - first.at == pytest.approx(1000 / 2_000 + 0.01, abs=0.005)  # after the first
    engine.pending.synchronize()
    assert time.monotonic() >= engine.pending.at


def test_the_leader_overlaps_stand_in_forwards_and_answers_each_when_its_forward_ends(topo, model):
    stand = StandInScorer(scalar_scorer(model, budget=600), StandInConfig(tokens_per_s=10_000), rank=1)
    engine = StandInEngine(Engine(stand, topo), stand)
    leader = Leader(engine, heartbeat_s=1, tokens_per_forward=600, overlap=True, sharing=True)
    rng = np.random.default_rng(1)
    seqs = [torch.from_numpy(rng.integers(4, 500, 500)) for _ in range(4)]  # a forward each: 0.05 s
    answered = {}
    start = time.monotonic()
    futures = [leader.submit([s]) for s in seqs]
    for k, f in enumerate(futures):
        f.add_done_callback(lambda _f, k=k: answered.setdefault(k, time.monotonic() - start))
    thread = threading.Thread(target=leader.run)
    thread.start()
    leader.close()
    thread.join(timeout=30)
    assert not thread.is_alive()
    for s, f in zip(seqs, futures):
        assert f.result().rewards[0][0] == np.float32(standin_reward(s.numpy(), len(s) - 1, 0))
    for k in range(4):  # forward k ends after k + 1 forwards' time, not before
        assert answered[k] >= 0.05 * (k + 1) - 0.005, answered
    assert answered[3] < 0.05 * 4 + 0.15, answered
