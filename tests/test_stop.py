"""The quiet stop: SIGTERM (or Ctrl-C) to the `reward-server` launcher goes to rank 0, which drains; every rank, torchrun
and the launcher exit 0, with no traceback, in under 10 s for the default model on this machine, while 32 clients keep
sending: each request gets its reward, a 503, or (once the port is closed) a refused connection, before anything is
sent. No closed connection for a client of the API port (every drain answer says `Connection: close`, and the port
stops listening before it closes what is left). On Triton's port a client meets at most two: Triton's HTTP server,
once stopping, leaves new connections unaccepted (reset when it exits) and cuts the connections left at its exit
timeout (one reset for a client that keeps its keep-alive connection; a client that ends its connection on a
shutting-down 503, as RemoteGPTRMClient does, and reconnects during that second can meet both)."""

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
API = re.compile(r"API http://127\.0\.0\.1:(\d+) ")
TRITON_PATH = "/v2/models/reward/infer"
CLOSED = ("ConnectionResetError", "RemoteDisconnected", "BrokenPipeError")  # a request that met a closed connection
API_BODY = json.dumps({"input": [[5, 6, 7, 8, 9, 10]]}).encode()
BODY = json.dumps({"inputs": [{"name": "token_ids", "shape": [1, 1], "datatype": "BYTES",
                               "data": ["5 6 7 8 9 10"]}]}).encode()


def client(port: int, path: str, body: bytes, results: list, done: threading.Event, backoff_s: float,
           close_on_shutdown: bool) -> None:
    """Sends one request after another on a keep-alive connection; after a 503 it waits `backoff_s` (as
    RemoteGPTRMClient does), ending its connection first if `close_on_shutdown` and the 503 says shutting down (as
    RemoteGPTRMClient does); a connection the server asked to close is closed; after a closed connection it backs off
    too; after a refused connection it stops."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while not done.is_set():
        sent = time.monotonic()
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            text = response.read()
            kind = response.status
            if response.will_close or (close_on_shutdown and kind == 503 and b"shutting_down" in text):
                conn.close()
        except ConnectionRefusedError:
            kind = "refused"
        except (OSError, http.client.HTTPException) as exc:
            kind = type(exc).__name__
            conn.close()
        results.append((sent, kind))
        if kind == "refused":
            return
        if kind != 200:  # a 503 or a closed connection: back off, as RemoteGPTRMClient does
            time.sleep(backoff_s)


def launch(tmp_path, log) -> subprocess.Popen:
    """The default model on 2 ranks through the launcher, every port free, its output in `log`."""
    return subprocess.Popen([sys.executable, "-m", "reward_server.launcher", "--nproc_per_node", "2", "--standalone",
                             "server.http_port=0", "server.grpc_port=0", "server.metrics_port=0", "server.api_port=0",
                             f"model.cache_dir={tmp_path / 'cache'}"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(proc, log, seen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not seen(log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def test_sigterm_to_the_launcher_drains_and_everything_exits_0(tmp_path):
    log = tmp_path / "server.log"
    proc = launch(tmp_path, log)
    try:
        wait_for(proc, log, lambda text: READY.search(text))
        port = int(READY.search(log.read_text()).group(1))
        api_port = int(API.search(log.read_text()).group(1))
        done = threading.Event()
        results = {"triton, closes on shutdown": [[] for _ in range(12)],
                   "triton, keeps its connection": [[] for _ in range(10)], "API port": [[] for _ in range(10)]}
        args = [(port, TRITON_PATH, BODY, r, done, 0.5, True) for r in results["triton, closes on shutdown"]] + \
               [(port, TRITON_PATH, BODY, r, done, 0.5, False) for r in results["triton, keeps its connection"]] + \
               [(api_port, "/classify", API_BODY, r, done, 0.5, False) for r in results["API port"]]
        threads = [threading.Thread(target=client, args=a) for a in args]
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
    print(f"stopped {stopped:.1f} s after SIGTERM, exit {code}")
    for kind, clients in results.items():
        seen = [r for c in clients for r in c]
        print(f"{kind}: before the signal {dict(Counter(k for t, k in seen if t < sigterm))}, "
              f"after {dict(Counter(k for t, k in seen if t >= sigterm))}")
    assert code == 0, output[-3000:]
    assert "Traceback" not in output and "SignalException" not in output, output[-3000:]
    assert "rank 0 exited cleanly" in output and "rank 1 exited cleanly" in output
    assert stopped <= 10.0, stopped
    for kind, clients in results.items():
        seen = [r for c in clients for r in c]
        assert {k for t, k in seen if t < sigterm} == {200}, (kind, seen)
        after = Counter(k for t, k in seen if t >= sigterm)
        assert after[503] > 0 and set(after) <= {200, 503, "refused", *CLOSED}, (kind, after)
        closed = [sum(1 for _, k in c if k in CLOSED) for c in clients]
        # Triton's port: its HTTP server stops accepting (a new connection is reset, not refused) and cuts the
        # connections left at its exit timeout; the API port never
        assert max(closed) <= (0 if kind == "API port" else 2), (kind, closed)


def test_sigterm_while_starting_stops_every_rank_with_exit_0(tmp_path):
    """Ctrl-C while the model loads: nothing was accepted, so each rank stops at once (no drain, no traceback)."""
    log = tmp_path / "server.log"
    proc = launch(tmp_path, log)
    try:
        wait_for(proc, log, lambda text: "settings on the cpu" in text)  # loaded, not ready yet
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert code == 0 and "Traceback" not in output, output[-3000:]
    if "ready after" not in output:  # else the signal came after all, and the drain stopped it (the test above)
        assert "rank 0 stops" in output and "rank 1 stops" in output, output[-3000:]
