"""An RL actor's loop rides through server restarts without a try/except, and a cancelled call stops costing.

One server under `torchrun --max-restarts 3` (2 data-parallel ranks, every forward sleeps 0.2 s so a batch is in
flight when rank 1 is killed): a loop of 60 infer_rm calls with rank 1 SIGKILLed during call 10 (the request in
flight gets 503 "ranks failed", then connections are refused while torchrun restarts the group, then 404s while
Triton loads the models: all retried), the same with the kill between two calls, and a server that starts 10 s
after the actor's first call. Every reward must equal a plain transformers forward.
"""

import asyncio
import os
import signal
import threading
import time

import numpy as np
import pytest

from oracles import reference_rewards
from servers import Server, free_port, rank_pids
from reward_server.client import RemoteGPTRMClient, RewardTimeout

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

CALLS, PER_CALL = 60, 16
FORWARD_S = 0.2


@pytest.fixture(scope="module")
def batches(llama_ckpt):
    rng = np.random.default_rng(7)
    calls = [[rng.integers(4, 500, int(rng.integers(2, 33))) for _ in range(PER_CALL)] for _ in range(CALLS)]
    expected = reference_rewards(llama_ckpt, [s for c in calls for s in c])
    return calls, [expected[i * PER_CALL:(i + 1) * PER_CALL] for i in range(CALLS)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, llama_ckpt):
    tmp = tmp_path_factory.mktemp("client_restarts")
    srv = Server(2, [f"model.path={llama_ckpt}", "parallel.tensor_parallel_size=1",
                     f"fault_injection.forward_delay_s={FORWARD_S}", f"model.cache_dir={tmp / 'cache'}"],
                 tmp / "server.log", launcher_args=["--max-restarts=3"])
    try:
        yield srv.wait_ready()
    finally:
        srv.stop(timeout=60)


def actor_loop(client, calls, expected, on_call=None):
    """What an RL actor does: score each batch, use the rewards; no try/except. Returns the seconds per call."""
    seconds = []
    for i, (seqs, want) in enumerate(zip(calls, expected)):
        start = time.monotonic()
        handle = client.infer_rm(seqs)
        if on_call:
            on_call(i)
        np.testing.assert_allclose(handle.result(), want, atol=1e-4, rtol=0, err_msg=f"call {i}")
        seconds.append(time.monotonic() - start)
    return seconds


def kill_rank1(srv):
    os.kill(rank_pids(srv.proc.pid)[1], signal.SIGKILL)


def test_rank_killed_during_a_call(server, batches):
    calls, expected = batches
    restarts = server.wait_ready().restarts()  # 0 unless the tests before ran
    with RemoteGPTRMClient(server.url, max_batch_size=8) as client:
        def on_call(i):
            if i == 10:
                time.sleep(FORWARD_S / 2)  # the call's requests are in a forward
                kill_rank1(server)
        seconds = actor_loop(client, calls, expected, on_call)
    print(f"call 10 took {seconds[10]:.1f} s (the restart); the others at most {max(seconds[:10] + seconds[11:]):.2f} s")
    assert seconds[10] > 3  # it did ride through a restart
    assert f"restarted by torchrun: restart {restarts + 1} of at most 3" in server.log()


def test_rank_killed_between_calls(server, batches):
    calls, expected = batches
    restarts = server.wait_ready().restarts()  # 1 after test_rank_killed_during_a_call, 0 alone
    with RemoteGPTRMClient(server.url, max_batch_size=8) as client:
        actor_loop(client, calls[:10], expected[:10])
        kill_rank1(server)
        seconds = actor_loop(client, calls[10:], expected[10:])
    print(f"first call after the kill took {seconds[0]:.1f} s")
    assert f"restarted by torchrun: restart {restarts + 1} of at most 3" in server.log()


def test_server_started_after_the_first_call(tmp_path, llama_ckpt, batches):
    calls, expected = batches
    port = free_port()
    started = {}

    def start_later():
        time.sleep(10)
        started["server"] = Server(2, [f"model.path={llama_ckpt}", f"model.cache_dir={tmp_path / 'cache'}"],
                                   tmp_path / "server.log", http_port=port)

    threading.Thread(target=start_later, daemon=True).start()
    try:
        # a server started with its client: the client waits for it as long as asked (a URL never seen answering
        # is otherwise reported after wait_for_server_s, 10 s)
        with RemoteGPTRMClient(f"127.0.0.1:{port}", max_batch_size=8, wait_for_server_s=120) as client:
            first = time.monotonic()
            seconds = actor_loop(client, calls[:20], expected[:20])
        print(f"first call answered {seconds[0]:.1f} s after it was made")
        assert seconds[0] > 10
    finally:
        while "server" not in started:
            time.sleep(0.5)
        started["server"].stop(timeout=60)
        assert first


def test_a_cancelled_call_does_not_delay_the_next(server, batches):
    calls, expected = batches
    server.wait_ready()
    big = [s for c in calls for s in c] * 3  # 2,880 sequences: 360 requests of 8
    with RemoteGPTRMClient(server.url, max_batch_size=8, concurrency=4) as client:
        client.score(calls[0])  # connected, config read
        start = time.monotonic()
        client.score(calls[1])
        alone = time.monotonic() - start

        handle = client.infer_rm(big)
        time.sleep(1.0)
        assert handle.cancel()
        start = time.monotonic()
        np.testing.assert_allclose(client.score(calls[2]), expected[2], atol=1e-4, rtol=0)
        after_cancel = time.monotonic() - start

        async def abandoned():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.ainfer_rm(big), timeout=1.0)
            start = time.monotonic()
            np.testing.assert_allclose(await client.ainfer_rm(calls[3]), expected[3], atol=1e-4, rtol=0)
            return time.monotonic() - start

        after_async_cancel = asyncio.run(abandoned())
    print(f"a call alone {alone:.2f} s; after a cancelled 2,880-sequence call {after_cancel:.2f} s; "
          f"after a cancelled ainfer_rm {after_async_cancel:.2f} s")
    # the 4 requests already sent finish in the forward running now; the next call's join the next forward
    assert after_cancel < alone + 3 * FORWARD_S + 0.5, (alone, after_cancel)
    assert after_async_cancel < alone + 3 * FORWARD_S + 0.5, (alone, after_async_cancel)


def test_result_timeout_says_what_timed_out(server, batches):
    calls, _ = batches
    server.wait_ready()
    with RemoteGPTRMClient(server.url, max_batch_size=8) as client:
        handle = client.infer_rm(calls[0] * 10)
        with pytest.raises(RewardTimeout, match=r"rewards of 160 sequences were not ready within 0.01s"):
            handle.result(timeout=0.01)
        handle.cancel()
