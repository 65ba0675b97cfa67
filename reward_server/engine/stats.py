"""The leader's counts of its forwards, logged and exported as metrics."""

import logging
import time
from typing import Optional

log = logging.getLogger("reward_server.engine")


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
