"""A call in flight (RewardFuture: its requests' futures put back in input order) and the client's worker threads."""

import queue
import threading
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .errors import RewardCancelled, RewardServerError, RewardTimeout, RowError, call_error
from .wire import Part, Scores

ON_ROW_ERROR = ("raise", "nan")


class RewardFuture:
    """A batch being scored. `result()` waits for the rewards; `future` is a concurrent.futures.Future of
    `Scores` (use `asyncio.wrap_future(handle.future)` in asyncio code).

    Rows the server refuses or fails: with on_row_error="raise" (the default) the call raises once every request
    has been answered, a RewardInputError / RewardServerError that carries every row's reward (NaN in the failed
    rows) and the failed rows' reasons (`exc.rewards`, `exc.errors`, `exc.scored`, `exc.step_rewards`); with
    "nan" it returns them: `result()` has NaN in the failed rows, `errors()` / `scores().errors` say why. Any
    other failure (the server unavailable, a timeout, a server fault) fails the call at once, its requests not
    yet sent dropped, with the rows scored so far attached to the exception."""

    def __init__(self, n: int, as_torch: bool, mean, std, on_row_error: str = "raise",
                 model_shape: Optional[Callable[[bool], Optional[Tuple[int, bool]]]] = None):
        if on_row_error not in ON_ROW_ERROR:
            raise ValueError(f"on_row_error must be one of {ON_ROW_ERROR}, got {on_row_error!r}")
        self.future: Future = Future()
        self._n, self._as_torch, self._mean, self._std = n, as_torch, mean, std
        self._on_row_error = on_row_error
        self._model_shape = model_shape  # (fetch) -> (num_labels, process reward model?) or None: when no part scored
        self._lock = threading.Lock()
        self._parts: List[Tuple[int, Future]] = []
        self._job: Optional[Future] = None  # the dispatch job that splits the batch into requests
        self._remaining = 0
        self.future.add_done_callback(self._on_done)  # a cancelled (or failed) call drops what is not sent

    def result(self, timeout: Optional[float] = None):
        """Rewards [batch, num_labels] (numpy float32, or torch if the batch was torch), in input order."""
        return self._wait(timeout).rewards

    def scores(self, timeout: Optional[float] = None) -> Scores:
        """Everything the server answered: rewards, step_rewards, errors."""
        return self._wait(timeout)

    def errors(self, timeout: Optional[float] = None) -> Dict[int, RowError]:
        """{index: RowError} of the rows that failed (on_row_error="nan"; {} when every row was scored)."""
        return self._wait(timeout).errors

    def cancel(self) -> bool:
        """Cancel the call: its requests not sent yet are dropped (those in flight finish on the server)."""
        return self.future.cancel()

    def cancelled(self) -> bool:
        return self.future.cancelled()

    def _wait(self, timeout: Optional[float]) -> Scores:
        try:
            return self.future.result(timeout)
        except FutureTimeout:
            if self.future.done():  # the call's own failure (RewardTimeout is a TimeoutError too)
                raise
            raise RewardTimeout(f"the rewards of {self._n} sequences were not ready within {timeout:g}s "
                                f"(result(timeout=...)); the call goes on, cancel() drops it") from None

    def step_rewards(self, timeout: Optional[float] = None) -> list:
        """A process reward model's per-step scores: one 1-D array per sequence."""
        steps = self._wait(timeout).step_rewards
        if steps is None:
            raise RewardServerError("the server's model returned no step_rewards (it is not a process reward model)")
        return steps

    def done(self) -> bool:
        return self.future.done()

    def exception(self, timeout: Optional[float] = None):
        return self.future.exception(timeout)

    # called by the client's worker threads

    def _track(self, parts: List[Tuple[int, Future]]) -> None:
        with self._lock:
            self._parts, self._remaining = parts, len(parts)
        if self.future.done():  # cancelled while the batch was being split
            self._on_done(self.future)
        for _, part in parts:
            part.add_done_callback(self._on_part)

    def _on_done(self, future: Future) -> None:
        if future.cancelled() or future.exception() is not None:
            with self._lock:
                parts = list(self._parts)
            for _, part in parts:
                part.cancel()
            if self._job is not None:
                self._job.cancel()

    def _on_part(self, part: Future) -> None:
        if part.cancelled():
            return self._fail(RewardCancelled("cancelled: the client was closed"))
        if part.exception() is not None:
            return self._fail(part.exception())
        with self._lock:
            self._remaining -= 1
            if self._remaining:
                return
        try:
            self._finish()
        except RewardServerError as exc:
            self._fail(exc)
        except Exception as exc:  # answers that do not fit together (servers of a pool with different models)
            error = RewardServerError(f"the answers to the {self._n} sequences' requests do not fit together: "
                                      f"{exc!r}")
            error.__cause__ = exc
            self._fail(error)

    def _fail(self, exc: BaseException) -> None:
        """The first failure fails the batch; requests of it not yet sent are dropped (`_on_done`). A server's
        failure carries the rows scored so far."""
        if self.future.done():
            return
        if isinstance(exc, RewardServerError) and not isinstance(exc, RewardCancelled) and exc.scored is None:
            try:
                with self._lock:
                    parts = [p for _, p in self._parts]
                done = [p.result() for p in parts if p.done() and not p.cancelled() and p.exception() is None]
                exc._attach(*self._assemble(done, fetch=False))
            except Exception:  # what was scored cannot be put together: the failure alone
                pass
        try:
            self.future.set_exception(exc)
        except InvalidStateError:
            return

    def _assemble(self, parts: List[Part], fetch: bool):
        """(rewards [batch, num_labels] as result() returns them, NaN in every row not scored; step rewards or
        None; scored [batch] bool; {index: RowError}) from the requests answered. The width comes from an answer,
        else from the model's config (`fetch`: read it from the server if the client has not yet); rewards is
        None when it is not known."""
        parts = sorted(parts, key=lambda p: p.start)
        widths = {p.rewards.shape[1] for p in parts if p.rewards is not None}
        if len(widths) > 1:
            raise RewardServerError(f"the server answered rows of different widths {sorted(widths)} for one call "
                                    f"(servers of different models?)")
        prm = any(p.steps is not None for p in parts)
        errors: Dict[int, RowError] = {}
        for p in parts:
            errors.update(p.errors())
        errors = dict(sorted(errors.items()))
        scored = np.zeros(self._n, dtype=bool)
        if widths:
            width = widths.pop()
        else:
            shape = self._model_shape(fetch) if self._model_shape is not None else None
            if shape is None:
                return None, None, scored, errors
            width, prm = shape
        rewards = np.full((self._n, width), np.nan, dtype=np.float32)
        steps = [np.zeros(0, dtype=np.float32)] * self._n if prm else None
        for p in parts:
            if p.rewards is not None:
                rewards[p.start:p.start + p.n] = p.rewards
                scored[p.start:p.start + p.n] = True
            if steps is not None and p.steps is not None:
                steps[p.start:p.start + p.n] = p.steps
        scored[list(errors)] = False
        if self._mean is not None:
            rewards = rewards - self._mean
        if self._std is not None:
            rewards = rewards / self._std
        rewards = rewards.astype(np.float32, copy=False)
        if self._as_torch:
            import torch

            rewards = torch.from_numpy(rewards)
            steps = None if steps is None else [torch.from_numpy(s) for s in steps]
        return rewards, steps, scored, errors

    def _finish(self) -> None:
        parts = [part.result() for _, part in sorted(self._parts, key=lambda p: p[0])]
        rewards, steps, scored, errors = self._assemble(parts, fetch=True)
        if errors and self._on_row_error == "raise":
            failed = [p for p in parts if p.failed]
            exc = call_error([(p.error(), p.start, p.n) for p in failed], list(errors), self._n)
            exc._attach(rewards, steps, scored, errors)
            return self._fail(exc)
        try:
            self.future.set_result(Scores(rewards, steps, errors))
        except InvalidStateError:
            pass




class _Workers:
    """A fixed set of daemon threads running jobs from a queue: unlike ThreadPoolExecutor's, a client that is
    never closed cannot hold up the interpreter's exit while a request hangs."""

    def __init__(self, n: int, name: str):
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            self._jobs.put((fut, fn, args))
        return fut

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn, args = job
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:
                    fut.set_exception(exc)

    def shutdown(self) -> None:
        """Cancel the jobs not started; each thread exits after its current job."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[0].cancel()
            for _ in self._threads:
                self._jobs.put(None)

    def join(self) -> None:
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()
