"""A toy PPO actor loop: generate rollouts, send them for scoring, keep working, then collect the rewards.

    torchrun --nproc_per_node 2 serve_reward_model.py &                  # the default reward server
    python examples/ppo_actor_loop.py                                    # one actor
    torchrun --nproc_per_node 2 --master_port 29600 examples/ppo_actor_loop.py   # two data-parallel actors

"Generation" draws random token ids (the default server's vocabulary has 512 ids); the "other work" is a few
matrix multiplications standing in for the actor's log-prob / value computation. Under torchrun every actor rank
makes its own client and scores only its own rollouts; the server's dynamic batcher merges the ranks' requests.
(The server's torchrun uses the default master port 29500, hence --master_port for the actors' own torchrun.)
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

from reward_server.client import RemoteGPTRMClient


def generate(batch: int, prompt_len: int, max_response: int, vocab: int, generator: torch.Generator):
    """A rollout batch as an actor holds it: prompt + response tokens right-padded, and their total lengths."""
    response_lengths = torch.randint(1, max_response + 1, (batch,), generator=generator)
    tokens = torch.zeros(batch, prompt_len + max_response, dtype=torch.long)
    for i, n in enumerate(response_lengths.tolist()):
        tokens[i, :prompt_len + n] = torch.randint(4, vocab, (prompt_len + n,), generator=generator)
    return {"response_tokens": tokens, "response_lengths": response_lengths + prompt_len}


def other_work(seconds: float) -> int:
    """Stand-in for the actor's own forward passes while the rewards are computed elsewhere."""
    x, steps, end = torch.randn(256, 256), 0, time.monotonic() + seconds
    while time.monotonic() < end:
        x = torch.tanh(x @ x.T / 16)
        steps += 1
    return steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="localhost:8000")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128, help="rollouts per actor rank per step")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-response", type=int, default=96)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--work-s", type=float, default=0.2, help="seconds of other work per step")
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ
    if distributed:  # the trainer's process group; the client itself never uses it
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    generator = torch.Generator().manual_seed(rank)

    with RemoteGPTRMClient(args.url) as client:
        for step in range(args.steps):
            rollouts = generate(args.batch, args.prompt_len, args.max_response, args.vocab, generator)
            start = time.monotonic()
            handle = client.infer_rm(rollouts)  # returns at once
            sent = time.monotonic() - start
            work = other_work(args.work_s)
            ready_after_work = handle.done()
            rewards = handle.result()[:, 0]  # [batch], in rollout order
            waited = time.monotonic() - start
            mean = rewards.mean()
            if distributed:
                dist.all_reduce(mean)
                mean /= dist.get_world_size()
            first = [round(r, 4) for r in rewards[:3].tolist()]
            print(f"rank {rank} step {step}: {len(rewards)} rewards, first {first}, "
                  f"mean{' over ranks' if distributed else ''} {mean.item():+.4f}; "
                  f"infer_rm returned in {sent * 1e3:.1f} ms, "
                  f"{work} steps of other work, rewards ready after the work: {ready_after_work}, "
                  f"total {waited * 1e3:.0f} ms", flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
