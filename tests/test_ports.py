"""Two servers on one machine: `server.*_port=0` picks free ports, printed in the ready line, and torchrun's
`--standalone` picks its own rendezvous port, so nothing collides."""

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from reward_server.client import RemoteGPTRMClient

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
READY = re.compile(r"ready after \d+ s: http://127\.0\.0\.1:(\d+)/v2/models/reward/infer.*gRPC 127\.0\.0\.1:(\d+); "
                   r"metrics http://127\.0\.0\.1:(\d+)/metrics")


def start(log: Path, cache: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "serve_reward_model.py"), "server.http_port=0", "server.grpc_port=0", "server.metrics_port=0",
           "server.api_port=0", f"model.cache_dir={cache}"]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def ready_ports(proc: subprocess.Popen, log: Path, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = READY.search(log.read_text(errors="replace"))
        if found:
            return [int(p) for p in found.groups()]
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    raise TimeoutError(log.read_text()[-3000:])


def test_two_servers_with_port_0_on_one_machine(tmp_path):
    procs = [start(tmp_path / f"server{i}.log", tmp_path / "cache") for i in range(2)]
    try:
        ports = [ready_ports(p, tmp_path / f"server{i}.log") for i, p in enumerate(procs)]
        assert len({p for trio in ports for p in trio}) == 6, ports  # six distinct ports
        rewards = []
        for http, _, metrics in ports:
            with RemoteGPTRMClient(f"127.0.0.1:{http}") as client:
                rewards.append(client.score(["two servers, one machine"]))
            assert urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).status == 200
        np.testing.assert_array_equal(rewards[0], rewards[1])  # the same default model
    finally:
        for p in procs:  # torchrun and its ranks (each rank runs in a session of its own)
            ranks = [int(pid) for tid in os.listdir(f"/proc/{p.pid}/task")
                     for pid in open(f"/proc/{p.pid}/task/{tid}/children").read().split()]
            os.killpg(p.pid, 9)
            for pid in ranks:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            p.wait()
