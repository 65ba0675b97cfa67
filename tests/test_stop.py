"""The quiet stop: SIGTERM (or Ctrl-C) to the `reward-server` launcher goes to rank 0, which drains; every rank, torchrun
and the launcher exit 0, with no traceback, in under 10 s for the default model on this machine, while clients keep
sending: each request gets its reward, a 503, or (once Triton's port is closed) a refused connection."""

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
READY = re.compile(r"ready after \d+ s: http://127\.0\.0\.1:(\d+)/v2/models/reward/infer")
BODY = json.dumps({"inputs": [{"name": "token_ids", "shape": [1, 1], "datatype": "BYTES",
                               "data": ["5 6 7 8 9 10"]}]}).encode()


def client(port: int, results: list, done: threading.Event, backoff_s: float) -> None:
    """Sends one request after another on a keep-alive connection; after a 503 it waits `backoff_s` (as
    RemoteGPTRMClient does), after a refused connection it stops."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while not done.is_set():
        sent = time.monotonic()
        try:
            conn.request("POST", "/v2/models/reward/infer", body=BODY)
            response = conn.getresponse()
            response.read()
            kind = response.status
        except ConnectionRefusedError:
            kind = "refused"
        except (OSError, http.client.HTTPException) as exc:
            kind = type(exc).__name__
            conn.close()
        results.append((sent, kind))
        if kind == "refused":
            return
        if kind == 503:
            time.sleep(backoff_s)


def test_sigterm_to_the_launcher_drains_and_everything_exits_0(tmp_path):
    log = tmp_path / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "reward_server.launcher", "--nproc_per_node", "2", "--standalone",
                             "server.http_port=0", "server.grpc_port=0", "server.metrics_port=0", "server.api_port=0",
                             f"model.cache_dir={tmp_path / 'cache'}"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 180
        while not READY.search(log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        port = int(READY.search(log.read_text()).group(1))
        results, done = [], threading.Event()
        threads = [threading.Thread(target=client, args=(port, results, done, 0.5)) for _ in range(32)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        sigterm = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        stopped = time.monotonic() - sigterm
        done.set()
        for t in threads:
            t.join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    after = Counter(kind for sent, kind in results if sent >= sigterm)
    print(f"stopped {stopped:.1f} s after SIGTERM, exit {code}; requests sent after it: {dict(after)}")
    assert code == 0, output[-3000:]
    assert "Traceback" not in output and "SignalException" not in output, output[-3000:]
    assert "rank 0 exited cleanly" in output and "rank 1 exited cleanly" in output
    assert stopped <= 10.0, stopped
    assert Counter(kind for sent, kind in results if sent < sigterm) == {200: sum(1 for s, _ in results if s < sigterm)}
    assert after[503] > 0, after
