"""`reward-server [torchrun options] [overrides]`: check the config, then start the ranks with torchrun.

    reward-server --nproc_per_node 2 model.path=/ckpt/rm parallel.tensor_parallel_size=2
    reward-server --nproc 8 --max-restarts 3 model.path=/ckpt/rm
    reward-server --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint host0:29500 model.path=/ckpt/rm

An argument that starts with "-" is torchrun's (`python -m torch.distributed.run --help`), and so is the word after
an option given without "=" (`--nproc_per_node 2`); `--nproc N` is short for `--nproc_per_node N`. Every other
argument is an override of the server's config (key=value, docs/configuration.md). The config is checked first,
with the world size torchrun will start when the options give it (--nnodes x --nproc_per_node): a setting that
cannot work prints one line `cannot start: <key>=<value>: <what to change>` and exits 2, before torchrun starts
(so without torchrun's failure report). Then it runs `python -m torch.distributed.run [torchrun options] -m
reward_server.cli [overrides]`, whose ranks check the config again (cheap) and serve. Without --nproc_per_node
torchrun starts one rank.

Stopping: SIGTERM or Ctrl-C to this process goes to rank 0 once it is ready (it writes its pid to the file named by
$REWARD_SERVER_PID_FILE): rank 0 drains, the ranks leave, and torchrun and this process exit 0 without torchrun's
SignalException report. Before rank 0 is ready the signal goes to each rank, which stops at once with exit code 0
(nothing was accepted yet), and so do torchrun and this process.
"""

import os
import signal
import subprocess
import sys
import tempfile
from typing import List, Optional, Tuple

ALIASES = {"--nproc": "--nproc_per_node"}


def split_args(argv: List[str]) -> Tuple[List[str], List[str]]:
    """(torchrun's arguments, the config overrides)."""
    torchrun, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            name, eq, value = arg.partition("=")
            name = ALIASES.get(name, name)
            torchrun.append(f"{name}{eq}{value}")
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if not eq and nxt is not None and not nxt.startswith(("-", "~", "+")) and "=" not in nxt:
                torchrun.append(nxt)  # the option's value
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return torchrun, overrides


def option(torchrun: List[str], *names: str) -> Optional[str]:
    """The value of a torchrun option (last one wins), in either spelling (--nproc-per-node / --nproc_per_node)."""
    spellings = {n for name in names for n in (name, name.replace("_", "-"), name.replace("-", "_"))}
    value = None
    for i, arg in enumerate(torchrun):
        name, eq, given = arg.partition("=")
        if name in spellings:
            value = given if eq else (torchrun[i + 1] if i + 1 < len(torchrun) else None)
    return value


def world_size(torchrun: List[str]) -> Optional[int]:
    """--nnodes x --nproc_per_node when both are plain numbers (torchrun's defaults: 1 and 1), else None (an
    elastic --nnodes MIN:MAX, or --nproc_per_node gpu / auto)."""
    nnodes, nproc = option(torchrun, "--nnodes") or "1", option(torchrun, "--nproc_per_node") or "1"
    if nnodes.isdigit() and nproc.isdigit():
        return int(nnodes) * int(nproc)
    return None


def torchrun_command(argv: List[str]) -> List[str]:
    torchrun, overrides = split_args(argv)
    return [sys.executable, "-m", "torch.distributed.run", *torchrun, "-m", "reward_server.cli", *overrides]


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        sys.exit(0)
    from .cli import EXIT_CONFIG, check  # no torch: a bad config fails fast

    torchrun, overrides = split_args(argv)
    env = dict(os.environ)
    world = world_size(torchrun)
    env.pop("RANK", None)
    env["WORLD_SIZE"] = str(world) if world is not None else ""  # "": unknown here, the ranks check it
    problem = check(overrides, env)
    if problem:
        print(problem, file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG)
    sys.exit(run(torchrun_command(argv), env))


def _die_with_parent() -> None:  # in torchrun's process: SIGTERM when this launcher dies (even by SIGKILL)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def children(pid: int) -> List[int]:
    """The processes whose parent is `pid` (torchrun's ranks), from /proc; [] where there is no /proc."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the command's parentheses
                found.append(int(entry))
    return found


def run(command: List[str], env: dict) -> int:
    """torchrun in a session of its own (a terminal's Ctrl-C reaches this process only), stopped through rank 0."""
    from .serving.lifecycle import PID_FILE_ENV

    fd, pid_file = tempfile.mkstemp(prefix="reward-server-", suffix=".pid")
    os.close(fd)
    env = {**env, PID_FILE_ENV: pid_file}
    env.pop("WORLD_SIZE", None)
    sys.stdout.flush()
    proc = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_die_with_parent)

    def forward(signum, _frame):
        try:
            with open(pid_file) as f:
                rank0 = int(f.read().strip() or 0)
        except (OSError, ValueError):
            rank0 = 0
        targets = [rank0] if rank0 else children(proc.pid)  # not ready yet: each rank stops at once, exit 0
        try:
            for pid in targets or [proc.pid]:
                os.kill(pid, signum)
        except ProcessLookupError:  # rank 0 gone already (a restart is starting it again): torchrun stops
            proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        return proc.wait()
    finally:
        os.unlink(pid_file)


if __name__ == "__main__":
    main()
