"""Pure policy: which queued sequences the next forward takes, within its token budget. No model, no ranks."""

import time
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


class Refill:
    """When to plan the next forward while one runs (batching.overlap). Planned right after the last forward's
    callers were answered, the next forward would hold only what was left in the queue: those callers' next
    requests, on their way, would wait a forward more, and forwards would stay small (GRPO at 64 clients under the
    stand-in scorer: 74 % of the budget). So while the forward in flight runs, the leader waits until as many works
    arrived as the last finished forward answered (a closed loop's callers all came back), for at most `share` of
    the in-flight forward's expected time (its tokens planned x the seconds per token computed, measured), and
    plans then; it stops waiting as soon as the forward in flight is done: the GPU does not wait."""

    def __init__(self, share: float = 0.5):
        self.share = share
        self.per_token: Optional[float] = None  # seconds per token computed (moving average)
        self.last_done: Optional[float] = None
        self.planned: Deque[int] = deque()  # tokens planned of each forward in flight, oldest first
        self.expect = self.base = 0  # works the last finished forward answered, and the pending works then

    def launched(self, tokens: int) -> None:
        self.planned.append(tokens)

    def finished(self, launched_at: float, computed: int, answered: int, pending: int) -> None:
        """A forward launched at `launched_at` was read back: it computed `computed` tokens and answered `answered`
        works; `pending` works are left."""
        now = time.monotonic()
        if self.planned:
            self.planned.popleft()
        start = launched_at if self.last_done is None else max(launched_at, self.last_done)
        if computed > 0 and now > start:
            sample = (now - start) / computed
            self.per_token = sample if self.per_token is None else 0.8 * self.per_token + 0.2 * sample
        self.last_done = now
        self.expect, self.base = answered, pending

    def deadline(self) -> float:
        """time.monotonic() until which to wait for the answered callers' next requests (now: do not wait)."""
        now = time.monotonic()
        if not self.expect or self.per_token is None or not self.planned:
            return now
        return now + self.share * self.planned[-1] * self.per_token

    def wait(self, ready, take: Callable[[], bool], pending: Deque[Work]) -> bool:
        """The leader's wait while a forward runs (`ready`: its CUDA event or the stand-in's, None on the CPU, where
        nothing runs in flight), `take()` moving queued works to `pending` (True once the stop sign was seen): until
        as many works arrived as the last finished forward answered, or `deadline`, or the forward is done. True
        once the stop sign was seen."""
        deadline = self.deadline()
        while len(pending) - self.base < self.expect and time.monotonic() < deadline:
            if ready is None or ready.query():  # done: plan at once
                return False
            time.sleep(0.001)
            if take():
                return True
        return False
