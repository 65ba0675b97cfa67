"""Triton's processes: alive while rank 0 drains, gone as soon as rank 0 is.

torchrun stops a rank by signalling its whole process group (killpg). Triton, its Python backend stubs and
PyTriton's shared-memory managers (started by the stubs) descend from rank 0, so the first SIGTERM would kill
them while rank 0 is still answering the requests it accepted. They therefore live in a process group of their
own, led by a reaper: a tiny shell that waits for rank 0 to exit, however it exits (SIGKILL and the OOM killer
included), then SIGKILLs its whole group. Rank 0 stops Triton itself when it drains; if rank 0 dies, Triton and
its helpers die with it at once, free the ports for torchrun's restart, and the clients' in-flight requests
fail instead of hanging.
"""

import contextlib
import os
import subprocess

# `read` returns when rank 0's end of the pipe closes; then remove the shared memory regions Triton's Python
# backend made for rank 0 ("pytrtion<rank 0 pid>-*", PyTriton's naming; already gone after a clean stop) and
# SIGKILL the reaper's own process group (`kill -9 0`).
PID_FILE_ENV = "REWARD_SERVER_PID_FILE"  # set by the reward-server launcher: where rank 0 writes its pid when ready

_REAPER = 'trap "" TERM INT HUP; read _; rm -f /dev/shm/pytrtion"$PPID"-*; kill -9 0'
_group = None  # while set, processes forked from Python join this process group


def _join_group() -> None:
    if _group is not None:
        os.setpgid(0, _group)


os.register_at_fork(after_in_child=_join_group)


@contextlib.contextmanager
def triton_process_group():
    """Start the reaper; processes forked from Python inside the block (PyTriton forks tritonserver, whose
    children inherit the group) join its process group. Keep the yielded reaper referenced until exit: it
    holds the pipe."""
    global _group
    reaper = subprocess.Popen(["/bin/sh", "-c", _REAPER], stdin=subprocess.PIPE, process_group=0)
    _group = reaper.pid
    try:
        yield reaper
    finally:
        _group = None


def write_pid() -> None:
    """Rank 0, once ready: its pid in $REWARD_SERVER_PID_FILE (launcher.py signals rank 0 rather than torchrun, so
    that a stop drains and every process exits 0)."""
    path = os.environ.get(PID_FILE_ENV)
    if path:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
