"""Tokens that data-parallel replicas compute with and without the record of what each was given
(scoring/affinity.py, batching.replica_affinity), on benchmarks/workload.py's workloads, on the CPU without a model:
each replica's prefix cache plans its calls exactly as in the server (scoring/prefix_cache.py: which tokens it
holds, which it computes); nothing is run on a device.

Forwards are formed as rank 0 forms them (engine.plan_forward, budget batching.max_tokens_per_forward x replicas)
from a window of `--clients` requests in the workload's order (a closed loop: a forward's requests are replaced by
the next ones). Reported per workload, replicas and setting: tokens received, computed (all replicas), taken from
the caches, and the critical path: per forward the most any one replica computed, summed (a forward ends when its
slowest replica does), with rank 0's planning time per forward.

  python benchmarks/replica_affinity.py --replicas 2 4 --workloads tree grpo rlhf --n 1024
"""

import argparse
import time
from collections import deque
from concurrent.futures import Future

import numpy as np
import torch

import workload
from reward_server.engine import Work, plan_forward
from reward_server.scoring.affinity import ReplicaAffinity
from reward_server.scoring.layout import Layout
from reward_server.scoring.prefix_cache import PrefixCache


def run(seqs, replicas, affinity_on, budget, cache_tokens, clients, min_shared, pad_multiple):
    layout = Layout("packed", budget, 0, sharing=True, min_shared=min_shared, pad_multiple=pad_multiple)
    caches = [PrefixCache(cache_tokens, min_shared, pad_multiple, 0, torch.device("cpu")) for _ in range(replicas)]
    affinity = ReplicaAffinity(replicas, cache_tokens, min_shared) if affinity_on else None
    cached = affinity.held if affinity is not None else None
    todo = deque(torch.from_numpy(s) for s in seqs)
    pending = deque()
    computed = reused = critical = forwards = 0
    plan_s = 0.0
    while todo or pending:
        while todo and len(pending) < clients:
            pending.append(Work([todo.popleft()], Future(), alone=False))
        start = time.perf_counter()
        picked, _ = plan_forward(pending, budget * replicas, True, min_shared, cached)
        batch = [w.seqs[i].numpy() for w, i in picked]
        shares = layout.replica_shares(batch, replicas, affinity)
        plan_s += time.perf_counter() - start
        most = 0
        for r, share in enumerate(shares):
            mine = [batch[i] for i in share]
            done = 0
            for call in layout.calls(mine) if mine else ():
                reuse = caches[r].plan(call, [mine[m] for m in call.members])
                done += reuse.computed if reuse is not None else call.computed
                reused += reuse.reused if reuse is not None else 0
            computed += done
            most = max(most, done)
        critical += most
        forwards += 1
        for w, _ in picked:
            if not w.untaken:
                pending.remove(w)
    return dict(received=sum(len(s) for s in seqs), computed=computed, reused=reused, critical=critical,
                forwards=forwards, plan_ms=1e3 * plan_s / max(1, forwards))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, nargs="+", default=[2, 4])
    p.add_argument("--workloads", nargs="+", default=["tree", "grpo", "rlhf"])
    p.add_argument("--n", type=int, default=1024, help="requests per workload")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--budget", type=int, default=16384, help="batching.max_tokens_per_forward (per replica)")
    p.add_argument("--cache-tokens", type=int, default=32768, help="batching.prefix_cache_tokens")
    p.add_argument("--min-shared", type=int, default=32, help="batching.prefix_min_tokens")
    p.add_argument("--pad-multiple", type=int, default=128, help="rows padded to this (flex_attention's block)")
    p.add_argument("--vocab", type=int, default=128256)
    args = p.parse_args()
    print("| workload | replicas | affinity | tokens received | computed | from the caches | critical path "
          "| on / off (critical path) | forwards | plan ms per forward |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in args.workloads:
        seqs = workload.make(kind, args.n, args.vocab)
        for replicas in args.replicas:
            off = None
            for on in (False, True):
                r = run(seqs, replicas, on, args.budget, args.cache_tokens, args.clients, args.min_shared,
                        args.pad_multiple)
                off = off or r
                print(f"| {kind} | {replicas} | {'on' if on else 'off'} | {r['received']:,} | {r['computed']:,} | "
                      f"{r['reused']:,} | {r['critical']:,} | {off['critical'] / r['critical']:.2f}x | "
                      f"{r['forwards']} | {r['plan_ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
