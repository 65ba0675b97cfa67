"""A live server for the benchmarks that drive one (standin.py, soak.py): start it with torchrun on free ports, wait
until it is ready, send token ids over Triton's HTTP/JSON (one keep-alive connection per client thread), read its
Prometheus counters, stop it (SIGTERM: it drains)."""

import dataclasses
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral = int(f.read().split()[0])
    while True:
        port = random.randrange(20000, min(ephemeral, 32768))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


class LiveServer:
    """`torchrun --nproc_per_node nproc serve_reward_model.py overrides` with its log in `log_path`."""

    def __init__(self, nproc: int, overrides: Sequence[str], log_path: str, env: Optional[Dict[str, str]] = None):
        from reward_server.config import ServerConfig

        self.http_port, self.metrics_port = free_port(), free_port()
        if "api_port" in {f.name for f in dataclasses.fields(ServerConfig)}:  # a fixed default port: off
            overrides = ["server.api_port=null", *overrides]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(REPO / "serve_reward_model.py"),
               f"server.http_port={self.http_port}",
               f"server.grpc_port={free_port()}", f"server.metrics_port={self.metrics_port}", *overrides]
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def wait_ready(self, timeout: float = 600.0) -> "LiveServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); see {self.log_path}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/models/reward/ready", timeout=2)
                return self
            except OSError:
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"the server was not ready after {timeout:.0f} s; see {self.log_path}")

    def _metrics_page(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as r:
            return r.read().decode()

    def metrics(self) -> Dict[str, float]:
        """Our counters (reward_server_*), by name without the _total suffix."""
        return {m.group(1): float(m.group(2))
                for m in re.finditer(r"^(reward_server_[a-z_]+?)(?:_total)? ([0-9.e+-]+)$", self._metrics_page(), re.M)}

    def triton_queued(self, model: str = "reward") -> float:
        """Requests waiting in Triton's queue for `model` (its nv_inference_pending_request_count, which our metrics
        page carries): ones no model instance was free to take."""
        text = self._metrics_page()
        return sum(float(m.group(1)) for m in re.finditer(
            rf'^nv_inference_pending_request_count{{model="{model}"[^}}]*}} ([0-9.e+-]+)$', text, re.M))

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "LiveServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Client:
    """One keep-alive HTTP connection to the native model `reward`: `score(rows)` sends token id rows (one
    request) and returns its outputs by name (rewards, step_rewards, num_steps, error) as numpy arrays."""

    def __init__(self, port: int, timeout: float = 600.0, model: str = "reward"):
        self.port, self.timeout, self.model = port, timeout, model
        self.conn: Optional[http.client.HTTPConnection] = None

    def score(self, rows: List[np.ndarray]) -> Dict[str, np.ndarray]:
        body = json.dumps({"inputs": [{"name": "token_ids", "shape": [len(rows), 1], "datatype": "BYTES",
                                       "data": [" ".join(map(str, r.tolist())) for r in rows]}]}).encode()
        for attempt in range(2):  # a keep-alive connection the server closed: once more on a new one
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request("POST", f"/v2/models/{self.model}/infer", body=body,
                                  headers={"Content-Type": "application/json"})
                response = self.conn.getresponse()
                data = response.read()
                break
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:500]!r}")
        out = {}
        for o in json.loads(data)["outputs"]:
            dtype = object if o["datatype"] == "BYTES" else np.float32 if o["datatype"] == "FP32" else np.int64
            out[o["name"]] = np.array(o["data"], dtype=dtype).reshape(o["shape"])
        return out
