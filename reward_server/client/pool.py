"""RemoteGPTRMClient's scheduling over one or several servers, and the retry policy.

Each request goes to the server with the fewest of this client's requests in flight among those not backing off
(ties: the next in turn). A request whose server fails in a way that says something about the server (refused or
lost connection, an UNAVAILABLE answer (HTTP 503), HTTP 404 while it loads its models: http.py) is sent again
at once to another server; the failed server backs off (retry_backoff_s x 2^k for its k-th failure in a row,
capped at max_backoff_s, x 1-1.5 jitter) and gets requests again after that. With one server this is the same policy as
ever: wait out the backoff, then try it again. Scoring is idempotent, so a request lost with a failed server is
simply sent again. A request gives up after `restart_budget_s` (or `retries`) with RewardServerUnavailable
saying what it saw; its hint follows the attempts' Retry reasons (the transport's own, or the server's 503
reason), never the wording of a message.
"""

import random
import threading
import time
from typing import Callable, List, Optional, Tuple

from ..protocol import OVERLOADED, RANKS_FAILED, SHUTTING_DOWN, UNAVAILABLE
from .errors import RewardCancelled, RewardServerUnavailable
from .http import CANNOT_CONNECT, TRANSPORT_REASONS, HttpTransport, Retry


class _Server:
    def __init__(self, transport: HttpTransport):
        self.transport = transport
        self.url = transport.url
        self.in_flight = 0
        self.failures = 0  # in a row
        self.down_until = 0.0


class ServerPool:
    def __init__(self, transports: List[HttpTransport], restart_budget_s: float, retry_backoff_s: float,
                 max_backoff_s: float, retries: Optional[int]):
        self.servers = [_Server(t) for t in transports]
        self.restart_budget_s, self.retry_backoff_s, self.max_backoff_s = restart_budget_s, retry_backoff_s, max_backoff_s
        self.retries = retries
        self._lock = threading.Lock()
        self._turn = 0
        self._closed = threading.Event()

    @property
    def url(self) -> str:
        return ",".join(s.url for s in self.servers)

    def request(self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None, *,
                what: str, cancelled: Callable[[], bool] = lambda: False) -> Tuple[int, bytes, Optional[int], str]:
        """(HTTP status, body, Inference-Header-Content-Length, the server's url) from the first server that
        answers for itself (200, 400, 404 for a wrong model name, 500)."""
        started, failures, reasons = time.monotonic(), [], []
        while True:
            if self._closed.is_set():
                raise RewardCancelled(f"{what}: the client was closed")
            if cancelled():
                raise RewardCancelled(f"{what}: cancelled before it was sent")
            server, wait = self._pick()
            if server is None:  # every server backs off: wait for the first to be due, within the budget
                self._closed.wait(min(wait, max(self.restart_budget_s - (time.monotonic() - started), 0.0)))
            else:
                try:
                    status, data, header_length = server.transport.attempt(method, path, body, headers or {}, what)
                except Retry as exc:
                    failures.append(f"{server.url}: {exc}" if len(self.servers) > 1 else str(exc))
                    reasons.append(exc.reason)
                    self._failed(server)
                else:
                    self._succeeded(server)
                    return status, data, header_length, server.url
                finally:
                    with self._lock:
                        server.in_flight -= 1
            elapsed = time.monotonic() - started
            if failures and ((self.retries is not None and len(failures) > self.retries)
                             or elapsed >= self.restart_budget_s):
                answered = reasons[-1] not in TRANSPORT_REASONS  # the server's own UNAVAILABLE
                raise RewardServerUnavailable(self._unavailable(what, failures, reasons, elapsed), None, failures[-1],
                                              UNAVAILABLE if answered else None, reasons[-1])

    def _pick(self) -> Tuple[Optional[_Server], float]:
        """The least busy server not backing off (counted in flight), or None and how long until one is due."""
        with self._lock:
            now = time.monotonic()
            due = [s for s in self.servers if s.down_until <= now]
            if not due:
                return None, min(s.down_until for s in self.servers) - now
            order = self.servers[self._turn:] + self.servers[:self._turn]
            server = min((s for s in order if s in due), key=lambda s: s.in_flight)
            self._turn = (self.servers.index(server) + 1) % len(self.servers)
            server.in_flight += 1
            return server, 0.0

    def _failed(self, server: _Server) -> None:
        with self._lock:
            server.failures += 1
            delay = min(self.retry_backoff_s * 2 ** (server.failures - 1), self.max_backoff_s)
            server.down_until = time.monotonic() + delay * (1 + 0.5 * random.random())

    def _succeeded(self, server: _Server) -> None:
        with self._lock:
            server.failures, server.down_until = 0, 0.0

    def _unavailable(self, what: str, failures: List[str], reasons: List[str], elapsed: float) -> str:
        last, one = failures[-1], len(self.servers) == 1
        if all(r == CANNOT_CONNECT for r in reasons):
            hint = ("nothing answered at this host and port: is the server running there?" if one else
                    "nothing answered at any of them: are they running?")
        elif reasons[-1] == SHUTTING_DOWN:
            hint = "the server was shutting down" if one else "the servers were shutting down"
        elif reasons[-1] == OVERLOADED:
            hint = "the server stayed overloaded" if one else "the servers stayed overloaded"
        elif reasons[-1] == RANKS_FAILED:
            hint = (f"{'its' if one else 'their'} ranks failed and {'it' if one else 'none'} did not come back "
                    f"within restart_budget_s={self.restart_budget_s:g}")
        else:
            hint = (f"{'the server did' if one else 'none did'} not come back within "
                    f"restart_budget_s={self.restart_budget_s:g}")
        where = f"reward server {self.url}" if one else f"reward servers {self.url}"
        return f"{where} unavailable for {what}: {last} ({len(failures)} attempts in {elapsed:.1f}s; {hint})"

    def close(self) -> None:
        """Wake threads blocked on a socket or in a backoff."""
        self._closed.set()
        for s in self.servers:
            s.transport.close()

    def close_connections(self) -> None:
        for s in self.servers:
            s.transport.close_connections()
