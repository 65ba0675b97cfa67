"""Pure policy: which queued sequences the next forward takes, within its token budget. No model, no ranks."""

from collections import deque
from concurrent.futures import Future
from typing import Callable, Deque, List, Optional, Tuple

import numpy as np
import torch

from ..scoring.trie import PrefixIndex


class Work:
    """One submitted request (or a retry of one, retry.py): its sequences, its caller's future, and the rows scored
    so far. Its sequences may be spread over several forwards, and a forward may hold sequences of several works."""

    def __init__(self, seqs: List[torch.Tensor], fut: Future, alone: bool):
        self.seqs = seqs
        self.fut = fut
        self.alone = alone  # only this work's sequences in its forwards (a retry that must not meet others)
        self.n_tokens = sum(len(s) for s in seqs)
        self.untaken = deque(range(len(seqs)))
        self.rows: List[Optional[np.ndarray]] = [None] * len(seqs)
        self.missing = len(seqs)
        self.retired = False  # replaced by its retries (retry.py): its rows still in flight are dropped


def plan_forward(pending: Deque[Work], budget: int, sharing: bool = False, min_shared: int = 32,
                 cached: Optional[Callable[[np.ndarray], int]] = None) -> Tuple[List[Tuple[Work, int]], int]:
    """The (work, sequence index) pairs of the next forward, and the tokens it computes: the oldest sequence
    first, so nothing waits for ever, then any queued sequence that still fits `budget` tokens, oldest works first
    (first fit). An `alone` work shares its forwards with nobody. A sequence longer than the budget runs on its own.

    With `sharing`, a sequence costs only the tokens it does not share with those already taken (the forward's
    prefix trie grows by that much), and taking one takes the rest of its group (queued sequences sharing at
    least `min_shared` leading tokens with it, from any work) while they fit, so that a group sent as separate
    requests is scored in one forward. `cached(seq)`: how many leading tokens of seq the prefix cache holds; they
    cost nothing either."""
    head = next((w for w in pending if w.untaken), None)
    if head is None:  # every queued sequence is already in a forward
        return [], 0
    pool = [(w, i) for w in ([head] if head.alone else pending) if not (w.alone and w is not head)
            for i in w.untaken]  # oldest first; head's first untaken sequence is pool[0]
    index = None
    if sharing:
        arrays = [w.seqs[i].numpy() for w, i in pool]
        index = PrefixIndex(arrays, min_shared, [cached(a) for a in arrays] if cached is not None else None)
    taken = np.zeros(len(pool), dtype=bool)
    used = 0

    def add(p: int) -> bool:
        nonlocal used
        cost = index.cost(p) if index is not None else len(pool[p][0].seqs[pool[p][1]])
        if used and used + cost > budget:
            return False
        taken[p] = True
        used += cost
        if index is not None:
            index.take(p)
        return True

    for p in range(len(pool)):
        if used >= budget:
            break
        if taken[p] or not add(p) or index is None:
            continue
        for q in index.group_of(p):
            if not taken[q]:
                add(int(q))
    picked = [pool[p] for p in np.flatnonzero(taken)]
    chosen = {}
    for w, i in picked:
        chosen.setdefault(id(w), set()).add(i)
    for w in {id(w): w for w, _ in picked}.values():
        w.untaken = deque(i for i in w.untaken if i not in chosen[id(w)])
    return picked, used
