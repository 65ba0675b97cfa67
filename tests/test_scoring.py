"""In-process scorers (no server): packed and padded layouts equal a plain per-sequence forward."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import reference_rewards
from reward_server.model import PackedSequenceScorer, SequenceScorer, micro_batches, pack

LENGTHS = [1, 5, 300, 17, 100, 2, 512, 64, 511, 3]


@pytest.fixture(scope="module")
def model_and_seqs(llama_ckpt):
    rng = np.random.default_rng(1)
    seqs = [rng.integers(4, 512, n) for n in LENGTHS]
    model = AutoModelForSequenceClassification.from_pretrained(llama_ckpt, dtype=torch.float32).eval()
    return model, seqs, reference_rewards(llama_ckpt, seqs)


@pytest.mark.parametrize("scorer_cls", [PackedSequenceScorer, SequenceScorer])
@pytest.mark.parametrize("budget", [64, 700, 4096])
def test_scorer_matches_plain_forward(model_and_seqs, scorer_cls, budget):
    model, seqs, expected = model_and_seqs
    # packed: several rows per forward, shorter rows with pad tails
    extra = {"row_tokens": budget // 2} if scorer_cls is PackedSequenceScorer else {}
    scorer = scorer_cls(model, model.config.pad_token_id, budget, torch.device("cpu"), **extra)
    got = scorer([torch.as_tensor(s) for s in seqs]).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_all_ones_mask_on_packed_rows_would_leak(model_and_seqs):
    """The trap the packed layout avoids: with an all-ones attention mask transformers does not detect packed
    rows from position_ids, and later sequences attend to earlier ones. Our comparison must catch that."""
    model, seqs, expected = model_and_seqs
    a, b = torch.as_tensor(seqs[2]), torch.as_tensor(seqs[3])
    ids = torch.cat([a, b])[None]
    positions = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None]
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids),
                                  use_cache=False).last_hidden_state[0]
        leaked = model.score(hidden[-1]).item()
    assert abs(leaked - expected[3, 0]) > 1e-3


def test_packing_and_micro_batches_respect_budget():
    lengths = [int(n) for n in np.random.default_rng(0).integers(1, 300, 200)]
    rows = pack(lengths, 1000)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 1000 for r in rows)
    assert sum(lengths) / (1000 * len(rows)) > 0.95  # first-fit decreasing leaves little room unused
    for mb in micro_batches(lengths, 1000):
        assert len(mb) == 1 or len(mb) * max(lengths[i] for i in mb) <= 1000


def test_compiled_layers_match_plain_forward(model_and_seqs, llama_ckpt):
    """model.compile=true: every decoder layer under torch.compile with dynamic shapes; forwards of several
    lengths give the plain forward's rewards, from one compiled graph (no recompilation per length)."""
    from torch._dynamo.utils import counters

    from reward_server.config import ModelConfig
    from reward_server.distributed import Topology
    from reward_server.model import load_pretrained

    _, seqs, expected = model_and_seqs
    topo = Topology(rank=0, world_size=1, tp_size=1, dp_size=1, device=torch.device("cpu"))
    model, _ = load_pretrained(AutoModelForSequenceClassification, ModelConfig(path=llama_ckpt, compile=True), topo)
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in model.base_model.layers)
    scorer = PackedSequenceScorer(model, model.config.pad_token_id, 700, torch.device("cpu"), row_tokens=700)
    torch._dynamo.reset()
    counters.clear()
    got = scorer([torch.as_tensor(s) for s in seqs]).numpy()  # forwards of several lengths
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
