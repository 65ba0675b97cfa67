"""Run by tests/test_fidelity.py under `torchrun --nproc_per_node 4`: each checkpoint given is loaded the way the
server loads it (world 4 = 2 data-parallel replicas x tensor parallel 2, over gloo) and the sequences of
`cases.npz` are scored through the Engine (each replica its share, transformers' TP inside it) in each layout.
Rank 0 writes the rewards to OUT/<name>-<layout>.npy.

    torchrun --nproc_per_node 4 tests/rank_families.py OUT CASES.npz NAME=CKPT [NAME=CKPT ...]
"""

import sys
from pathlib import Path

import numpy as np
import torch

from reward_server import distributed as d
from reward_server.config import BatchingConfig, ModelConfig, ParallelConfig
from reward_server.engine import FAILED, FAULTED, Engine
from reward_server.kinds.scalar import load_scalar_scorer

LAYOUTS = {"packed": BatchingConfig(layout="packed", prefix_sharing=True),
           "padded": BatchingConfig(layout="padded", prefix_sharing=False)}


def sharded(module) -> int:
    """How many weights hold only part of their values on this rank (tensor parallelism at work)."""
    from torch.distributed.tensor import DTensor

    def local(p):
        return p.to_local().numel() if isinstance(p, DTensor) else p.numel()

    return sum(local(p) < p.numel() for p in module.parameters())


def main(out: Path, cases: Path, checkpoints) -> None:
    topo = d.init_distributed(ParallelConfig(backend="gloo", tensor_parallel_size=2))
    data = np.load(cases)
    seqs = [torch.from_numpy(data[k]) for k in sorted(data.files, key=int)]
    for name, path in (c.split("=", 1) for c in checkpoints):
        for layout, batching in LAYOUTS.items():
            scorer, _, config = load_scalar_scorer(ModelConfig(path=path), batching, topo)
            split = sharded(scorer.backbone)
            assert split, f"{name}: no weight is split over the tensor-parallel ranks"
            out_ = Engine(scorer, topo, scorer.layout).forward(seqs)
            if topo.is_leader:
                assert not out_[len(seqs) + FAILED, 0] and not out_[len(seqs) + FAULTED, 0], \
                    f"{name} {layout}: a rank's forward failed"
                np.save(out / f"{name}-{layout}.npy", out_[: len(seqs), : config.num_labels].numpy())
                print(f"{name} {layout}: {config.model_type}, attention {config._attn_implementation}, "
                      f"{split} weights split over the tensor-parallel ranks", flush=True)
    d.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
