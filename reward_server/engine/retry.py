"""The leader's retry policy. A forward that fails alike on the ranks (input that slipped past the checks) fails
every work with a sequence in it; each such work is scored again in forwards of its own, and a work that fails
alone is scored again sequence by sequence, so that only a sequence that fails on its own fails: its caller gets
its slot of `Scored` with a ForwardError, every other row its reward. A fatal fault (RankFault) and the
Unavailable errors (shutting down, overloaded, ranks failed) are not retried: they fail whole works (leader.py)."""

import contextlib
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from .errors import ForwardError
from .plan import Work


@dataclass
class Scored:
    """A work's result, one row per sequence: its rewards, or NaN and the error of a sequence that failed alone."""

    rewards: np.ndarray  # [n, width] float32 (rows of one work may come from forwards of different widths: 0-padded)
    errors: List[Optional[BaseException]]  # per sequence: None where scored

    @classmethod
    def of(cls, rows: List[Optional[np.ndarray]], errors: List[Optional[BaseException]]) -> "Scored":
        """From each sequence's reward row (None where it failed)."""
        width = max((len(r) for r in rows if r is not None), default=1)
        out = np.zeros((len(rows), width), dtype=np.float32)
        for i, r in enumerate(rows):
            if r is None:
                out[i] = np.nan
            else:
                out[i, : len(r)] = r
        return cls(out, list(errors))

    @classmethod
    def concat(cls, parts: List["Scored"]) -> "Scored":
        return cls.of([r for p in parts for r in p.rows()], [e for p in parts for e in p.errors])

    def rows(self) -> List[Optional[np.ndarray]]:
        """Each sequence's reward row, None where it failed."""
        return [None if e is not None else r for r, e in zip(self.rewards, self.errors)]


def retries(work: Work, error: ForwardError) -> List[Work]:
    """The works that replace `work`, whose forward failed with `error` (they go to the back of the queue): its
    sequences in forwards of their own, or, when it was already alone, each sequence alone; none for one sequence
    that failed alone (its slot gets `error`). `work` is retired (its rows still in flight are dropped) and
    completes with its replacements' results."""
    work.retired = True
    if work.alone and len(work.seqs) == 1:
        with contextlib.suppress(InvalidStateError):  # an abort from another thread may have failed it already
            work.fut.set_result(Scored.of([None], [error]))
        return []
    parts = [work.seqs] if not work.alone else [[s] for s in work.seqs]
    replacements = [Work(seqs, Future(), alone=True) for seqs in parts]
    _gather([w.fut for w in replacements], work.fut)
    return replacements


def _gather(parts: List[Future], whole: Future) -> None:
    """Complete `whole` with the parts' results in order, or with the first exception of a part (an abort)."""
    def done(part: Future) -> None:
        with contextlib.suppress(InvalidStateError):
            if part.exception() is not None:
                whole.set_exception(part.exception())
            elif all(p.done() for p in parts) and not any(p.exception() for p in parts):
                whole.set_result(Scored.concat([p.result() for p in parts]))

    for part in parts:
        part.add_done_callback(done)
