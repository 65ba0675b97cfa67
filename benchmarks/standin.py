"""The live server at a GPU's pace without a GPU: the stand-in scorer (TEST / BENCHMARK ONLY,
fault_injection.standin, reward_server/faults.py) takes the time one H100 takes for the 8B model's forwards (tokens
computed / 40,000 s; x 1 / 0.87 through the prefix cache) behind the real Triton, leader, scheduler, layout and
prefix cache, so what the live path loses when forwards are fast shows on a CPU: tokens computed against the unique
tokens of what was sent, and how full the forwards were.

Each (workload, sharing) runs on a fresh server (the tiny default model, never run) with the GPU's defaults where
the CPU's differ (16 Triton instances, packed rows of the whole budget, overlapped forwards); `--clients` threads
each send one sequence per request and the next when it is answered, `--n` requests in all; every reward is checked
against the stand-in's. Which sequence a client sends next (`--order`): perf_analyzer (default; what its synchronous
concurrency mode does, and so what the GPU runs measured: client k sends the sequences k, k + clients, k + 2 x
clients, ..., so a GRPO group's 8 requests come from 8 clients, each when its own previous request was answered, and
they drift apart round after round); group (lanes of --group clients: a lane sends a group's requests together and
its next group once the whole group is answered, as a trainer that needs a group's rewards together does); next.

    PYTHONPATH=.:benchmarks python benchmarks/standin.py --workloads grpo tree rlhf --sharing on off --clients 64
    PYTHONPATH=.:benchmarks python benchmarks/standin.py --workloads grpo --sharing on --order group

Columns: tokens/s received over first send to last answer; computed / unique (the workload's trie, each shared
prefix once: 1.00x is every saving taken); tokens computed per forward and its share of the budget over the
steady part of the run (from the 20 % to the 90 % answered); received / computed (the saving taken); in Triton's
queue: the mean of Triton's pending requests for the model over the steady part (sampled every 0.1 s), requests no
model instance was free to hand to rank 0 (each instance holds its batch until all of it is scored).
"""

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np

import soak
import workload
from live import Client, LiveServer
from reward_server.faults import standin_reward

GPU_LIKE = ["batching.instances=16"]  # and packed rows of the whole budget (flex_attention's auto; the model never runs)


def drive(server: LiveServer, seqs, clients: int, order: str = "perf_analyzer", group: int = 8,
          check: bool = True) -> dict:
    """Closed loop: each client sends its next sequence when its previous one is answered. `order`: perf_analyzer
    (its synchronous concurrency mode: client k sends sequences k, k + clients, k + 2 x clients, ..., so a group's
    requests come from `group` clients, each when its own previous request was answered) or next (every client
    takes the next sequence not sent yet) or group (lanes of `group` clients; a lane sends the `group` consecutive
    sequences of a group together and the next group once all of them are answered, as an RL trainer that needs a
    group's rewards together)."""
    lock, state = threading.Lock(), {"next": 0, "done": 0}
    sent, answered = np.zeros(len(seqs)), np.zeros(len(seqs))
    wrong, errors, snaps, queued = [], [], {}, []

    lanes = {lane: threading.Barrier(group) for lane in range(max(1, clients // group))}

    def take(k: int, previous):
        if order == "group":  # lanes of `group` clients: a lane sends a group together, the next when all are answered
            lane, member = divmod(k, group)
            n_lanes = clients // group
            if previous is not None:
                lanes[lane].wait()
                i = previous + n_lanes * group
            else:
                i = lane * group + member
            return i if i < len(seqs) else None
        if order == "perf_analyzer":
            i = k if previous is None else previous + clients
            return i if i < len(seqs) else None
        with lock:
            i = state["next"]
            state["next"] += 1
        return i if i < len(seqs) else None

    def client(k: int):
        conn = Client(server.http_port)
        i = None
        while True:
            i = take(k, i)
            if i is None:
                return
            sent[i] = time.monotonic()
            try:
                out = conn.score([seqs[i]])
            except Exception as exc:  # noqa: BLE001 (reported, the run goes on)
                errors.append(repr(exc)[:300])
                continue
            answered[i] = time.monotonic()
            if check and out["rewards"][0, 0] != np.float32(standin_reward(seqs[i], len(seqs[i]) - 1, 0)):
                wrong.append(i)
            with lock:
                state["done"] += 1

    def watch():
        marks = {"from": int(0.2 * len(seqs)), "to": int(0.9 * len(seqs))}
        while marks:
            for name, at in list(marks.items()):
                if state["done"] >= at:
                    snaps[name] = server.metrics()
                    del marks[name]
            time.sleep(0.02)

    def sample_triton_queue():  # requests Triton holds because every model instance is busy, over the steady part
        while state["done"] < int(0.9 * len(seqs)) and not errors:
            if state["done"] >= int(0.2 * len(seqs)):
                queued.append(server.triton_queued())
            time.sleep(0.1)

    before = server.metrics()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    helpers = [threading.Thread(target=watch, daemon=True), threading.Thread(target=sample_triton_queue, daemon=True)]
    for t in threads + helpers:
        t.start()
    for t in threads:
        t.join()
    for t in helpers:
        t.join(timeout=5)
    after = server.metrics()
    ok = answered > 0
    return dict(before=before, after=after, snaps=snaps, wall=float(answered[ok].max() - sent.min()), sent=sent,
                answered=answered,
                latency=np.sort(answered[ok] - sent[ok]), wrong=len(wrong) if check else "not checked", errors=errors,
                triton_queued=float(np.mean(queued)) if queued else None)


def delta(a: dict, b: dict, name: str) -> float:
    return b.get(f"reward_server_{name}", 0.0) - a.get(f"reward_server_{name}", 0.0)


def summary(kind: str, sharing: str, seqs, run: dict, budget: int) -> dict:
    b, a = run["before"], run["after"]
    received, computed = delta(b, a, "tokens_received"), delta(b, a, "tokens_computed")
    forwards = delta(b, a, "forwards")
    unique = workload.trie_tokens(seqs) if sharing == "on" else sum(len(s) for s in seqs)
    s0, s1 = run["snaps"].get("from", b), run["snaps"].get("to", a)
    window_forwards = max(1.0, delta(s0, s1, "forwards"))
    per_forward = delta(s0, s1, "tokens_computed") / window_forwards
    lat = run["latency"]
    return dict(workload=kind, sharing=sharing, requests=len(seqs), answered=len(lat), wrong=run["wrong"],
                errors=len(run["errors"]), received=int(received), computed=int(computed), unique=int(unique),
                forwards=int(forwards), wall_s=round(run["wall"], 2), tokens_per_s=round(received / run["wall"]),
                computed_over_unique=round(computed / max(1, unique), 3),
                saving=round(received / max(1, computed), 3), ideal=round(received / max(1, unique), 3),
                per_forward=round(per_forward), fill=round(per_forward / budget, 3),
                reused=int(delta(b, a, "tokens_reused")),
                p50_ms=round(1e3 * float(lat[len(lat) // 2]), 1) if len(lat) else None,
                triton_queued=None if run["triton_queued"] is None else round(run["triton_queued"], 1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["grpo", "tree", "rlhf"])
    p.add_argument("--sharing", nargs="+", default=["on", "off"], choices=["on", "off"])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--n", type=int, default=1024, help="requests per run (the workload's first n sequences)")
    p.add_argument("--order", default="perf_analyzer", choices=["perf_analyzer", "next", "group"],
                   help="which sequence a client sends next (see drive)")
    p.add_argument("--group", type=int, default=8, help="--order group: clients per lane (the workload's group)")
    p.add_argument("--tokens-per-s", type=float, default=40_000.0, help="fault_injection.standin.tokens_per_s")
    p.add_argument("--shared-speed", type=float, default=0.87, help="fault_injection.standin.shared_speed")
    p.add_argument("--budget", type=int, default=16384, help="batching.max_tokens_per_forward")
    p.add_argument("--nproc", type=int, default=1, help="ranks (data-parallel replicas)")
    p.add_argument("--out", default="/tmp/standin", help="server logs and results.json")
    p.add_argument("--vocab", type=int, default=512, help="the tiny default model's")
    p.add_argument("--step-tag", type=int, default=None,
                   help="end every step of the workloads with this token id (workload.py --step-tag), so that a scalar "
                   "RM and --prm run the same tokens; --prm: soak.py's tag, 7")
    p.add_argument("--prm", action="store_true",
                   help="serve soak.py's tiny causal LM as a math-shepherd PRM (step tag 7, candidates 11 / 12) instead of "
                   "the default scalar RM; its rewards are not checked here (soak.py checks a PRM's against plain "
                   "transformers)")
    p.add_argument("overrides", nargs="*", help="more server overrides, e.g. batching.prefix_cache_tokens=65536")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    print("| workload | sharing | tokens/s | computed / unique | received / computed (ideal) | computed per forward "
          "| fill | forwards | p50 ms | in Triton's queue | wrong rewards |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    tag = a.step_tag if a.step_tag is not None else (soak.TAG if a.prm else None)
    reward = []
    if a.prm:
        reward = [f"model.path={soak.tiny_checkpoint(out / 'prm', True)}", "reward=math_shepherd",
                  "reward.step_tag_source=ids", f"reward.step_tag_ids=[{soak.TAG}]",
                  f"reward.candidate_token_ids=[{soak.GOOD},{soak.BAD}]", "reward.max_steps=256"]
    for kind in a.workloads:
        seqs = workload.make(kind, a.n, a.vocab, tag=tag)
        for sharing in a.sharing:
            overrides = [*GPU_LIKE, f"fault_injection.standin.tokens_per_s={a.tokens_per_s}",
                         f"fault_injection.standin.shared_speed={a.shared_speed}",
                         f"batching.max_tokens_per_forward={a.budget}", f"batching.packed_row_tokens={a.budget}",
                         f"batching.prefix_sharing={sharing == 'on'}",
                         "model.default.max_position_embeddings=8192", "server.stats_log_s=5", *reward, *a.overrides]
            with LiveServer(a.nproc, overrides, str(out / f"server_{kind}_{sharing}.log")).wait_ready() as server:
                run = drive(server, seqs, a.clients, a.order, a.group, check=not a.prm)
                r = summary(kind, sharing, seqs, run, a.budget * a.nproc)
            results.append(r)
            np.savez(out / f"times_{kind}_{sharing}.npz", sent=run["sent"], answered=run["answered"])
            print(f"| {kind} | {sharing} | {r['tokens_per_s']:,} | {r['computed_over_unique']:.3f}x | "
                  f"{r['saving']:.2f}x ({r['ideal']:.2f}x) | {r['per_forward']:,} | {100 * r['fill']:.1f} % | "
                  f"{r['forwards']} | {r['p50_ms']} | {r['triton_queued']} | {r['wrong']} (errors {r['errors']}) |", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
