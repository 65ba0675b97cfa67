"""Process group, topology and the wire protocol between rank 0 and the subscriber ranks.

Every batch crosses in three steps, all ranks in lock-step:
  1. header (gloo control group, CPU): [command, number of sequences, number of tokens]
  2. payload (gloo control group, CPU): sequence lengths, then all tokens concatenated. Every rank plans its
     forward's layout from these ids on the CPU (scoring/layout.py), so no rank waits for its GPU to read them.
  3. after the forward, each rank's rewards (zeros where it did not score) are summed onto rank 0 (default
     group: NCCL on GPU, gloo on CPU). On the GPU the sum runs on a stream of its own (`result_stream`), so a
     replica starts its next forward without waiting for the others to finish this one.
Rank 0 checks every request before step 1, so a malformed request never reaches the subscribers.
"""

import contextlib
import datetime
import logging
import os
import socket
import threading
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .config import ParallelConfig, resolve_backend

log = logging.getLogger(__name__)


class Command(IntEnum):
    HEARTBEAT = 0
    FORWARD = 1
    SHUTDOWN = 2


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    tp_size: int
    dp_size: int
    device: torch.device

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


_control_group = None
_watch_group = None  # watchdog.py: subscribers send their goodbye here; nothing else uses it
GOODBYE = 1
WATCH_TIMEOUT = datetime.timedelta(days=365)  # the watch receives wait as long as the ranks live


def init_distributed(cfg: ParallelConfig) -> Topology:
    """Join the torchrun group (or make a group of one when started without torchrun)."""
    global _control_group
    use_cuda = torch.cuda.is_available()
    backend = resolve_backend(cfg.backend, use_cuda)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    if "RANK" in os.environ:
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            kwargs.update(store=attempt_store(timeout), rank=int(os.environ["RANK"]),
                          world_size=int(os.environ["WORLD_SIZE"]))
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    world = dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if attempt and dist.get_rank() == 0:
        log.warning("restarted by torchrun: restart %d of at most %s", attempt,
                    os.environ.get("TORCHELASTIC_MAX_RESTARTS"))
    tp = cfg.tensor_parallel_size
    if tp < 1 or world % tp:
        raise ValueError(f"parallel.tensor_parallel_size={tp} must divide the world size {world}")
    # Subscribers wait for headers while the server is idle; rank 0 sends heartbeats, so a wait longer
    # than a few heartbeats means rank 0 is gone.
    control_timeout = datetime.timedelta(seconds=max(cfg.timeout_s, 3 * cfg.heartbeat_s))
    _control_group = dist.new_group(backend="gloo", timeout=control_timeout)
    global _watch_group
    _watch_group = dist.new_group(backend="gloo", timeout=WATCH_TIMEOUT)
    return Topology(rank=dist.get_rank(), world_size=world, tp_size=tp, dp_size=world // tp, device=device)


def attempt_store(timeout: datetime.timedelta):
    """torchrun's key-value store, in a namespace of this restart attempt. torchrun (2.13) keeps one store for
    all attempts of a run, so after a restart (--max-restarts) a rank could read the addresses the dead ranks
    published and fail to connect; its own env:// store no longer adds a per-attempt prefix."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"/reward_server/attempt_{attempt}", store)


def send_header(command: Command, n_seqs: int = 0, n_tokens: int = 0) -> None:
    header = torch.tensor([int(command), n_seqs, n_tokens], dtype=torch.int64)
    dist.broadcast(header, src=0, group=_control_group)


@contextlib.contextmanager
def heartbeats(period_s: float):
    """Rank 0: send heartbeats from a thread while the main thread is busy on its own (starting Triton), so that
    the subscribers, already waiting for their first header, do not time out."""
    stop = threading.Event()

    def beat():
        while not stop.wait(period_s):
            send_header(Command.HEARTBEAT)

    thread = threading.Thread(target=beat, name="startup-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def recv_header() -> Tuple[Command, int, int]:
    header = torch.empty(3, dtype=torch.int64)
    dist.broadcast(header, src=0, group=_control_group)
    command, n_seqs, n_tokens = header.tolist()
    return Command(command), n_seqs, n_tokens


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without making the host wait for the GPU: a copy from pageable memory would
    wait for every kernel already queued, so copy through pinned memory, asynchronously."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def broadcast_batch(seqs: Optional[List[torch.Tensor]], n_seqs: int, n_tokens: int) -> List[torch.Tensor]:
    """Rank 0 passes its sequences; the others pass None and receive them. Returns them as int64 CPU tensors.
    No rank waits for its GPU here, so rank 0 can send the next batch while the current forward runs."""
    if seqs is not None:
        sizes = [len(s) for s in seqs]
        lengths = torch.tensor(sizes, dtype=torch.int64)
        flat = torch.cat(seqs).to(torch.int64) if n_tokens else torch.empty(0, dtype=torch.int64)
    else:
        lengths = torch.empty(n_seqs, dtype=torch.int64)
        flat = torch.empty(n_tokens, dtype=torch.int64)
    if dist.get_world_size() > 1:
        dist.broadcast(lengths, src=0, group=_control_group)
        dist.broadcast(flat, src=0, group=_control_group)
    if seqs is None:
        sizes = lengths.tolist()
    return list(torch.split(flat, sizes))


def hostname() -> str:
    return socket.gethostname()


def peer_processes() -> Dict[int, Tuple[str, int]]:
    """Every rank's (host, pid), gathered on every rank (collective)."""
    mine = (hostname(), os.getpid())
    if dist.get_world_size() == 1:
        return {0: mine}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine, group=_control_group)
    return dict(enumerate(gathered))


def watch_peers(on_lost: Callable[[int, BaseException], None]) -> List[threading.Thread]:
    """Rank 0: a thread per subscriber waits for its goodbye on the watch group; `on_lost(rank, error)` when the
    wait fails instead (the peer's process is gone). Returns the threads (they end with the goodbyes)."""
    threads = []
    for rank in range(1, dist.get_world_size()):
        def wait(rank=rank):
            box = torch.zeros(1, dtype=torch.int64)
            try:
                dist.irecv(box, src=rank, group=_watch_group).wait()
            except Exception as exc:  # noqa: BLE001 - any failure of the wait means the peer is gone
                on_lost(rank, exc)
        threads.append(threading.Thread(target=wait, name=f"watch-rank-{rank}", daemon=True))
        threads[-1].start()
    return threads


def say_goodbye() -> None:
    """A subscriber leaving cleanly tells rank 0's watcher, so that its exit is not taken for a failure."""
    try:
        dist.send(torch.tensor([GOODBYE], dtype=torch.int64), dst=0, group=_watch_group)
    except Exception:  # noqa: BLE001 - rank 0 already gone: nobody to tell
        log.warning("rank 0 is gone; leaving without a goodbye")


_result_streams: Dict[torch.device, "torch.cuda.Stream"] = {}


def result_stream(device: torch.device):
    """The CUDA stream on which a forward's rewards are summed onto rank 0 and copied to its host: with several
    ranks a side stream, so that no GPU waits for the other replicas before its next forward (replicas meet only
    in this sum, on their side streams, while each computes on); with one rank the compute stream (as measured
    before the side stream). None off the GPU."""
    if device.type != "cuda":
        return None
    if dist.get_world_size() == 1:
        return torch.cuda.current_stream(device)
    if device not in _result_streams:
        _result_streams[device] = torch.cuda.Stream(device)
    return _result_streams[device]


def reduce_to_leader(values: torch.Tensor) -> torch.Tensor:
    """Sum each rank's partial result onto rank 0 (ranks write zeros where they did not score). On the GPU this
    runs on `result_stream`, after the forward that wrote `values`; read the sum on that stream."""
    if dist.get_world_size() == 1:
        return values
    side = result_stream(values.device)
    if side is None:
        dist.reduce(values, dst=0)
        return values
    side.wait_stream(torch.cuda.current_stream(values.device))
    values.record_stream(side)  # the compute stream may reuse its memory only once the side stream is done with it
    with torch.cuda.stream(side):
        dist.reduce(values, dst=0)
    return values


def barrier() -> None:
    dist.barrier(group=_control_group)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
