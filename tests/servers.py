"""Our processes in the tests: a real `torchrun --nproc_per_node N serve_reward_model.py` server (Server,
running_server), torchrun command lines, those processes read from /proc, and the calls tests make to a server.

A test that starts any of them carries the `server` marker (the rule: tests/conftest.py). While a test without it
runs, conftest calls `forbid_servers(its id)`: a Server, a torchrun command, or any subprocess that runs torchrun,
serve_reward_model.py, reward_server.launcher, reward_server.check or a script of benchmarks/ then raises, so
`-m "not server"` cannot start one unnoticed."""

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODELS = ("reward", "reward_model")

# ---------------------------------------------------------------- the `server` marker, enforced

_unmarked_test: Optional[str] = None  # the running test's id while it lacks the `server` marker
# our programs: the server, its launchers, the parity command; and every script in benchmarks/
_ENTRY_POINTS = ("torch.distributed.run", "torchrun", "serve_reward_model.py", "reward_server.launcher",
                 "reward_server.check")


def forbid_servers(test_id: Optional[str]) -> None:
    """From now on starting a server raises, naming `test_id` (None: allowed again)."""
    global _unmarked_test
    _unmarked_test = test_id


def check_allowed(what: str) -> None:
    if _unmarked_test is not None:
        raise RuntimeError(f"{_unmarked_test} starts {what} but is not marked `server`: add @pytest.mark.server "
                           f"(or pytestmark in its module); the rule is in tests/conftest.py")


def _words(args) -> List[str]:
    if isinstance(args, str):
        return args.split()
    if isinstance(args, (bytes, os.PathLike)):
        return [os.fsdecode(args)]
    return [os.fsdecode(a) if isinstance(a, (str, bytes, os.PathLike)) else str(a) for a in args]


def guard_subprocesses() -> None:
    """subprocess.Popen (hence subprocess.run) checks, in this process, that a command running one of our programs
    (_ENTRY_POINTS, benchmarks/*) runs inside a `server` test. Idempotent."""
    original = subprocess.Popen.__init__
    if getattr(original, "server_guard", False):
        return

    def __init__(self, args, *rest, **kwargs):
        if _unmarked_test is not None:
            words = _words(args)
            if any(os.path.basename(w) in _ENTRY_POINTS or Path(w).parent == REPO / "benchmarks" for w in words):
                check_allowed(f"`{' '.join(words)[:300]}`")
        original(self, args, *rest, **kwargs)

    __init__.server_guard = True
    subprocess.Popen.__init__ = __init__


# ---------------------------------------------------------------- starting servers

def free_port() -> int:
    """A free port below Linux's ephemeral range: a port the kernel hands out for outgoing connections (gloo,
    clients) may be taken again before the server binds it."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_start = int(f.read().split()[0])
    while True:
        port = random.randrange(20000, min(ephemeral_start, 32768))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def torchrun(nproc: int, script, *args, launcher_args=()) -> List[str]:
    """The command line of `torchrun --nproc_per_node nproc [launcher_args] script args` on a free master port."""
    check_allowed(f"torchrun {Path(script).name}")
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            *map(str, launcher_args), str(script), *map(str, args)]


class Server:
    """A real `torchrun --nproc_per_node N serve_reward_model.py ...` process group."""

    def __init__(self, nproc: int, overrides, log_path: Path, env=None, launcher_args=(), http_port=None):
        check_allowed("a server")
        self.http_port, self.grpc_port, self.metrics_port = http_port or free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = log_path
        cmd = torchrun(nproc, REPO / "serve_reward_model.py", f"server.http_port={self.http_port}",
                       f"server.grpc_port={self.grpc_port}", f"server.metrics_port={self.metrics_port}",
                       "server.api_port=0", *overrides,  # the API port (default 30000): a free one, see api_url
                       launcher_args=launcher_args)
        self._log = open(log_path, "w")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, models=MODELS, timeout=180.0):
        """Ready when every model is: PyTriton loads them one by one and restarts Triton when a later one fails
        to load, so the first model's readiness alone is not the server's."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-5000:]}")
            try:
                if all(urllib.request.urlopen(f"{self.url}/v2/models/{m}/ready", timeout=2).status == 200
                       for m in models) and "ready after" in self.log():  # Triton's a moment before rank 0's line
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log()[-5000:]}")

    def api_url(self) -> str:
        """The API port's URL (serving/api.py), from the ready line (the last one: a torchrun restart picks anew)."""
        found = re.findall(r"; API (http://[0-9.]+:\d+) ", self.log())
        assert found, "the API port is off (server.api_port=null) or the server is not ready"
        return found[-1]

    def restarts(self) -> int:
        """How many times torchrun has restarted the group so far (rank 0 logs each restart)."""
        done = re.findall(r"restarted by torchrun: restart (\d+) of at most", self.log())
        return max(map(int, done), default=0)

    def terminate(self, timeout=30.0) -> int:
        """SIGTERM to the launcher, as a user's Ctrl-C or a scheduler would; returns torchrun's exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise
        self._log.close()
        return self.proc.returncode

    def stop(self, timeout=30.0):
        """Teardown of a server whose shutdown is not under test: SIGKILL to torchrun and its ranks, and rank 0's
        reaper stops Triton (reward_server/serving/lifecycle.py; tests/test_rank_failure.py checks that it does). A
        graceful SIGTERM drain takes ~9 s on 2 cores, mostly Triton unloading its Python backend stubs;
        tests/test_serve.py and tests/test_security_drain.py check that path."""
        self.kill()

    def kill(self):
        if self.proc.poll() is None:
            ranks = children(self.proc.pid)
            os.killpg(self.proc.pid, signal.SIGKILL)
            for pid in ranks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def running_server(log_dir: Path, overrides, nproc=2, models=MODELS, env=None, launcher_args=()):
    """A real torchrun server for a whole test module; always stopped at the end."""
    srv = Server(nproc, list(overrides) + [f"model.cache_dir={log_dir / 'cache'}"], log_dir / "server.log",
                 env=env, launcher_args=launcher_args)
    try:
        yield srv.wait_ready(models)
    finally:
        srv.stop(timeout=60)


# ---------------------------------------------------------------- its processes, from /proc

def children(pid: int) -> List[int]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
    return out


def descendants(pid: int) -> List[int]:
    out = []
    for child in children(pid):
        out += [child] + descendants(child)
    return out


def name(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def rank_pids(torchrun_pid: int) -> Dict[int, int]:
    """{rank: pid} of the ranks torchrun is running now."""
    ranks = {}
    for pid in children(torchrun_pid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            if b"RANK" in env:
                ranks[int(env[b"RANK"])] = pid
    return ranks


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids, timeout: float) -> float:
    """Seconds until none of `pids` runs; AssertionError after `timeout`."""
    start = time.monotonic()
    while any(alive(p) for p in pids):
        assert time.monotonic() - start < timeout, f"still running after {timeout}s: {[p for p in pids if alive(p)]}"
        time.sleep(0.1)
    return time.monotonic() - start


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise ValueError(pid)


# ---------------------------------------------------------------- calls to a running server

def infer_rewards(url, model, name, rows):
    """One Triton HTTP request of BYTES rows to `model`'s input `name`; every row scored; the rewards."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
    data = np.array([[r] for r in rows], dtype=object)
    inp = httpclient.InferInput(name, list(data.shape), "BYTES")
    inp.set_data_from_numpy(data)
    result = client.infer(model, [inp])
    errors = result.as_numpy("error")
    assert all(e[0] == b"" for e in errors), errors
    return result.as_numpy("rewards")


def score_tokens(url, seqs, per_request=5, clients=4):
    """Split into requests of `per_request` sequences, sent from `clients` threads at once."""
    chunks = [seqs[i:i + per_request] for i in range(0, len(seqs), per_request)]
    rows = [[" ".join(map(str, s.tolist())).encode() for s in chunk] for chunk in chunks]
    with ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(lambda r: infer_rewards(url, "reward", "token_ids", r), rows))
    return np.concatenate(parts)


def infer_outputs(url, name, rows, model="reward"):
    """One Triton HTTP request of text rows (or bytes) to input `name`: every output (rewards, step_rewards,
    num_steps, error; None where the model has no such output), failed rows included."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
    data = np.array([[r.encode() if isinstance(r, str) else r] for r in rows], dtype=object)
    inp = httpclient.InferInput(name, list(data.shape), "BYTES")
    inp.set_data_from_numpy(data)
    result = client.infer(model, [inp])
    return {k: result.as_numpy(k) for k in ("rewards", "step_rewards", "num_steps", "error")}


def metrics(server) -> str:
    """The server's Prometheus text (our counters and Triton's, on its metrics port)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        return response.read().decode()


def value(text: str, name: str) -> float:
    """One sample's value in Prometheus text, by its full name (labels included)."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert found, f"{name} not in the metrics"
    return float(found.group(1))


class FakeTriton:
    """An HTTP server on a free loopback port that speaks Triton's binary inference protocol the way our client
    uses it: GET answers `config()` (a model config), POST decodes the request's BYTES rows and answers
    `answer(rows)` -> (status, body, Inference-Header-Content-Length or None). Subclasses say what to answer."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from tritonclient.utils import deserialize_bytes_tensor

        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body: bytes, headers=()):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(200, json.dumps(fake.config()).encode())

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                length = int(self.headers["Inference-Header-Content-Length"])
                rows = [bytes(r).decode() for r in deserialize_bytes_tensor(body[length:])]
                status, data, header_length = fake.answer(rows)
                self._send(status, data, [("Inference-Header-Content-Length", str(header_length))]
                           if header_length is not None else [])

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def config(self) -> dict:
        return {"max_batch_size": 4}

    def answer(self, rows):
        raise NotImplementedError

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class DelayedProxy:
    """Starts listening on `port` only after `delay_s`, then forwards every connection to `target_port`."""

    def __init__(self, port: int, target_port: int, delay_s: float):
        self.port, self.target_port, self.delay_s = port, target_port, delay_s
        self.listening_since = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        time.sleep(self.delay_s)
        with socket.create_server(("127.0.0.1", self.port)) as listener:
            listener.settimeout(0.1)
            self.listening_since = time.monotonic()
            while not self._stop.is_set():
                try:
                    down, _ = listener.accept()
                    up = socket.create_connection(("127.0.0.1", self.target_port))
                except socket.timeout:
                    continue
                except OSError:
                    down.close()
                    continue
                for a, b in ((down, up), (up, down)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def stop(self):
        self._stop.set()
        self._thread.join()
