"""In-process scorers (no server): every layout, with and without prefix sharing, equals a plain per-sequence
forward; the trie layout's pieces (scoring/trie.py, scoring/layout.py) against brute force."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from oracles import TinyPRM, reference_rewards, save_prm_checkpoint, scalar_scorer, sharing_cases
from reward_server.config import BatchingConfig
from reward_server.scoring.layout import Layout, micro_batches
from reward_server.scoring.trie import PrefixIndex, TrieRow, first_fit_decreasing, trie_order

LENGTHS = [1, 5, 300, 17, 100, 2, 512, 64, 511, 3]


@pytest.fixture(scope="module")
def llama(llama_ckpt):
    return AutoModelForSequenceClassification.from_pretrained(llama_ckpt, dtype=torch.float32).eval()


# ---------------------------------------------------------------- the trie against brute force

def random_family(rng, alphabet=3):
    """Sequences over a tiny alphabet built from a few shared stems: many shared prefixes, duplicates, prefixes."""
    stems = [rng.integers(0, alphabet, rng.integers(1, 8)) for _ in range(3)]
    seqs = []
    for _ in range(rng.integers(1, 10)):
        stem = stems[rng.integers(0, 3)]
        seq = np.concatenate([stem[:rng.integers(0, len(stem) + 1)], rng.integers(0, alphabet, rng.integers(0, 4))])
        seqs.append(seq.astype(np.int64) if len(seq) else np.array([1], np.int64))
    return seqs


def prefixes(seqs):
    return {tuple(s[:t + 1]) for s in seqs for t in range(len(s))}


def test_trie_row_gives_each_token_exactly_its_own_sequence():
    rng = np.random.default_rng(0)
    for _ in range(300):
        seqs = random_family(rng)
        row = TrieRow(seqs, *trie_order(seqs))
        assert len(row) == len(prefixes(seqs))  # every distinct prefix once
        sees = [[k for k in range(len(row)) if k <= q <= row.ends[k]] for q in range(len(row))]
        for j, m in enumerate(row.members):
            path = row.paths[j]
            assert (row.ids[path] == seqs[m]).all() and (row.positions[path] == np.arange(len(seqs[m]))).all()
            for t in range(len(path)):  # token t sees its own sequence's tokens 0..t and nothing else
                assert sees[path[t]] == sorted(path[:t + 1].tolist())


def test_prefix_index_cost_is_what_the_trie_grows_by():
    rng = np.random.default_rng(1)
    for _ in range(200):
        seqs = random_family(rng)
        index, taken = PrefixIndex(seqs, 2), []
        for i in rng.permutation(len(seqs)):
            grows = len(prefixes([seqs[k] for k in taken] + [seqs[i]])) - len(prefixes([seqs[k] for k in taken]))
            assert index.cost(i) == grows
            index.take(i)
            taken.append(i)
        for i in range(len(seqs)):  # a group: sorted neighbours sharing >= 2 tokens, transitively
            assert i in index.group_of(i).tolist()


def test_layout_calls_cover_every_sequence_within_the_budget():
    cases = sharing_cases()
    seqs = [s for case in cases.values() for s in case]
    for kind, sharing, row_tokens in [("packed", True, 256), ("packed", False, 256), ("packed", True, 0),
                                      ("padded", False, 0)]:
        layout = Layout(kind, 512, 0, row_tokens=row_tokens, sharing=sharing, pad_multiple=128)
        calls = list(layout.calls(seqs))
        members = sorted(int(m) for c in calls for m in c.members)
        assert members == list(range(len(seqs)))
        for c in calls:
            assert c.ids.size <= 512 or len(c.members) == 1 or c.ids.shape[0] == 1
            for j, m in enumerate(c.members):  # every token where the layout says it is
                np.testing.assert_array_equal(c.ids.reshape(-1)[c.index(np.full(len(seqs[m]), j),
                                                                        np.arange(len(seqs[m])))], seqs[m])
        if kind == "packed" and sharing:
            assert sum(c.computed for c in calls) < sum(len(s) for s in seqs) * 0.7
    assert all(len(b) == 1 or len(b) * max(LENGTHS[i] for i in b) <= 1000 for b in micro_batches(LENGTHS, 1000))
    bins = first_fit_decreasing(LENGTHS, 600)
    assert sorted(i for b in bins for i in b) == list(range(len(LENGTHS)))


def test_replica_shares_keep_a_group_together_and_balance_tokens():
    rng = np.random.default_rng(2)
    groups = [[np.concatenate([p, rng.integers(4, 500, int(n))]) for n in rng.integers(5, 60, 8)]
              for p in (rng.integers(4, 500, 300) for _ in range(4))]
    seqs = [s for g in groups for s in g]
    order = rng.permutation(len(seqs))
    seqs = [seqs[i] for i in order]
    group_of = {int(j): int(order[j]) // 8 for j in range(len(seqs))}
    shares = Layout("packed", 4096, 0).replica_shares(seqs, 2)
    assert sorted(i for s in shares for i in s) == list(range(len(seqs)))
    for share in shares:
        assert len({group_of[i] for i in share}) == 2  # two whole groups each
    off = Layout("packed", 4096, 0, sharing=False).replica_shares(seqs, 2)
    loads = [sum(len(seqs[i]) for i in s) for s in off]
    assert max(loads) - min(loads) <= max(len(s) for s in seqs)


# ---------------------------------------------------------------- scorers against a plain forward

@pytest.mark.parametrize("layout,sharing,budget,row_tokens", [
    ("packed", True, 512, 0), ("packed", True, 4096, 0), ("packed", True, 512, 256), ("packed", False, 512, 0),
    ("padded", False, 700, 0)], ids=["shared", "shared-one-call", "shared-short-rows", "not-shared", "padded"])
def test_every_layout_matches_a_plain_forward_on_shared_prefixes(llama, llama_ckpt, layout, sharing, budget,
                                                                 row_tokens):
    cases = sharing_cases()
    seqs = [s for case in cases.values() for s in case]
    expected = reference_rewards(llama_ckpt, seqs)
    got = scalar_scorer(llama, layout, sharing, budget, row_tokens)([torch.from_numpy(s) for s in seqs]).numpy()
    at = 0
    for name, case in cases.items():
        np.testing.assert_allclose(got[at:at + len(case)], expected[at:at + len(case)], atol=1e-5, rtol=0,
                                   err_msg=name)
        at += len(case)


@pytest.mark.parametrize("layout,sharing", [("packed", True), ("packed", False), ("padded", False)],
                         ids=["shared", "not-shared", "padded"])
def test_pooling_follows_transformers_or_takes_the_true_last_token(llama, llama_ckpt, layout, sharing):
    """Sequences ending in the pad token (once, three times, only pad tokens, pad inside), also as prefixes of
    others: model.pooling=last_non_pad equals transformers' own pooling, model.pooling=last a forward read at the
    true last token."""
    pad = llama.config.pad_token_id
    assert pad is not None
    rng = np.random.default_rng(3)
    body = rng.integers(4, 500, 60)
    body = body[body != pad]
    seqs = [np.append(body, pad), np.concatenate([body, [pad] * 3]), np.full(5, pad), body.copy(),
            np.concatenate([body[:20], [pad], body[20:]]), np.concatenate([body, [pad], body[:10]]),
            np.concatenate([body[:30], [pad, pad]])]
    hf = reference_rewards(llama_ckpt, seqs)
    got = scalar_scorer(llama, layout, sharing)([torch.from_numpy(s) for s in seqs]).numpy()
    np.testing.assert_allclose(got, hf, atol=1e-5, rtol=0)
    assert not np.allclose(hf[0], reference_rewards_without_pad(llama_ckpt, seqs[:1])[0], atol=1e-3)  # it matters

    true_last = reference_rewards_without_pad(llama_ckpt, seqs)
    got = scalar_scorer(llama, layout, sharing, pooling="last")([torch.from_numpy(s) for s in seqs]).numpy()
    np.testing.assert_allclose(got, true_last, atol=1e-5, rtol=0)


def reference_rewards_without_pad(path, seqs):
    """transformers' forward with config.pad_token_id unset: it then pools each sequence's last token."""
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    model.config.pad_token_id = None
    with torch.no_grad():
        return np.stack([model(input_ids=torch.as_tensor(s)[None]).logits[0].float().numpy() for s in seqs])


def test_eager_attention_takes_the_additive_tree_mask(llama_ckpt):
    model = AutoModelForSequenceClassification.from_pretrained(llama_ckpt, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    seqs = sharing_cases(seed=1)["grpo group"] + sharing_cases(seed=1)["duplicates"]
    got = scalar_scorer(model)([torch.from_numpy(s) for s in seqs]).numpy()
    np.testing.assert_allclose(got, reference_rewards(llama_ckpt, seqs), atol=1e-5, rtol=0)


def test_flex_attention_block_mask_on_the_cpu(llama_ckpt):
    """The GPU default (flex_attention, our BlockMask from the trie) run on the CPU: compiles (tens of seconds)."""
    model = AutoModelForSequenceClassification.from_pretrained(llama_ckpt, dtype=torch.float32,
                                                               attn_implementation="flex_attention").eval()
    cases = sharing_cases(seed=2)
    seqs = cases["grpo group"] + cases["tree 3 deep"][:7] + cases["prefix of another"]
    scorer = scalar_scorer(model, budget=1024)
    assert scorer.layout.pad_multiple == 128 and scorer.layout.row_tokens == 1024
    got = scorer([torch.from_numpy(s) for s in seqs]).numpy()
    np.testing.assert_allclose(got, reference_rewards(llama_ckpt, seqs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["mistral", "qwen2-mixed"])
def test_sliding_window_models_get_the_window_in_the_tree_mask(tmp_path, arch):
    """Windows shorter than the sequences: Mistral's on every layer (one mask), Qwen2's on its upper layers only
    (config.layer_types: one mask per kind of layer). The tree mask applies each per sequence."""
    from transformers import (MistralConfig, MistralForSequenceClassification, Qwen2Config,
                              Qwen2ForSequenceClassification)

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, sliding_window=48, num_labels=1, pad_token_id=0)
    if arch == "mistral":
        model = MistralForSequenceClassification(MistralConfig(**common))
    else:
        model = Qwen2ForSequenceClassification(Qwen2Config(**common, use_sliding_window=True, max_window_layers=1))
        assert set(model.config.layer_types) == {"full_attention", "sliding_attention"}
    torch.manual_seed(0)
    model.save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    seqs = sharing_cases(seed=3)["grpo group"]
    got = scalar_scorer(model)([torch.from_numpy(s) for s in seqs]).numpy()
    expected = reference_rewards(tmp_path, seqs)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    no_window = dict(sliding_window=None) if arch == "mistral" else dict(layer_types=["full_attention"] * 2)
    unwindowed = reference_rewards_without_window(tmp_path, seqs, **no_window)
    assert np.abs(unwindowed - expected).max() > 1e-3  # the window matters for these lengths


def reference_rewards_without_window(path, seqs, **config):
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, **config).eval()
    with torch.no_grad():
        return np.stack([model(input_ids=torch.as_tensor(s)[None]).logits[0].numpy() for s in seqs])


@pytest.mark.parametrize("layout,sharing", [("packed", True), ("packed", False), ("padded", False)])
def test_step_scores_for_every_layout_with_tags_in_shared_prefixes(tmp_path_factory, layout, sharing):
    """A PRM's step scores (softmax over two candidate tokens at every step tag) equal a plain causal-LM forward
    in every layout; a tag inside a shared prefix is read for every sequence that contains it."""
    prm = TinyPRM(tmp_path_factory.mktemp("prm"))
    solution = prm.steps(3)
    seqs = [np.concatenate([solution, prm.steps(k)]) for k in (1, 2, 1)] + [solution.copy(), solution[:20].copy()]
    seqs = [s for s in seqs if (s == prm.tag).any()]
    scorer = prm.scorer(BatchingConfig(layout=layout, prefix_sharing=sharing, max_tokens_per_forward=256))
    prm.check(scorer([torch.from_numpy(s) for s in seqs]).numpy(), seqs)


def test_all_ones_mask_on_packed_rows_would_leak(llama, llama_ckpt):
    """The trap a packed layout must avoid: with an all-ones attention mask, later sequences attend to earlier ones
    in the row. Our comparisons must catch that."""
    rng = np.random.default_rng(1)
    a, b = torch.as_tensor(rng.integers(4, 512, 300)), torch.as_tensor(rng.integers(4, 512, 17))
    ids = torch.cat([a, b])[None]
    positions = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None]
    with torch.no_grad():
        hidden = llama.base_model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids),
                                  use_cache=False).last_hidden_state[0]
        leaked = llama.score(hidden[-1]).item()
    assert abs(leaked - reference_rewards(llama_ckpt, [b.numpy()])[0, 0]) > 1e-3


def test_compiled_layers_do_not_recompile_after_the_warm_up(llama_ckpt):
    """model.compile=true: the warm-up compiles every graph the forwards need (separate and shared sequences, several
    lengths); later forwards of other lengths and sharing patterns compile nothing new and match the plain forward."""
    from torch._dynamo.utils import counters

    from reward_server.config import ModelConfig
    from reward_server.distributed import Topology
    from reward_server.loading.model import load_pretrained, quantize_and_compile
    from reward_server.scoring.scorer import warm_up

    topo = Topology(rank=0, world_size=1, tp_size=1, dp_size=1, device=torch.device("cpu"))
    model, _ = load_pretrained(AutoModelForSequenceClassification, ModelConfig(path=llama_ckpt), topo)
    quantize_and_compile(model, ModelConfig(compile=True), topo)
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in model.base_model.layers)
    scorer = scalar_scorer(model, budget=700)
    torch._dynamo.reset()
    counters.clear()
    warm_up(scorer, model.config.vocab_size, 700)
    after_warm_up = dict(counters["stats"])
    cases = sharing_cases(seed=4)
    seqs = [s for case in cases.values() for s in case][:40]
    got = scorer([torch.from_numpy(s) for s in seqs]).numpy()
    np.testing.assert_allclose(got, reference_rewards(llama_ckpt, seqs), atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == after_warm_up["unique_graphs"], dict(counters["stats"])
    # one graph per shape kind (and the prefix cache's break around the KV cache call), not one per layer
    assert 1 <= counters["stats"]["unique_graphs"] <= 8
    assert not counters.get("recompile_limit"), dict(counters)


def test_prm_load_and_warm_up_compile_once_per_shape_kind(tmp_path):
    """A PRM with compiled layers: its head check at load runs before the layers are compiled and without a KV cache
    (a cache object per layer made the shared layer code recompile up to dynamo's limit: the recompile-limit warnings
    of a PRM server's start-up); after the warm-up, forwards of new lengths and sharing patterns compile nothing new."""
    from torch._dynamo.utils import counters

    from reward_server.config import ModelConfig, RewardConfig
    from reward_server.distributed import Topology
    from reward_server.kinds.prm import load_step_scorer
    from reward_server.scoring.scorer import warm_up

    ckpt = save_prm_checkpoint(tmp_path, "LlamaForCausalLM", seed=3)
    topo = Topology(rank=0, world_size=1, tp_size=1, dp_size=1, device=torch.device("cpu"))
    torch._dynamo.reset()
    counters.clear()
    scorer, _, config = load_step_scorer(ModelConfig(path=ckpt, compile=True), RewardConfig(kind="prm"),
                                         BatchingConfig(max_tokens_per_forward=512), topo)
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])  # the head check runs before compiling
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in scorer.backbone.layers)
    warm_up(scorer, config.vocab_size, 512)
    graphs = counters["stats"]["unique_graphs"]
    tag = scorer.readout.tag.ids
    rng = np.random.default_rng(0)
    prefix = np.concatenate([rng.integers(20, config.vocab_size, 40), tag])
    seqs = [np.concatenate([prefix, rng.integers(20, config.vocab_size, n), tag]) for n in (3, 70, 150)]
    scorer([torch.from_numpy(s) for s in seqs])
    assert counters["stats"]["unique_graphs"] == graphs <= 8, dict(counters["stats"])
