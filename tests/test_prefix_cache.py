"""Prefix reuse across forwards (scoring/prefix_cache.py), in one process, fp32 on the CPU: sequences that share a
prefix with ones scored in earlier forwards (a GRPO group split over forwards, a search tree scored depth by depth,
a prefix of an earlier sequence, a duplicate) get the rewards and step scores of each sequence scored alone by
plain transformers (1e-5), for every model family the server supports; a small cache gives tokens up and stays
exact, a shared prompt outliving its responses; traffic that shares nothing never takes the cache's path; a failed call forgets what it planned; compiled layers with
flex_attention compile nothing after the warm-up."""

import numpy as np
import pytest
import torch

from oracles import FAMILIES, TinyPRM, load_model, reference_rewards, scalar_scorer, scorer_with_cache, sharing_cases
from reward_server.config import BatchingConfig
from reward_server.scoring.scorer import warm_up

ATOL = 1e-5


def forwards_of(cases):
    """The cases as a sequence of forwards in which later ones extend what earlier ones scored."""
    grpo, tree, prefix, dup = (cases[k] for k in ("grpo group", "tree 3 deep", "prefix of another", "duplicates"))
    level1 = [s for i, s in enumerate(tree) if i % 7 == 0]
    level2 = [s for i, s in enumerate(tree) if i % 7 in (1, 4)]
    level3 = [s for i, s in enumerate(tree) if i % 7 not in (0, 1, 4)]
    return [grpo[:2], grpo[2:5], grpo[5:],  # a group over three forwards, the last one alone
            level1, level2, level3,  # a tree depth by depth
            [prefix[0], prefix[2]], [prefix[1]],  # a longer sequence after its prefix
            dup[:2], dup[2:],  # a duplicate of a cached sequence beside an unrelated one
            cases["nothing shared"]]


def score_in_forwards(scorer, forwards):
    return np.concatenate([scorer([torch.from_numpy(s) for s in f]).numpy() for f in forwards])


@pytest.mark.parametrize("arch", FAMILIES)
def test_sequences_extending_earlier_forwards_match_each_scored_alone(checkpoints, arch):
    model = load_model(checkpoints[arch])
    forwards = forwards_of(sharing_cases(seed=11))
    scorer = scalar_scorer(model, budget=512)
    got = score_in_forwards(scorer, forwards)
    expected = reference_rewards(checkpoints[arch], [s for f in forwards for s in f])
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    assert scorer.cache.reused_tokens > 1000, scorer.cache.reused_tokens


def test_step_scores_at_tags_inside_cached_prefixes(tmp_path):
    """A PRM: the tags of a solution scored in one forward are read from the cache in the next, for the candidates
    that extend it and for the solution itself sent again."""
    prm = TinyPRM(tmp_path)
    solution = prm.steps(4)
    forwards = [[np.concatenate([solution, prm.steps(1)]), np.concatenate([solution, prm.steps(2)])],
                [np.concatenate([solution, prm.steps(k)]) for k in (1, 3)] + [solution.copy()]]
    scorer = prm.scorer(BatchingConfig(max_tokens_per_forward=256))
    for seqs in forwards:
        prm.check(scorer([torch.from_numpy(s) for s in seqs]).numpy(), seqs, ATOL)
    assert scorer.cache.reused_tokens >= len(solution)  # trie nodes: the solution once, shared by the three


def check_slots(cache):
    """Every slot is free or held by exactly one node; every node's slots are real ones."""
    held, stack = [], [cache.tree.root]
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        assert len(node.slots) == len(node.ids) and (node is cache.tree.root or node.slots.min() >= 0)
        held.extend(node.slots.tolist())
    assert sorted(held + cache.tree.free) == list(range(cache.capacity))


def tiny_model(llama_ckpt):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(llama_ckpt, dtype=torch.float32).eval()


def test_a_small_cache_gives_tokens_up_and_stays_exact(llama_ckpt):
    scorer = scorer_with_cache(tiny_model(llama_ckpt), capacity=300)
    forwards = forwards_of(sharing_cases(seed=12)) * 2
    got = score_in_forwards(scorer, forwards)
    np.testing.assert_allclose(got, reference_rewards(llama_ckpt, [s for f in forwards for s in f]), atol=ATOL, rtol=0)
    cache = scorer.cache
    assert cache.reused_tokens > 0 and cache.written > 3 * cache.capacity
    check_slots(cache)


def test_a_shared_prompt_outlives_its_responses_and_stays_exact(llama_ckpt):
    """A GRPO group's first two members, then a forward of other work that needs more room than there is: the
    cache gives up the members' responses, then one of that forward's own new responses, and keeps the prompt (a
    ring would have dropped it with the first responses), so the group's late member computes only its response,
    with the reward of a plain forward."""
    scorer = scorer_with_cache(tiny_model(llama_ckpt), capacity=400)
    rng = np.random.default_rng(21)
    prompt, stem = rng.integers(4, 500, 100), rng.integers(4, 500, 40)
    group = [np.concatenate([prompt, rng.integers(4, 500, 60)]) for _ in range(3)]
    other = [np.concatenate([stem, rng.integers(4, 500, 150)]) for _ in range(2)]
    forwards = [group[:2], other, group[2:]]
    cache = scorer.cache
    got = [scorer([torch.from_numpy(s) for s in forwards[0]]).numpy()]
    assert cache.written == 220
    got.append(scorer([torch.from_numpy(s) for s in forwards[1]]).numpy())  # 340 new tokens, 180 free
    assert cache.lookup(group[0])[0] == 100 == cache.lookup(group[1])[0]  # the responses went, the prompt stayed
    assert sorted(cache.lookup(s)[0] for s in other) == [40, 190] and cache.written == 220 + 190
    reused = cache.reused_tokens
    got.append(scorer([torch.from_numpy(s) for s in forwards[2]]).numpy())
    assert cache.reused_tokens - reused == 100 and scorer.computed_tokens == 220 + 340 + 60
    np.testing.assert_allclose(np.concatenate(got), reference_rewards(llama_ckpt, [s for f in forwards for s in f]),
                               atol=ATOL, rtol=0)
    check_slots(cache)


def test_a_call_larger_than_the_free_room_keeps_its_own_context(llama_ckpt):
    """A sequence scored again, all of it cached (its last token's final hidden state is its reward), beside more
    new tokens than the cache holds: the cache keeps the nodes the call reads and stores only the new tokens that
    fit. (With a ring, the call's new tokens wrapped onto that token's slot: seen in tests/test_load.py's CI run,
    one 32-token duplicate got another reward.)"""
    scorer = scorer_with_cache(tiny_model(llama_ckpt), capacity=300)
    rng = np.random.default_rng(13)
    a = rng.integers(4, 500, 40).astype(np.int64)
    stem = rng.integers(4, 500, 40).astype(np.int64)
    forwards = [[a, np.concatenate([a, rng.integers(4, 500, 5)])],  # stored: 45 slots
                [a] + [np.concatenate([stem, rng.integers(4, 500, 130)]) for _ in range(2)]]  # 300 new tokens
    got = score_in_forwards(scorer, forwards)
    assert scorer.cache.lookup(a)[0] == 40 and scorer.computed_tokens == 345
    np.testing.assert_allclose(got, reference_rewards(llama_ckpt, [s for f in forwards for s in f]), atol=ATOL, rtol=0)
    check_slots(scorer.cache)


def test_traffic_that_shares_nothing_does_not_take_the_cache_path(llama_ckpt):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(llama_ckpt, dtype=torch.float32).eval()
    scorer = scalar_scorer(model, budget=512)
    seqs = sharing_cases(seed=13)["nothing shared"]
    for _ in range(2):  # a single sequence, or several sharing nothing: run as without the cache, not stored
        got = np.concatenate([scorer([torch.from_numpy(seqs[0])]).numpy(),
                              scorer([torch.from_numpy(s) for s in seqs[1:]]).numpy()])
        np.testing.assert_allclose(got, reference_rewards(llama_ckpt, seqs), atol=ATOL, rtol=0)
    assert len(scorer.cache) == 0 and scorer.cache.written == 0 and scorer.cache.reused_tokens == 0


def test_a_failed_call_forgets_its_entries(llama_ckpt):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(llama_ckpt, dtype=torch.float32).eval()
    scorer = scalar_scorer(model, budget=512)
    group = sharing_cases(seed=14)["grpo group"]
    scorer([torch.from_numpy(s) for s in group[:2]])
    assert len(scorer.cache) == 2
    backbone = scorer.backbone

    def broken(**kwargs):
        raise RuntimeError("injected")

    scorer.backbone = broken
    with pytest.raises(RuntimeError, match="injected"):
        scorer([torch.from_numpy(s) for s in group[2:4]])
    assert len(scorer.cache) == 0  # its slots were never written: nothing may point at them
    scorer.backbone = backbone
    got = scorer([torch.from_numpy(s) for s in group]).numpy()
    np.testing.assert_allclose(got, reference_rewards(llama_ckpt, group), atol=ATOL, rtol=0)


def test_flex_attention_masks_compile_nothing_after_the_warm_up(llama_ckpt):
    """flex_attention (the GPU's attention) on the CPU: the warm-up covers the block-mask shapes a search tree and
    split groups bring (context of several blocks, new tokens within one block or several); serving them then
    compiles no graph. On the GPU a call whose new tokens fit one block recompiled the mask and the layers while
    serving (a stall of seconds). The layers are not compiled here: inductor's CPU code for flex_attention with
    these masks does not build (torch 2.13), and the GPU's Triton code does."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(llama_ckpt, dtype=torch.float32,
                                                               attn_implementation="flex_attention").eval()
    budget = 1024
    scorer = scalar_scorer(model, budget=budget)
    torch._dynamo.reset()
    counters.clear()
    warm_up(scorer, model.config.vocab_size, budget)
    assert len(scorer.cache) == 0  # the warm-up's synthetic entries are forgotten
    graphs = counters["stats"]["unique_graphs"]
    cases = sharing_cases(seed=15)
    short = np.random.default_rng(16).integers(4, 512, 40)  # a call within one block, sharing only within itself
    forwards = forwards_of(cases) + [[s] for s in cases["grpo group"]] + [[np.append(short, [5, 6]), np.append(short, 7)]]
    got = score_in_forwards(scorer, forwards)
    np.testing.assert_allclose(got, reference_rewards(llama_ckpt, [s for f in forwards for s in f]), atol=ATOL, rtol=0)
    assert scorer.cache.reused_tokens > 1000
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    assert not counters.get("recompile_limit"), dict(counters)


def test_a_negative_capacity_is_refused_in_one_line(llama_ckpt):
    from transformers import AutoModelForSequenceClassification

    from reward_server.loading.checkpoint import StartupError

    model = AutoModelForSequenceClassification.from_pretrained(llama_ckpt, dtype=torch.float32).eval()
    with pytest.raises(StartupError, match=r"batching.prefix_cache_tokens=-1: expected a number of tokens"):
        scorer_with_cache(model, capacity=-1)
    assert scorer_with_cache(model, capacity=0).cache is None
