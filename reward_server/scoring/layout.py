"""Sequences -> the inputs of backbone calls, and each sequence's tokens' places in the output.

Two layouts (`batching.layout`):
  packed  sequences laid out padding-free in rows as depth-first tries (scoring/trie.py): with prefix sharing
          (`batching.prefix_sharing`, the default) a prefix that several sequences share is one set of tokens;
          without it every sequence is a branch of its own. Each token sees exactly its own sequence's earlier
          tokens (`ends`, turned into an attention mask by scoring/masks.py) at its own position, so every
          sequence's hidden states are those of a forward over it alone.
  padded  one sequence per row, rows padded to the longest of their call, with a 2D padding mask that
          transformers turns into its own causal mask: works with every attention implementation.
Batch-invariant mode (`batching.batch_invariant`, packed kind only): scoring/blocks.py plans its calls (with its
own attention, scoring/invariant.py); `calls` here lays out one sequence per row at offset 0 for the stand-in's
booking, and `replica_shares` keeps shared-prefix groups together as with sharing.
A call holds rows of at most `budget` tokens in all (rows x padded width); a sequence longer than that gets a call
of its own. Sequences are int64 numpy arrays on the CPU; every rank computes the same layout from the same ids.
"""

from typing import Iterator, List, Optional, Sequence

import numpy as np

from .trie import TrieRow, first_fit_decreasing, least_loaded, trie_order, units


class Call:
    """One backbone call: [R, W] ids and positions, either `ends` (packed: tree attention mask) or `pad_mask`
    (padded), the scorer's sequences it holds (`members`) and where each of their tokens is in the flattened
    [R * W] output (`index`)."""

    def __init__(self, ids: np.ndarray, positions: np.ndarray, members: np.ndarray, paths: List[np.ndarray],
                 computed: int, ends: Optional[np.ndarray] = None, pad_mask: Optional[np.ndarray] = None,
                 lengths: Optional[np.ndarray] = None):
        self.ids, self.positions, self.ends, self.pad_mask = ids, positions, ends, pad_mask
        self.members = members
        self.computed = computed  # real tokens computed (no padding)
        self.lengths = lengths  # packed: real tokens of each row (the rest is padding)
        self._paths = np.concatenate(paths)
        self._starts = np.concatenate([[0], np.cumsum([len(p) for p in paths])]).astype(np.int64)

    def index(self, member: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """Flat output index of token `depth` of the member-th sequence of this call."""
        return self._paths[self._starts[member] + depth]

    def path(self, member: int) -> np.ndarray:
        """Flat indices of every token of the member-th sequence, in order."""
        return self._paths[self._starts[member]:self._starts[member + 1]]


def micro_batches(lengths: Sequence[int], budget: int) -> List[List[int]]:
    """Indices grouped longest first so that rows x longest length stays within `budget` tokens
    (a longer one runs alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: List[List[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Layout:
    """Plans the calls of a scorer and the share of each data-parallel replica; see the module docstring.

    row_tokens: longest packed row (a dense attention mask costs row length squared); pad_multiple: rows are
    padded to a multiple of this (flex_attention's block size keeps the number of shapes to compile small);
    min_shared: sequences sharing at least this many leading tokens stay in one row and one replica."""

    def __init__(self, kind: str, budget: int, pad_token_id: int, row_tokens: int = 0, sharing: bool = True,
                 min_shared: int = 32, pad_multiple: int = 1, invariant: int = 0):
        if kind not in ("packed", "padded"):
            raise ValueError(f"batching.layout={kind!r}: expected packed or padded")
        self.kind = kind
        self.budget = budget
        self.pad_token_id = pad_token_id
        self.row_tokens = row_tokens or budget
        self.sharing = sharing and kind == "packed"
        self.min_shared = max(1, min_shared)
        self.pad_multiple = max(1, pad_multiple)
        self.invariant = invariant  # > 0: batch-invariant rows of a multiple of this many tokens (module docstring)
        if invariant:  # the mode's calls are planned by scoring/blocks.py; `calls` here only books them
            self.pad_multiple = _round_up(invariant, self.pad_multiple)

    def _units(self, seqs: Sequence[np.ndarray], idx: Sequence[int], cap: int):
        """Runs of sequences to keep together (in sorted order) with their trie sizes, each at most `cap` tokens;
        without sharing, each sequence alone."""
        if not self.sharing:
            return [(np.array([i]), len(seqs[i])) for i in idx]
        order, lcp = trie_order(seqs, idx)
        lengths = np.array([len(seqs[i]) for i in order], dtype=np.int64)
        return [(order[a:b], cost) for a, b, cost in units(lengths, lcp, self.min_shared, cap)]

    def replica_shares(self, seqs: Sequence[np.ndarray], n_replicas: int, affinity=None) -> List[List[int]]:
        """Sequence indices for each data-parallel replica, about equal in tokens computed; with sharing, a group
        sharing a prefix goes to one replica whenever it fits that replica's forward budget (a group larger than
        that is cut into pieces of at most the budget), and with `affinity` (scoring/affinity.py) preferably to
        the one whose prefix cache holds its prefix. A group kept whole computes its prefix once: a lone group
        runs on one replica while the others idle, where splitting it would compute the prefix on each."""
        if n_replicas == 1:
            return [list(range(len(seqs)))]
        run = self._units(seqs, range(len(seqs)), cap=self.budget)
        bins = affinity.assign(seqs, run) if affinity is not None else least_loaded([c for _, c in run], n_replicas)
        return [[int(i) for u in b for i in run[u][0]] for b in bins]

    def calls(self, seqs: Sequence[np.ndarray]) -> Iterator[Call]:
        if self.kind == "padded":
            yield from self._padded_calls(seqs)
            return
        if self.invariant:
            yield from self._invariant_calls(seqs)
            return
        run = self._units(seqs, range(len(seqs)), self.row_tokens)
        rows = []
        for members in first_fit_decreasing([c for _, c in run], self.row_tokens):
            idx = [int(i) for u in members for i in run[u][0]]
            order, lcp = trie_order(seqs, idx) if self.sharing else (np.array(idx), np.zeros(len(idx), np.int64))
            rows.append(TrieRow(seqs, order, lcp))
        for group in micro_batches([len(r) for r in rows], self.budget):
            yield self._stack([rows[g] for g in group])

    def _invariant_calls(self, seqs: Sequence[np.ndarray]) -> Iterator[Call]:
        """One sequence per row at offset 0; the rows of a call all have one padded width, a function of their own
        length alone; at most `budget` tokens per call (at least one row)."""
        widths: dict = {}
        for i, s in enumerate(seqs):
            widths.setdefault(_round_up(len(s), self.pad_multiple), []).append(i)
        for width in sorted(widths):
            idx, per_call = widths[width], max(1, self.budget // width)
            for a in range(0, len(idx), per_call):
                yield self._stack([TrieRow(seqs, np.array([i]), np.zeros(1, np.int64)) for i in idx[a:a + per_call]])

    def _stack(self, rows: List[TrieRow]) -> Call:
        """Rows padded to one width; a pad token sees only itself."""
        width = _round_up(max(len(r) for r in rows), self.pad_multiple)
        ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        positions = np.zeros((len(rows), width), dtype=np.int64)
        ends = np.tile(np.arange(width, dtype=np.int64), (len(rows), 1))
        members, paths = [], []
        for r, row in enumerate(rows):
            n = len(row)
            ids[r, :n], positions[r, :n], ends[r, :n] = row.ids, row.positions, row.ends
            members.append(row.members)
            paths += [r * width + p for p in row.paths]
        return Call(ids, positions, np.concatenate(members), paths, sum(len(r) for r in rows), ends=ends,
                    lengths=np.array([len(r) for r in rows], dtype=np.int64))

    def _padded_calls(self, seqs: Sequence[np.ndarray]) -> Iterator[Call]:
        for idx in micro_batches([len(s) for s in seqs], self.budget):
            width = len(seqs[idx[0]])
            ids = np.full((len(idx), width), self.pad_token_id, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for r, i in enumerate(idx):
                ids[r, :len(seqs[i])] = seqs[i]
                mask[r, :len(seqs[i])] = 1
            positions = np.tile(np.arange(width, dtype=np.int64), (len(idx), 1))
            paths = [r * width + np.arange(len(seqs[i]), dtype=np.int64) for r, i in enumerate(idx)]
            yield Call(ids, positions, np.array(idx, dtype=np.int64), paths, int(mask.sum()), pad_mask=mask)
