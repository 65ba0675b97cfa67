"""The front of the leader's queue, on the callers' threads: admission under batching.max_queued_tokens (each
request on its own), the futures callers wait on, and withdrawal (a caller that gives up takes its sequences that no
forward has taken out of the queue). `Leader` (leader.py) adds the main thread's loop; InFlight is a forward it
launched."""

import contextlib
import threading
from collections import deque
from concurrent.futures import Future, InvalidStateError
from functools import partial
from typing import Callable, Deque, List, Optional, Tuple

import torch

from ..protocol import Unavailable
from .errors import Overloaded, ShuttingDown
from .plan import Work
from .retry import Scored

_submitting = threading.local()  # .hook: called with the futures of each submit_batch on this thread (`submitting`)


class Withdrawn(Unavailable):
    """The caller gave up on its request before it was answered: `cause` "disconnected" (its client went away) or
    "timeout" (server.request_timeout_s passed). Its sequences not taken by a forward yet are never computed."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


class InFlight:
    """A launched forward: its (work, index) pairs and its rewards on their way to the host."""

    def __init__(self, picked: List[Tuple[Work, int]], n_tokens: int, host: torch.Tensor, ready,
                 begun=None, launch_s: float = 0.0):
        self.picked = picked
        self.n_tokens = n_tokens
        self.host = host
        self.ready = ready  # a CUDA event recorded after the copy to the host, or None on the CPU
        self.begun = begun  # a timing CUDA event recorded before the forward's first kernel, or None
        self.launch_s = launch_s  # rank 0's time to plan and launch it

    def wait(self) -> torch.Tensor:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host

    def gpu_seconds(self) -> Optional[float]:
        """Its time on the GPU, first kernel to rewards on the host (after `wait`); None off the GPU."""
        return self.begun.elapsed_time(self.ready) / 1e3 if self.begun is not None else None


class QueueFront:
    """The callers' side of the Leader's queue (the Leader holds the state: _lock, _queue, _pending, _closed, the
    counts)."""

    def submit(self, seqs: List[torch.Tensor], alone: bool = False) -> Future:
        """One work; see `submit_batch`."""
        return self.submit_batch([seqs], alone)[0]

    def submit_batch(self, batch: List[List[torch.Tensor]], alone: bool = False) -> List[Future]:
        """A future per work (one request's sequences) of `batch` (one Triton batch), each completed with a
        `Scored`: a row per sequence, where only a sequence that failed in a forward of its own has an error
        (retry.py). A future fails only with the error of a whole work: Unavailable (shutting down, overloaded,
        ranks failed). The admitted works are queued at once (the main thread takes them together) and count as
        one queued batch; a work without sequences is answered at once. Each work is admitted on its own: it is
        refused as overloaded when the tokens queued with it would pass max_queued_tokens, unless nothing is
        queued (a request alone is never refused for its size), so the queue never holds more than the limit or
        one request. `alone`: each work in forwards of its own."""
        futures: List[Future] = [Future() for _ in batch]
        works = [Work(seqs, fut, alone) for seqs, fut in zip(batch, futures) if seqs]
        for seqs, fut in zip(batch, futures):
            if not seqs:  # nothing to score (a request whose every row failed its checks): answered as it is
                fut.set_result(Scored.of([], []))
        if not works:
            return futures
        with self._lock:
            if self._closed.is_set():
                refusal = self._refusal or ShuttingDown("the reward server is shutting down; retry")
                for w in works:
                    w.fut.set_exception(refusal)
                return futures
            admitted = []
            for w in works:
                queued = self.queued_tokens + sum(a.n_tokens for a in admitted)
                if self.max_queued_tokens and queued and queued + w.n_tokens > self.max_queued_tokens:
                    w.fut.set_exception(Overloaded(
                        f"the reward server is overloaded ({queued} tokens queued, limit {self.max_queued_tokens}); "
                        "retry later"))
                else:
                    admitted.append(w)
            if admitted:
                self.queued_batches += 1
                self.queued_tokens += sum(w.n_tokens for w in admitted)
                self.peak_queued_tokens = max(self.peak_queued_tokens, self.queued_tokens)
                left = [len(admitted)]  # works of this batch not answered yet
                for w in admitted:
                    w.fut.add_done_callback(partial(self._dequeued, w.n_tokens, left))
                self._queue.put(admitted)
        hook = getattr(_submitting, "hook", None)
        if hook is not None:
            hook(futures)
        return futures

    @staticmethod
    @contextlib.contextmanager
    def submitting(hook: Callable[[List[Future]], None]):
        """While in this block, every `submit_batch` on this thread hands its futures (one per work, in the batch's
        order) to `hook` once they are queued, so that another thread can `withdraw` them later."""
        _submitting.hook = hook
        try:
            yield
        finally:
            _submitting.hook = None

    def withdraw(self, fut: Future, exc: Withdrawn) -> bool:
        """From any thread: the caller of the work whose future is `fut` gives up. The future fails with `exc` now
        (its tokens leave the queue's count); the main thread takes the work's sequences that no forward has taken
        out of the queue before it plans the next forward, uncomputed (sequences already in a forward finish and are
        dropped). False when the work was already answered."""
        with self._lock:
            try:
                fut.set_exception(exc)
            except InvalidStateError:
                return False
        return True

    def _withdrawn(self, work: Work, indices) -> None:
        """Count the sequences `indices` of a withdrawn work as taken out of the queue uncomputed (main thread)."""
        n_seqs, n_tokens = len(indices), sum(len(work.seqs[i]) for i in indices)
        self.withdrawn_sequences += n_seqs
        self.withdrawn_tokens += n_tokens
        if n_seqs and self.metrics is not None and hasattr(self.metrics, "withdrawn"):
            self.metrics.withdrawn(n_seqs, n_tokens)

    def _prune(self) -> None:
        """Drop the withdrawn works (their futures already failed) from the pending list, with their sequences that
        no forward has taken (main thread, before planning)."""
        with self._lock:
            if not any(w.fut.done() for w in self._pending):
                return
            kept: Deque[Work] = deque()
            for w in self._pending:
                if w.fut.done():
                    self._withdrawn(w, list(w.untaken))
                    w.untaken = deque()
                else:
                    kept.append(w)
            self._pending = kept

    def _dequeued(self, n_tokens: int, left: List[int], _fut: Future) -> None:
        with self._lock:
            self.queued_tokens -= n_tokens
            left[0] -= 1
            if not left[0]:
                self.queued_batches -= 1
