"""RemoteGPTRMClient's transport: one keep-alive HTTP connection per worker thread (http.client), and the retry
policy that lets an RL actor ride through a server restart.

What the server's answer or the connection says decides, not its text:
  the server's state - connection refused / reset / lost (the server restarting, a rank failed, a deploy),
      HTTP 503 (overloaded, draining, ranks restarting), HTTP 404 for the model while Triton (re)loads it (not
      ready yet, or ready for less than `model_load_grace_s`):
      retried with exponential backoff and jitter for up to `restart_budget_s`, then RewardServerUnavailable
      saying what was seen. Scoring is idempotent, so a request lost with a failed group is simply sent again.
  the caller's input - HTTP 400: returned to the caller, which raises RewardInputError at once.
  anything else (500: a server fault) - returned; the caller raises RewardServerError.
A sent request with no answer within `request_timeout_s` raises RewardTimeout (not retried: the server may
still be working on it); an unknown host raises at once.
"""

import http.client
import random
import socket
import threading
import time
from typing import Callable, List, Optional, Tuple

from .client_errors import RewardCancelled, RewardServerUnavailable, RewardTimeout, server_reason
from .client_wire import error_text



class _Retry(Exception):
    """A failure of the server's state, worth another attempt."""


class HttpTransport:
    def __init__(self, host: str, port: int, connect_timeout_s: float, request_timeout_s: float,
                 restart_budget_s: float, retry_backoff_s: float, max_backoff_s: float, retries: Optional[int],
                 model_load_grace_s: float):
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self.connect_timeout_s, self.request_timeout_s = connect_timeout_s, request_timeout_s
        self.restart_budget_s, self.retry_backoff_s, self.max_backoff_s = restart_budget_s, retry_backoff_s, max_backoff_s
        self.retries = retries
        self.model_load_grace_s = model_load_grace_s
        self._ready_since: Optional[float] = None  # when a 404 first met a ready server (see _loading)
        self._local = threading.local()
        self._connections: List[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def request(self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None, *,
                what: str, cancelled: Callable[[], bool] = lambda: False) -> Tuple[int, bytes, Optional[int]]:
        """(HTTP status, body, Inference-Header-Content-Length), riding through the server's restarts."""
        started, failures = time.monotonic(), []
        while True:
            if self._closed.is_set():
                raise RewardCancelled(f"{what}: the client was closed")
            if cancelled():
                raise RewardCancelled(f"{what}: cancelled before it was sent")
            try:
                return self._once(method, path, body, headers or {}, what)
            except _Retry as exc:
                failures.append(str(exc))
            elapsed = time.monotonic() - started
            if (self.retries is not None and len(failures) > self.retries) or elapsed >= self.restart_budget_s:
                raise RewardServerUnavailable(self._unavailable(what, failures, elapsed), None, failures[-1])
            delay = min(self.retry_backoff_s * 2 ** (len(failures) - 1), self.max_backoff_s)
            delay = min(delay * (1 + 0.5 * random.random()), self.restart_budget_s - elapsed)  # jitter, never past
            self._closed.wait(max(delay, 0.0))                                               # the budget

    def _unavailable(self, what: str, failures: List[str], elapsed: float) -> str:
        last = failures[-1]
        if all("refused" in f or "cannot connect" in f for f in failures):
            hint = "nothing answered at this host and port: is the server running there?"
        elif "shutting down" in last:
            hint = "the server was shutting down"
        elif "overloaded" in last:
            hint = "the server stayed overloaded"
        else:
            hint = f"the server did not come back within restart_budget_s={self.restart_budget_s:g}"
        return (f"reward server {self.url} unavailable for {what}: {last} ({len(failures)} attempts in "
                f"{elapsed:.1f}s; {hint})")

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout_s)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _once(self, method, path, body, headers, what):
        conn = self._connection()
        if conn.sock is None:
            try:
                conn.connect()  # bounded by connect_timeout_s
            except socket.gaierror as exc:
                conn.close()
                raise RewardServerUnavailable(f"reward server {self.url}: unknown host ({exc})") from None
            except OSError as exc:
                conn.close()
                raise _Retry(f"cannot connect ({exc})") from None
            conn.sock.settimeout(self.request_timeout_s)
            if self._closed.is_set():  # close() ran while this thread connected
                conn.close()
                raise RewardCancelled(f"{what}: the client was closed")
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except TimeoutError:
            conn.close()
            if self._closed.is_set():
                raise RewardCancelled(f"{what}: the client was closed") from None
            raise RewardTimeout(f"reward server {self.url} did not answer {what} within "
                                f"{self.request_timeout_s:g}s (request_timeout_s)") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if self._closed.is_set():
                raise RewardCancelled(f"{what}: the client was closed") from None
            raise _Retry(f"connection lost ({exc!r})") from None
        if response.will_close:
            conn.close()
        if response.status == 503:
            raise _Retry(f"HTTP 503: {server_reason(error_text(data))[1]}")
        if response.status == 404 and self._loading():  # a model being (re)loaded, not a wrong name
            raise _Retry(f"HTTP 404 while the server loads its models: {server_reason(error_text(data))[1]}")
        if response.status != 404:
            self._ready_since = None  # the next 404 starts a new grace
        header_length = response.getheader("Inference-Header-Content-Length")
        return response.status, data, None if header_length is None else int(header_length)

    def _loading(self) -> bool:
        """Whether a 404 for the model may be the server still loading it: Triton is not ready yet, or it has been
        ready for less than `model_load_grace_s` (PyTriton loads the models one after the other, and Triton can
        report ready between two). A 404 that outlasts the grace on a ready server is a wrong model name."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout_s)
        try:
            conn.request("GET", "/v2/health/ready")
            ready = conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            ready = False
        finally:
            conn.close()
        now = time.monotonic()
        if not ready:
            self._ready_since = None
            return True
        if self._ready_since is None:
            self._ready_since = now
        return now - self._ready_since < self.model_load_grace_s

    def close(self) -> None:
        """Wake threads blocked on a socket or in a backoff, then close every connection."""
        self._closed.set()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            if conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close_connections(self) -> None:
        """After the worker threads are gone (RemoteGPTRMClient.close)."""
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.close()
