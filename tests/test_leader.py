"""Rank 0's scheduler in-process (a group of one over gloo): forwards filled to the token budget across
submitted batches, every row back to its own caller, bit-identical to scoring the same forward directly."""

import random
import threading
from collections import deque

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from oracles import reference_rewards
from reward_server.config import BatchingConfig
from reward_server.engine import (Engine, ForwardError, ForwardResult, Leader, Overloaded, RanksFailed, Scored,
                                  ShuttingDown, Work, plan_forward)
from reward_server.engine.step import FAULTED
from reward_server.scoring.readout import LastToken
from reward_server.scoring.scorer import build_scorer

BUDGET = 600


def packed_scorer(model, sharing=True):
    batching = BatchingConfig(max_tokens_per_forward=BUDGET, prefix_sharing=sharing)
    return build_scorer(model, LastToken(model.score, 1, model.config.pad_token_id), batching, model.config.pad_token_id, torch.device("cpu"))


class RecordingScorer:
    """Wraps a scorer and keeps each forward's sequences; a sequence holding `poison` fails its forward."""

    def __init__(self, inner=None, poison=None):
        self.inner = inner
        self.cache = getattr(inner, "cache", None)  # the leader's scheduler reads the prefix cache
        self.poison = poison
        self.forwards = []
        self.alone_computed = 0  # without `inner`: every token of each sequence

    @property
    def computed_tokens(self):
        return self.inner.computed_tokens if self.inner is not None else self.alone_computed

    @property
    def reused_tokens(self):
        return self.inner.reused_tokens if self.inner is not None else 0

    def output_width(self, seqs):
        return 1

    def __call__(self, seqs):
        self.forwards.append([s.clone() for s in seqs])
        if self.inner is None:
            self.alone_computed += sum(len(s) for s in seqs)
        if self.poison is not None and any(bool((s == self.poison).any()) for s in seqs):
            raise ValueError("poisoned forward")
        if self.inner is not None:
            return self.inner(seqs)
        return torch.tensor([[float(s.sum()) * 1000 + len(s)] for s in seqs])


def fake_rewards(seqs):
    """RecordingScorer's rewards without `inner`."""
    return np.array([[float(s.sum()) * 1000 + len(s)] for s in seqs], dtype=np.float32)


def serve(leader, submissions):
    """Queue every submission (so the leader sees them together), then run the leader until it has served them."""
    futures = [leader.submit(seqs, alone=alone) for seqs, alone in submissions]
    thread = threading.Thread(target=leader.run)
    thread.start()
    leader.close()
    thread.join(timeout=120)
    assert not thread.is_alive()
    return futures


def random_batches(n, seed, max_len=250):
    rng = random.Random(seed)
    return [[torch.randint(4, 500, (rng.randint(1, max_len),)) for _ in range(rng.randint(1, 6))] for _ in range(n)]


def test_forwards_fill_the_budget_across_batches_and_rows_go_home(topo):
    scorer = RecordingScorer()
    budget = 2000
    leader = Leader(Engine(scorer, topo), heartbeat_s=1, tokens_per_forward=budget)
    batches = random_batches(40, seed=0) + [[torch.randint(4, 500, (budget + 50,))]]  # one over the budget
    futures = serve(leader, [(b, False) for b in batches])
    for seqs, fut in zip(batches, futures):
        np.testing.assert_array_equal(fut.result(timeout=1).rewards, fake_rewards(seqs))
    sizes = [sum(len(s) for s in f) for f in scorer.forwards]
    assert all(size <= budget or len(f) == 1 for size, f in zip(sizes, scorer.forwards))
    assert max(sizes) > budget  # the long one ran, alone
    total = sum(len(s) for b in batches for s in b)
    assert len(scorer.forwards) <= total / budget * 1.1 + 2  # nearly full: far fewer forwards than batches
    assert len(scorer.forwards) < len(batches) / 3


def test_plan_forward_takes_the_oldest_first_and_keeps_alone_works_apart():
    def work(lengths, alone=False):
        return Work([torch.zeros(n, dtype=torch.long) for n in lengths], None, alone)

    a, b, c = work([500, 500]), work([80, 90], alone=True), work([100, 50])
    pending = deque([a, b, c])
    picked, computed = plan_forward(pending, 600)
    assert [(w is a, i) for w, i in picked][:1] == [(True, 0)]
    assert {(id(w), i) for w, i in picked} == {(id(a), 0), (id(c), 0)}  # b is alone; a[1] and c[1] do not fit
    assert computed == 600
    picked, _ = plan_forward(pending, 600)
    assert {(id(w), i) for w, i in picked} == {(id(a), 1), (id(c), 1)}
    pending.remove(a), pending.remove(c)
    assert {(id(w), i) for w, i in plan_forward(pending, 600)[0]} == {(id(b), 0), (id(b), 1)}


def test_a_failed_forward_fails_only_the_sequence_that_fails_alone(topo):
    """A forward that fails alike on the ranks (input that slipped past the checks): the leader scores each work of
    it again in forwards of its own, then each sequence of a work that fails alone, so that only the bad sequence
    fails (ForwardError in its slot) and every other row is scored; alone works are never mixed with others. The
    retries happen inside the leader, after close() too (no caller resubmits, nobody is refused)."""
    poison = 3
    scorer = RecordingScorer(poison=poison)
    leader = Leader(Engine(scorer, topo), heartbeat_s=1, tokens_per_forward=BUDGET)
    good = [[torch.randint(4, 500, (50,))]] + random_batches(5, seed=1, max_len=100)
    bad = [torch.randint(4, 500, (40,)), torch.tensor([5, poison, 7]), torch.randint(4, 500, (30,))]
    lonely = [torch.randint(4, 500, (20,)), torch.randint(4, 500, (30,))]
    submissions = [(good[0], False), (bad, False), (lonely, True)] + [(g, False) for g in good[1:]]
    futures = serve(leader, submissions)
    results = [f.result(timeout=1) for f in futures]
    assert all(isinstance(r, Scored) for r in results)
    for (seqs, _), result in zip(submissions, results):
        if seqs is bad:
            continue
        assert result.errors == [None] * len(seqs)
        np.testing.assert_array_equal(result.rewards, fake_rewards(seqs))
    scored = results[1]
    assert scored.errors[0] is None and scored.errors[2] is None
    assert isinstance(scored.errors[1], ForwardError) and "the forward failed" in str(scored.errors[1])
    assert np.isnan(scored.rewards[1]).all()
    np.testing.assert_array_equal(scored.rewards[[0, 2]], fake_rewards(bad)[[0, 2]])
    with_bad = [f for f in scorer.forwards if any(torch.equal(s, bad[1]) for s in f if s.shape == bad[1].shape)]
    assert len(with_bad[0]) > 3  # shared with other works: they are scored again, alone
    assert [len(f) for f in with_bad[1:]] == [3, 1]  # the bad work alone, then its sequences one by one
    assert [len(f) for f in scorer.forwards[-3:]] == [1, 1, 1]
    alone_forwards = [f for f in scorer.forwards if any(s.shape == lonely[0].shape and torch.equal(s, lonely[0])
                                                          for s in f)]
    assert len(alone_forwards) == 1 and len(alone_forwards[0]) == 2
    assert leader.queued_batches == 0 and leader.queued_tokens == 0
    with pytest.raises(ShuttingDown):
        leader.submit(good[0]).result(timeout=1)


def test_unavailable_fails_whole_works_and_a_batch_of_works_is_queued_as_one(topo):
    """Overloaded and an abort (ranks failed) fail whole works, never rows; submit_batch queues one Triton batch's
    works at once (counted as one batch), each admitted on its own under max_queued_tokens."""
    leader = Leader(Engine(RecordingScorer(), topo), heartbeat_s=1, tokens_per_forward=BUDGET,
                    max_queued_tokens=100)
    first = leader.submit_batch([[torch.randint(4, 500, (30,))], [torch.randint(4, 500, (40,))]])
    assert (leader.queued_batches, leader.queued_tokens) == (1, 70)
    second = leader.submit_batch([[torch.randint(4, 500, (20,))], [torch.randint(4, 500, (20,))]])
    assert not second[0].done() and isinstance(second[1].exception(timeout=1), Overloaded)  # 90 fit, 110 would not
    assert (leader.queued_batches, leader.queued_tokens) == (2, 90)
    first = first + second[:1]
    empty = leader.submit([])
    assert empty.result(timeout=1).rewards.shape[0] == 0 and empty.result(timeout=1).errors == []
    leader.abort(RanksFailed("reward ranks failed: test"))
    assert all(isinstance(f.exception(timeout=1), RanksFailed) for f in first)
    assert leader.submit([]).result(timeout=1).errors == []  # nothing to score: answered, never refused
    assert (leader.queued_batches, leader.queued_tokens) == (0, 0)


def test_forward_result_unpacks_the_reduced_tensor():
    """step.py packs rewards and its tally rows into one tensor (one collective); ForwardResult reads them back."""
    out = torch.zeros(3 + 4, 2)
    out[:3] = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    out[3:, 0] = torch.tensor([1.0, 0.0, 120.0, 30.0])
    result = ForwardResult.from_reduced(out, 3)
    np.testing.assert_array_equal(result.rewards, np.arange(6, dtype=np.float32).reshape(3, 2))
    assert (result.failed_ranks, result.faulted_ranks, result.computed, result.reused) == (1, 0, 120, 30)


def test_rewards_bit_identical_to_scoring_each_forward_directly(topo, llama_ckpt):
    model = AutoModelForSequenceClassification.from_pretrained(llama_ckpt, dtype=torch.float32).eval()
    scorer = RecordingScorer(packed_scorer(model))
    leader = Leader(Engine(scorer, topo), heartbeat_s=1, tokens_per_forward=BUDGET)
    batches = random_batches(12, seed=2)
    futures = serve(leader, [(b, False) for b in batches])
    got = {}
    for seqs, fut in zip(batches, futures):
        for s, row in zip(seqs, fut.result(timeout=1).rewards):
            got[tuple(s.tolist())] = row
    direct = {}
    for forward in scorer.forwards:  # the simple path: the scorer called on the same forward, no queue
        for s, row in zip(forward, scorer.inner(forward).numpy()):
            direct[tuple(s.tolist())] = row
    assert got.keys() == direct.keys()
    for key in got:
        assert np.array_equal(got[key], direct[key]), key[:5]
    seqs = [s.numpy() for b in batches for s in b]
    flat = np.stack([got[tuple(s.tolist())] for s in seqs])
    np.testing.assert_allclose(flat, reference_rewards(llama_ckpt, seqs), atol=1e-5, rtol=0)
    assert len(scorer.forwards) < len(batches)  # forwards held sequences of several batches


def test_overlapped_forwards_give_the_simple_paths_rewards_bit_for_bit(topo, llama_ckpt):
    """batching.overlap launches forward N+1 before reading back N; the forwards and every reward are the same as
    with one forward at a time."""
    model = AutoModelForSequenceClassification.from_pretrained(llama_ckpt, dtype=torch.float32).eval()
    batches = random_batches(10, seed=3)
    runs = []
    for overlap in (False, True):
        scorer = RecordingScorer(packed_scorer(model))
        leader = Leader(Engine(scorer, topo), heartbeat_s=1, tokens_per_forward=BUDGET, overlap=overlap)
        futures = serve(leader, [(b, False) for b in batches])
        runs.append(([f.result(timeout=1).rewards for f in futures], scorer.forwards))
    (simple, simple_forwards), (overlapped, overlapped_forwards) = runs
    assert len(simple_forwards) == len(overlapped_forwards) > 1
    assert all(len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
               for a, b in zip(simple_forwards, overlapped_forwards))
    for a, b in zip(simple, overlapped):
        assert a.tobytes() == b.tobytes()


class FaultThenBrokenGroup:
    """An engine whose first forward reports a rank's fatal error, like a rank that ran out of memory and left the
    group; the next forward's collectives then fail, as they do against the departed rank."""

    def __init__(self, engine):
        self.engine = engine
        self.topo = engine.topo
        self.calls = 0

    def forward(self, seqs):
        self.calls += 1
        if self.calls > 1:
            raise ConnectionError("connection closed by peer")
        out = self.engine.forward(seqs)
        out[len(seqs) + FAULTED, 0] = 1.0
        return out


def test_a_launch_into_a_broken_group_first_answers_the_forward_that_broke_it(topo):
    """With overlap, forward N+1 is launched before N's result is read; if a rank faulted in N, N+1's launch
    fails. The callers still learn the cause (the rank's fatal error), not just the broken connection."""
    engine = FaultThenBrokenGroup(Engine(RecordingScorer(), topo))
    leader = Leader(engine, heartbeat_s=1, tokens_per_forward=BUDGET, overlap=True)
    batches = [[torch.randint(4, 500, (400,))] for _ in range(3)]  # one per forward
    futures = [leader.submit(b) for b in batches]
    leader.close()
    with pytest.raises(RuntimeError, match="fatal error"):
        leader.run()
    assert engine.calls == 2  # forward 2's launch failed before forward 1 was read back
    for fut in futures:
        assert "fatal error (out of memory?)" in str(fut.exception(timeout=1))
    # a request that comes after the failure, before the process exits, learns the same cause (not "shutting down")
    late = leader.submit([torch.randint(4, 500, (10,))]).exception(timeout=1)
    assert str(late).startswith("reward ranks failed: ") and "fatal error (out of memory?)" in str(late), late


def test_plan_forward_with_sharing_takes_a_group_together_and_counts_computed_tokens():
    """A group sharing a prefix, sent as separate requests and interleaved with others, goes into one forward; the
    budget counts tokens computed (the forward's prefix trie)."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(4, 500, 300)
    group = [Work([torch.from_numpy(np.concatenate([prompt, rng.integers(4, 500, 40)]))], None, False) for _ in range(4)]
    others = [Work([torch.from_numpy(rng.integers(4, 500, 250))], None, False) for _ in range(4)]
    pending = deque([group[0], others[0], others[1], group[1], others[2], group[2],
                                               others[3], group[3]])
    picked, computed = plan_forward(pending, 710, sharing=True, min_shared=32)
    assert {id(w) for w, _ in picked} == {id(w) for w in group[:4]} | {id(others[0])}
    assert computed == 300 + 4 * 40 + 250  # the prompt once
    assert all(not w.untaken for w in group) and not others[0].untaken and others[1].untaken
    # without sharing the same queue is cut by tokens sent: the oldest, then first fit
    for w in pending:
        w.untaken = deque([0])
    picked, computed = plan_forward(pending, 700, sharing=False)
    assert [id(w) for w, _ in picked] == [id(group[0]), id(others[0])] and computed == 340 + 250


def test_plan_forward_with_sharing_cuts_traffic_that_shares_nothing_into_the_same_forwards():
    """RLHF traffic (no two sequences share a prefix): the sharing scheduler plans exactly the forwards of the plain
    one, so what sharing-on costs such traffic is the planning's CPU time only (measured in docs/performance.md)."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.5, 0.8, 400).astype(int), 16, 4096)  # the RLHF mix's shape
    seqs = [rng.integers(4, 128_256, n) for n in lengths]

    def forwards(sharing):
        pending = deque(Work([torch.from_numpy(s) for s in seqs[k:k + 4]], None, False) for k in range(0, len(seqs), 4))
        order = {id(w): k for k, w in enumerate(pending)}
        out = []
        while any(w.untaken for w in pending):
            picked, computed = plan_forward(pending, 16384, sharing=sharing, min_shared=32)
            out.append(([(order[id(w)], i) for w, i in picked], computed))
        return out

    plain = forwards(False)
    assert len(plain) > 10 and forwards(True) == plain


def test_plan_forward_counts_tokens_the_prefix_cache_holds_as_free():
    """The rest of a group whose prompt an earlier forward computed: only the responses count against the budget."""
    rng = np.random.default_rng(1)
    prompt = rng.integers(4, 500, 300)
    group = [Work([torch.from_numpy(np.concatenate([prompt, rng.integers(4, 500, 60)]))], None, False) for _ in range(6)]

    def cached(seq):
        return 300 if np.array_equal(seq[:300], prompt) else 0

    picked, computed = plan_forward(deque(group), 600, sharing=True, min_shared=32)
    assert len(picked) == 5 and computed == 300 + 5 * 60  # the prompt counts once
    for w in group:
        w.untaken = deque([0])
    picked, computed = plan_forward(deque(group), 600, sharing=True, min_shared=32, cached=cached)
    assert len(picked) == 6 and computed == 6 * 60


def test_the_rest_of_a_cached_group_fills_one_forward_and_its_rewards_stay_exact(topo, llama_ckpt):
    """Leader + real scorer with its prefix cache: a group's second half, whose prompt the first half's forward
    computed, fits one forward because the budget counts the cached prompt as free; rewards match transformers."""
    from oracles import reference_rewards

    model = AutoModelForSequenceClassification.from_pretrained(llama_ckpt, dtype=torch.float32).eval()
    scorer = RecordingScorer(packed_scorer(model))
    assert scorer.cache is not None
    prompt = torch.randint(4, 500, (300,))
    first = [torch.cat([prompt, torch.randint(4, 500, (60,))]) for _ in range(2)]
    rest = [torch.cat([prompt, torch.randint(4, 500, (60,))]) for _ in range(6)]
    results = []
    for batch in (first, rest):  # one leader after the other, on the same scorer (and cache)
        leader = Leader(Engine(scorer, topo), heartbeat_s=1, tokens_per_forward=BUDGET, sharing=True)
        results.append(serve(leader, [([s], False) for s in batch]))
    assert len(scorer.forwards) == 2 and len(scorer.forwards[1]) == 6  # 6 x 60 <= 600; with the prompt, 660
    got = np.stack([f.result(timeout=1).rewards[0] for batch in results for f in batch])
    np.testing.assert_allclose(got, reference_rewards(llama_ckpt, [s.numpy() for s in first + rest]), atol=1e-5, rtol=0)
