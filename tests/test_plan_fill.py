"""Full forwards while one runs (engine/plan.py Refill, the leader's wait before it plans the next forward): a closed
loop of callers comes back before the next forward is planned, so forwards fill their budget; the wait never
outlasts the forward in flight."""

import threading
import time
from collections import deque

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from oracles import scalar_scorer
from reward_server.config.standin import StandInConfig
from reward_server.engine import Engine, Leader
from reward_server.engine.plan import Refill
from reward_server.faults import Done, StandInEngine, StandInScorer

BUDGET = 2000


def test_the_wait_ends_when_the_callers_came_back_the_forward_is_done_or_the_stop_sign_came():
    refill = Refill(share=0.5)
    refill.launched(1000)
    refill.launched(1000)
    refill.finished(time.monotonic() - 1.0, 1000, answered=3, pending=5)  # 1 ms per token
    assert refill.deadline() - time.monotonic() == pytest.approx(0.5, abs=0.1)  # half of 1,000 tokens' time
    pending = deque(range(5))
    running = Done(time.monotonic() + 10)
    arrivals = iter([[], [1], [2, 3]])

    def take():
        pending.extend(next(arrivals, []))
        return False

    start = time.monotonic()
    assert not refill.wait(running, take, pending) and len(pending) == 8  # the 3 answered callers came back
    assert time.monotonic() - start < 0.3
    pending = deque(range(5))  # nobody comes back: the wait ends at the deadline, well before the forward's end
    start = time.monotonic()
    assert not refill.wait(running, lambda: False, pending)
    assert 0.3 < time.monotonic() - start < 0.9
    start = time.monotonic()
    assert not refill.wait(Done(0.0), lambda: False, pending)  # the forward is done: plan at once
    assert not refill.wait(None, lambda: False, pending)  # on the CPU nothing runs in flight
    assert time.monotonic() - start < 0.3
    assert refill.wait(running, lambda: True, pending)  # the stop sign


def closed_loop(topo, model, share, clients=20, rounds=6):
    """`clients` callers, each sending its next 250-token sequence 5 ms after its previous one was answered, to a
    leader over the stand-in scorer (10,000 tokens/s: 200 ms per full forward). The forwards' computed tokens."""
    stand = StandInScorer(scalar_scorer(model, budget=BUDGET, sharing=False), StandInConfig(tokens_per_s=10_000),
                          rank=1)
    engine = StandInEngine(Engine(stand, topo), stand)
    leader = Leader(engine, heartbeat_s=1, tokens_per_forward=BUDGET, overlap=True)
    leader.refill = Refill(share)
    sizes = []
    launch = leader._launch

    def recording(picked, planned):
        sizes.append(sum(len(w.seqs[i]) for w, i in picked))
        return launch(picked, planned)

    leader._launch = recording
    rng = np.random.default_rng(0)
    left = [rounds] * clients
    done = threading.Event()

    def send(k):
        left[k] -= 1
        fut = leader.submit([torch.from_numpy(rng.integers(4, 500, 250))])
        fut.add_done_callback(lambda _f: threading.Timer(0.005, again, (k,)).start())

    def again(k):
        if left[k]:
            send(k)
        elif not any(left):
            done.set()

    for k in range(clients):
        send(k)
    thread = threading.Thread(target=leader.run)
    thread.start()
    assert done.wait(60)
    leader.close()
    thread.join(timeout=30)
    return np.array(sizes)


def test_a_closed_loop_fills_its_forwards_when_the_leader_waits_for_the_callers_it_answered(topo, llama_ckpt):
    model = AutoModelForSequenceClassification.from_pretrained(llama_ckpt, dtype=torch.float32).eval()
    at_once = closed_loop(topo, model, share=0.0)  # planned as soon as the last forward was answered
    waited = closed_loop(topo, model, share=0.5)
    steady = slice(2, -3)  # not the first forwards, nor the last ones as the callers stop
    # quiet, 2,000 vs 1,600; on a loaded machine the callers are slow to come back either way and planning at once
    # can fill its forwards too, so only the waiting side's fill is a bound
    assert waited[steady].mean() >= 0.9 * BUDGET, (at_once, waited)
    assert waited[steady].mean() >= at_once[steady].mean(), (at_once, waited)
