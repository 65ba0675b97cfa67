"""Batch-invariant scoring with prefix sharing and a prefix cache (`batching.batch_invariant`; scoring/invariant.py
says what varies without it and why).

Every sequence sees its keys in fixed tiles counted from its own position 0, whatever it is computed with: the
mode's attention (`invariant.blocked_attention`) takes each item's keys and values by position from a store. An
*item* is a run of tokens [start, end) of a sequence, computed with the keys of [0, start) as its context: start is
0, or the length of a prefix that an item of the same call holds (a prefix several sequences share, computed once:
the trie's sharing, at any split point) or that the store holds from an earlier call (the cache). Items are packed
padding-free into rows (the backbone's other layers act on each token alone; the rows hold a multiple of GRID
tokens in all), a shared prefix before the items that extend it; every layer's attention first writes the call's
new keys and values into the store, then reads each item's by slot, so an item may share its context's call. Keys,
values and final hidden states stay in the store, a ring of slots like scoring/prefix_cache.py's. A token's keys and
values depend only on the tokens up to it: the same bits whether computed alone, in a shared prefix, or read back.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .. import distributed as d
from .invariant import GRID, QUERY_TILE as QT, attend_tiles, blocked
from .trie import HeldPrefixes, first_fit_decreasing, trie_order


def _up(n: int) -> int:
    return -(-n // GRID) * GRID


class Entry:
    """An item stored: its ids and the virtual slot of each token (the form trie.HeldPrefixes keeps)."""

    def __init__(self, ids: np.ndarray, slots: np.ndarray):
        self.ids, self.slots = ids, slots
        self.oldest = int(slots.min()) if len(slots) else 0
        self.key = ids.tobytes()


class Item:
    def __init__(self, ids: np.ndarray, start: int, context: Optional[np.ndarray]):
        self.ids, self.start = ids, start
        self.context = context  # virtual slots of [0, start), or the item (a shared prefix) that holds them
        self.level = 0
        self.slots: Optional[np.ndarray] = None


class BlockStore:
    """Keys, values (per layer) and final hidden states of the tokens computed, a ring of `capacity` slots; with
    `keep` the entries outlive a call (the prefix cache of this mode; `prefix_cache_tokens`), else each call
    starts empty. Grows to hold one call's tokens when that is more (the entries are then forgotten)."""

    def __init__(self, capacity: int, min_shared: int, device: torch.device, keep: bool):
        self.capacity, self.keep, self.device = max(capacity, GRID), keep, device
        self.min_shared = max(1, min_shared)
        self.keys: Dict[int, torch.Tensor] = {}
        self.values: Dict[int, torch.Tensor] = {}
        self.hidden: Optional[torch.Tensor] = None
        self.reused_tokens = 0
        self.clear()

    def clear(self) -> None:
        self.held = HeldPrefixes(self.min_shared)
        self.written = 0

    def __len__(self) -> int:
        return len(self.held)

    def lookup(self, seq: np.ndarray):
        return self.held.longest(seq)

    def plan(self, call, seqs):
        """The stand-in scorer's booking (faults.StandInScorer): this mode's calls are booked as computed in full."""
        return None

    def reserve(self, tokens: int) -> None:
        if tokens > self.capacity:
            self.capacity = _up(tokens)
            self.keys, self.values, self.hidden = {}, {}, None
            self.clear()

    def slots(self, virtual: np.ndarray) -> torch.Tensor:
        """Physical slots of virtual ones; -1 (padding) -> the extra slot of zeros."""
        return d.to_device(torch.from_numpy(np.where(virtual < 0, self.capacity, virtual % self.capacity)),
                           self.device)

    def write(self, pools: Dict[int, torch.Tensor], layer: int, slots: torch.Tensor, states: torch.Tensor) -> None:
        if layer not in pools:  # one more slot, of zeros: padding reads finite values (0 x value adds nothing)
            pools[layer] = torch.empty((self.capacity + 1, *states.shape[1:]), dtype=states.dtype,
                                       device=states.device)
            pools[layer][self.capacity].zero_()
        pools[layer].index_copy_(0, slots, states)

    def write_hidden(self, slots: torch.Tensor, states: torch.Tensor) -> None:
        if self.hidden is None:
            self.hidden = torch.empty((self.capacity, states.shape[-1]), dtype=states.dtype, device=states.device)
        self.hidden.index_copy_(0, slots, states)


class CallPlan:
    """One backbone call: rows of items' new tokens, and what the attention needs to see each item's keys by
    position."""

    def __init__(self, store: BlockStore, rows: List[List[Item]], pad_token_id: int):
        width = _up(max(sum(len(x.ids) - x.start for x in row) for row in rows))
        self.store = store
        self.ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
        self.positions = np.zeros((len(rows), width), dtype=np.int64)
        items = [x for row in rows for x in row]
        flat, new = [], []
        for r, row in enumerate(rows):
            at = 0
            for x in row:
                n = len(x.ids) - x.start
                self.ids[r, at:at + n] = x.ids[x.start:]
                self.positions[r, at:at + n] = np.arange(x.start, len(x.ids))
                flat.append(r * width + at + np.arange(n))
                new.append(x.slots[x.start:])
                at += n
        self.computed = sum(len(f) for f in flat)
        self.flat = d.to_device(torch.from_numpy(np.concatenate(flat)), store.device)
        self.new_slots = store.slots(np.concatenate(new))
        queries = max(-(-(len(x.ids) - x.start) // QT) * QT for x in items)
        keys = max(_up(len(x.ids)) for x in items)
        q_index = np.zeros((len(items), queries), dtype=np.int64)  # flat index of each item's new tokens
        q_pos = np.full((len(items), queries), -1, dtype=np.int64)  # their positions (-1: padding, sees nothing)
        kv = np.full((len(items), keys), -1, dtype=np.int64)  # virtual slot of each position (-1: padding)
        for i, (x, f) in enumerate(zip(items, flat)):
            q_index[i, :len(f)] = f
            q_pos[i, :len(f)] = np.arange(x.start, len(x.ids))
            kv[i, :len(x.ids)] = x.slots
        # per query block, its items grouped by the key blocks they see: (block, items, key blocks, leading key
        # blocks every real query sees whole, where the real queries' outputs go, which rows they are)
        self.groups = []
        for b in range(queries // QT):
            block = q_pos[:, b * QT:(b + 1) * QT]
            live = np.flatnonzero(block[:, 0] >= 0)
            top = block[live].max(1) // GRID + 1
            for seen in np.unique(top).tolist():
                sub = live[top == seen]
                real = (block[sub] >= 0).reshape(-1)
                src = np.flatnonzero(real)
                dest = q_index[sub, b * QT:(b + 1) * QT].reshape(-1)[src]
                full = int(((block[sub].reshape(-1)[src] + 1) // GRID).min())
                self.groups.append((b, self._dev(sub), seen, full, self._dev(dest), self._dev(src)))
        self.q_index = d.to_device(torch.from_numpy(q_index), store.device)
        self.q_pos = d.to_device(torch.from_numpy(q_pos), store.device)
        self.kv = store.slots(kv)

    def _dev(self, array: np.ndarray) -> torch.Tensor:
        return d.to_device(torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)), self.store.device)

    def attend(self, layer, query, key, value, scaling, softcap, window):
        """query/key/value [R, heads, W, D] of the call's packed rows -> attention output [R, W, heads, D]."""
        rows, heads, width, dim = query.shape
        kv_heads = key.shape[1]
        store = self.store
        ones = torch.ones_like(value[..., :1])  # values stored with a column of ones: P @ V sums the weights too
        for pools, states in ((store.keys, key), (store.values, torch.cat([value, ones], -1))):
            new = states.transpose(1, 2).reshape(rows * width, kv_heads, states.shape[-1]).index_select(0, self.flat)
            store.write(pools, layer, self.new_slots, new)
        scale = dim ** -0.5 if scaling is None else scaling
        flat_q = query.transpose(1, 2).reshape(rows * width, heads, dim).float() * scale
        out = torch.zeros(rows * width, heads, dim, dtype=torch.float32, device=query.device)
        g = heads // kv_heads
        for b, items, seen, full, dest, src in self.groups:
            index = self.q_index[items, b * QT:(b + 1) * QT]  # [n, QT]
            n = len(items)
            q = flat_q[index.reshape(-1)].view(n, QT, kv_heads, g, dim).permute(0, 2, 3, 1, 4)
            slots = self.kv[items, :seen * GRID].reshape(-1)

            def take(pool):
                return pool[layer].index_select(0, slots).view(n, seen * GRID, kv_heads, -1).transpose(1, 2)

            o = attend_tiles(q.reshape(n, kv_heads, g * QT, dim), take(store.keys), take(store.values),
                             self.q_pos[items, b * QT:(b + 1) * QT], softcap, window, full)
            o = o.view(n, kv_heads, g, QT, dim).permute(0, 3, 1, 2, 4).reshape(n * QT, heads, dim)
            out.index_copy_(0, dest, o.index_select(0, src))
        return out.to(query.dtype).view(rows, width, heads, dim), None


class SharedBlocks:
    """The mode's scorer core: sequences -> the final hidden state of each (sequence, depth) asked for."""

    def __init__(self, backbone, store: BlockStore, sharing: bool, budget: int, row_tokens: int, pad_token_id: int):
        self.backbone, self.store, self.sharing = backbone, store, sharing
        self.budget, self.row_tokens, self.pad_token_id = budget, max(GRID, row_tokens), pad_token_id

    def plan(self, seqs: Sequence[np.ndarray]):
        """The items to compute (a shared prefix before the items that extend it), and each sequence's item (whose
        slots are its tokens')."""
        store = self.store
        nodes: Dict[bytes, Item] = {}  # the distinct sequences and shared block-aligned prefixes
        for s in seqs:
            nodes.setdefault(s.tobytes(), Item(s, 0, None))
        lengths = set()
        trie = sum(len(s) for s in seqs)
        if self.sharing and len(seqs) > 1:
            order, lcp = trie_order(seqs)
            trie -= int(lcp.sum())
            for k in range(1, len(order)):
                a = int(lcp[k])
                if a >= store.min_shared:
                    lengths.add(a)
                    prefix = seqs[order[k]][:a]
                    nodes.setdefault(prefix.tobytes(), Item(prefix, 0, None))
        items = sorted(nodes.values(), key=lambda x: len(x.ids))
        for x in items:  # the longest shared prefix that is a node of this call
            for a in sorted((a for a in lengths if a < len(x.ids)), reverse=True):
                parent = nodes.get(x.ids[:a].tobytes())
                if parent is not None:
                    x.start, x.context = a, parent
                    break
        upper = sum(len(x.ids) - x.start for x in items)
        store.reserve(upper)
        horizon = store.written + upper - store.capacity  # slots older than this may be overwritten by this call
        for x in items if self.sharing and store.keep else []:
            shared, entry = store.lookup(x.ids)
            if shared > x.start and entry.slots[:shared].min() >= horizon:
                x.start, x.context = shared, entry.slots[:shared]
        todo: List[Item] = []
        for x in items:
            if isinstance(x.context, Item):
                x.level = x.context.level + 1
                context = x.context.slots[:x.start]
            else:
                context = x.context if x.context is not None else np.zeros(0, np.int64)
            new = store.written + np.arange(len(x.ids) - x.start, dtype=np.int64)
            store.written += len(new)
            x.slots = np.concatenate([context, new])
            if len(new):
                todo.append(x)
        store.reused_tokens += trie - sum(len(x.ids) - x.start for x in todo)  # the call's trie, less computed
        return sorted(todo, key=lambda x: x.level), [nodes[s.tobytes()] for s in seqs]

    def __call__(self, seqs: Sequence[np.ndarray], member: np.ndarray, depth: np.ndarray):
        """(final hidden states [len(member), hidden] of token depth[k] of seqs[member[k]], tokens computed)."""
        store = self.store
        todo, mine = self.plan(seqs)
        computed = 0
        try:
            for call in self._calls(todo):
                bins = first_fit_decreasing([len(x.ids) - x.start for x in call], self.row_tokens)
                computed += self._run(CallPlan(store, [[call[i] for i in b] for b in bins], self.pad_token_id))
            slots = np.array([mine[m].slots[t] for m, t in zip(member.tolist(), depth.tolist())], dtype=np.int64)
            picked = store.hidden.index_select(0, store.slots(slots))
        except BaseException:
            store.clear()
            raise
        if not store.keep:
            store.clear()
            return picked, computed
        for x in {id(x): x for x in mine + todo}.values():
            store.held.add(Entry(x.ids.copy(), x.slots))
        store.held.evict(store.written - store.capacity)
        return picked, computed

    def _calls(self, todo: List[Item]) -> List[List[Item]]:
        """Items in order (a shared prefix before the items that extend it: they may share its call, whose
        attention stores every layer's keys before reading any), cut into calls of at most the budget."""
        calls: List[List[Item]] = []
        tokens = 0
        for x in todo:
            n = len(x.ids) - x.start
            if not calls or _up(tokens + n) > self.budget:
                calls.append([])
                tokens = 0
            calls[-1].append(x)
            tokens += n
        return calls

    def _run(self, plan: CallPlan) -> int:
        ids = d.to_device(torch.from_numpy(plan.ids), self.store.device)
        positions = d.to_device(torch.from_numpy(plan.positions), self.store.device)
        mask = torch.ones((ids.shape[0], 1, 1, 1), dtype=torch.bool, device=ids.device)  # ready-made: not built
        with blocked(self.backbone.config):
            hidden = self.backbone(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False,
                                   invariant_plan=plan).last_hidden_state
        self.store.write_hidden(plan.new_slots, hidden.reshape(-1, hidden.shape[-1])[plan.flat])
        return plan.computed
