"""Pacing (launch_pacing.py): while a forward runs on the GPU, rank 0 takes newly queued requests until that forward is
expected to end within `launch_lead` launch times, then launches the next one. In-process, with a stand-in for the
forward in flight (the pacing itself only runs with CUDA)."""

import threading
import time

import torch

from reward_server.engine import Leader
from reward_server.launch_pacing import Pacer


class Running:
    """A forward in flight as Leader._gather sees it: when it began on the GPU, its tokens, whether it has ended."""

    def __init__(self, started, n_computed, ends_at=None):
        self.started = started
        self.n_computed = n_computed
        self.ends_at = ends_at

    def done(self):
        return self.ends_at is not None and time.monotonic() >= self.ends_at


class NoEngine:
    topo = None


def paced_leader(gpu_s=0.3, computed=1000, launch_s=0.01, lead=2.0, budget=4096):
    leader = Leader(NoEngine(), heartbeat_s=1, tokens_per_forward=budget, launch_lead=lead)
    if gpu_s is not None:
        leader.pacer.finished(gpu_s, computed)
        leader.pacer.launched(launch_s)
    return leader


def seq(n):
    return torch.arange(n) % 100 + 3


def test_the_deadline_is_the_expected_end_less_lead_launch_times():
    pacer = Pacer(lead=2.0)
    assert pacer.deadline(started=100.0, computed=1000) is None  # nothing measured yet: launch at once
    pacer.finished(0.2, 1000)
    assert pacer.deadline(started=100.0, computed=1000) is None  # no launch time yet
    pacer.launched(0.01)
    assert abs(pacer.deadline(started=100.0, computed=2000) - (100.0 + 0.4 - 0.02)) < 1e-9
    pacer.finished(0.6, 1000)  # slower forwards move the estimate towards them, smoothed
    assert 0.2 / 1000 < pacer.seconds_per_token < 0.6 / 1000
    assert Pacer(lead=0.0).deadline(0.0, 1) is None  # 0: no pacing


def test_requests_that_arrive_while_the_forward_runs_join_the_next_one():
    leader = paced_leader(gpu_s=0.3, computed=1000, launch_s=0.01)
    start = time.monotonic()
    late = []

    def send():  # clients answered by the previous forward come back a little later
        for delay in (0.03, 0.06):
            time.sleep(delay - (time.monotonic() - start))
            late.append(leader.submit([seq(50)]))

    sender = threading.Thread(target=send)
    sender.start()
    assert leader._gather(Running(start, 1000)) is False
    took = time.monotonic() - start
    sender.join()
    assert len(leader._pending) == 2 and all(not f.done() for f in late)
    assert 0.3 - 2 * 0.01 - 0.02 < took < 0.3  # until the forward's expected end less two launch times


def test_work_that_fills_a_forward_is_launched_at_once():
    leader = paced_leader(budget=1000)
    leader.submit([seq(600), seq(600)])
    leader._take_queued(wait=False)
    start = time.monotonic()
    assert leader._gather(Running(start, 1000)) is False
    assert time.monotonic() - start < 0.05


def test_pacing_stops_when_the_forward_in_flight_ends_early_or_the_server_stops():
    leader = paced_leader(gpu_s=1.0)
    start = time.monotonic()
    assert leader._gather(Running(start, 1000, ends_at=start + 0.05)) is False
    assert time.monotonic() - start < 0.3
    leader.close()
    assert leader._gather(Running(time.monotonic(), 1000)) is True  # the stop sign


def test_nothing_measured_or_pacing_off_launches_at_once():
    for leader in (paced_leader(gpu_s=None), paced_leader(lead=0.0)):
        start = time.monotonic()
        assert leader._gather(Running(start, 1000)) is False
        assert time.monotonic() - start < 0.05
