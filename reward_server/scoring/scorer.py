"""One forward code path for every kind of reward: layout (scoring/layout.py) x backbone x readout
(scoring/readout.py). Sequences come in as CPU tensors of token ids, identical on every rank of a replica; the
layout is planned on the CPU and copied to the device without waiting for the GPU."""

import contextlib
import inspect
import logging
from typing import List, Optional

import numpy as np
import torch
from torch.fx.experimental import _config as fx_config

from .. import distributed as d
from ..loading.checkpoint import StartupError
from ..config import BatchingConfig, auto_row_tokens
from .blocks import BlockStore, SharedBlocks
from .invariant import RowByRow, grid, register_attention
from .layout import Layout
from .masks import TreeMasks, flex_block_size
from .prefix_cache import PrefixCache

log = logging.getLogger(__name__)

# Compiled layers (model.compile) hand their layer index, an int attribute, to the prefix cache's KV cache call (a
# graph break): dynamic there, one graph serves every layer instead of one per layer up to dynamo's recompile limit.
# Without duck sizing, lengths that happen to be equal (context and new tokens) do not specialize a graph that a
# later call recompiles. Only around the calls that take the cache: set for every graph, the first broke inductor's
# lowering of flex_attention (seen on the GPU with the cache off).
def _cache_call_settings() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True))
    stack.enter_context(fx_config.patch(use_duck_shape=False))
    return stack




class Scorer:
    def __init__(self, backbone, readout, layout: Layout, masks, device: torch.device,
                 cache: Optional[PrefixCache] = None, blocks: Optional[SharedBlocks] = None):
        self.backbone = backbone
        self.readout = readout
        self.layout = layout
        self.masks = masks  # TreeMasks for the packed layout, None for padded
        self.device = device
        self.cache = cache  # PrefixCache (packed layout with prefix sharing), or None
        self.cache_argument = cache_argument(backbone)
        self.blocks = blocks  # batch-invariant mode: its layout, attention and store (its cache when kept)
        self.computed_tokens = 0  # tokens the backbone computed (no padding), all calls so far

    @property
    def reused_tokens(self) -> int:
        """Tokens taken from the prefix cache instead of computed, all calls so far."""
        return self.cache.reused_tokens if self.cache is not None else 0

    def output_width(self, seqs: List[torch.Tensor]) -> int:
        return self.readout.output_width([s.numpy() for s in seqs])

    @torch.no_grad()  # not inference_mode: FSDP-wrapped replicas (TP x DP) cannot unshard inference tensors
    def __call__(self, seqs: List[torch.Tensor]) -> torch.Tensor:
        arrays = [s.numpy() for s in seqs]
        out = torch.zeros(len(seqs), self.readout.output_width(arrays), dtype=torch.float32, device=self.device)
        if self.blocks is not None:  # batch-invariant mode (scoring/blocks.py)
            member, depth, column = self.readout.targets(arrays)
            picked, computed = self.blocks(arrays, member, depth)
            self.computed_tokens += computed
            columns = None if column is None else self._device(column)
            self.readout.write(out, self._device(member), columns, picked)
            return out
        for call in self.layout.calls(arrays):
            members = [arrays[m] for m in call.members]
            hidden, index = self._hidden_states(call, members)
            member, depth, column = self.readout.targets(members)
            picked = hidden[d.to_device(torch.from_numpy(index(member, depth)), self.device)]
            rows = d.to_device(torch.from_numpy(call.members[member]), self.device)
            columns = None if column is None else d.to_device(torch.from_numpy(column), self.device)
            self.readout.write(out, rows, columns, picked)
        return out

    def _device(self, array: np.ndarray) -> torch.Tensor:
        return d.to_device(torch.from_numpy(array), self.device)

    def _hidden_states(self, call, members):
        """The call's final hidden states [tokens, hidden size], and (member, depth) -> the row of a token."""
        if call.ends is None:  # padded: transformers makes the causal mask and positions from the padding mask
            self.computed_tokens += call.computed
            hidden = self.backbone(input_ids=self._device(call.ids), attention_mask=self._device(call.pad_mask),
                                   use_cache=False).last_hidden_state
            return hidden.reshape(-1, hidden.shape[-1]), call.index
        reuse = self.cache.plan(call, members) if self.cache is not None else None
        if reuse is None:
            self.computed_tokens += call.computed
            positions = self._device(call.positions)
            hidden = self.backbone(input_ids=self._device(call.ids), position_ids=positions,
                                   attention_mask=self.masks(self._device(call.ends), positions),
                                   use_cache=False).last_hidden_state
            return hidden.reshape(-1, hidden.shape[-1]), call.index
        self.computed_tokens += reuse.computed
        try:
            hidden = kv = None
            if reuse.computed:  # else every token of the call is cached
                positions = self._device(reuse.positions)
                if reuse.context:
                    mask = self.masks.with_context(self._device(reuse.query_index), self._device(reuse.kv_index),
                                                   self._device(reuse.kv_ends), positions,
                                                   self._device(reuse.kv_positions))
                else:  # nothing cached: the call as it is
                    mask = self.masks(self._device(reuse.kv_ends), positions)
                kv = self.cache.kv(reuse)
                with _cache_call_settings():
                    hidden = self.backbone(input_ids=self._device(reuse.ids), position_ids=positions,
                                           attention_mask=mask, use_cache=True,
                                           **{self.cache_argument: kv}).last_hidden_state
            states = self.cache.finish(reuse, kv, hidden)
        except BaseException:
            self.cache.clear()  # its entries for this call name slots that were not written
            raise
        return states, lambda member, depth: reuse.remap[call.index(member, depth)]


def cache_argument(backbone) -> str:
    """The backbone's name for its KV cache argument: `cache` (transformers >= 5.2x) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


def build_scorer(model, readout, batching: BatchingConfig, pad_token_id: int, device: torch.device) -> Scorer:
    """A scorer for a loaded model: the layout and masks `batching` asks for, fitted to its attention kernel."""
    attn = model.config._attn_implementation
    flex = attn == "flex_attention"
    masks = None
    if batching.layout == "packed":
        masks = TreeMasks(model.config, attn, model.dtype)
    row_tokens = auto_row_tokens(batching.packed_row_tokens, batching.max_tokens_per_forward, attn)
    pad_multiple = flex_block_size() if flex else 1
    invariant = 0
    if batching.batch_invariant:  # scoring/invariant.py, scoring/blocks.py
        if batching.layout != "packed":
            raise StartupError("batching.batch_invariant=true needs batching.layout=packed (a padded row's width "
                               "depends on its companions)")
        invariant = grid(pad_multiple)
        readout.head = RowByRow(readout.head)
        register_attention()
    layout = Layout(batching.layout, batching.max_tokens_per_forward, pad_token_id, row_tokens=row_tokens,
                    sharing=batching.prefix_sharing, min_shared=batching.prefix_min_tokens,
                    pad_multiple=pad_multiple, invariant=invariant)
    if batching.prefix_cache_tokens < 0:
        raise StartupError(f"batching.prefix_cache_tokens={batching.prefix_cache_tokens}: expected a number of tokens "
                           "(0: no prefix cache)")
    if invariant:
        keep = layout.sharing and batching.prefix_cache_tokens > 0
        store = BlockStore(batching.prefix_cache_tokens, layout.min_shared, device, keep)
        blocks = SharedBlocks(model.base_model, store, layout.sharing, batching.max_tokens_per_forward,
                              batching.max_tokens_per_forward, pad_token_id)
        return Scorer(model.base_model, readout, layout, None, device, store if keep else None, blocks)
    cache = None
    if layout.sharing and batching.prefix_cache_tokens:
        cache = PrefixCache(batching.prefix_cache_tokens, batching.prefix_min_tokens, layout.pad_multiple,
                            pad_token_id, device)
    log.debug("layout %s, sharing %s, rows of %d tokens, prefix cache %d tokens", layout.kind, layout.sharing,
              layout.row_tokens, cache.capacity if cache else 0)
    return Scorer(model.base_model, readout, layout, masks, device, cache)


def warm_up(scorer: Scorer, vocab_size: int, budget: int) -> None:
    """A few synthetic batches of different shapes through the scorer on every rank (same data everywhere, so
    tensor-parallel collectives line up), so that the first requests do not pay for compilation: separate
    sequences, and a group sharing a prefix."""
    gen = torch.Generator().manual_seed(0)

    def seq(n):
        return torch.randint(3, vocab_size, (n,), generator=gen)

    for lengths in ([7], [budget // 8] * 3, [budget // 2, budget // 3, 100], [budget // 4] * 5):
        scorer([seq(n) for n in lengths])
    prefix = seq(budget // 4)
    scorer([torch.cat([prefix, seq(n)]) for n in (budget // 16, budget // 8, 1, budget // 16)] + [prefix])
    if scorer.cache is not None:  # later forwards extending cached prefixes (two shapes: the second compiles the
        # dynamic-shape graphs), then forget the synthetic entries
        scorer([torch.cat([prefix, seq(n)]) for n in (budget // 16, 3)] + [prefix])
        scorer([torch.cat([prefix[:budget // 8], seq(n)]) for n in (budget // 4, budget // 8)])
        # new tokens within one attention block (a search's next step): flex_attention's masks and the layers
        # specialize on a single query block (seen as recompiles while serving a tree search on the GPU)
        scorer([torch.cat([prefix, seq(3)])])
        scorer([torch.cat([prefix[:budget // 8], seq(n)]) for n in (5, 9)])
        short = seq(scorer.cache.min_shared)  # and a call within one block that shares nothing cached, stored
        scorer([torch.cat([short, seq(n)]) for n in (3, 5)])
        scorer.cache.clear()
