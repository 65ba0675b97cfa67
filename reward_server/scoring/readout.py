"""Hidden states -> numbers: which tokens of each sequence a scorer reads, and what it makes of them there.

  LastToken   a sequence-classification head at each sequence's pooled token: [n, num_labels]
  StepScores  a process reward model's head at the last token of every step tag: [n, max steps]
A readout names (sequence, position) pairs; the scorer finds those tokens in whatever layout it used (with prefix
sharing, a token in a shared prefix is computed once and read for every sequence that contains it).
"""

from typing import List, Optional, Tuple

import numpy as np
import torch


POOLINGS = ("last_non_pad", "last")


def pooled_position(ids: np.ndarray, pad_token_id: Optional[int]) -> int:
    """transformers' *ForSequenceClassification rule: the last token whose id is not the pad token (the first
    token when every one is), or the last token when the model has no pad token."""
    if pad_token_id is None:
        return len(ids) - 1
    kept = np.flatnonzero(ids != pad_token_id)
    return int(kept[-1]) if kept.size else 0


class LastToken:
    """`pad_token_id`: pool as transformers does (model.pooling=last_non_pad, the model's config.pad_token_id);
    None: each sequence's true last token (model.pooling=last), also when it is the pad token."""

    def __init__(self, head, width: int, pad_token_id: Optional[int] = None):
        self.head = head
        self.width = width
        self.pad_token_id = pad_token_id

    def output_width(self, seqs: List[np.ndarray]) -> int:
        return self.width

    def targets(self, seqs: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """(sequence, position, output column or None for the whole row) of each token read."""
        positions = [pooled_position(s, self.pad_token_id) for s in seqs]
        return np.arange(len(seqs)), np.array(positions, dtype=np.int64), None

    def write(self, out: torch.Tensor, rows: torch.Tensor, columns, hidden: torch.Tensor) -> None:
        out[rows] = self.head(hidden).float()


class StepScores:
    """`tag.positions` finds the steps; `read` turns the head's logits at a step into its score."""

    def __init__(self, head, read, tag):
        self.head = head
        self.read = read
        self.tag = tag

    def output_width(self, seqs: List[np.ndarray]) -> int:
        return max(1, int(self.tag.counts(seqs).max()))

    def targets(self, seqs: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.tag.positions(seqs)

    def write(self, out: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, hidden: torch.Tensor) -> None:
        out[rows, columns] = self.read(self.head(hidden).float())
