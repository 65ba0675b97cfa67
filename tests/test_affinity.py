"""Data-parallel replicas and the prefix cache (scoring/affinity.py): the record sends a group where its prefix was
sent before, keeps the replicas' work about equal, spreads traffic that shares nothing exactly as the size-only
rule did, forgets what the cache's ring would have evicted, and gives every rank the same shares. In one process,
two real scorers with their own caches stand for two replicas: a search tree scored depth by depth computes fewer
tokens with the record than without, with rewards equal to each sequence scored alone (1e-5)."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from oracles import reference_rewards, scalar_scorer, scorer_with_cache, tree_depths
from reward_server.scoring.affinity import ReplicaAffinity
from reward_server.scoring.layout import Layout
from reward_server.scoring.trie import least_loaded

MIN_SHARED = 32
CAPACITY = 100_000


def ids(rng, n):
    return rng.integers(4, 500, n).astype(np.int64)


def layout(budget=100_000):
    return Layout("packed", budget, 0, sharing=True, min_shared=MIN_SHARED)


def shares(affinity, seqs):
    return layout().replica_shares(seqs, 2, affinity)


def test_nothing_recorded_spreads_as_the_size_only_rule_and_records_nothing():
    rng = np.random.default_rng(0)
    seqs = [ids(rng, int(n)) for n in rng.integers(5, 400, 40)]  # nothing shared
    affinity = ReplicaAffinity(2, CAPACITY, MIN_SHARED)
    for _ in range(3):
        assert shares(affinity, seqs) == shares(None, seqs)
    assert all(len(r.held) == 0 for r in affinity.replicas)
    units = layout()._units(seqs, range(len(seqs)), cap=100_000)
    assert ReplicaAffinity(2, CAPACITY, MIN_SHARED).assign(seqs, units) == least_loaded([c for _, c in units], 2)


def test_a_group_goes_where_its_prompt_went_unless_that_unbalances_the_replicas():
    rng = np.random.default_rng(1)
    prompt_a, prompt_b = ids(rng, 400), ids(rng, 400)
    group_a = [np.concatenate([prompt_a, ids(rng, 30)]) for _ in range(4)]
    group_b = [np.concatenate([prompt_b, ids(rng, 30)]) for _ in range(4)]
    affinity = ReplicaAffinity(2, CAPACITY, MIN_SHARED)
    first = shares(affinity, group_a[:2] + group_b[:2])  # one group per replica
    where_a = 0 if 0 in first[0] else 1
    # the rest of both groups, listed the other way round: each goes back to its prompt's replica
    later = group_b[2:] + group_a[2:]
    second = shares(affinity, later)
    assert sorted(second[where_a]) == [2, 3] and sorted(second[1 - where_a]) == [0, 1], (first, second)
    assert shares(None, later) != second or where_a == 1  # the size-only rule ignores where the prompts are
    # a group larger than a replica's forward budget is cut into pieces, spread over the replicas
    big = [np.concatenate([prompt_a[:40], ids(rng, 600)]) for _ in range(6)]  # 3,640 tokens of trie
    split = layout(budget=2000).replica_shares(big, 2, affinity)
    assert split[0] and split[1], split


def test_a_group_within_a_replicas_budget_stays_on_one_replica_even_alone():
    """A lone GRPO group (8 responses to a 300-token prompt) on 2 replicas: one replica computes the prompt once,
    where an even split would compute it on both."""
    rng = np.random.default_rng(5)
    prompt = ids(rng, 300)
    group = [np.concatenate([prompt, ids(rng, int(n))]) for n in rng.integers(60, 90, 8)]
    for affinity in (None, ReplicaAffinity(2, CAPACITY, MIN_SHARED)):
        got = layout(budget=16384).replica_shares(group, 2, affinity)
        assert sorted(len(g) for g in got) == [0, 8], got
    # beside another group, each stays whole and the two go to different replicas
    other_prompt = ids(rng, 300)
    other = [np.concatenate([other_prompt, ids(rng, 70)]) for _ in range(8)]
    got = layout(budget=16384).replica_shares(group + other, 2, None)
    assert sorted(sorted(g) for g in got) == [list(range(8)), list(range(8, 16))], got


def test_every_rank_computes_the_same_shares():
    rng = np.random.default_rng(2)
    ranks = [ReplicaAffinity(2, 3000, MIN_SHARED) for _ in range(3)]  # a small ring: entries come and go
    for depth in tree_depths(rng, depths=6):
        got = [shares(a, depth) for a in ranks]
        assert got[0] == got[1] == got[2]
    assert [sorted(r.held.entries) for r in ranks[0].replicas] == [sorted(r.held.entries) for r in ranks[2].replicas]


def groups(rng, n, prompt=300, response=20):
    """`n` groups of two sequences sharing a prompt (two per forward: a group is not more than a replica's share)."""
    out = []
    for _ in range(n):
        p = ids(rng, prompt)
        out += [np.concatenate([p, ids(rng, response)]) for _ in range(2)]
    return out


def test_the_record_forgets_what_the_ring_evicts():
    rng = np.random.default_rng(3)
    affinity = ReplicaAffinity(2, 1000, MIN_SHARED)
    old = groups(rng, 2)
    shares(affinity, old)
    assert all(sorted([r.held.longest(old[0])[0], r.held.longest(old[2])[0]]) == [0, 320] for r in affinity.replicas)
    for _ in range(3):  # two groups of 340 new tokens each, one per replica: 1,020 tokens on each replica's clock
        shares(affinity, groups(rng, 2))
    assert not any(r.held.longest(s)[0] for r in affinity.replicas for s in old)
    assert all(r.written == 4 * 340 and len(r.held) == 4 for r in affinity.replicas)


@pytest.fixture(scope="module")
def llama(llama_ckpt):
    return AutoModelForSequenceClassification.from_pretrained(llama_ckpt, dtype=torch.float32).eval()


def score_on_two_replicas(model, depths, affinity):
    """Each depth one forward, split over two scorers (each its own prefix cache) as two replicas would be."""
    replicas = [scalar_scorer(model, budget=4096) for _ in range(2)]
    rewards = {}
    for depth in depths:
        for r, share in enumerate(shares(affinity, depth)):
            if share:
                out = replicas[r]([torch.from_numpy(depth[i]) for i in share]).numpy()
                rewards.update({depth[i].tobytes(): row for i, row in zip(share, out)})
    return rewards, sum(s.computed_tokens for s in replicas), [s.computed_tokens for s in replicas]


def test_a_search_tree_on_two_replicas_computes_fewer_tokens_and_rewards_stay_exact(llama, llama_ckpt):
    depths = tree_depths(np.random.default_rng(4), depths=4)
    spread, spread_total, _ = score_on_two_replicas(llama, depths, None)
    steered, steered_total, each = score_on_two_replicas(llama, depths, ReplicaAffinity(2, 32768, MIN_SHARED))
    received = sum(len(s) for d in depths for s in d)
    print(f"tokens received {received}, computed: size-only {spread_total}, with the record {steered_total} {each}")
    assert steered_total < 0.8 * spread_total, (steered_total, spread_total)
    assert min(each) > 0.3 * max(each), each  # both replicas work
    seqs = [s for d in depths for s in d]
    expected = reference_rewards(llama_ckpt, seqs)
    np.testing.assert_allclose(np.stack([steered[s.tobytes()] for s in seqs]), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.stack([spread[s.tobytes()] for s in seqs]), expected, atol=1e-5, rtol=0)


def test_random_traffic_with_duplicates_on_two_replicas_with_small_rings_stays_exact(llama, llama_ckpt):
    """Like tests/test_load.py, in process: requests of 1-4 sequences drawn from a pool of 128 (1-70 tokens, so
    duplicates and cached sequences are common), forwards planned by the scheduler with the record's cached counts,
    split over two replicas whose 500-token rings wrap every few forwards. Every reward equals transformers'.
    (Before the prefix cache read its hidden states ahead of storing, this found hundreds of wrong rows.)"""
    from collections import deque
    from concurrent.futures import Future

    from reward_server.engine import Work, plan_forward

    rng = np.random.default_rng(0)
    pool = [ids(rng, int(n)) for n in rng.integers(1, 71, 128)]
    reward_of = {p.tobytes(): r for p, r in zip(pool, reference_rewards(llama_ckpt, pool)[:, 0])}
    replicas = [scorer_with_cache(llama, 500, budget=2048) for _ in range(2)]
    affinity, pending, rows = ReplicaAffinity(2, 500, MIN_SHARED), deque(), 0
    for _ in range(40):
        for _ in range(int(rng.integers(1, 30))):
            work = Work([torch.from_numpy(pool[i]) for i in rng.integers(0, len(pool), int(rng.integers(1, 5)))],
                        Future(), alone=False)
            pending.append(work)
        picked, _ = plan_forward(pending, int(rng.integers(50, 3000)), True, MIN_SHARED, affinity.held)
        batch = [w.seqs[i].numpy() for w, i in picked]
        for r, share in enumerate(layout(2048).replica_shares(batch, 2, affinity)):
            if share:
                got = replicas[r]([torch.from_numpy(batch[i]) for i in share]).numpy()[:, 0]
                want = [reward_of[batch[i].tobytes()] for i in share]
                np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
                rows += len(share)
        for w in {id(w): w for w, _ in picked}.values():
            if not w.untaken:
                pending.remove(w)
    assert rows > 500 and all(s.cache.written > 3 * 500 for s in replicas), rows
    assert sum(s.reused_tokens for s in replicas) > 0
