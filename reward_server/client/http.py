"""RemoteGPTRMClient's transport to one server: one keep-alive HTTP connection per worker thread (http.client),
and what each answer means.

What the connection or the server's answer says decides (its error code: errors.read_failure), never its wording:
  the server's state - no connection (refused, unreachable, timed out connecting) or a lost one (the server
      restarting, a rank failed, a deploy), an UNAVAILABLE answer (HTTP 503: overloaded, shutting_down,
      ranks_failed), HTTP 404 for the model while Triton (re)loads it (not ready yet, or ready for less than
      `model_load_grace_s`): Retry, with its `reason`; pool.py sends the request again (to another server, or
      to this one after a backoff) for up to `restart_budget_s`.
  anything else (INVALID_ARG / 400: the caller's input; INTERNAL / 500: a server fault): returned; the caller
      raises RewardInputError or RewardServerError (errors.request_error).
A sent request with no answer within `request_timeout_s` raises RewardTimeout (not retried: the server may
still be working on it); an unknown host raises at once.
"""

import http.client
import socket
import threading
import time
from typing import List, Optional, Tuple

from ..protocol import UNAVAILABLE
from .errors import RewardCancelled, RewardServerUnavailable, RewardTimeout, read_failure
from .wire import error_text

# Retry reasons of the transport's own (the server's are protocol.REASONS)
CANNOT_CONNECT = "cannot_connect"  # no connection: refused, unreachable, timed out connecting
CONNECTION_LOST = "connection_lost"  # reset or closed before the answer
LOADING = "loading"  # HTTP 404 for the model while the server (re)loads its models
SERVER_UNAVAILABLE = "unavailable"  # an UNAVAILABLE answer that gives no reason
TRANSPORT_REASONS = (CANNOT_CONNECT, CONNECTION_LOST, LOADING)


class Retry(Exception):
    """A failure of the server's state, worth another attempt. `reason`: CANNOT_CONNECT (the default),
    CONNECTION_LOST, LOADING, or an UNAVAILABLE answer's reason (protocol.REASONS, or SERVER_UNAVAILABLE)."""

    def __init__(self, message: str, reason: str = CANNOT_CONNECT):
        super().__init__(message)
        self.reason = reason


class HttpTransport:
    def __init__(self, host: str, port: int, connect_timeout_s: float, request_timeout_s: float,
                 model_load_grace_s: float):
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self.connect_timeout_s, self.request_timeout_s = connect_timeout_s, request_timeout_s
        self.model_load_grace_s = model_load_grace_s
        self._ready_since: Optional[float] = None  # when a 404 first met a ready server (see _loading)
        self._local = threading.local()
        self._connections: List[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout_s)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def attempt(self, method: str, path: str, body: Optional[bytes], headers: dict,
                what: str) -> Tuple[int, bytes, Optional[int]]:
        """One try: (HTTP status, body, Inference-Header-Content-Length), or Retry when the server's state is
        to blame (pool.py decides where and when to try again)."""
        conn = self._connection()
        if conn.sock is None:
            try:
                conn.connect()  # bounded by connect_timeout_s
            except socket.gaierror as exc:
                conn.close()
                raise RewardServerUnavailable(f"reward server {self.url}: unknown host ({exc})") from None
            except OSError as exc:
                conn.close()
                raise Retry(f"cannot connect ({exc})", CANNOT_CONNECT) from None
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
            raise Retry(f"connection lost ({exc!r})", CONNECTION_LOST) from None
        if response.will_close:
            conn.close()
        if response.status != 200:
            failure = read_failure(response.status, error_text(data))
            if failure.code == UNAVAILABLE:
                raise Retry(f"HTTP {response.status}: {failure.message}", failure.reason or SERVER_UNAVAILABLE)
            if response.status == 404 and self._loading():  # a model being (re)loaded, not a wrong name
                raise Retry(f"HTTP 404 while the server loads its models: {failure.message}", LOADING)
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
