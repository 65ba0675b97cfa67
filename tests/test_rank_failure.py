"""A rank that dies or runs out of memory never hangs the server: the requests in flight get a 503 (retryable), the
whole process group exits within 10 s, and torchrun (--max-restarts) starts it again; once the restarts are spent
torchrun exits non-zero. A rank that hangs instead is caught after parallel.timeout_s (rank 0's watchdog, or
gloo's own collective timeout), and rank 0 SIGKILLs it rather than wait for torchrun's 30 s grace.

One torchrun for the module (2 data-parallel ranks, --max-restarts=3); the tests run in order and each leaves it
restarting. Each expects the restart after the ones its server's log shows, and the last one first spends any
restart left, so that every test also passes alone. Every forward sleeps 1 s (fault_injection.forward_delay_s) so
that requests are surely in flight.
"""

import contextlib
import glob
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as httpclient

from oracles import reference_rewards
from reward_server.protocol import RANKS_FAILED, UNAVAILABLE, error_token
from servers import descendants, name, rank_pids, running_server, wait_gone

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

RESTARTS = 3
SEQS = [np.arange(4, 4 + n) % 500 + 4 for n in (3, 17, 9, 30, 5, 12)]
RANKS_FAILED_503 = f"[503] {error_token(UNAVAILABLE, RANKS_FAILED)} reward ranks failed"  # what the client sees


@pytest.fixture(scope="module")
def server(tmp_path_factory, llama_ckpt):
    tmp = tmp_path_factory.mktemp("rank_failure")
    overrides = [f"model.path={llama_ckpt}", "parallel.tensor_parallel_size=1", "parallel.timeout_s=10",
                 "fault_injection.forward_delay_s=1",
                 f"fault_injection.oom_file={tmp / 'oom'}", "fault_injection.oom_rank=1"]
    with running_server(tmp, overrides, launcher_args=[f"--max-restarts={RESTARTS}"]) as srv:
        srv.oom_file = tmp / "oom"
        srv.expected = reference_rewards(llama_ckpt, SEQS)
        yield srv


def score(url, seq):
    """The reward, or the exception the client got."""
    client = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
    try:
        data = np.array([[" ".join(map(str, seq)).encode()]], dtype=object)
        tensor = httpclient.InferInput("token_ids", [1, 1], "BYTES")
        tensor.set_data_from_numpy(data)
        result = client.infer("reward", [tensor])
        assert result.as_numpy("error")[0, 0] == b""
        return result.as_numpy("rewards")[0]
    except Exception as exc:
        return exc
    finally:
        client.close()


def fail_while_busy(srv, fail, exit_within=60.0):
    """Send requests, call fail(ranks) while they are in flight; check that the requests are answered (rewards
    right, or an error) and that the old ranks and tritonserver are gone within `exit_within` seconds of the
    failure. Returns the errors and the old ranks."""
    srv.wait_ready(("reward", "reward_model"))
    ranks = rank_pids(srv.proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    tritons = [p for p in descendants(ranks[0]) if name(p) == "tritonserver"]
    assert len(tritons) == 1
    np.testing.assert_allclose(score(srv.url, SEQS[0]), srv.expected[0], atol=1e-4, rtol=0)
    with ThreadPoolExecutor(len(SEQS)) as pool:
        futures = [pool.submit(score, srv.url, s) for s in SEQS]
        time.sleep(0.5)  # the first batch is inside its 1 s forward
        start = time.monotonic()
        fail(ranks)
        results = [f.result(timeout=60) for f in futures]
    answered = time.monotonic() - start
    gone = answered + wait_gone(list(ranks.values()) + tritons, timeout=exit_within - answered)
    print(f"requests answered {answered:.1f} s, ranks and tritonserver gone {gone:.1f} s after the failure")
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors, "nothing was in flight"
    for r, expected in zip(results, srv.expected):
        if not isinstance(r, Exception):
            np.testing.assert_allclose(r, expected, atol=1e-4, rtol=0)
    assert answered < 30
    return errors, ranks


def restarts_so_far(srv) -> int:
    """Once the server serves: how many restarts torchrun has made (the tests before this one, if they ran)."""
    srv.wait_ready(("reward", "reward_model"))
    return srv.restarts()


def restarted_and_serving(srv, restarts_done):
    srv.wait_ready(("reward", "reward_model"))
    assert f"restarted by torchrun: restart {restarts_done} of at most {RESTARTS}" in srv.log()
    np.testing.assert_allclose(score(srv.url, SEQS[1]), srv.expected[1], atol=1e-4, rtol=0)


def spend_restarts(srv):
    """SIGKILL rank 1 until torchrun has no restart left (what the module's earlier tests leave, when they run)."""
    while (done := restarts_so_far(srv)) < RESTARTS:
        os.kill(rank_pids(srv.proc.pid)[1], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while srv.restarts() == done:
            assert srv.proc.poll() is None and time.monotonic() < deadline, srv.log()[-3000:]
            time.sleep(0.5)


def test_subscriber_killed(server):
    before = restarts_so_far(server)
    errors, _ = fail_while_busy(server, lambda ranks: os.kill(ranks[1], signal.SIGKILL), exit_within=10)
    messages = [str(e) for e in errors]
    assert all(m.startswith(RANKS_FAILED_503) for m in messages), messages
    assert not any(".py" in m or ".cc" in m for m in messages), messages  # no server paths
    restarted_and_serving(server, before + 1)


def test_rank0_killed_takes_tritonserver_with_it(server):
    before = restarts_so_far(server)
    _, ranks = fail_while_busy(server, lambda ranks: os.kill(ranks[0], signal.SIGKILL))
    assert not glob.glob(f"/dev/shm/pytrtion{ranks[0]}-*")  # the reaper removed its shared memory
    restarted_and_serving(server, before + 1)


def test_out_of_memory_on_one_rank(server):
    before = restarts_so_far(server)
    errors, _ = fail_while_busy(server, lambda ranks: server.oom_file.touch())
    assert any("fatal error (out of memory?)" in str(e) for e in errors), errors
    assert "injected by fault_injection.oom_file on rank 1" in server.log()
    restarted_and_serving(server, before + 1)


def test_stuck_rank_times_out_and_torchrun_exits_nonzero_when_restarts_are_spent(server):
    """A rank that hangs (SIGSTOP) instead of dying: after parallel.timeout_s (10 s here) the requests get a 503,
    rank 0 SIGKILLs the stuck rank and exits: gone within timeout_s + 10 s. This fourth failure ends torchrun."""
    spend_restarts(server)
    stopped, at = [], []

    def stop(ranks):
        stopped.append(ranks[1])
        at.append(time.monotonic())
        os.kill(ranks[1], signal.SIGSTOP)

    try:
        errors, _ = fail_while_busy(server, stop, exit_within=20)
        assert all(str(e).startswith(RANKS_FAILED_503) for e in errors), errors
        assert server.proc.wait(timeout=60) != 0
    finally:
        for pid in stopped:  # never leave a stopped process behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    print(f"torchrun exited {server.proc.returncode} {time.monotonic() - at[0]:.1f} s after the failure")
