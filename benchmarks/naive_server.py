"""The naive baseline: PyTriton + transformers, each dynamic batch padded to its longest sequence and run in one
forward. Same request contract as our `reward` model's token_ids input, so the same perf_analyzer workload runs
against both.

    python benchmarks/naive_server.py --model /tmp/rm8b --port 8010
"""

import argparse
import os

import numpy as np
import torch
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig
from transformers import AutoModelForSequenceClassification

from reward_server.serving.triton import ensure_python_library_path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, default=8010)
    p.add_argument("--max-batch-size", type=int, default=64)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForSequenceClassification.from_pretrained(a.model, dtype=dtype).to(device).eval()
    pad = model.config.pad_token_id

    @batch
    def infer(token_ids):
        rows = [torch.tensor([int(t) for t in r[0].split()], device=device) for r in token_ids]
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)
        mask = (torch.arange(ids.shape[1], device=device)[None] < torch.tensor([len(r) for r in rows], device=device)[:, None])
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask.long()).logits
        return {"rewards": logits.float().cpu().numpy()}

    ensure_python_library_path()
    config = TritonConfig(http_address="127.0.0.1", http_port=a.port, grpc_port=a.port + 1, metrics_port=a.port + 2)
    token = os.environ.get("REWARD_SERVER_ACCESS_TOKEN") or None  # perf_analyzer reads the statistics API
    with Triton(config=config, security_config=TritonSecurityConfig(access_token=token)) as triton:
        triton.bind(model_name="reward", infer_func=infer,
                    inputs=[Tensor(name="token_ids", dtype=bytes, shape=(1,))],
                    outputs=[Tensor(name="rewards", dtype=np.float32, shape=(-1,))],
                    config=ModelConfig(max_batch_size=a.max_batch_size,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=2000)))
        triton.serve()


if __name__ == "__main__":
    main()
