"""Rank 0's leader: checked requests from the front doors go into a queue; the main thread serves them in
forwards of a token budget (plan.py), broadcasts each, runs its own share (step.py) and completes each caller's
future once all of its sequences are scored, retrying the works of a forward that failed apart (retry.py). A
caller that gives up (its client disconnected, its deadline passed) withdraws its work: the sequences no forward has
taken yet leave the queue uncomputed (`withdraw`, `submitting`)."""

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import InvalidStateError
from functools import partial
from typing import Callable, Deque, List, Optional, Tuple

import numpy as np
import torch

from .. import distributed as d
from ..distributed import Command
from .admission import InFlight, QueueFront
from .errors import ForwardError, RankFault, RanksFailed
from .plan import Refill, Work, plan_forward
from .retry import Scored, retries
from .stats import EngineStats
from .step import Engine, ForwardResult

log = logging.getLogger("reward_server.engine")

_STOP = object()


class Leader(QueueFront):
    """Rank 0: checked batches from the Triton threads go into a queue; the main thread serves them in forwards
    of up to `tokens_per_forward` tokens, cut across batch boundaries, so that forwards stay full however
    Triton happened to batch the requests (a batch waiting behind a forward joins the next one)."""

    def __init__(self, engine: Engine, heartbeat_s: float, tokens_per_forward: int, overlap: bool = True,
                 stats_interval_s: float = 0, sharing: bool = False, min_shared: int = 32,
                 max_queued_tokens: int = 0, metrics=None):
        self.engine = engine
        self.heartbeat_s = heartbeat_s
        self.tokens_per_forward = tokens_per_forward  # tokens computed (after prefix sharing)
        self.sharing = sharing
        self.min_shared = min_shared
        self.overlap = overlap  # launch the next forward before reading back the current one's rewards
        self.max_queued_tokens = max_queued_tokens  # 0: unbounded
        self.queued_batches = self.queued_tokens = 0  # submitted (one per submit_batch) and not answered yet
        self.peak_queued_tokens = 0  # the most queued_tokens has been
        cache = getattr(getattr(engine, "scorer", None), "cache", None)  # rank 0's replica's prefix cache, or None
        self.stats = EngineStats(stats_interval_s, metrics, tokens_per_forward, cache)
        self.metrics = metrics  # withdrawn sequences are counted there (metrics.Metrics.withdrawn)
        self.withdrawn_sequences = self.withdrawn_tokens = 0  # taken out of the queue uncomputed, so far
        # the budget counts tokens held by the prefix cache as free where rank 0 knows them: with one replica its
        # cache, with several the record of what each was given (scoring/affinity.py), which sends a sequence to the
        # replica that holds the most of it
        topo, affinity = getattr(engine, "topo", None), getattr(engine, "affinity", None)
        self.cached: Optional[Callable[[np.ndarray], int]] = None
        if cache is not None and topo is not None and topo.dp_size == 1:
            self.cached = lambda seq: cache.lookup(seq)[0]
        elif affinity is not None:
            self.cached = affinity.held
        self._queue: "queue.Queue" = queue.Queue()
        self._pending: Deque[Work] = deque()
        self._closed = threading.Event()
        self._lock = threading.RLock()  # no submit slips in between closing and failing what is queued (reentrant:
        # failing a future under it runs its callback, which counts it out of the queue)
        self.failed: Optional[BaseException] = None
        self._refusal: Optional[BaseException] = None  # why new work is refused once the ranks failed
        self.finished = False  # run() returned after SHUTDOWN
        self._launches: Deque[float] = deque()  # launch times of the forwards not finished yet (watchdog.py)
        self.refill = Refill()  # with overlap: when to plan the next forward while one runs (plan.py)

    def close(self) -> None:
        """Take no new work; `run` returns after the work already queued."""
        with self._lock:
            if not self._closed.is_set():
                self._closed.set()
                self._queue.put(_STOP)

    def run(self) -> None:
        """Serve until closed. With `overlap`, forward N+1 is prepared, broadcast and launched while forward N
        still runs on the GPU, and N's callers are answered while N+1 runs, so the GPU does not wait for rank 0's
        Python between forwards. Each forward's rewards are the same either way."""
        try:
            stopping, in_flight = False, None
            while True:
                if not stopping:
                    stopping = self._take_queued(wait=in_flight is None)
                if in_flight is not None and not stopping:  # the callers just answered may be sending again
                    stopping = self.refill.wait(in_flight.ready, partial(self._take_queued, False), self._pending)
                self._prune()
                planned = time.monotonic()
                picked, used = plan_forward(self._pending, self.tokens_per_forward, self.sharing,
                                            self.min_shared, self.cached) if self._pending else ([], 0)
                try:
                    launched = self._launch(picked, planned) if picked else None
                    if launched is not None:
                        self.refill.launched(used)
                except BaseException:
                    # a rank that faulted in the forward still in flight has left the group, so this launch
                    # failed; answer that forward first, so its callers learn the cause (out of memory)
                    if in_flight is not None:
                        self._finish(in_flight, idle_after=True)
                    raise
                if in_flight is not None:
                    self._finish(in_flight, idle_after=launched is None)
                in_flight = launched
                if in_flight is not None and not self.overlap:
                    self._finish(in_flight, idle_after=True)
                    in_flight = None
                if stopping and in_flight is None and not any(w.untaken for w in self._pending):
                    break
            self.stats.log()
            d.send_header(Command.SHUTDOWN)
            self.finished = True
        except BaseException as exc:  # a collective failed or a rank faulted: the group is broken, fail everything
            self.failed = exc
            # the callers get the cause in a line; a collective's own text (file paths, addresses) stays in the log
            cause = str(exc) if isinstance(exc, RankFault) else f"a collective failed ({type(exc).__name__})"
            self.abort(RanksFailed(f"reward ranks failed: {cause}; the server restarts"))
            raise

    def _take_queued(self, wait: bool) -> bool:
        """Move queued works to the pending list; with `wait` and nothing to do, wait for work (sending
        heartbeats). True once the stop sign was seen."""
        while True:
            idle = wait and not any(w.untaken for w in self._pending)
            try:
                item = self._queue.get(block=idle, timeout=self.heartbeat_s if idle else None)
            except queue.Empty:
                if not idle:
                    return False
                d.send_header(Command.HEARTBEAT)
                continue
            if item is _STOP:
                return True
            with self._lock:  # not between a withdrawal's check of the future and its failing it
                for work in item:
                    if work.fut.done():  # withdrawn while queued: none of its sequences is computed
                        self._withdrawn(work, range(len(work.seqs)))
                    elif work.fut.set_running_or_notify_cancel():
                        self._pending.append(work)

    def oldest_forward_launch(self) -> Optional[float]:
        """time.monotonic() at which the oldest unfinished forward was launched, or None."""
        try:
            return self._launches[0]
        except IndexError:
            return None

    def abort(self, exc: BaseException) -> None:
        """From another thread, while the main thread may be stuck in a collective: fail every queued and
        in-flight work with `exc` and refuse new ones with it (the first failure's cause is kept)."""
        with self._lock:
            self._closed.set()
            self._refusal = self._refusal or exc
            self._fail_pending(exc)

    def _launch(self, picked: List[Tuple[Work, int]], planned: float) -> InFlight:
        """`planned`: time.monotonic() when rank 0 began to plan this forward."""
        self._launches.append(time.monotonic())
        seqs = [w.seqs[i] for w, i in picked]
        n_tokens = sum(len(s) for s in seqs)
        self.stats.launched()
        d.send_header(Command.FORWARD, len(seqs), n_tokens)
        local = d.broadcast_batch(seqs, len(seqs), n_tokens)
        begun, device = None, getattr(getattr(self.engine, "topo", None), "device", None)
        if device is not None and device.type == "cuda":
            begun = torch.cuda.Event(enable_timing=True)
            begun.record(torch.cuda.current_stream(device))
        out = self.engine.forward(local)
        if out.device.type == "cuda":
            with torch.cuda.stream(d.result_stream(out.device)):  # where the rewards were summed (after every
                # replica's forward), so that this GPU's next forward does not wait for the copy or the other replicas
                host = out.to("cpu", non_blocking=True)
                ready = torch.cuda.Event(enable_timing=True)
                ready.record()
        else:
            host, ready = out, getattr(self.engine, "pending", None)  # TEST ONLY: the stand-in's (faults.py), else None
        return InFlight(picked, n_tokens, host, ready, begun, time.monotonic() - planned)

    def _finish(self, forward: InFlight, idle_after: bool) -> None:
        n = len(forward.picked)
        result = ForwardResult.from_reduced(forward.wait(), n)
        launched_at = self._launches.popleft()
        self.stats.finished(n, forward.n_tokens, result.computed, result.reused, idle_after, forward.launch_s,
                            forward.gpu_seconds())
        if result.faulted_ranks:
            raise RankFault(f"{result.faulted_ranks} reward rank(s) hit a fatal error (out of memory?); the server "
                            "restarts")
        # a work retired by an earlier forward's failure (or failed by an abort) may still have had sequences in
        # this one: skip it
        works = [w for w in {id(w): w for w, _ in forward.picked}.values() if not (w.retired or w.fut.done())]
        if result.failed_ranks:  # every work with a sequence in this forward is scored again, apart (retry.py)
            error = ForwardError(f"the forward failed on {result.failed_ranks} rank(s); see the server log")
            if any(not w.alone or len(w.seqs) > 1 for w in works):
                log.warning("a forward of %d sequence(s) from %d work(s) failed on %d rank(s); scoring them apart",
                            n, len(works), result.failed_ranks)
            with self._lock:  # not between an abort's failing of the pending works and its refusals
                for w in works:
                    self._pending.remove(w)
                    self._pending.extend(retries(w, error))
            return
        for (w, i), row in zip(forward.picked, result.rewards):
            w.rows[i] = row
            w.missing -= 1
        answered = 0
        for w in works:
            if w.missing == 0:
                self._pending.remove(w)
                w.fut.set_result(Scored.of(w.rows, [None] * len(w.rows)))
                answered += 1
        self.refill.finished(launched_at, result.computed, answered, len(self._pending))

    def reject_queued(self, exc: BaseException) -> None:
        """Fail the batches waiting in the queue, e.g. ones that reached a Triton which is being restarted
        after a failed start, before `run` began: their callers get `exc` instead of waiting forever."""
        with self._lock:
            self._fail_pending(exc)

    def _fail_pending(self, exc: BaseException) -> None:
        """Fail every queued and pending work (safe from another thread: a future already answered stays so)."""
        def fail(work: Work) -> None:
            with contextlib.suppress(InvalidStateError):
                work.fut.set_exception(exc)

        while self._pending:
            fail(self._pending.popleft())
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                for work in item:
                    fail(work)
