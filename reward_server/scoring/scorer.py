"""One forward code path for every kind of reward: layout (scoring/layout.py) x backbone x readout
(scoring/readout.py). Sequences come in as CPU tensors of token ids, identical on every rank of a replica; the
layout is planned on the CPU and copied to the device without waiting for the GPU."""

import logging
from typing import List

import torch

from .. import distributed as d
from ..config import BatchingConfig
from .layout import Layout
from .masks import TreeMasks, flex_block_size

log = logging.getLogger(__name__)

# Longest packed row with a dense attention mask (sdpa, eager), whose memory and work grow with the row length
# squared; flex_attention skips masked blocks, so its rows take the whole token budget.
DENSE_MASK_ROW_TOKENS = 2048


class Scorer:
    def __init__(self, backbone, readout, layout: Layout, masks, device: torch.device):
        self.backbone = backbone
        self.readout = readout
        self.layout = layout
        self.masks = masks  # TreeMasks for the packed layout, None for padded
        self.device = device

    def output_width(self, seqs: List[torch.Tensor]) -> int:
        return self.readout.output_width([s.numpy() for s in seqs])

    @torch.no_grad()  # not inference_mode: FSDP-wrapped replicas (TP x DP) cannot unshard inference tensors
    def __call__(self, seqs: List[torch.Tensor]) -> torch.Tensor:
        arrays = [s.numpy() for s in seqs]
        out = torch.zeros(len(seqs), self.readout.output_width(arrays), dtype=torch.float32, device=self.device)
        for call in self.layout.calls(arrays):
            ids = d.to_device(torch.from_numpy(call.ids), self.device)
            if call.ends is not None:
                positions = d.to_device(torch.from_numpy(call.positions), self.device)
                mask = self.masks(d.to_device(torch.from_numpy(call.ends), self.device), positions)
            else:  # padded: transformers makes the causal mask and positions from the padding mask
                positions, mask = None, d.to_device(torch.from_numpy(call.pad_mask), self.device)
            hidden = self.backbone(input_ids=ids, position_ids=positions, attention_mask=mask,
                                   use_cache=False).last_hidden_state
            member, depth, column = self.readout.targets([arrays[m] for m in call.members])
            picked = hidden.reshape(-1, hidden.shape[-1])[d.to_device(torch.from_numpy(call.index(member, depth)),
                                                                      self.device)]
            rows = d.to_device(torch.from_numpy(call.members[member]), self.device)
            columns = None if column is None else d.to_device(torch.from_numpy(column), self.device)
            self.readout.write(out, rows, columns, picked)
        return out


def build_scorer(model, readout, batching: BatchingConfig, pad_token_id: int, device: torch.device) -> Scorer:
    """A scorer for a loaded model: the layout and masks `batching` asks for, fitted to its attention kernel."""
    attn = model.config._attn_implementation
    flex = attn == "flex_attention"
    masks = None
    if batching.layout == "packed":
        masks = TreeMasks(model.config, attn, model.dtype)
    row_tokens = batching.packed_row_tokens or (batching.max_tokens_per_forward if flex else DENSE_MASK_ROW_TOKENS)
    layout = Layout(batching.layout, batching.max_tokens_per_forward, pad_token_id, row_tokens=row_tokens,
                    sharing=batching.prefix_sharing, min_shared=batching.prefix_min_tokens,
                    pad_multiple=flex_block_size() if flex else 1)
    log.debug("layout %s, sharing %s, rows of %d tokens", layout.kind, layout.sharing, layout.row_tokens)
    return Scorer(model.base_model, readout, layout, masks, device)


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
