"""The attention mask of a packed call (scoring/layout.py): token q sees token k when k <= q <= ends[k] (k is q or
one of its ancestors in the row's trie) and, for sliding-window layers, when q is less than the window after k in
their sequence. Passed to transformers as a ready 4D mask, which it uses as it is (no mask of its own, no
packed-sequence detection and the host sync that comes with it):
  flex_attention  a BlockMask: blocks with nothing to see are skipped, so long rows cost what their trie costs
  sdpa            a dense boolean [R, 1, W, W] mask (memory and work grow with the row length squared)
  eager           the same as an additive float mask
With cached context (scoring/prefix_cache.py) a call computes only its new tokens and sees the cached ones' keys
first: the same rule over the tokens' indices in the call's full trie (`with_context`).
Models with several kinds of attention layer (config.layer_types, e.g. Gemma2's sliding and full layers) get one
mask per kind, keyed as the model looks them up.
"""

from typing import Dict, Optional

import torch

DENSE = ("sdpa", "eager")
SUPPORTED = ("flex_attention",) + DENSE
LAYER_WINDOWS = {"full_attention": False, "sliding_attention": True}


def flex_block_size() -> int:
    """flex_attention's block: rows padded to a multiple of it keep the number of shapes (and compilations) small."""
    from torch.nn.attention.flex_attention import _DEFAULT_SPARSE_BLOCK_SIZE

    return _DEFAULT_SPARSE_BLOCK_SIZE


def attention_windows(config) -> Dict[Optional[str], Optional[int]]:
    """{layer type (None: the model takes one mask): sliding window in tokens or None} for a model config."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        unknown = sorted(set(types) - set(LAYER_WINDOWS))
        if unknown:
            raise ValueError(f"{type(config).__name__}: attention layer types {unknown} are not supported by the packed "
                             "layout; set batching.layout=padded")
        windows = {t: (window if LAYER_WINDOWS[t] else None) for t in set(types)}
        # one kind of layer: one mask, which every model takes (a dict only those that look masks up by kind)
        return {None: next(iter(windows.values()))} if len(windows) == 1 else windows
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    return {None: window}


class TreeMasks:
    """Builds a packed call's attention mask for one model (attention implementation, dtype, windows)."""

    def __init__(self, config, attn_implementation: str, dtype: torch.dtype):
        if attn_implementation not in SUPPORTED:
            raise ValueError(f"attention implementation {attn_implementation!r} cannot take the packed layout's "
                             f"masks (supported: {', '.join(SUPPORTED)}); set batching.layout=padded")
        self.impl = attn_implementation
        self.dtype = dtype
        self.windows = attention_windows(config)

    def __call__(self, ends: torch.Tensor, positions: torch.Tensor):
        """ends, positions: [R, W] on the model's device."""
        masks = {}
        for kind, window in self.windows.items():
            masks[kind] = self._flex(ends, positions, window) if self.impl == "flex_attention" else \
                self._dense(ends, positions, window)
        return masks[None] if None in masks else masks

    def with_context(self, query_index, kv_index, kv_ends, query_positions, kv_positions):
        """A call with cached context: [R, W] new tokens (their indices in the full trie row, their positions)
        against [R, C + W] keys (context, then the new tokens: indices, subtree ends, positions)."""
        masks = {}
        for kind, window in self.windows.items():
            make = self._flex_context if self.impl == "flex_attention" else self._dense_context
            masks[kind] = make(query_index, kv_index, kv_ends, query_positions, kv_positions, window)
        return masks[None] if None in masks else masks

    def _flex_context(self, qi, ki, ke, qp, kp, window):
        from torch.nn.attention.flex_attention import create_block_mask

        if window is None:
            def mask_mod(b, h, q, k):
                return (ki[b, k] <= qi[b, q]) & (qi[b, q] <= ke[b, k])
        else:
            def mask_mod(b, h, q, k):
                return (ki[b, k] <= qi[b, q]) & (qi[b, q] <= ke[b, k]) & (qp[b, q] - kp[b, k] < window)
        rows, width = qi.shape
        return create_block_mask(mask_mod, rows, None, width, ki.shape[1], device=qi.device, _compile=True)

    def _dense_context(self, qi, ki, ke, qp, kp, window) -> torch.Tensor:
        allowed = (ki[:, None, :] <= qi[:, :, None]) & (qi[:, :, None] <= ke[:, None, :])
        if window is not None:
            allowed &= qp[:, :, None] - kp[:, None, :] < window
        return self._dense_form(allowed[:, None], qi.device)

    def _dense_form(self, allowed: torch.Tensor, device) -> torch.Tensor:
        if self.impl == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=self.dtype, device=device).masked_fill_(
            ~allowed, torch.finfo(self.dtype).min)

    def _flex(self, ends: torch.Tensor, positions: torch.Tensor, window: Optional[int]):
        from torch.nn.attention.flex_attention import create_block_mask

        if window is None:
            def mask_mod(b, h, q, k):
                return (k <= q) & (q <= ends[b, k])
        else:
            def mask_mod(b, h, q, k):
                return (k <= q) & (q <= ends[b, k]) & (positions[b, q] - positions[b, k] < window)
        rows, width = ends.shape
        return create_block_mask(mask_mod, rows, None, width, width, device=ends.device, _compile=True)

    def _dense(self, ends: torch.Tensor, positions: torch.Tensor, window: Optional[int]) -> torch.Tensor:
        index = torch.arange(ends.shape[1], device=ends.device)
        q, k = index[None, :, None], index[None, None, :]
        allowed = (k <= q) & (q <= ends[:, None, :])
        if window is not None:
            allowed &= positions[:, :, None] - positions[:, None, :] < window
        return self._dense_form(allowed[:, None], ends.device)
