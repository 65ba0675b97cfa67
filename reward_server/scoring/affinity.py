"""Data parallelism and the prefix cache: a group of sequences goes to the replica whose cache probably holds its
prefix, as far as that keeps the replicas' work about equal.

Each replica has a prefix cache of its own (scoring/prefix_cache.py), holding the tokens of the forwards it ran.
Spread by size alone, a search's next depth or the rest of a GRPO group may land on a replica that holds nothing of
it: that spread does not look at the caches. So every rank keeps a record of the sequences each replica was given, and
`assign` puts each group (largest first) where it costs least: the tokens that replica was given in this forward so
far, plus the group's tokens it does not hold. With nothing recorded this is the size-only spread (largest first, to
the least loaded), so traffic that shares nothing is spread as it was.

The record imitates the caches without asking them: every rank updates it from the same forwards in the same order,
so every rank computes the same shares, as it must (a replica scores only its own share). It is a guess (a call
that fails clears a cache, not the record; a call that shares nothing is not stored by the cache, and a group alone
with nothing held is not recorded either), so it steers work and never changes a reward.
"""

from typing import Dict, List, Sequence, Tuple

import numpy as np

from .trie import HeldPrefixes, common_prefix


class _Held:
    def __init__(self, ids: np.ndarray, oldest: int):
        self.ids = ids
        self.key = ids.tobytes()
        self.oldest = oldest


class ReplicaRecord:
    """What one replica's prefix cache probably holds: the sequences it was given, on a clock of the tokens it
    computed; like the cache's ring, an entry is gone once `capacity` tokens were computed after its oldest one."""

    def __init__(self, capacity: int, min_shared: int):
        self.capacity = capacity
        self.held = HeldPrefixes(min_shared)
        self.written = 0

    def record(self, seqs: Sequence[np.ndarray], computed: int) -> None:
        """`seqs` were given to this replica, which computed `computed` tokens of them."""
        oldest = self.written
        for s in seqs:
            entry = self.held.longest(s)[1]
            if entry is not None:  # its prefix's tokens were stored when that entry's were
                oldest = min(oldest, entry.oldest)
        self.written += computed
        for s in seqs:  # a copy: the caller's array may be a view of a buffer it reuses
            self.held.add(_Held(s.copy(), oldest))
        self.held.evict(self.written - self.capacity)


class ReplicaAffinity:
    """Every rank's record of what the data-parallel replicas' prefix caches hold; see the module docstring."""

    def __init__(self, n_replicas: int, capacity: int, min_shared: int):
        self.replicas = [ReplicaRecord(capacity, min_shared) for _ in range(n_replicas)]
        # per sequence (its bytes), the tokens of it each replica holds, until the next record: the scheduler looks
        # the queued sequences up, then `assign` the ones it took
        self._known: Dict[bytes, List[int]] = {}

    def _lengths(self, seq: np.ndarray) -> List[int]:
        key = seq.tobytes()
        got = self._known.get(key)
        if got is None:
            got = self._known[key] = [r.held.longest(seq)[0] for r in self.replicas]
        return got

    def _empty(self) -> bool:
        return not any(len(r.held) for r in self.replicas)

    def held(self, seq: np.ndarray) -> int:
        """The longest prefix of `seq` that a replica probably holds."""
        return 0 if self._empty() else max(self._lengths(seq))

    def assign(self, seqs: Sequence[np.ndarray], units: Sequence[Tuple[np.ndarray, int]]) -> List[List[int]]:
        """Unit indices for each replica. `units`: (sequence indices in sorted order, tokens of their trie), groups to
        keep together (layout.Layout._units). Records the assignment."""
        n = len(self.replicas)
        members = [[seqs[int(i)] for i in idx] for idx, _ in units]
        held = [[0] * n for _ in units]  # tokens of each unit's trie that each replica holds
        if not self._empty():  # else nothing recorded (traffic that shares nothing): no lookups
            for u, m in enumerate(members):
                for s, shared in zip(m, [0] + [common_prefix(a, b) for a, b in zip(m, m[1:])]):
                    held[u] = [h + max(0, n_held - shared) for h, n_held in zip(held[u], self._lengths(s))]
        self._known.clear()
        load = [0] * n
        bins: List[List[int]] = [[] for _ in range(n)]
        for u in sorted(range(len(units)), key=lambda u: -units[u][1]):
            cost = units[u][1]
            b = min(range(n), key=lambda b: (load[b] + cost - held[u][b], -held[u][b]))
            bins[b].append(u)
            load[b] += cost - held[u][b]
            if held[u][b] or len(members[u]) > 1:  # the cache stores only calls that share something
                self.replicas[b].record(members[u], cost - held[u][b])
        return bins
