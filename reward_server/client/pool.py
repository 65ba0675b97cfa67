"""RemoteGPTRMClient's scheduling over one or several servers, and the retry policy.

Each request goes to the server with the fewest of this client's requests in flight among those not backing off
(ties: the next in turn). A request whose server fails in a way that says something about the server (refused or
lost connection, an UNAVAILABLE answer (HTTP 503), HTTP 404 while it loads its models, an answer that is not
Triton's: http.py's Retry) is sent again at once to another server; the failed server backs off
(retry_backoff_s x 2^k for its k-th failure in a row, capped at max_backoff_s, x 1-1.5 jitter) and gets requests
again after that. With one server this is the same policy as ever: wait out the backoff, then try it again.
Scoring is idempotent, so a request lost with a failed server is simply sent again.

How long a request keeps trying depends on what the client knows of the servers. A server is *seen* once it has
answered as a reward server with the model: a 200 that the caller could read (`read`), or an error text that
carries a reward server's token. While no server of the pool has been seen, a request gives up after
`wait_for_server_s` (a wrong URL is reported in seconds, not minutes); once one has, after `restart_budget_s`
(a restart is ridden through); `retries` bounds the attempts too. It gives up with RewardServerUnavailable, or
RewardServerNotFound when every server it tried answered but not as Triton with the model; its hint follows
the attempts' Retry reasons (the transport's own, or the server's 503 reason), never the wording of a message.
In a pool, a server never seen keeps getting its turn after its backoff (it may start later than the others);
after wait_for_server_s of failures it is logged once, as a warning.
"""

import logging
import random
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..protocol import OVERLOADED, RANKS_FAILED, SHUTTING_DOWN, UNAVAILABLE
from .errors import RewardCancelled, RewardServerNotFound, RewardServerUnavailable
from .http import (CANNOT_CONNECT, LOADING, NO_MODEL, NOT_TRITON, TRANSPORT_REASONS, UNKNOWN_HOST, HttpTransport,
                   Retry, has_token)

log = logging.getLogger("reward_server.client")

NOT_FOUND_REASONS = (NOT_TRITON, NO_MODEL)  # an answer, but not Triton's with the model


class _Server:
    def __init__(self, transport: HttpTransport):
        self.transport = transport
        self.url = transport.url
        self.in_flight = 0
        self.failures = 0  # in a row
        self.down_until = 0.0
        self.seen = False  # answered once as a reward server with the model
        self.failing_since: Optional[float] = None  # its first failure, while never seen
        self.warned = False


class ServerPool:
    def __init__(self, transports: List[HttpTransport], restart_budget_s: float, retry_backoff_s: float,
                 max_backoff_s: float, retries: Optional[int], wait_for_server_s: float = 10.0):
        self.servers = [_Server(t) for t in transports]
        self.restart_budget_s, self.retry_backoff_s, self.max_backoff_s = restart_budget_s, retry_backoff_s, max_backoff_s
        self.wait_for_server_s = wait_for_server_s
        self.retries = retries
        self._lock = threading.Lock()
        self._turn = 0
        self._closed = threading.Event()

    @property
    def url(self) -> str:
        return ",".join(s.url for s in self.servers)

    def seen(self, url: str) -> bool:
        """Whether the server at `url` has answered as a reward server with the model."""
        return any(s.seen for s in self.servers if s.url == url)

    def budget(self) -> float:
        """How long a request keeps trying: restart_budget_s once a server of the pool has been seen, else
        wait_for_server_s (never longer than restart_budget_s)."""
        if any(s.seen for s in self.servers):
            return self.restart_budget_s
        return min(self.wait_for_server_s, self.restart_budget_s)

    def request(self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None, *,
                what: str, cancelled: Callable[[], bool] = lambda: False,
                read: Optional[Callable[[int, bytes, Optional[int], str], Any]] = None):
        """(HTTP status, body, Inference-Header-Content-Length, the server's url) from the first server that
        answers for itself (200, 400, 404 for a wrong model name, 500); with `read`, what read(those four)
        returns (a 200 it returns from marks the server seen; what it raises goes to the caller)."""
        started, failures, reasons = time.monotonic(), [], []
        last: Dict[str, Tuple[str, str]] = {}  # url -> (its last failure, its reason)
        cause: Optional[BaseException] = None
        while True:
            if self._closed.is_set():
                raise RewardCancelled(f"{what}: the client was closed")
            if cancelled():
                raise RewardCancelled(f"{what}: cancelled before it was sent")
            server, wait = self._pick()
            if server is None:  # every server backs off: wait for the first to be due, within the budget
                self._closed.wait(min(wait, max(self.budget() - (time.monotonic() - started), 0.0)))
            else:
                try:
                    status, data, header_length = server.transport.attempt(method, path, body, headers or {}, what)
                except Retry as exc:
                    if exc.reward_server:
                        self._saw(server)
                    failures.append(f"{server.url}: {exc}" if len(self.servers) > 1 else str(exc))
                    reasons.append(exc.reason)
                    last[server.url] = (str(exc), exc.reason)
                    cause = exc.__cause__ or exc
                    self._failed(server, exc)
                else:
                    self._succeeded(server)
                    if has_token(status, data):
                        self._saw(server)
                    if read is None:
                        if status == 200:
                            self._saw(server)
                        return status, data, header_length, server.url
                    result = read(status, data, header_length, server.url)
                    if status == 200:
                        self._saw(server)
                    return result
                finally:
                    with self._lock:
                        server.in_flight -= 1
            elapsed = time.monotonic() - started
            budget = self.budget()
            if failures and ((self.retries is not None and len(failures) > self.retries) or elapsed >= budget):
                raise self._give_up(what, failures, reasons, last, elapsed, budget) from cause

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

    def _failed(self, server: _Server, exc: Retry) -> None:
        with self._lock:
            now = time.monotonic()
            server.failures += 1
            delay = min(self.retry_backoff_s * 2 ** (server.failures - 1), self.max_backoff_s)
            server.down_until = now + delay * (1 + 0.5 * random.random())
            if server.seen:
                return
            if server.failing_since is None:
                server.failing_since = now
            warn = (len(self.servers) > 1 and not server.warned
                    and now - server.failing_since >= self.wait_for_server_s)
            server.warned = server.warned or warn
        if warn:
            log.warning("reward server %s has not answered as a reward server for %.0f s (wait_for_server_s=%g): "
                        "%s; requests go to the other servers, and to it when it answers", server.url,
                        now - server.failing_since, self.wait_for_server_s, exc)

    def _saw(self, server: _Server) -> None:
        with self._lock:
            server.seen, server.failing_since = True, None

    def _succeeded(self, server: _Server) -> None:
        with self._lock:
            server.failures, server.down_until = 0, 0.0

    def _give_up(self, what: str, failures: List[str], reasons: List[str], last: Dict[str, Tuple[str, str]],
                 elapsed: float, budget: float):
        """RewardServerNotFound when no server was ever seen and every one tried answered, but not as Triton with
        the model; else RewardServerUnavailable. The message names each server's last failure."""
        one, seen = len(self.servers) == 1, any(s.seen for s in self.servers)
        shown = failures[-1] if one else "; ".join(f"{url}: {message}" for url, (message, _) in last.items())
        attempts = f"{len(failures)} attempts in {elapsed:.1f}s"
        waited = ""
        if not seen and elapsed >= budget and budget < self.restart_budget_s:
            waited = (f"; never seen answering as a reward server, so waited wait_for_server_s="
                      f"{self.wait_for_server_s:g} (raise it for a server that starts later)")
        where = f"reward server {self.url}" if one else f"reward servers {self.url}"
        if not seen and all(reason in NOT_FOUND_REASONS for _, reason in last.values()):
            if reasons[-1] == NO_MODEL:
                hint = ("Triton answers there but has no such model: a wrong model_name, or not a reward server" +
                        ("" if one else " (each of them)"))
            else:
                hint = ("not a Triton server: check the host and port (the server's http_port, not its metrics "
                        "or gRPC port)")
            return RewardServerNotFound(f"{where} not found for {what}: {shown} ({attempts}; {hint}{waited})", None,
                                        failures[-1], None, reasons[-1])
        answered = reasons[-1] not in TRANSPORT_REASONS  # the server's own UNAVAILABLE
        message = self._unavailable(what, shown, reasons, attempts, seen, waited)
        return RewardServerUnavailable(message, None, failures[-1], UNAVAILABLE if answered else None, reasons[-1])

    def _unavailable(self, what: str, last: str, reasons: List[str], attempts: str, seen: bool = True,
                     waited: str = "") -> str:
        one = len(self.servers) == 1
        if all(r == CANNOT_CONNECT for r in reasons):
            hint = ("nothing answered at this host and port: is the server running there?" if one else
                    "nothing answered at any of them: are they running?")
        elif reasons[-1] == UNKNOWN_HOST:
            hint = "the host name does not resolve: check the URL" if one else "a host name does not resolve"
        elif reasons[-1] == LOADING and not seen:
            hint = "a Triton server there was still loading its models"
        elif reasons[-1] in NOT_FOUND_REASONS and not seen:
            hint = "no answer as a reward server with this model"
        elif reasons[-1] == SHUTTING_DOWN:
            hint = "the server was shutting down" if one else "the servers were shutting down"
        elif reasons[-1] == OVERLOADED:
            hint = "the server stayed overloaded" if one else "the servers stayed overloaded"
        elif reasons[-1] == RANKS_FAILED:
            hint = (f"{'its' if one else 'their'} ranks failed and {'it' if one else 'none'} did not come back "
                    f"within restart_budget_s={self.restart_budget_s:g}")
        elif not seen:
            hint = "the server did not answer as a reward server" if one else "none answered as a reward server"
        else:
            hint = (f"{'the server did' if one else 'none did'} not come back within "
                    f"restart_budget_s={self.restart_budget_s:g}")
        where = f"reward server {self.url}" if one else f"reward servers {self.url}"
        return f"{where} unavailable for {what}: {last} ({attempts}; {hint}{waited})"

    def close(self) -> None:
        """Wake threads blocked on a socket or in a backoff."""
        self._closed.set()
        for s in self.servers:
            s.transport.close()

    def close_connections(self) -> None:
        for s in self.servers:
            s.transport.close_connections()
