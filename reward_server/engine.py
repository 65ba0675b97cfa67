"""The distributed engine: rank 0 leads, ranks 1..N-1 follow, all run the same forward in lock-step.

Rank 0's Triton threads hand checked batches to `Leader.submit`; its main thread runs `Leader.run`, which
broadcasts each batch, joins the forward and completes the caller's future. Subscribers run
`run_subscriber` until rank 0 sends SHUTDOWN.
"""

import logging
import queue
import threading
from concurrent.futures import Future
from typing import List, Optional

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


class Leader:
    """Rank 0: a queue of checked batches, served one forward at a time from the main thread."""

    def __init__(self, engine: Engine, heartbeat_s: float):
        self.engine = engine
        self.heartbeat_s = heartbeat_s
        self._queue: "queue.Queue" = queue.Queue()
        self._closed = threading.Event()
        self._lock = threading.Lock()  # no submit slips in between closing and failing what is queued
        self.failed: Optional[BaseException] = None

    def submit(self, seqs: List[torch.Tensor]) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._closed.is_set():
                fut.set_exception(ShuttingDown("the reward server is shutting down"))
            else:
                self._queue.put((seqs, fut))
        return fut

    def close(self) -> None:
        """Take no new work; `run` returns after the work already queued."""
        with self._lock:
            if not self._closed.is_set():
                self._closed.set()
                self._queue.put(_STOP)

    def run(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=self.heartbeat_s)
                except queue.Empty:
                    d.send_header(Command.HEARTBEAT)
                    continue
                if item is _STOP:
                    break
                seqs, fut = item
                if fut.set_running_or_notify_cancel():
                    self._forward(seqs, fut)
            d.send_header(Command.SHUTDOWN)
        except BaseException as exc:  # a collective failed or a rank faulted: the group is broken, fail everything
            self.failed = exc
            with self._lock:
                self._closed.set()
                self._fail_pending(RuntimeError(f"reward ranks failed: {exc}"))
            raise

    def _forward(self, seqs: List[torch.Tensor], fut: Future) -> None:
        n_tokens = sum(len(s) for s in seqs)
        try:
            d.send_header(Command.FORWARD, len(seqs), n_tokens)
            local = d.broadcast_batch(seqs, len(seqs), n_tokens, self.engine.topo.device)
            out = self.engine.forward(local).cpu()
        except BaseException as exc:
            fut.set_exception(RuntimeError(f"reward ranks failed: {exc}"))
            raise
        failed, faulted = int(out[-2, 0]), int(out[-1, 0])
        if faulted:
            exc = RankFault(f"{faulted} reward rank(s) hit a fatal error (out of memory?); the server restarts")
            fut.set_exception(exc)
            raise exc
        if failed:
            fut.set_exception(ForwardError(f"the forward failed on {failed} rank(s); see the server log"))
        else:
            fut.set_result(out[:-2].numpy())

    def reject_queued(self, exc: BaseException) -> None:
        """Fail the batches waiting in the queue, e.g. ones that reached a Triton which is being restarted
        after a failed start, before `run` began: their callers get `exc` instead of waiting forever."""
        with self._lock:
            self._fail_pending(exc)

    def _fail_pending(self, exc: BaseException) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item[1].set_exception(exc)


def run_subscriber(engine: Engine) -> None:
    """Ranks 1..N-1: follow rank 0's commands until SHUTDOWN."""
    while True:
        command, n_seqs, n_tokens = d.recv_header()
        if command == Command.SHUTDOWN:
            return
        if command == Command.FORWARD:
            engine.forward(d.broadcast_batch(None, n_seqs, n_tokens, engine.topo.device))
