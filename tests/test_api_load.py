"""Smoke test of benchmarks/api_load.py (per-sample load through the API port's /classify vs Triton's `reward`
model, one load generator) against a live server: a short run prints its table and ratio, and both paths give the
same rewards."""

import os
import re
import subprocess
import sys

import pytest

from servers import REPO

pytestmark = [pytest.mark.server, pytest.mark.timeout(300)]


def test_api_load_smoke(start_server, llama_ckpt, tmp_path):
    srv = start_server(1, [f"model.path={llama_ckpt}"])
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "api_load.py"), "--triton", srv.url, "--api", srv.api_url(),
         "--metrics", f"127.0.0.1:{srv.metrics_port}", "--n", "32", "--callers", "8", "--rounds", "2", "--warmup", "4",
         "--max-tokens", "1000", "--json", str(tmp_path / "load.json")],
        capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| Triton reward |")
            or line.startswith("| API /classify |")]
    assert len(rows) == 4, out.stdout
    assert all(int(r.split("|")[3]) == 32 and float(r.split("|")[6].replace(",", "")) > 0 for r in rows), rows
    found = re.search(r"ratio (\d+\.\d+); rewards max \|difference\| (\S+)", out.stdout)
    assert found and float(found.group(1)) > 0 and float(found.group(2)) <= 1e-5, out.stdout
