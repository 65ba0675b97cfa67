"""RemoteGPTRMClient over several servers (client_servers.py): each request to the least busy one, a request
whose server fails sent to another at once, nothing lost and the order kept. The scheduling in-process with fake
transports; then two real servers (torchrun, one rank each), one SIGKILLed while a 600-sequence batch is in
flight."""

import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from oracles import reference_rewards
from reward_server.client import RemoteGPTRMClient
from reward_server.client.errors import RewardServerUnavailable
from reward_server.client.http import Retry
from reward_server.client.pool import ServerPool
from servers import Server

pytestmark = pytest.mark.timeout(600)


class FakeTransport:
    """Answers 200 after `delay_s`, or fails with Retry (the server's state) while `down` is set."""

    def __init__(self, name: str, delay_s: float = 0.0):
        self.url, self.delay_s = f"http://{name}:8000", delay_s
        self.down = False
        self.calls = 0
        self.busy = self.most_busy = 0
        self._lock = threading.Lock()

    def attempt(self, method, path, body, headers, what):
        with self._lock:
            self.calls += 1
            self.busy += 1
            self.most_busy = max(self.most_busy, self.busy)
        try:
            if self.down:
                raise Retry("cannot connect ([Errno 111] Connection refused)")
            time.sleep(self.delay_s)
            return 200, self.url.encode(), None
        finally:
            with self._lock:
                self.busy -= 1

    def close(self):
        pass

    def close_connections(self):
        pass


def pool(*transports, budget=5.0, backoff=0.05, retries=None):
    return ServerPool(list(transports), restart_budget_s=budget, retry_backoff_s=backoff, max_backoff_s=0.2,
                      retries=retries)


def send(p, n, threads=8):
    """n requests from `threads` threads at once: (status, body, url) of each."""
    def one(_):
        status, body, _, url = p.request("POST", "/infer", b"", what="x")
        return status, body.decode(), url

    with ThreadPoolExecutor(threads) as workers:
        return list(workers.map(one, range(n)))


def test_requests_spread_over_servers_by_requests_in_flight():
    fast, slow = FakeTransport("fast", 0.01), FakeTransport("slow", 0.1)
    answers = send(pool(fast, slow), 80)
    assert all(status == 200 and body == url for status, body, url in answers)
    assert fast.calls + slow.calls == 80 and fast.calls > 2 * slow.calls, (fast.calls, slow.calls)
    assert slow.most_busy <= 5  # never more than its share of the 8 in flight


def test_a_failed_server_loses_nothing_and_is_tried_again_after_its_backoff():
    a, b = FakeTransport("a", 0.01), FakeTransport("b", 0.01)
    b.down = True
    p = pool(a, b)
    answers = send(p, 40)
    assert len(answers) == 40 and {url for _, _, url in answers} == {a.url}
    assert b.calls < 10, b.calls  # backed off, not hammered
    b.down = False
    time.sleep(0.3)  # its backoff (at most max_backoff_s x 1.5) is over
    answers = send(p, 40)
    assert {url for _, _, url in answers} == {a.url, b.url}


def test_one_server_waits_out_its_backoff_then_gives_up_with_what_it_saw():
    down = FakeTransport("down")
    down.down = True
    started = time.monotonic()
    with pytest.raises(RewardServerUnavailable) as exc:
        pool(down, budget=0.5).request("POST", "/infer", b"", what="sequences 0..3")
    assert 0.5 <= time.monotonic() - started < 2.0
    message = str(exc.value)
    assert message.startswith("reward server http://down:8000 unavailable for sequences 0..3: cannot connect")
    assert "is the server running there?" in message and 3 <= down.calls <= 10, (message, down.calls)
    both = [FakeTransport("a"), FakeTransport("b")]
    for t in both:
        t.down = True
    with pytest.raises(RewardServerUnavailable, match="reward servers http://a:8000,http://b:8000 unavailable .* "
                                                      "nothing answered at any of them: are they running"):
        pool(*both, retries=3).request("POST", "/infer", b"", what="x")
    assert sum(t.calls for t in both) == 4


# ---------------------------------------------------------------- two real servers

FORWARD_S = 0.2


@pytest.fixture(scope="module")
def servers(tmp_path_factory, llama_ckpt):
    tmp = tmp_path_factory.mktemp("two_servers")
    started = [Server(1, [f"model.path={llama_ckpt}", f"fault_injection.forward_delay_s={FORWARD_S}",
                          "batching.max_queue_delay_us=0", f"model.cache_dir={tmp / 'cache'}"], tmp / f"server{i}.log")
               for i in range(2)]
    try:
        yield [s.wait_ready() for s in started]
    finally:
        for s in started:
            s.stop()


def requests_served(srv) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines  # Triton's counter, through our metrics port
               if re.match(r"nv_inference_request_success(_total)?\{", line) and 'model="reward"' in line)


@pytest.mark.server
def test_a_server_killed_mid_batch_its_requests_go_to_the_other(servers, llama_ckpt):
    rng = np.random.default_rng(11)
    seqs = [rng.integers(4, 500, int(rng.integers(2, 40))) for _ in range(600)]
    expected = reference_rewards(llama_ckpt, seqs)
    survivor, victim = servers
    with RemoteGPTRMClient([survivor.url, victim.url], max_batch_size=10, concurrency=8,
                           restart_budget_s=60) as client:
        handle = client.infer_rm(seqs)
        deadline = time.monotonic() + 60
        served_before = (0.0, 0.0)
        while min(served_before) < 2 and time.monotonic() < deadline:  # both servers at work on the batch
            time.sleep(0.05)
            served_before = requests_served(victim), requests_served(survivor)
        victim.kill()  # SIGKILL torchrun and its rank; Triton goes with rank 0 (lifecycle.py)
        killed = time.monotonic()
        rewards = handle.result(timeout=120)
        print(f"served before the kill: victim {served_before[0]:.0f}, survivor {served_before[1]:.0f} requests; "
              f"the rest done {time.monotonic() - killed:.1f} s after it")
        assert min(served_before) >= 2, served_before
        np.testing.assert_allclose(rewards, expected, atol=1e-4, rtol=0)
        again = client.infer_rm(seqs[:50]).result(timeout=60)  # the dead server is skipped from now on
        np.testing.assert_allclose(again, expected[:50], atol=1e-4, rtol=0)
