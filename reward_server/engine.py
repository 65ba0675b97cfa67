"""The distributed engine: rank 0 leads, ranks 1..N-1 follow, all run the same forward in lock-step.

Rank 0's Triton threads hand checked batches to `Leader.submit`; its main thread runs `Leader.run`, which cuts
the queued sequences into forwards of a token budget, broadcasts each, joins the forward and completes each
caller's future once all of its sequences are scored. Subscribers run
`run_subscriber` until rank 0 sends SHUTDOWN.
"""

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Deque, List, Optional, Tuple

import numpy as np
import torch

from . import distributed as d
from .distributed import Command, Topology

log = logging.getLogger(__name__)


class ForwardError(RuntimeError):
    """The forward failed alike for this batch (e.g. a request that slipped past the checks); the group is healthy."""


class RankFault(RuntimeError):
    """A rank cannot go on (out of memory): every rank exits non-zero so that torchrun restarts the group."""


class ShuttingDown(RuntimeError):
    """The server is draining and takes no new work."""


# Errors after which a rank's state cannot be trusted; anything else counts as a bad batch.
FATAL_ERRORS = (torch.OutOfMemoryError, MemoryError)


def shard_for_replicas(lengths: List[int], n_replicas: int) -> List[List[int]]:
    """Split sequence indices over data-parallel replicas with about equal token counts (longest first,
    each to the least loaded replica). Every rank computes the same split from the same lengths."""
    shares: List[List[int]] = [[] for _ in range(n_replicas)]
    load = [0] * n_replicas
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = min(range(n_replicas), key=lambda r: load[r])
        shares[r].append(i)
        load[r] += lengths[i]
    return shares


class Engine:
    """One synchronized forward over all ranks."""

    def __init__(self, scorer, topo: Topology):
        self.scorer = scorer
        self.topo = topo

    def forward(self, seqs: List[torch.Tensor]) -> torch.Tensor:
        """Returns [n + 2, width] on rank 0: rewards, then two rows whose first values count the ranks whose
        forward failed (bad batch) and the ranks that hit a fatal error (RankFault)."""
        n = len(seqs)
        out = torch.zeros(n + 2, self.scorer.output_width(seqs), dtype=torch.float32, device=self.topo.device)
        mine = shard_for_replicas([len(s) for s in seqs], self.topo.dp_size)[self.topo.dp_rank]
        fault = None
        try:
            if mine:
                values = self.scorer([seqs[i] for i in mine])
                if self.topo.tp_rank == 0:  # a share may need fewer columns than the batch (steps per row)
                    out[torch.tensor(mine, device=out.device), : values.shape[1]] = values
        except FATAL_ERRORS as exc:
            log.exception("rank %d: fatal error in the forward; the group will exit so that torchrun restarts it",
                          self.topo.rank)
            if self.topo.tp_size > 1:  # the other ranks may wait inside the forward's own collectives: leave now
                raise RankFault(f"rank {self.topo.rank}: {exc}") from exc
            fault = exc
            out[n + 1, 0] = 1.0
        except Exception:
            log.exception("rank %d: forward failed", self.topo.rank)
            out[n, 0] = 1.0
        out = d.reduce_to_leader(out)
        if fault is not None:  # rank 0 now knows; leave the group
            raise RankFault(f"rank {self.topo.rank}: {fault}") from fault
        return out


_STOP = object()


class Work:
    """One submitted batch: its sequences, its caller's future, and the rows scored so far. Its sequences may be
    spread over several forwards, and a forward may hold sequences of several works."""

    def __init__(self, seqs: List[torch.Tensor], fut: Future, alone: bool):
        self.seqs = seqs
        self.fut = fut
        self.alone = alone  # only this work's sequences in its forwards (a retry that must not meet others)
        self.untaken = deque(range(len(seqs)))
        self.rows: List[Optional[np.ndarray]] = [None] * len(seqs)
        self.missing = len(seqs)

    def result(self) -> np.ndarray:
        width = max(len(r) for r in self.rows)  # rows of one work may come from forwards of different widths
        out = np.zeros((len(self.rows), width), dtype=np.float32)
        for i, r in enumerate(self.rows):
            out[i, :len(r)] = r
        return out


def plan_forward(pending: Deque[Work], budget: int) -> List[Tuple[Work, int]]:
    """The (work, sequence index) pairs of the next forward: the oldest sequence first, so nothing waits for
    ever, then any queued sequence that still fits `budget` tokens, oldest works first (first fit). An `alone`
    work shares its forwards with nobody. A sequence longer than the budget runs on its own."""
    head = pending[0]
    first = head.untaken.popleft()
    picked, used = [(head, first)], len(head.seqs[first])
    for work in ([head] if head.alone else pending):
        if work.alone and work is not head:
            continue
        kept = deque()
        while work.untaken:
            i = work.untaken.popleft()
            if used + len(work.seqs[i]) <= budget:
                picked.append((work, i))
                used += len(work.seqs[i])
            else:
                kept.append(i)
        work.untaken = kept
        if used >= budget:
            break
    return picked


class EngineStats:
    """Counts of the leader's forwards, logged every `interval_s` and at exit: how full the forwards were and
    how much of the time the ranks were busy."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self.since, self.forwards, self.seqs, self.tokens, self.busy_s = now, 0, 0, 0, 0.0

    def add(self, n_seqs: int, n_tokens: int, seconds: float) -> None:
        self.forwards += 1
        self.seqs += n_seqs
        self.tokens += n_tokens
        self.busy_s += seconds
        if self.interval_s and time.monotonic() - self.since >= self.interval_s:
            self.log()

    def log(self) -> None:
        now = time.monotonic()
        wall = now - self.since
        if self.forwards:
            log.info("engine: %d forwards, %d sequences, %d tokens (%.0f per forward) in %.1f s: %.0f tokens/s, "
                     "busy %.1f %%", self.forwards, self.seqs, self.tokens, self.tokens / self.forwards, wall,
                     self.tokens / wall, 100 * self.busy_s / wall)
        self._reset(now)


class Leader:
    """Rank 0: checked batches from the Triton threads go into a queue; the main thread serves them in forwards
    of up to `tokens_per_forward` tokens, cut across batch boundaries, so that forwards stay full however
    Triton happened to batch the requests (a batch waiting behind a forward joins the next one)."""

    def __init__(self, engine: Engine, heartbeat_s: float, tokens_per_forward: int, stats_interval_s: float = 0):
        self.engine = engine
        self.heartbeat_s = heartbeat_s
        self.tokens_per_forward = tokens_per_forward
        self.stats = EngineStats(stats_interval_s)
        self._queue: "queue.Queue" = queue.Queue()
        self._pending: Deque[Work] = deque()
        self._closed = threading.Event()
        self._lock = threading.Lock()  # no submit slips in between closing and failing what is queued
        self.failed: Optional[BaseException] = None

    def submit(self, seqs: List[torch.Tensor], alone: bool = False) -> Future:
        """Rewards [len(seqs), width] as a numpy array, in a future. `alone`: score these sequences in forwards
        of their own (used to retry the requests of a failed forward one by one)."""
        fut: Future = Future()
        with self._lock:
            if self._closed.is_set():
                fut.set_exception(ShuttingDown("the reward server is shutting down"))
            elif not seqs:
                fut.set_result(np.zeros((0, 1), dtype=np.float32))
            else:
                self._queue.put(Work(seqs, fut, alone))
        return fut

    def close(self) -> None:
        """Take no new work; `run` returns after the work already queued."""
        with self._lock:
            if not self._closed.is_set():
                self._closed.set()
                self._queue.put(_STOP)

    def run(self) -> None:
        try:
            stopping = False
            while not (stopping and not self._pending):
                if not stopping:
                    stopping = self._take_queued()
                if self._pending:
                    self._forward(plan_forward(self._pending, self.tokens_per_forward))
            self.stats.log()
            d.send_header(Command.SHUTDOWN)
        except BaseException as exc:  # a collective failed or a rank faulted: the group is broken, fail everything
            self.failed = exc
            with self._lock:
                self._closed.set()
                self._fail_pending(RuntimeError(f"reward ranks failed: {exc}"))
            raise

    def _take_queued(self) -> bool:
        """Move queued works to the pending list (waiting, with heartbeats, while there is nothing to do);
        True once the stop sign was seen."""
        while True:
            try:
                item = self._queue.get(block=not self._pending, timeout=self.heartbeat_s)
            except queue.Empty:
                if self._pending:
                    return False
                d.send_header(Command.HEARTBEAT)
                continue
            if item is _STOP:
                return True
            if item.fut.set_running_or_notify_cancel():
                self._pending.append(item)

    def _forward(self, picked: List[Tuple[Work, int]]) -> None:
        seqs = [w.seqs[i] for w, i in picked]
        n_tokens = sum(len(s) for s in seqs)
        start = time.monotonic()
        d.send_header(Command.FORWARD, len(seqs), n_tokens)
        local = d.broadcast_batch(seqs, len(seqs), n_tokens, self.engine.topo.device)
        out = self.engine.forward(local).cpu()
        self.stats.add(len(seqs), n_tokens, time.monotonic() - start)
        failed, faulted = int(out[-2, 0]), int(out[-1, 0])
        if faulted:
            raise RankFault(f"{faulted} reward rank(s) hit a fatal error (out of memory?); the server restarts")
        works = list({id(w): w for w, _ in picked}.values())
        if failed:  # every work with a sequence in this forward fails; the service retries them one by one
            for w in works:
                self._pending.remove(w)
                w.fut.set_exception(ForwardError(f"the forward failed on {failed} rank(s); see the server log"))
            return
        values = out[:-2].numpy()
        for (w, i), row in zip(picked, values):
            w.rows[i] = row
            w.missing -= 1
        for w in works:
            if w.missing == 0:
                self._pending.remove(w)
                w.fut.set_result(w.result())

    def reject_queued(self, exc: BaseException) -> None:
        """Fail the batches waiting in the queue, e.g. ones that reached a Triton which is being restarted
        after a failed start, before `run` began: their callers get `exc` instead of waiting forever."""
        with self._lock:
            self._fail_pending(exc)

    def _fail_pending(self, exc: BaseException) -> None:
        while self._pending:
            self._pending.popleft().fut.set_exception(exc)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item.fut.set_exception(exc)


def run_subscriber(engine: Engine) -> None:
    """Ranks 1..N-1: follow rank 0's commands until SHUTDOWN."""
    while True:
        command, n_seqs, n_tokens = d.recv_header()
        if command == Command.SHUTDOWN:
            return
        if command == Command.FORWARD:
            engine.forward(d.broadcast_batch(None, n_seqs, n_tokens, engine.topo.device))
