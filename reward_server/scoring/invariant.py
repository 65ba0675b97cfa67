"""Batch-invariant scoring (`batching.batch_invariant`, off by default): a sequence's rewards and step rewards are
the same bits whatever it is scored with (alone, beside others, in a shared-prefix group, again, on any replica).

What varies without it (measured on the CPU, fp32 and bf16, sdpa): the backbone's matmuls and nn.Linear give the
same bits for a row whatever the number of rows (128 to 4096 rows here), and so do RMSNorm and the MLP; two things
do not. The head: in fp32 a [n, H] x [H, labels] GEMM with a handful of rows (n >= 2 for 2+ labels, n >= 5 for
one) takes another kernel than n = 1, so the batch's number of pooled tokens (or a PRM's steps) moves the bits.
And attention. The packed
layout puts a sequence at an offset in its row that depends on its companions (and shares a prefix computed once,
or reads it from the prefix cache with the new tokens' keys after it), and the CPU's flash attention cuts the keys
into blocks from the row's start: another offset, another order of the softmax's sums (~1e-7 in fp32). Even a
sequence at offset 0 of its own row is not safe: its bits moved with the padded row width (keys 256 vs 384, 768
vs 896 for a 4 x 256 Llama, torch 2.13), the kernel's last key block taking another GEMM.

So in this mode the attention is our own (`blocked_attention`, registered with transformers and named in the
model's config only during the mode's calls): each item's keys are read by position from a store into fixed
QUERY_TILE x GRID tiles (keys at positions 0..GRID-1 the first tile, ...), every tile is one GEMM shape, the softmax
takes one exact max and the tiles' sums are added in tile order; a tile a query does not see adds exact zeros. A
query's bits then depend only on its own sequence's keys, not on where they were computed: prefix sharing and the
prefix cache stay on (scoring/blocks.py plans the items and holds the store), at any split point, since the tiles
are counted from the sequence's own position 0 and not from where a shared prefix ends. The other layers act on one
token at a time; the packed rows hold a multiple of GRID tokens, within the range measured. The head is applied to
one pooled token at a time (`RowByRow`). `self_test` checks it on this machine's kernels before serving.
"""

import contextlib
from typing import List

import numpy as np
import torch

from ..loading.checkpoint import StartupError

GRID = 128  # the attention's key tile (flex_attention's default block): packed rows hold a multiple of it
QUERY_TILE = 32  # the attention's query tile: a short item (a search step, a GRPO answer) pads to 32 queries
ATTENTION = "reward_server_blocked"  # the mode's attention function, registered with transformers (below)


def blocked_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                      sliding_window=None, invariant_plan=None, **kwargs):
    """Attention in fixed GRID x GRID tiles, a sequence's keys in the blocks of its own positions (0..GRID-1 the
    first, ...): each query's score tile, softmax and P@V are GEMMs of one shape, and its blocks are summed in
    order 0, 1, 2, ... whatever else the call holds; a block the query does not see adds exact zeros. Its own
    layout (`invariant_plan`, scoring/blocks.py): the call's packed rows of new tokens, each item's keys and
    values in the plan's store (written here, then read by slot), so that context and new tokens line up by
    position. fp32 inside (bf16 models too); exact softmax with one max over every block the query sees."""
    if invariant_plan is None or kwargs.get("s_aux") is not None:
        raise RuntimeError("batch-invariant attention: called without its plan, or on a model with attention sinks")
    return invariant_plan.attend(module.layer_idx, query, key, value, scaling, softcap, sliding_window)


def attend_tiles(q, k, v, qpos, softcap, window, full):
    """q [n, Hkv, g * QUERY_TILE, D] (one query tile of n items, scaled, a kv head's g query heads stacked), k
    [n, Hkv, nk * GRID, D] and v [..., D + 1] (values and a column of ones), each item's keys from its position 0;
    qpos [n, QUERY_TILE] (-1: padding, sees nothing); full: leading key tiles that every real query sees whole (no
    mask there). Returns [n, Hkv, g * QUERY_TILE, D] in fp32."""
    n, hkv, gm, d = q.shape
    nk, qt = k.shape[2] // GRID, qpos.shape[1]
    kb = k.float().view(n, hkv, nk, GRID, d).transpose(-1, -2)
    vb = v.float().view(n, hkv, nk, GRID, d + 1)
    s = torch.matmul(q[:, :, None], kb)  # [n, Hkv, nk, g * QUERY_TILE, GRID]: one GEMM shape per tile
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    full = 0 if window is not None else min(full, nk)
    if full < nk:
        kpos = torch.arange(full * GRID, nk * GRID, device=q.device).view(nk - full, 1, GRID)
        seen = kpos[None] <= qpos[:, None, :, None]  # [n, key tiles, QUERY_TILE, GRID]
        if window is not None:
            seen &= qpos[:, None, :, None] - kpos[None] < window
        s[:, :, full:].view(n, hkv, nk - full, gm // qt, qt, GRID).masked_fill_(~seen[:, None, :, None],
                                                                                    float("-inf"))
    m = s.amax(dim=(2, 4), keepdim=True)  # exact, in any order
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    pv = torch.matmul(s.sub_(m).exp_(), vb)  # [n, Hkv, nk, g * QUERY_TILE, D + 1]; the last column sums weights
    acc = pv[:, :, 0]
    for j in range(1, nk):  # in block order, one add at a time
        acc = acc + pv[:, :, j]
    total = acc[..., d:]
    return torch.where(total > 0, acc[..., :d] / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.zeros_like(total))


def register_attention() -> None:
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTENTION, torch._dynamo.disable(blocked_attention))


@contextlib.contextmanager
def blocked(config):
    """The model's layers call `blocked_attention` for the duration (the config names their attention function)."""
    before = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


def grid(pad_multiple: int = 1) -> int:
    """The row grid of the mode: GRID rounded up to a multiple of the layout's own padding."""
    return -(-GRID // max(1, pad_multiple)) * max(1, pad_multiple)


class RowByRow:
    """A readout head applied to one row at a time, so a row's bits do not depend on how many rows come with it."""

    def __init__(self, head):
        self.head = head

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[0] <= 1:
            return self.head(hidden)
        return torch.cat([self.head(hidden[i:i + 1]) for i in range(hidden.shape[0])])


def probe_sequences(vocab_size: int, budget: int, seed: int = 0) -> List[torch.Tensor]:
    """A few sequences of several lengths (within a block, across blocks, two sharing a prefix), the same on every
    rank."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [n for n in (5, 37, 130, 300) if n <= budget] or [min(5, budget)]
    seqs = [torch.randint(3, vocab_size, (n,), generator=gen) for n in lengths]
    prefix = seqs[-1][:max(1, len(seqs[-1]) // 2)]
    seqs.append(torch.cat([prefix, torch.randint(3, vocab_size, (7,), generator=gen)]))
    return seqs


def mismatches(scorer, seqs: List[torch.Tensor], vocab_size: int, seed: int = 1) -> List[str]:
    """Each sequence scored alone, then in batches of other sizes and orders, beside unrelated sequences and
    repeated: a line for every sequence and batching whose bits differ from alone."""
    gen = torch.Generator().manual_seed(seed)
    alone = [scorer([s])[0] for s in seqs]
    others = [torch.randint(3, vocab_size, (int(n),), generator=gen) for n in (3, 64, 129, 250)]
    batches = {"all together": list(range(len(seqs))), "reversed": list(range(len(seqs)))[::-1],
               "twice each": [i for i in range(len(seqs)) for _ in range(2)]}
    out = []
    for name, idx in batches.items():
        for extra in (0, len(others)):
            got = scorer([seqs[i] for i in idx] + others[:extra])
            for row, i in enumerate(idx):
                if not torch.equal(got[row], alone[i]):
                    where = f"{name}{' beside others' if extra else ''}"
                    out.append(f"sequence {i} ({len(seqs[i])} tokens) {where}: max |diff| "
                               f"{(got[row] - alone[i]).abs().max().item():.3g}")
    return out


def self_test(scorer, vocab_size: int, budget: int) -> None:
    """Refuse to start (StartupError) if a bit differs on this machine's kernels; run on every rank alike."""
    bad = mismatches(scorer, probe_sequences(vocab_size, budget), vocab_size)
    if scorer.cache is not None:
        scorer.cache.clear()
    if bad:
        raise StartupError(f"batching.batch_invariant=true: this machine's kernels do not give the same bits for a "
                           f"sequence alone and in a batch ({len(bad)} mismatches; first: {bad[0]}); set "
                           "batching.batch_invariant=false")


def rows_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit equality of two reward rows (NaN included)."""
    return a.shape == b.shape and a.tobytes() == b.tobytes()
