"""What is scored, by reward.kind: each kind loads its scorer, decodes requests and shapes the outputs.

A kind has `load(cfg, topo) -> (scorer, tokenizer, model config)`, `decoder(cfg, scorer, tokenizer, rules)` and
`outputs(cfg, scorer, model config)`; nothing outside this package asks which kind it serves."""

from .prm import PRM
from .scalar import Scalar

KINDS = {"scalar": Scalar, "prm": PRM}


def kind_of(name: str):
    if name not in KINDS:
        raise ValueError(f"reward.kind={name!r}: expected one of {sorted(KINDS)}")
    return KINDS[name]
