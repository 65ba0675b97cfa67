"""The distributed engine: rank 0 leads, ranks 1..N-1 follow, all run the same forward in lock-step.

Rank 0's Triton threads hand checked batches to `Leader.submit`; its main thread runs `Leader.run`, which cuts
the queued sequences into forwards of a token budget, broadcasts each, joins the forward and completes each
caller's future once all of its sequences are scored. Subscribers run
`run_subscriber` until rank 0 sends SHUTDOWN.
"""

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from typing import Callable, Deque, List, Optional, Tuple

import numpy as np
import torch

from . import distributed as d
from .distributed import Command, Topology
from .scoring.layout import Layout
from .scoring.trie import PrefixIndex
from .statuses import Unavailable

log = logging.getLogger(__name__)


class ForwardError(RuntimeError):
    """The forward failed alike for this batch (e.g. a request that slipped past the checks); the group is healthy."""


class RankFault(RuntimeError):
    """A rank cannot go on (out of memory): every rank exits non-zero so that torchrun restarts the group."""


class ShuttingDown(Unavailable):
    """The server is draining and takes no new work."""


class Overloaded(Unavailable):
    """More tokens are queued than batching.max_queued_tokens: retry later."""


class RanksFailed(Unavailable):
    """The ranks' group broke (a rank died, hung or ran out of memory); torchrun restarts the server."""


# Errors after which a rank's state cannot be trusted; anything else counts as a bad batch.
FATAL_ERRORS = (torch.OutOfMemoryError, MemoryError)


# Rows after the rewards in a forward's output, summed over the ranks (first column): how many ranks' forward failed
# (a bad batch), how many hit a fatal error (RankFault), and the tokens all replicas computed and took from their
# prefix caches.
FAILED, FAULTED, COMPUTED, REUSED = range(4)
TALLY_ROWS = REUSED + 1


class Engine:
    """One synchronized forward over all ranks. `layout` splits each forward over the data-parallel replicas
    (keeping sequences that share a prefix together, and with `affinity` sending them where their prefix is
    cached); every rank computes the same split from the same ids."""

    def __init__(self, scorer, topo: Topology, layout: Optional[Layout] = None, affinity=None):
        self.scorer = scorer
        self.topo = topo
        self.layout = layout or Layout("packed", 1, 0, sharing=False)
        self.affinity = affinity  # scoring.affinity.ReplicaAffinity, or None

    def forward(self, seqs: List[torch.Tensor]) -> torch.Tensor:
        """`seqs` on the CPU. Returns [n + TALLY_ROWS, width] on rank 0: rewards, then the tally rows above."""
        n = len(seqs)
        out = torch.zeros(n + TALLY_ROWS, self.scorer.output_width(seqs), dtype=torch.float32,
                          device=self.topo.device)
        shares = self.layout.replica_shares([s.numpy() for s in seqs], self.topo.dp_size, self.affinity)
        mine = shares[self.topo.dp_rank]
        computed, reused = self.scorer.computed_tokens, self.scorer.reused_tokens
        fault = None
        try:
            if mine:
                values = self.scorer([seqs[i] for i in mine])
                if self.topo.tp_rank == 0:  # a share may need fewer columns than the batch (steps per row)
                    out[d.to_device(torch.tensor(mine), out.device), : values.shape[1]] = values
        except FATAL_ERRORS as exc:
            log.exception("rank %d: fatal error in the forward; the group will exit so that torchrun restarts it",
                          self.topo.rank)
            if self.topo.tp_size > 1:  # the other ranks may wait inside the forward's own collectives: leave now
                raise RankFault(f"rank {self.topo.rank}: {exc}") from exc
            fault = exc
            out[n + FAULTED, 0] = 1.0
        except Exception:
            log.exception("rank %d: forward failed", self.topo.rank)
            out[n + FAILED, 0] = 1.0
        if self.topo.tp_rank == 0:  # one rank per replica counts its tokens
            out[n + COMPUTED, 0] = float(self.scorer.computed_tokens - computed)
            out[n + REUSED, 0] = float(self.scorer.reused_tokens - reused)
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
        self.n_tokens = sum(len(s) for s in seqs)
        self.untaken = deque(range(len(seqs)))
        self.rows: List[Optional[np.ndarray]] = [None] * len(seqs)
        self.missing = len(seqs)

    def result(self) -> np.ndarray:
        width = max(len(r) for r in self.rows)  # rows of one work may come from forwards of different widths
        out = np.zeros((len(self.rows), width), dtype=np.float32)
        for i, r in enumerate(self.rows):
            out[i, :len(r)] = r
        return out


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


class EngineStats:
    """Counts of the leader's forwards, logged every `interval_s` and at exit: how full the forwards were, tokens
    received and computed (fewer when sequences share prefixes), and the share of the time with a forward in
    flight (launched and its rewards not yet read back)."""

    def __init__(self, interval_s: float, metrics=None, budget: int = 0, cache=None):
        self.interval_s = interval_s
        self.metrics = metrics  # metrics.Metrics, or None
        self.budget = budget
        self.cache = cache  # rank 0's scoring.prefix_cache.PrefixCache, or None
        self.busy_since: Optional[float] = None
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self.since, self.forwards, self.seqs, self.tokens, self.computed, self.busy_s = now, 0, 0, 0, 0, 0.0
        self.launch_s = self.gpu_s = 0.0  # summed over the forwards (the GPU's: those timed, on CUDA)
        self.gpu_timed = 0
        self.reused = 0
        if self.busy_since is not None:
            self.busy_since = now

    def launched(self) -> None:
        if self.busy_since is None:
            self.busy_since = time.monotonic()

    def finished(self, n_seqs: int, n_tokens: int, n_computed: int, n_reused: int, idle_after: bool,
                 launch_s: float = 0.0, gpu_s: Optional[float] = None) -> None:
        """A forward was read back: `n_computed` and `n_reused` tokens summed over the replicas."""
        if self.metrics is not None and self.cache is not None:
            self.metrics.reused.inc(n_reused)
        self.reused += n_reused
        self.forwards += 1
        self.seqs += n_seqs
        self.tokens += n_tokens
        self.computed += n_computed
        self.launch_s += launch_s
        if gpu_s is not None:
            self.gpu_s += gpu_s
            self.gpu_timed += 1
        if self.metrics is not None:
            self.metrics.forward(n_seqs, n_tokens, n_computed, self.budget)
        if idle_after and self.busy_since is not None:
            self.busy_s += time.monotonic() - self.busy_since
            self.busy_since = None
        if self.interval_s and time.monotonic() - self.since >= self.interval_s:
            self.log()

    def log(self) -> None:
        now = time.monotonic()
        wall = now - self.since
        busy = self.busy_s + (now - self.busy_since if self.busy_since is not None else 0.0)
        if self.forwards:
            log.info("engine: %d forwards, %d sequences, %d tokens received, %d computed (%.0f per forward, %.2fx "
                     "shared) in %.1f s: %.0f tokens/s received, %.0f computed, busy %.1f %%", self.forwards,
                     self.seqs, self.tokens, self.computed, self.computed / self.forwards,
                     self.tokens / max(1, self.computed), wall, self.tokens / wall, self.computed / wall,
                     100 * busy / wall)
            log.info("engine: per forward %.1f ms on rank 0 to plan and launch%s", 1e3 * self.launch_s / self.forwards,
                     f", {1e3 * self.gpu_s / self.gpu_timed:.1f} ms on the GPU (first kernel to rewards on the host)"
                     if self.gpu_timed else "")
            if self.cache is not None:
                log.info("prefix cache: %d of those tokens taken from earlier forwards instead of computed (all "
                         "replicas; rank 0's holds %d sequences)", self.reused, len(self.cache))
        self._reset(now)


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


class Leader:
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
        self.queued_batches = self.queued_tokens = 0  # submitted (one per Triton batch) and not answered yet
        cache = getattr(getattr(engine, "scorer", None), "cache", None)  # rank 0's replica's prefix cache, or None
        self.stats = EngineStats(stats_interval_s, metrics, tokens_per_forward, cache)
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

    def submit(self, seqs: List[torch.Tensor], alone: bool = False) -> Future:
        """Rewards [len(seqs), width] as a numpy array, in a future. `alone`: score these sequences in forwards
        of their own (used to retry the requests of a failed forward one by one)."""
        fut: Future = Future()
        with self._lock:
            n_tokens = sum(len(s) for s in seqs)
            if self._closed.is_set():
                fut.set_exception(self._refusal or ShuttingDown("the reward server is shutting down; retry"))
            elif not seqs:
                fut.set_result(np.zeros((0, 1), dtype=np.float32))
            elif self.max_queued_tokens and self.queued_tokens and \
                    self.queued_tokens + n_tokens > self.max_queued_tokens:
                fut.set_exception(Overloaded(
                    f"the reward server is overloaded ({self.queued_tokens} tokens queued, limit "
                    f"{self.max_queued_tokens}); retry later"))
            else:
                self.queued_batches += 1
                self.queued_tokens += n_tokens
                fut.add_done_callback(lambda _: self._dequeued(n_tokens))
                self._queue.put(Work(seqs, fut, alone))
        return fut

    def _dequeued(self, n_tokens: int) -> None:
        with self._lock:
            self.queued_batches -= 1
            self.queued_tokens -= n_tokens

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
                planned = time.monotonic()
                picked, _ = plan_forward(self._pending, self.tokens_per_forward, self.sharing,
                                         self.min_shared, self.cached) if self._pending else ([], 0)
                try:
                    launched = self._launch(picked, planned) if picked else None
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
            if item.fut.set_running_or_notify_cancel():
                self._pending.append(item)

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
            host, ready = out, None
        return InFlight(picked, n_tokens, host, ready, begun, time.monotonic() - planned)

    def _finish(self, forward: InFlight, idle_after: bool) -> None:
        out = forward.wait()
        self._launches.popleft()
        n = len(forward.picked)
        tally = out[n:, 0].tolist()
        self.stats.finished(n, forward.n_tokens, int(tally[COMPUTED]), int(tally[REUSED]), idle_after,
                            forward.launch_s, forward.gpu_seconds())
        failed, faulted = int(tally[FAILED]), int(tally[FAULTED])
        if faulted:
            raise RankFault(f"{faulted} reward rank(s) hit a fatal error (out of memory?); the server restarts")
        # a work failed by an earlier forward may still have had sequences in this one: skip it
        works = [w for w in {id(w): w for w, _ in forward.picked}.values() if not w.fut.done()]
        if failed:  # every work with a sequence in this forward fails; the service retries them one by one
            for w in works:
                self._pending.remove(w)
                w.fut.set_exception(ForwardError(f"the forward failed on {failed} rank(s); see the server log"))
            return
        values = out[:n].numpy()
        for (w, i), row in zip(forward.picked, values):
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
                fail(item)


def run_subscriber(engine: Engine) -> None:
    """Ranks 1..N-1: follow rank 0's commands until SHUTDOWN."""
    while True:
        command, n_seqs, n_tokens = d.recv_header()
        if command == Command.SHUTDOWN:
            return
        if command == Command.FORWARD:
            engine.forward(d.broadcast_batch(None, n_seqs, n_tokens))
