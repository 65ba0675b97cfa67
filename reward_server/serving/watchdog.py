"""Rank 0 notices a lost rank in seconds, answers every caller and exits, whatever the collective backend does.

With NCCL a dead or hung rank leaves rank 0's main thread inside a collective that never returns (and NCCL's
own watchdog waits a minute before it ends the process; docs/operations.md), so callers hung until torchrun's
grace ran out. Two watchers in threads of rank 0 act instead:
  - peers (distributed.watch_peers): a receive from each subscriber on a gloo group of their own; the subscriber
    sends its goodbye when it leaves cleanly, so a receive that fails means its process is gone (its sockets
    closed) - noticed within a fraction of a second.
  - progress: a forward launched more than parallel.timeout_s ago and not finished means a rank hangs.
Either way (and when the main thread sees the group fail itself, as gloo reports a lost peer at once) rank 0
fails every queued and in-flight request (HTTP 503, retryable: torchrun restarts the group), refuses new ones,
SIGKILLs the ranks on its host that are still there (a stopped process ignores torchrun's SIGTERM), and exits
non-zero at once; its reaper takes Triton down with it (lifecycle.py).
"""

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Dict

from .. import distributed as d
from ..engine import RanksFailed

log = logging.getLogger(__name__)

# After failing the requests: time for Triton to send the answers before rank 0 exits (and its reaper kills Triton).
ANSWER_GRACE_S = 0.5
POLL_S = 0.5  # how often the progress watcher looks at the forward in flight


class Watchdog:
    def __init__(self, leader, service, timeout_s: float, peers: Dict[int, tuple]):
        self.leader = leader
        self.service = service
        self.timeout_s = timeout_s
        self.peers = peers  # rank -> (host, pid), from distributed.peer_processes()
        self._fired = threading.Lock()

    def start(self) -> None:
        self.peer_watchers = d.watch_peers(self._peer_gone)
        threading.Thread(target=self._watch_progress, name="progress-watchdog", daemon=True).start()

    def _peer_gone(self, rank: int, exc: BaseException) -> None:
        if not (self.leader.failed is not None or self.leader.finished):
            log.error("the watch receive from rank %d failed: %s", rank, exc)
        self.lost(f"rank {rank} is gone")

    def _watch_progress(self) -> None:
        while True:
            time.sleep(POLL_S)
            since = self.leader.oldest_forward_launch()
            if since is not None and time.monotonic() - since > self.timeout_s:
                self.lost(f"a forward has not finished in {self.timeout_s:g} s (parallel.timeout_s): a rank hangs")

    def lost(self, reason: str) -> None:
        """Fail every request with `reason`, exit non-zero. Ignored once the main thread saw a failure itself
        (gloo reports a lost peer at once; it then calls `exit_after_failure`) or after a clean shutdown."""
        if self.leader.failed is not None or self.leader.finished:
            return
        self._fail_and_exit(reason)

    def exit_after_failure(self, exc: BaseException) -> None:
        """The main thread's way out after the group failed: its callers were answered; exit at once (the reaper
        takes Triton down) rather than stop Triton gracefully, so torchrun can restart the group sooner."""
        self._fail_and_exit(f"the ranks' group failed ({type(exc).__name__})")

    def _fail_and_exit(self, reason: str) -> None:
        if not self._fired.acquire(blocking=False):
            return
        log.error("%s: failing every request and exiting, so that torchrun restarts the group", reason)
        failure = RanksFailed(f"reward ranks failed: {reason}; the server restarts")
        self.service.admission.refusing = failure
        self.leader.abort(failure)
        time.sleep(ANSWER_GRACE_S)
        # the other ranks on this host: a hung or stopped one ignores torchrun's SIGTERM, and none is of use now
        host = d.hostname()
        for rank, (peer_host, pid) in self.peers.items():
            if rank != 0 and peer_host == host:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    log.error("sent SIGKILL to rank %d (pid %d)", rank, pid)
        logging.shutdown()
        os._exit(1)
