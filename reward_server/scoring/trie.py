"""Shared prefixes among token sequences, found by sorting: no trie of nodes is ever built.

Sorted by their bytes, sequences that share a prefix are adjacent, and a sequence comes before every sequence it
is a prefix of; the prefix two sorted neighbours share (`lcp`) is then the longest that either shares with any
earlier sequence. So the prefix trie of a set of sequences has `sum(len) - sum(lcp)` nodes, a sequence added to a
set costs its length minus the longest prefix it shares with its sorted neighbours in the set, and emitting each
sequence's tokens after its `lcp` in sorted order lays the trie out depth-first (`lay_out`). Every function here
is plain numpy on the CPU, computed alike on every rank from the same sequences.
"""

import bisect
from typing import List, Optional, Sequence, Tuple

import numpy as np


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    if m == 0 or a[0] != b[0]:
        return 0
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if diff.size else m


def trie_order(seqs: Sequence[np.ndarray], idx: Sequence[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """`idx` (default: all) sorted so that shared prefixes are adjacent, and lcp[k] = the prefix order[k-1] and
    order[k] share (lcp[0] = 0). Sequences must be int64 arrays (their bytes are the sort key)."""
    idx = list(range(len(seqs))) if idx is None else list(idx)
    order = np.array(sorted(idx, key=lambda i: seqs[i].tobytes()), dtype=np.int64)
    lcp = np.zeros(len(order), dtype=np.int64)
    for k in range(1, len(order)):
        lcp[k] = common_prefix(seqs[order[k - 1]], seqs[order[k]])
    return order, lcp


def units(lengths: np.ndarray, lcp: np.ndarray, min_shared: int, cap: int) -> List[Tuple[int, int, int]]:
    """Cut a sorted order into runs to keep together: a run ends where neighbours share fewer than `min_shared`
    tokens, or where it would grow past `cap` tokens of trie (a run of one sequence may be longer). Returns
    (start, stop, trie tokens) over positions in the sorted order."""
    out: List[Tuple[int, int, int]] = []
    start, cost = 0, 0
    for k in range(len(lengths)):
        shared = int(lcp[k]) if k > start and lcp[k] >= min_shared else 0
        if k > start and (shared == 0 or cost + lengths[k] - shared > cap):
            out.append((start, k, cost))
            start, cost, shared = k, 0, 0
        cost += int(lengths[k]) - shared
    if len(lengths):
        out.append((start, len(lengths), cost))
    return out


def first_fit_decreasing(costs: Sequence[int], capacity: int) -> List[List[int]]:
    """Indices grouped into bins of at most `capacity` in total, largest first (a larger item gets a bin alone)."""
    bins: List[List[int]] = []
    room: List[int] = []
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        for b, free in enumerate(room):
            if costs[i] <= free:
                bins[b].append(i)
                room[b] -= costs[i]
                break
        else:
            bins.append([i])
            room.append(capacity - costs[i])
    return bins


def least_loaded(costs: Sequence[int], n_bins: int) -> List[List[int]]:
    """Indices spread over `n_bins` with about equal totals: largest first, each to the least loaded bin."""
    bins: List[List[int]] = [[] for _ in range(n_bins)]
    load = [0] * n_bins
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        b = min(range(n_bins), key=lambda b: load[b])
        bins[b].append(i)
        load[b] += costs[i]
    return bins


class TrieRow:
    """Sequences laid out as one depth-first trie: every shared prefix token once.

    ids, positions: the tokens and each one's position in its own sequence; ends[k]: the last index of token k's
    subtree, so token q sees token k (k is q or an ancestor of q) exactly when k <= q <= ends[k]; paths[j]: the
    index of every token of the j-th sequence (in `members` order) in this row."""

    def __init__(self, seqs: Sequence[np.ndarray], members: np.ndarray, lcp: np.ndarray):
        self.members = members
        lengths = np.array([len(seqs[m]) for m in members], dtype=np.int64)
        new = lengths - lcp  # tokens each sequence adds to the trie
        offset = np.concatenate([[0], np.cumsum(new)])
        n = int(offset[-1])
        self.ids = np.concatenate([seqs[m][l:] for m, l in zip(members, lcp)]) if n else np.zeros(0, np.int64)
        self.positions = np.arange(n, dtype=np.int64) - np.repeat(offset[:-1] - lcp, new)
        self.ends = np.empty(n, dtype=np.int64)
        self.paths: List[np.ndarray] = []
        open_runs: List[list] = []  # [first depth, index of its first token, tokens] of the current path, shallow first
        path = np.zeros(0, dtype=np.int64)
        for j, shared in enumerate(lcp.tolist()):
            # the path's tokens at depth >= shared end their subtrees just before this sequence's tokens
            while open_runs and open_runs[-1][0] >= shared:
                _, at, count = open_runs.pop()
                self.ends[at:at + count] = offset[j] - 1
            if open_runs and open_runs[-1][0] + open_runs[-1][2] > shared:
                run = open_runs[-1]
                keep = shared - run[0]
                self.ends[run[1] + keep:run[1] + run[2]] = offset[j] - 1
                run[2] = keep
            if new[j]:
                open_runs.append([int(shared), int(offset[j]), int(new[j])])
            path = np.concatenate([path[:shared], np.arange(offset[j], offset[j + 1], dtype=np.int64)])
            self.paths.append(path)
        for _, at, count in open_runs:
            self.ends[at:at + count] = n - 1

    def __len__(self) -> int:
        return len(self.ids)


class PrefixIndex:
    """The scheduler's view of queued sequences: what each would add to the trie of those taken so far, and
    which queued sequences share a prefix of at least `min_shared` tokens with it (its group). `cached[i]`: how
    many leading tokens of sequence i the prefix cache holds (computed by an earlier forward, not again)."""

    def __init__(self, seqs: Sequence[np.ndarray], min_shared: int, cached: Optional[Sequence[int]] = None):
        self.seqs = seqs
        self.cached = cached
        self.order, self.lcp = trie_order(seqs)
        self.rank = np.empty(len(seqs), dtype=np.int64)
        self.rank[self.order] = np.arange(len(seqs))
        self.group = np.cumsum(self.lcp < max(1, min_shared))  # group id per sorted position
        self.group_start = np.searchsorted(self.group, self.group, side="left")
        self.group_stop = np.searchsorted(self.group, self.group, side="right")
        # sparse table: mins[j][k] = min(lcp[k : k + 2**j])
        self.mins = [self.lcp]
        while 2 ** len(self.mins) <= len(seqs):
            prev, half = self.mins[-1], 2 ** (len(self.mins) - 1)
            self.mins.append(np.minimum(prev[:-half], prev[half:]))
        self.taken: List[int] = []  # sorted positions of the sequences taken

    def _shared(self, a: int, b: int) -> int:
        """The prefix shared by the sequences at sorted positions a < b: min(lcp[a+1 .. b])."""
        j = (b - a).bit_length() - 1
        return int(min(self.mins[j][a + 1], self.mins[j][b - 2 ** j + 1]))

    def cost(self, i: int) -> int:
        """Tokens sequence i adds to the trie of the sequences taken so far."""
        p = int(self.rank[i])
        k = bisect.bisect_left(self.taken, p)
        shared = 0
        if k > 0:
            shared = self._shared(self.taken[k - 1], p)
        if k < len(self.taken) and self.taken[k] != p:
            shared = max(shared, self._shared(p, self.taken[k]))
        elif k < len(self.taken):  # already taken
            return 0
        if self.cached is not None:
            shared = max(shared, int(self.cached[i]))
        return len(self.seqs[i]) - shared

    def take(self, i: int) -> None:
        bisect.insort(self.taken, int(self.rank[i]))

    def group_of(self, i: int) -> np.ndarray:
        """The sequences (including i) in i's group, in sorted order."""
        p = int(self.rank[i])
        return self.order[self.group_start[p]:self.group_stop[p]]


class HeldPrefixes:
    """Sequences held somewhere (the prefix cache, a replica), each an entry with `ids`, `key` (ids' bytes) and
    `oldest` (the clock value of its oldest token); `longest` finds the entry sharing the longest prefix with a
    sequence: sorted by bytes, it is next to where the sequence would go."""

    def __init__(self, min_shared: int):
        self.min_shared = max(1, min_shared)
        self.clear()

    def clear(self) -> None:
        self.entries: dict = {}
        self.sorted_keys: List[bytes] = []

    def __len__(self) -> int:
        return len(self.entries)

    def longest(self, seq: np.ndarray):
        """(tokens shared, entry) for the entry sharing the longest prefix with `seq`; (0, None) when that is
        shorter than min_shared."""
        at = bisect.bisect_left(self.sorted_keys, seq.tobytes())
        best, found = 0, None
        for k in (at - 1, at):
            if 0 <= k < len(self.sorted_keys):
                entry = self.entries[self.sorted_keys[k]]
                shared = common_prefix(seq, entry.ids)
                if shared > best:
                    best, found = shared, entry
        return (best, found) if best >= self.min_shared else (0, None)

    def add(self, entry) -> None:
        if entry.key not in self.entries:
            bisect.insort(self.sorted_keys, entry.key)
        self.entries[entry.key] = entry  # a sequence held again: its newest entry

    def evict(self, horizon: int) -> None:
        """Forget the entries whose oldest token is older than `horizon`."""
        dead = [k for k, e in self.entries.items() if e.oldest < horizon]
        if dead:
            for k in dead:
                del self.entries[k]
            self.sorted_keys = sorted(self.entries)
