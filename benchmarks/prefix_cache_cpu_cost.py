"""Rank 0's CPU time of the prefix cache's planning (scoring/prefix_cache.py) per forward: an RLHF forward that shares
nothing (the lookups and the decision to run it without the cache), and a GRPO forward that extends a cached prompt.
  python benchmarks/prefix_cache_cpu_cost.py
"""
import time, numpy as np, torch, json
from reward_server.scoring.layout import Layout
from reward_server.scoring.prefix_cache import PrefixCache
rng = np.random.default_rng(0)
# RLHF-like forward: 16,384-token budget, lengths log-normal like benchmarks/workload.py (mean ~850)
def lengths(n):
    return np.clip(rng.lognormal(6.5, 0.7, n), 80, 3072).astype(int)
def seqs_for(budget=16384):
    out, tot = [], 0
    for L in lengths(200):
        if tot + L > budget: break
        out.append(rng.integers(3, 128000, L).astype(np.int64)); tot += L
    return out
layout = Layout("packed", 16384, 0, sharing=True, min_shared=32, pad_multiple=128)
cache = PrefixCache(32768, 32, 128, 0, torch.device("cpu"))
# fill the cache index with a GRPO-like forward's entries (what a mixed workload leaves behind)
prompt = rng.integers(3, 128000, 1000).astype(np.int64)
grp = [np.concatenate([prompt, rng.integers(3, 128000, 500)]) for _ in range(8)]
for call in layout.calls(grp):
    cache.plan(call, [grp[m] for m in call.members])
print("entries", len(cache))
for name, make in (("rlhf (nothing shared)", seqs_for), ):
    ts, tl = [], []
    for _ in range(20):
        seqs = make()
        t0 = time.perf_counter(); calls = list(layout.calls(seqs)); t1 = time.perf_counter()
        for call in calls:
            r = cache.plan(call, [seqs[m] for m in call.members])
            assert r is None
        t2 = time.perf_counter(); tl.append(t1 - t0); ts.append(t2 - t1)
    print(name, len(seqs), "seqs/forward; layout %.2f ms, cache plan (lookup + decision) %.2f ms (median of 20)" % (1e3*np.median(tl), 1e3*np.median(ts)))
# GRPO split: second half of a group extends the cached prompt
seqs = [np.concatenate([prompt, rng.integers(3, 128000, 500)]) for _ in range(4)] + seqs_for(8000)
t0 = time.perf_counter()
for call in layout.calls(seqs):
    r = cache.plan(call, [seqs[m] for m in call.members])
print("grpo part + others: plan %.2f ms, reused %d" % (1e3*(time.perf_counter()-t0), cache.reused_tokens))
