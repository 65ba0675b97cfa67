"""Batch-invariant scoring (`batching.batch_invariant`, off by default): a sequence's rewards and step rewards are
the same bits whatever it is scored with (alone, beside others, in a shared-prefix group, again, on any replica).

What varies without it (measured on the CPU, fp32 and bf16, sdpa): the backbone's matmuls and nn.Linear give the
same bits for a row whatever the number of rows (128 to 4096 rows here), and so do RMSNorm and the MLP; two things
do not. The head: in fp32 a [n, H] x [H, labels] GEMM with a handful of rows (n >= 2 for 2+ labels, n >= 5 for
one) takes another kernel than n = 1, so the batch's number of pooled tokens (or a PRM's steps) moves the bits.
And attention. The packed
layout puts a sequence at an offset in its row that depends on its companions (and shares a prefix computed once,
or reads it from the prefix cache with the new tokens' keys after it), and the CPU's flash attention cuts the keys
into blocks from the row's start: another offset, another order of the softmax's sums (~1e-7 in fp32). A sequence
at offset 0 of its own row, followed by padding that nothing sees, gets the same bits at any row width and any
number of rows.

So in this mode (scoring/layout.py `invariant`): one sequence per row at offset 0, no prefix sharing, no prefix
cache, rows padded to a multiple of GRID tokens and a call holding rows of one width only (the width is a function
of the sequence's own length: a kernel that picks its blocks by the key length sees one length per sequence),
and the head applied to one pooled token at a time (`RowByRow`).
`self_test` checks it on this machine's kernels before serving.
"""

from typing import List

import numpy as np
import torch

from ..loading.checkpoint import StartupError

GRID = 128  # the attention block (flex_attention's default): rows are padded to a multiple of it


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
