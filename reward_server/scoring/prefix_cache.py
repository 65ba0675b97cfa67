"""Prefix reuse across forwards: the keys and values (and final hidden states) of the tokens of recent forwards stay
on the device, so that a later sequence that shares a prefix with one scored before computes only what follows it
(a GRPO group whose requests reached two forwards, a search's depth d+1 extending depth d's paths).

Within a forward the trie (scoring/trie.py) shares prefixes; this module removes, from each packed call, the trie
nodes found in the cache. The call then computes only its new tokens; each layer's attention sees the cached
nodes' keys and values first (the call's *context*), then its own, under the same rule as without the cache: token
q sees token k when k <= q <= ends[k] in the call's full trie (scoring/masks.py). A token's key and value depend
only on the tokens up to it, so cached ones are exactly what the call would have computed (up to rounding);
the readout reads a cached token's stored final hidden state.

Storage: `capacity` token slots per layer (keys, values) plus one for final hidden states; which slots hold
which tokens is a radix tree (scoring/radix.py): a prefix several stored sequences share is held once, and when a
call brings more than there is room for, what goes first are the leaves that branch off a shared prefix (a GRPO
group's responses, the call's own among them), so that a group's prompt outlives its responses and its late
members still find it. The nodes a call reads are never given up for it.
Every rank of a replica sees the same calls and so takes the same decisions: no rank ever asks another what it
holds. A call that fails clears the cache (its entries name slots that were not written); failures are alike on the
ranks of a replica (a bad input), and if one ever were not, the ranks' calls would stop matching and the watchdog
would restart the group. Calls without a trie (padded layout) do not use it, nor calls that share nothing, within
themselves or with the cache: those run exactly as without it.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import distributed as d
from .layout import _round_up
from .radix import RadixTree
from .trie import trie_order

# Index of a context slot that holds nothing (padding): larger than any query's index, so nothing sees it.
NOTHING = np.iinfo(np.int64).max // 2


class Reuse:
    """A packed call with its cached nodes taken out: the inputs of the backbone (`ids`, `positions`, [R, W] of new
    tokens; the mask's index arrays), where the context's keys come from (`context_slots`, [R, C]), where each of
    the call's flat token indices lands in [hidden of new tokens, hidden of context tokens] (`remap`), and what to
    store afterwards."""

    def __init__(self, call, width: int, context: int, pad_token_id: int):
        rows = call.ids.shape[0]
        self.call = call
        self.ids = np.full((rows, width), pad_token_id, dtype=np.int64)
        self.positions = np.zeros((rows, width), dtype=np.int64)
        self.query_index = np.zeros((rows, width), dtype=np.int64)  # each new token's index in the call's row
        self.kv_index = np.full((rows, context + width), NOTHING, dtype=np.int64)  # same, over context + new
        self.kv_ends = np.zeros((rows, context + width), dtype=np.int64)
        self.kv_positions = np.zeros((rows, context + width), dtype=np.int64)
        self.context_slots = np.zeros((rows, context), dtype=np.int64)  # physical slots (padding: 0, never seen)
        self.context_read: List[np.ndarray] = []  # physical slots of the real context tokens, row by row
        self.remap = np.zeros(call.ids.size, dtype=np.int64)
        self.store_rows = self.store_cols = self.store_slots = np.zeros(0, dtype=np.int64)
        self.computed = 0
        self.reused = 0

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    @property
    def context(self) -> int:
        return self.context_slots.shape[1]


class ContextKV:
    """The backbone's KV cache for one call: each attention layer gets the call's context before its own keys and
    values, and its own are kept for storing. Run outside torch.compile (a graph break in each compiled layer), so
    that the compiled layer code does not specialize on the layer index."""

    def __init__(self, cache: "PrefixCache", reuse: Reuse):
        self.cache = cache
        self.reuse = reuse
        self.new: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.new[layer_idx] = (key_states, value_states)
        if not self.reuse.context:
            return key_states, value_states
        keys, values = self.cache.context(layer_idx, self.reuse)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.reuse.context


def context_cache_class():
    """ContextKV as a transformers Cache (models check the type of the cache they are given)."""
    from transformers.cache_utils import DynamicCache

    class _ContextKV(ContextKV, DynamicCache):
        def __init__(self, cache, reuse):
            DynamicCache.__init__(self)
            ContextKV.__init__(self, cache, reuse)

        update = torch._dynamo.disable(ContextKV.update)
        get_seq_length = ContextKV.get_seq_length

    return _ContextKV


class PrefixCache:
    def __init__(self, capacity: int, min_shared: int, pad_multiple: int, pad_token_id: int, device: torch.device):
        self.capacity = capacity
        self.pad_token_id = pad_token_id
        self.min_shared = max(1, min_shared)
        self.pad_multiple = max(1, pad_multiple)
        self.device = device
        self.kv_class = context_cache_class()
        self.keys: Dict[int, torch.Tensor] = {}  # layer -> [capacity, kv heads, head dim]
        self.values: Dict[int, torch.Tensor] = {}
        self.hidden: Optional[torch.Tensor] = None  # [capacity, hidden size]
        self.clear()
        self.reused_tokens = 0  # tokens read from the cache instead of computed (counts for the engine's log)

    def clear(self) -> None:
        """Forget every entry (the storage stays allocated)."""
        self.tree = RadixTree(self.capacity)

    def __len__(self) -> int:
        return len(self.tree)  # sequences held

    @property
    def written(self) -> int:
        """Token slots handed out so far (since the last clear)."""
        return self.tree.written

    # ------------------------------------------------------------ planning (CPU)
    def lookup(self, seq: np.ndarray) -> Tuple[int, Optional[np.ndarray]]:
        """The longest prefix of `seq` the cache holds (0 when shorter than min_shared), and its tokens' slots."""
        shared, path = self.tree.match(seq)
        if shared < self.min_shared:
            return 0, None
        return shared, self.tree.slots_of(path, shared)

    def plan(self, call, seqs: Sequence[np.ndarray]) -> Optional[Reuse]:
        """`call` (a packed layout.Call) over `seqs` (the call's members, in order) with its cached nodes taken out;
        None when nothing of it is cached and none of its sequences share a prefix of min_shared tokens: traffic
        that shares nothing (one response per prompt) runs as it would without the cache and is not stored."""
        rows, full = call.ids.shape
        source = np.full(rows * full, -1, dtype=np.int64)  # slot of each cached node
        tree = self.tree
        tree.tick()
        hits = 0
        for j, seq in enumerate(seqs):
            # the whole prefix held, even under min_shared (a chat template's first tokens): the call takes the
            # cache's path anyway if it takes it at all, and a token held is never stored twice
            shared, path = tree.match(seq)
            if shared:
                tree.lock(path)
                source[call.path(j)[:shared]] = tree.slots_of(path, shared)
                hits += shared >= self.min_shared
        if not hits and (len(seqs) < 2 or trie_order(seqs)[1].max() < self.min_shared):
            return None
        source = source.reshape(rows, full)
        context = [np.flatnonzero(source[r, :n] >= 0) for r, n in enumerate(call.lengths)]
        new = [np.flatnonzero(source[r, :n] < 0) for r, n in enumerate(call.lengths)]
        longest_context = max(len(c) for c in context)
        reuse = Reuse(call, _round_up(max(len(n) for n in new), self.pad_multiple),
                      _round_up(longest_context, self.pad_multiple) if longest_context else 0, self.pad_token_id)
        width, ctx = reuse.width, reuse.context
        done = 0
        for r, (c, w) in enumerate(zip(context, new)):
            n = int(call.lengths[r])
            reuse.ids[r, :len(w)] = call.ids[r, w]
            reuse.positions[r, :len(w)] = call.positions[r, w]
            reuse.query_index[r] = np.concatenate([w, n + np.arange(width - len(w))])  # padding: unique, sees itself
            reuse.kv_index[r, :len(c)] = c
            reuse.kv_index[r, ctx:] = reuse.query_index[r]
            reuse.kv_ends[r, :len(c)] = call.ends[r, c]
            reuse.kv_ends[r, ctx:] = reuse.query_index[r]
            reuse.kv_ends[r, ctx:ctx + len(w)] = call.ends[r, w]
            reuse.kv_positions[r, :len(c)] = call.positions[r, c]
            reuse.kv_positions[r, ctx:] = reuse.positions[r]
            slots = source[r, c]
            reuse.context_slots[r, :len(c)] = slots
            reuse.context_read.append(slots)
            reuse.remap[r * full + w] = r * width + np.arange(len(w))
            reuse.remap[r * full + c] = rows * width + done + np.arange(len(c))
            done += len(c)
        reuse.computed = sum(len(w) for w in new)
        reuse.reused = done
        self.reused_tokens += done
        self._assign_slots(reuse, source, new, seqs)
        return reuse

    def _assign_slots(self, reuse: Reuse, source: np.ndarray, new: List[np.ndarray], seqs) -> None:
        """The call's sequences into the tree (those shorter than min_shared are not stored), then slots for the
        new tokens it keeps (scoring/radix.py: when room is short, some of the call's new tokens are not stored;
        never the nodes the call reads). They are stored after the forward."""
        call, tree = reuse.call, self.tree
        rows, full = call.ids.shape
        slot = source.reshape(-1)
        slot = np.where(slot >= 0, slot, -2 - np.arange(rows * full, dtype=np.int64))  # placeholders: -2 - index
        for j, seq in enumerate(seqs):
            if len(seq) >= self.min_shared:
                tree.insert(seq, slot[call.path(j)])
        placeholders, slots = tree.settle()
        at = -2 - placeholders  # the stored tokens' indices in the call (row * full + column)
        col = np.full(rows * full, -1, dtype=np.int64)  # each new token's column among its row's new tokens
        for r, w in enumerate(new):
            col[r * full + w] = np.arange(len(w))
        reuse.store_rows, reuse.store_cols, reuse.store_slots = at // full, col[at], slots

    # ------------------------------------------------------------ device side
    def kv(self, reuse: Reuse):
        """The KV cache object to hand to the backbone for this call."""
        return self.kv_class(self, reuse)

    def context(self, layer: int, reuse: Reuse) -> Tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s context keys and values: [R, kv heads, C, head dim]."""
        if layer not in self.keys:
            raise RuntimeError(f"prefix cache: no stored keys for layer {layer} (the model calls its cache in a way this "
                               "cache does not know); set batching.prefix_cache_tokens=0")
        slots = self._device_slots(reuse)
        rows, ctx = reuse.context_slots.shape

        def take(pool):
            return pool.index_select(0, slots).view(rows, ctx, *pool.shape[1:]).transpose(1, 2)

        return take(self.keys[layer]), take(self.values[layer])

    def _device_slots(self, reuse: Reuse) -> torch.Tensor:
        if getattr(reuse, "_slots", None) is None:
            reuse._slots = d.to_device(torch.from_numpy(reuse.context_slots.reshape(-1)), self.device)
        return reuse._slots

    def finish(self, reuse: Reuse, kv, hidden: Optional[torch.Tensor]) -> torch.Tensor:
        """After the call's forward (`hidden`: its new tokens' final hidden states, None when all were cached): the
        final hidden states the readout takes, then the new tokens stored (in that order, though a call's new tokens
        never take the slots of its own context: `make_room` leaves the nodes the call reads)."""
        states = self._hidden_states(reuse, hidden)
        if hidden is not None:
            self._store(reuse, kv, hidden)
        return states

    def _hidden_states(self, reuse: Reuse, hidden: Optional[torch.Tensor]) -> torch.Tensor:
        """[R * W + context tokens, hidden size]: the call's new tokens' final hidden states, then its context's."""
        parts = [] if hidden is None else [hidden.reshape(-1, hidden.shape[-1])]
        if reuse.reused:
            slots = d.to_device(torch.from_numpy(np.concatenate(reuse.context_read)), self.device)
            parts.append(self.hidden.index_select(0, slots))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _store(self, reuse: Reuse, kv, hidden: torch.Tensor) -> None:
        """The new tokens' keys, values and final hidden states into their slots (see `finish`)."""
        if not len(reuse.store_slots):
            return
        rows = d.to_device(torch.from_numpy(reuse.store_rows), self.device)
        cols = d.to_device(torch.from_numpy(reuse.store_cols), self.device)
        slots = d.to_device(torch.from_numpy(reuse.store_slots), self.device)
        for layer, (keys, values) in kv.new.items():
            for pools, states in ((self.keys, keys), (self.values, values)):
                if layer not in pools:
                    pools[layer] = torch.empty((self.capacity, states.shape[1], states.shape[3]), dtype=states.dtype,
                                               device=states.device)
                # states: [R, kv heads, W, head dim] (the new tokens' only; the context is not in kv.new)
                pools[layer].index_copy_(0, slots, states[rows, :, cols])
        if self.hidden is None:
            self.hidden = torch.empty((self.capacity, hidden.shape[-1]), dtype=hidden.dtype, device=hidden.device)
        self.hidden.index_copy_(0, slots, hidden[rows, cols])
