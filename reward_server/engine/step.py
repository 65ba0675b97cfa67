"""One synchronized forward over all ranks: every rank runs `Engine.forward` on the same broadcast batch (its
data-parallel replica's share), and the rewards are summed onto rank 0. Subscribers (ranks 1..N-1) run
`run_subscriber` until rank 0 sends SHUTDOWN.

The rewards and each rank's tally (its forward failed or faulted, tokens computed and reused) travel in one tensor,
so that a forward costs one collective; this module alone knows that layout: rank 0 reads the summed tensor back as
a `ForwardResult`."""

import logging
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from .. import distributed as d
from ..distributed import Command, Topology
from ..scoring.layout import Layout
from .errors import FATAL_ERRORS, RankFault

log = logging.getLogger("reward_server.engine")


# Rows after the rewards in a forward's output, summed over the ranks (first column): how many ranks' forward failed
# (a bad batch), how many hit a fatal error (RankFault), and the tokens all replicas computed and took from their
# prefix caches.
FAILED, FAULTED, COMPUTED, REUSED = range(4)
TALLY_ROWS = REUSED + 1


@dataclass
class ForwardResult:
    """A forward's outcome on rank 0, summed over the ranks."""

    rewards: np.ndarray  # [n, width] float32, one row per sequence of the forward
    failed_ranks: int  # ranks whose forward failed (a bad batch; the group is healthy)
    faulted_ranks: int  # ranks that hit a fatal error (RankFault: the group restarts)
    computed: int  # tokens the replicas computed
    reused: int  # tokens the replicas took from their prefix caches

    @classmethod
    def from_reduced(cls, out: torch.Tensor, n: int) -> "ForwardResult":
        """From `Engine.forward`'s tensor for n sequences, on the host (a view of it: no copy of the rewards)."""
        tally = out[n:, 0].tolist()
        return cls(out[:n].numpy(), int(tally[FAILED]), int(tally[FAULTED]), int(tally[COMPUTED]),
                   int(tally[REUSED]))


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
        """`seqs` on the CPU. Returns [n + TALLY_ROWS, width] on rank 0 (on its device; read it on the host with
        `ForwardResult.from_reduced`): rewards, then the tally rows above."""
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


def run_subscriber(engine: Engine) -> None:
    """Ranks 1..N-1: follow rank 0's commands until SHUTDOWN."""
    while True:
        command, n_seqs, n_tokens = d.recv_header()
        if command == Command.SHUTDOWN:
            return
        if command == Command.FORWARD:
            engine.forward(d.broadcast_batch(None, n_seqs, n_tokens))
