"""TEST ONLY: failures on purpose, so the tests can show what the server does when a rank runs out of memory,
when a request that slipped past the checks breaks the forward, or when requests are in flight at shutdown.

Everything is off by default (config `fault_injection`, see config.py); the server logs a warning at start-up
when any of it is on. Never set these in production.
"""

import logging
import os
import time
from typing import List

import torch

from .config import FaultInjectionConfig

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
