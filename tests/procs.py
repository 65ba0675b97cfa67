"""Helpers for the reliability tests: a server shared by a test module, and its processes read from /proc."""

import contextlib
import time
from pathlib import Path
from typing import Dict, List

from conftest import Server, children


@contextlib.contextmanager
def running_server(log_dir: Path, overrides, nproc=2, models=("reward", "reward_model"), env=None,
                   launcher_args=()):
    """A real torchrun server for a whole test module; always stopped at the end."""
    srv = Server(nproc, list(overrides) + [f"model.cache_dir={log_dir / 'cache'}"], log_dir / "server.log",
                 env=env, launcher_args=launcher_args)
    try:
        yield srv.wait_ready(models)
    finally:
        srv.stop(timeout=60)


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
