"""RemoteGPTRMClient's transport to one server: one keep-alive HTTP connection per worker thread (http.client),
and what each answer means.

What the connection or the server's answer says decides (its error code: errors.read_failure), never its wording:
  the server's state - no connection (refused, unreachable, timed out connecting, a host name that does not
      resolve) or a lost one (the server restarting, a rank failed, a deploy), an UNAVAILABLE answer (HTTP 503:
      overloaded, shutting_down, ranks_failed), HTTP 404 for the model while Triton (re)loads it (not ready yet,
      or ready for less than `model_load_grace_s`), HTTP 404 from something that is not Triton or an answer that
      is not HTTP/1.1 (NOT_TRITON: a proxy in front of a server not up yet may answer so): Retry, with its
      `reason`; pool.py sends the request again (to another server, or to this one after a backoff) for up to
      `wait_for_server_s` while the server was never seen answering as a reward server, `restart_budget_s` once
      it was.
  anything else (INVALID_ARG / 400: the caller's input; INTERNAL / 500: a server fault; 404 for the model past
      the grace: a wrong model name): returned; the caller reads it (client.py).
A sent request with no answer within `request_timeout_s` raises RewardTimeout (not retried: the server may
still be working on it). Whatever else goes wrong reading an answer raises RewardServerError (the cause chained).
"""

import http.client
import socket
import threading
import time
from typing import List, Optional, Tuple

from ..protocol import RANKS_FAILED, SHUTTING_DOWN, TOKEN, UNAVAILABLE
from .errors import RewardCancelled, RewardServerError, RewardTimeout, read_failure
from .wire import error_text, triton_error

# Retry reasons of the transport's own (the server's are protocol.REASONS)
CANNOT_CONNECT = "cannot_connect"  # no connection: refused, unreachable, timed out connecting
UNKNOWN_HOST = "unknown_host"  # the host name does not resolve
CONNECTION_LOST = "connection_lost"  # reset or closed before the answer
LOADING = "loading"  # HTTP 404 for the model from a Triton server not ready yet (it (re)loads its models)
NO_MODEL = "no_model"  # HTTP 404 for the model from a ready Triton server, within model_load_grace_s
NOT_TRITON = "not_triton"  # HTTP 404 from something that is not Triton, or an answer that is not HTTP/1.1
SERVER_UNAVAILABLE = "unavailable"  # an UNAVAILABLE answer that gives no reason
TRANSPORT_REASONS = (CANNOT_CONNECT, UNKNOWN_HOST, CONNECTION_LOST, LOADING, NO_MODEL, NOT_TRITON)


class Retry(Exception):
    """A failure of the server's state, worth another attempt. `reason`: CANNOT_CONNECT (the default),
    UNKNOWN_HOST, CONNECTION_LOST, LOADING, NO_MODEL, NOT_TRITON, or an UNAVAILABLE answer's reason
    (protocol.REASONS, or SERVER_UNAVAILABLE). `reward_server`: the answer carried a reward server's error token
    (so the server is one, and has the model)."""

    def __init__(self, message: str, reason: str = CANNOT_CONNECT, reward_server: bool = False):
        super().__init__(message)
        self.reason = reason
        self.reward_server = reward_server


def has_token(status: int, body: bytes) -> bool:
    """Whether a failed answer carries a reward server's error token."""
    return status != 200 and TOKEN.search(error_text(body)) is not None


def body_start(body: bytes, chars: int = 80) -> str:
    """The start of an answer's body, on one line, quoted (to show what answered)."""
    return repr(" ".join(body[:chars].decode("utf-8", "replace").split()))


class HttpTransport:
    def __init__(self, host: str, port: int, connect_timeout_s: float, request_timeout_s: float,
                 model_load_grace_s: float):
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self.connect_timeout_s, self.request_timeout_s = connect_timeout_s, request_timeout_s
        self.model_load_grace_s = model_load_grace_s
        self._ready_since: Optional[float] = None  # when a 404 first met a ready server (see _not_found)
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
                raise Retry(f"unknown host {self.host!r} ({exc})", UNKNOWN_HOST) from exc
            except OSError as exc:
                conn.close()
                raise Retry(f"cannot connect ({exc})", CANNOT_CONNECT) from exc
            conn.sock.settimeout(self.request_timeout_s)
            if self._closed.is_set():  # close() ran while this thread connected
                conn.close()
                raise RewardCancelled(f"{what}: the client was closed")
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except TimeoutError as exc:
            conn.close()
            if self._closed.is_set():
                raise RewardCancelled(f"{what}: the client was closed") from exc
            raise RewardTimeout(f"reward server {self.url} did not answer {what} within "
                                f"{self.request_timeout_s:g}s (request_timeout_s)") from exc
        except (http.client.BadStatusLine, http.client.LineTooLong) as exc:
            conn.close()
            if self._closed.is_set():
                raise RewardCancelled(f"{what}: the client was closed") from exc
            if isinstance(exc, ConnectionError):  # RemoteDisconnected: closed before answering
                raise Retry(f"connection lost ({exc!r})", CONNECTION_LOST) from exc
            raise Retry(f"not an HTTP/1.1 answer ({type(exc).__name__}: {str(exc)[:40]!r}): not a Triton server's "
                        f"HTTP port (its gRPC port?)", NOT_TRITON) from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if self._closed.is_set():
                raise RewardCancelled(f"{what}: the client was closed") from exc
            raise Retry(f"connection lost ({exc!r})", CONNECTION_LOST) from exc
        except Exception as exc:  # http.client choking on an answer
            conn.close()
            raise RewardServerError(f"reward server {self.url}: unreadable answer to {what} ({exc!r})") from exc
        if response.will_close:
            conn.close()
        status = response.status
        if status != 200:
            failure = read_failure(status, error_text(data))
            token = has_token(status, data)
            if failure.code == UNAVAILABLE:
                if failure.reason in (SHUTTING_DOWN, RANKS_FAILED):  # this server is going away: end the
                    conn.close()  # connection now, so its stop waits for no one and never resets us mid-request
                raise Retry(f"HTTP {status}: {failure.message}", failure.reason or SERVER_UNAVAILABLE, token)
            if status == 404 and not token:
                self._not_found(method, path, data)
        if status != 404:
            self._ready_since = None  # the next 404 starts a new grace
        header_length = response.getheader("Inference-Header-Content-Length")
        try:
            return status, data, None if header_length is None else int(header_length)
        except ValueError as exc:
            raise RewardServerError(f"reward server {self.url} answered {what} with a bad "
                                    f"Inference-Header-Content-Length {header_length!r}") from exc

    def _not_found(self, method: str, path: str, data: bytes) -> None:
        """A 404 for `path`: Retry while it may be a server starting up (or restarting), else return (the
        caller reads it as the wrong model name). Not Triton's answer, or Triton's health endpoint unknown too:
        NOT_TRITON. Triton not ready yet: LOADING. Triton ready for less than `model_load_grace_s`: NO_MODEL
        (PyTriton loads the models one after the other, and Triton can report ready between two). A 404 that
        outlasts the grace on a ready server is a wrong model name."""
        if triton_error(data) is None:
            raise Retry(f"HTTP 404 for {method} {path}, not from a Triton server (it answers {body_start(data)})",
                        NOT_TRITON)
        health = self._health()
        now = time.monotonic()
        if health == 404:
            raise Retry(f"HTTP 404 for {method} {path} and for GET /v2/health/ready: not a Triton server",
                        NOT_TRITON)
        if health != 200:
            self._ready_since = None
            raise Retry(f"HTTP 404 for {method} {path} while the server loads its models: "
                        f"{error_text(data)}", LOADING)
        if self._ready_since is None:
            self._ready_since = now
        if now - self._ready_since < self.model_load_grace_s:
            raise Retry(f"HTTP 404 for {method} {path} from a ready Triton server: {error_text(data)}", NO_MODEL)

    def _health(self) -> Optional[int]:
        """The HTTP status of Triton's GET /v2/health/ready (200 ready, 400 not ready yet); None when none came."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout_s)
        try:
            conn.request("GET", "/v2/health/ready")
            response = conn.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

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
