"""Batch-invariant scoring (batching.batch_invariant, scoring/invariant.py), in one process on the CPU: with the mode
on, every sequence's rewards (a scalar RM, fp32 and bf16) and step rewards (a math-shepherd-style PRM) are the same
bits (np.array_equal, no tolerance) alone, beside unrelated sequences, inside its shared-prefix group, after its
group warmed a scorer, and repeated; with it off (the default packed layout, prefix cache on) the same comparison
finds differences, so the test can fail. The start-up self-test passes on this machine's kernels and refuses a
scorer whose bits differ."""

import numpy as np
import pytest
import torch

from oracles import TinyPRM, save_seqcls_checkpoint
from reward_server.config import BatchingConfig
from reward_server.loading.checkpoint import StartupError
from reward_server.scoring.invariant import mismatches, probe_sequences, self_test
from reward_server.scoring.readout import LastToken
from reward_server.scoring.scorer import build_scorer

BUDGET = 1024
WIDTH = 64  # columns every way's rows are compared at


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_seqcls_checkpoint(tmp_path_factory.mktemp("inv-llama"), "llama", seed=3)


def scalar(ckpt, dtype, invariant):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").eval()
    batching = BatchingConfig(max_tokens_per_forward=BUDGET, batch_invariant=invariant)
    pad = model.config.pad_token_id
    return lambda: build_scorer(model, LastToken(model.score, 1, pad), batching, pad, torch.device("cpu"))


def cases(tokens, seed=0):
    """Targets (a group's members sharing a 150-token prompt) and the sequences they are scored with."""
    rng = np.random.default_rng(seed)
    prompt = tokens(rng, 150)
    group = [np.concatenate([prompt, tokens(rng, n)]) for n in (40, 10, 77, 3, 129)]
    others = [tokens(rng, n) for n in (30, 200, 7, 300)]
    return group, others


def each_way(make, group, others):
    """{way: rows of the group's sequences} for the ways a sequence can be batched, shared or cached with."""
    def score(scorer, seqs):  # a PRM's width is the batch's most steps: every row widened to WIDTH columns
        out = scorer([torch.from_numpy(s) for s in seqs]).float().numpy()
        return np.pad(out, ((0, 0), (0, WIDTH - out.shape[1])))

    ways = {"alone": np.concatenate([score(make(), [s]) for s in group])}
    ways["beside others"] = np.concatenate([score(make(), [s] + others)[:1] for s in group])
    warm = make()
    ways["in its group"] = score(warm, group)
    ways["repeated (cache hit)"] = score(warm, group[::-1])[::-1]
    ways["one by one, warm cache"] = np.concatenate([score(warm, [s]) for s in group])
    ways["group split over forwards"] = np.concatenate([score(make(), group[:2]), score(warm, group[2:] + others)[:3]])
    return ways


def differing(ways):
    return [w for w, rows in ways.items() if not np.array_equal(rows, ways["alone"])]


def ids(rng, n):
    return rng.integers(4, 512, n).astype(np.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scalar_rewards_are_the_same_bits_every_way_with_the_mode_on(llama, dtype):
    group, others = cases(ids)
    assert differing(each_way(scalar(llama, dtype, True), group, others)) == []
    assert differing(each_way(scalar(llama, dtype, False), group, others)), "the default path was equal: no test"


def test_prm_step_rewards_are_the_same_bits_every_way_with_the_mode_on(tmp_path):
    prm = TinyPRM(tmp_path)

    def steps(rng, n):
        return prm.steps(max(1, n // 20))

    group, others = cases(steps, seed=1)
    on = each_way(lambda: prm.scorer(BatchingConfig(max_tokens_per_forward=BUDGET, batch_invariant=True)),
                  group, others)
    assert differing(on) == [] and on["alone"].shape[1] > 3 and (on["alone"] != 0).any()
    off = each_way(lambda: prm.scorer(BatchingConfig(max_tokens_per_forward=BUDGET)), group, others)
    assert differing(off)


def test_the_self_test_passes_here_and_refuses_differing_bits(llama):
    scorer = scalar(llama, torch.float32, True)()
    self_test(scorer, 512, BUDGET)  # this machine's kernels
    assert scorer.layout.sharing and scorer.cache is not None and len(scorer.cache) == 0  # the probes forgotten
    default = scalar(llama, torch.float32, False)()
    seqs = probe_sequences(512, BUDGET)
    wobbly = Wobbly(default)
    assert mismatches(wobbly, seqs, 512)
    with pytest.raises(StartupError, match="batch_invariant"):
        self_test(wobbly, 512, BUDGET)


class Wobbly:
    """A scorer whose rows move by one ulp with the batch size (as a split-K GEMM would)."""

    def __init__(self, scorer):
        self.scorer, self.cache = scorer, None

    def __call__(self, seqs):
        out = self.scorer(seqs)
        return torch.nextafter(out, torch.full_like(out, np.inf)) if len(seqs) > 1 else out


def test_the_mode_shares_prefixes_and_reuses_the_cache(llama):
    """With the mode on, a group's prompt is computed once (the tokens of its trie, as with the mode off), a
    repeat computes nothing, and an extension of a cached sequence computes only its new tokens."""
    group, others = cases(ids)
    trie = len(group[0]) - 40 + sum(len(s) - 150 for s in group)
    on, off = scalar(llama, torch.float32, True)(), scalar(llama, torch.float32, False)()
    for scorer in (on, off):
        scorer([torch.from_numpy(s) for s in group])
        assert scorer.computed_tokens == trie
    first = on([torch.from_numpy(s) for s in group]).numpy()
    assert on.computed_tokens == trie and on.reused_tokens == trie
    longer = np.concatenate([group[2], np.arange(4, 40)])
    on([torch.from_numpy(longer)])
    assert on.computed_tokens == trie + 36
    assert np.array_equal(first, scalar(llama, torch.float32, True)()([torch.from_numpy(s) for s in group]).numpy())


def test_trie_edge_cases_and_families_alone_and_together(tmp_path):
    """Every sharing case of the trie (a tree 3 deep, a sequence that is a prefix of another, duplicates, a prefix
    longer than the budget), on a model with sliding windows (mistral, every layer) and one with soft-capped
    logits and alternating layers (gemma2, eager): together the same bits as alone, and plain transformers'
    rewards within 1e-5."""
    from oracles import reference_rewards, sharing_cases
    from transformers import AutoModelForSequenceClassification

    seqs = [s for case in sharing_cases().values() for s in case]
    for arch, attn in (("mistral", "sdpa"), ("gemma2", "eager")):
        ckpt = save_seqcls_checkpoint(tmp_path / arch, arch, seed=2)
        model = AutoModelForSequenceClassification.from_pretrained(ckpt, dtype=torch.float32,
                                                                   attn_implementation=attn).eval()
        pad = model.config.pad_token_id
        batching = BatchingConfig(max_tokens_per_forward=512, batch_invariant=True)
        scorer = build_scorer(model, LastToken(model.score, 1, pad), batching, pad, torch.device("cpu"))
        together = scorer([torch.from_numpy(s) for s in seqs]).numpy()
        fresh = build_scorer(model, LastToken(model.score, 1, pad), batching, pad, torch.device("cpu"))
        alone = np.concatenate([fresh([torch.from_numpy(s)]).numpy() for s in seqs])
        assert np.array_equal(together, alone), arch
        assert np.abs(together - reference_rewards(ckpt, seqs)).max() < 1e-5, arch


def test_the_mode_needs_the_packed_layout(llama):
    with pytest.raises(StartupError, match="layout=packed"):
        build_scorer_padded(llama)


def build_scorer_padded(ckpt):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(ckpt, dtype=torch.float32).eval()
    batching = BatchingConfig(layout="padded", batch_invariant=True)
    return build_scorer(model, LastToken(model.score, 1, 0), batching, 0, torch.device("cpu"))


def scorer_as_server(scorer):
    """A stand-in for check.served_rewards: an in-process scorer behind the requests (one forward per request)."""
    def served(url, model_name, name, rows, timeout_s, request_rows=64):
        return scorer([torch.from_numpy(np.array(r.decode().split(), dtype=np.int64)) for r in rows]).numpy()
    return served


@pytest.mark.parametrize("on", [True, False], ids=["mode-on", "mode-off"])
def test_check_invariance_passes_with_the_mode_and_reports_mismatches_without(llama, on, monkeypatch, capsys):
    import json

    from reward_server import check

    monkeypatch.setattr(check, "served_rewards", scorer_as_server(scalar(llama, torch.float32, on)()))
    code = check.main(["--model", str(llama), "--invariance", "--n", "24", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == (0 if on else 1) and report["pass"] is on
    assert (sum(report["mismatches"].values()) == 0) is on, report


@pytest.mark.server
@pytest.mark.timeout(600)
def test_check_invariance_through_a_dp2_server(start_server, llama):
    """Two data-parallel replicas (gloo, CPU) with the mode on: the start-up self-test passes and check --invariance
    finds the same bits every way; the default server, the same check, finds mismatches."""
    import subprocess
    import sys

    for on in (True, False):
        srv = start_server(nproc=2, overrides=[f"model.path={llama}", f"batching.batch_invariant={str(on).lower()}",
                                               "batching.max_tokens_per_forward=1024"])
        run = subprocess.run([sys.executable, "-m", "reward_server.check", "--model", str(llama), "--url", srv.url,
                              "--invariance", "--n", "32"], capture_output=True, text=True, timeout=300)
        assert run.returncode == (0 if on else 1), run.stdout + run.stderr
        assert ("PASS" if on else "FAIL") in run.stdout
        srv.stop()
