"""TEST ONLY: failures on purpose, so the tests can show what the server does when a rank runs out of memory,
when a request that slipped past the checks breaks the forward, or when requests are in flight at shutdown; and
the stand-in scorer (`fault_injection.standin`), which takes a GPU's time without a GPU, for benchmarks/standin.py.

Everything is off by default (config `fault_injection`, see config/schema.py); the server logs a warning at
start-up when any of it is on. Never set these in production.
"""

import hashlib
import logging
import os
import time
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import distributed as d
from .config import FaultInjectionConfig
from .config.standin import StandInConfig

log = logging.getLogger(__name__)


def enabled(cfg: FaultInjectionConfig) -> bool:
    return bool(cfg.oom_file or cfg.poison_token_id is not None or cfg.forward_delay_s > 0)


class FaultInjectingScorer:
    """Wraps a scorer; raises or sleeps before calling it, as configured."""

    def __init__(self, scorer, cfg: FaultInjectionConfig, rank: int):
        self.scorer = scorer
        self.cfg = cfg
        self.rank = rank
        log.warning("rank %d: TEST-ONLY fault injection is on: %s", rank, cfg)

    def __getattr__(self, name):  # width, tag, output_width, ... of the wrapped scorer
        return getattr(self.scorer, name)

    def __call__(self, seqs: List[torch.Tensor]) -> torch.Tensor:
        cfg = self.cfg
        if cfg.forward_delay_s > 0:
            time.sleep(cfg.forward_delay_s)
        if cfg.oom_file and self.rank == cfg.oom_rank and os.path.exists(cfg.oom_file):
            os.remove(cfg.oom_file)
            raise torch.OutOfMemoryError(f"injected by fault_injection.oom_file on rank {self.rank}")
        if cfg.poison_token_id is not None and any(bool((s == cfg.poison_token_id).any()) for s in seqs):
            raise ValueError(f"injected by fault_injection.poison_token_id={cfg.poison_token_id}")
        return self.scorer(seqs)


# ---------------------------------------------------------------- the stand-in scorer (fault_injection.standin)

def standin_enabled(cfg: FaultInjectionConfig) -> bool:
    return cfg.standin.tokens_per_s > 0


def standin_reward(seq: np.ndarray, depth: int, column: int) -> float:
    """A fixed reward in [-1, 1), exact in float32, for the token at `depth` of `seq` (column `column`): a hash of
    the tokens up to it, so that like a causal model's it depends on that prefix alone, wherever it was scored."""
    digest = hashlib.blake2b(seq[:depth + 1].tobytes() + int(column).to_bytes(4, "little"), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 40) / 2 ** 23 - 1.0  # 24 bits: exact in float32


class StandInScorer:
    """Wraps a real scorer (scoring/scorer.py): plans its calls with its layout and its prefix cache (the cache's
    entries and slots are booked as in a real call, nothing is stored), counts the tokens computed, adds each
    call's time on the GPU to `seconds` (`take_seconds`), and returns `standin_reward` at each token its readout
    reads. The backbone never runs."""

    def __init__(self, scorer, cfg: StandInConfig, rank: int):
        self.scorer = scorer
        self.cfg = cfg
        self.computed_tokens = 0
        self.seconds = 0.0
        if rank == 0:
            log.warning("TEST-ONLY stand-in scorer: no model runs; each call takes its tokens / %g tokens/s (x 1 / %g "
                        "through the prefix cache) + %g s; fixed rewards", cfg.tokens_per_s, cfg.shared_speed,
                        cfg.call_s)

    def __getattr__(self, name):  # layout, cache, readout, output_width, ... of the wrapped scorer
        return getattr(self.scorer, name)

    @property
    def reused_tokens(self) -> int:
        return self.scorer.reused_tokens

    def take_seconds(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def __call__(self, seqs: List[torch.Tensor]) -> torch.Tensor:
        arrays = [s.numpy() for s in seqs]
        readout, cache = self.scorer.readout, self.scorer.cache
        out = torch.zeros(len(arrays), readout.output_width(arrays), dtype=torch.float32)
        for call in self.scorer.layout.calls(arrays):
            members = [arrays[m] for m in call.members]
            reuse = cache.plan(call, members) if cache is not None and call.ends is not None else None
            computed = reuse.computed if reuse is not None else call.computed
            self.computed_tokens += computed
            speed = self.cfg.tokens_per_s * (self.cfg.shared_speed if reuse is not None else 1.0)
            self.seconds += computed / speed + self.cfg.call_s
        member, depth, column = readout.targets(arrays)
        for k, (m, at) in enumerate(zip(member.tolist(), depth.tolist())):
            columns = range(out.shape[1]) if column is None else [int(column[k])]
            for c in columns:
                out[m, c] = standin_reward(arrays[m], at, c)
        return out.to(self.scorer.device)


class Done:
    """When a stand-in forward's rewards are on the host; the leader waits on it as on a CUDA event."""

    def __init__(self, at: float):
        self.at = at

    def query(self) -> bool:
        return time.monotonic() >= self.at

    def synchronize(self) -> None:
        delay = self.at - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class StandInEngine:
    """Wraps an engine (engine/step.py) whose scorer is a StandInScorer: each forward returns at once and leaves
    `pending`, when it ends on a GPU that works through the forwards in order (each replica on a clock of its own;
    a forward ends when its slowest replica does: the ranks take the latest end, a collective of their own), so that
    rank 0 plans and launches the next forward while this one runs (batching.overlap), as on a GPU."""

    def __init__(self, engine, scorer: StandInScorer):
        self.engine = engine
        self.standin = scorer
        self.free_at = 0.0  # time.monotonic() when this replica's queued forwards end (one clock for every process)
        self.pending: Optional[Done] = None

    def __getattr__(self, name):  # scorer, topo, layout, affinity of the wrapped engine
        return getattr(self.engine, name)

    def forward(self, seqs: List[torch.Tensor]) -> torch.Tensor:
        out = self.engine.forward(seqs)
        self.free_at = max(time.monotonic(), self.free_at) + self.standin.take_seconds()
        end = self.free_at
        if dist.is_initialized() and dist.get_world_size() > 1:
            latest = torch.tensor([end], dtype=torch.float64)
            dist.all_reduce(latest, op=dist.ReduceOp.MAX, group=d._control_group)  # gloo, on the CPU
            end = float(latest.item())
        self.pending = Done(end)
        return out
