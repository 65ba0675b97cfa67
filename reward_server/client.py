"""RemoteGPTRMClient: what an RL actor uses to score its rollouts on a reward server.

    with RemoteGPTRMClient("localhost:8000") as client:
        handle = client.infer_rm(rollout_batch)  # returns at once; requests go out on worker threads
        ...                                      # the actor keeps working
        rewards = handle.result()                # [batch, num_labels] in input order, or one clear exception

Talks to the server's native model (`reward`, see inputs.py) over plain HTTP: one keep-alive connection per
worker thread (http.client) and Triton's binary tensor encoding (tritonclient's request/response codec).
A batch larger than the server's max batch size is split into requests sent concurrently and put back in order.
Connection failures and 503s are retried a bounded number of times; a sequence that fails the server's checks
is never retried and is reported by its index in the caller's batch. torch is imported only when the caller
passes torch tensors (and then rewards come back as torch tensors). Nothing here touches torch.distributed: in a
data-parallel actor every rank makes its own client and sends only its own shard (docs/client.md).
"""

import asyncio
import http.client
import json
import os
import queue
import re
import socket
import threading
import time
import weakref
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple
from urllib.parse import quote, urlsplit

import numpy as np
from tritonclient.http import InferenceServerClient as _Codec
from tritonclient.http import InferInput

__all__ = ["RemoteGPTRMClient", "RewardFuture", "Scores", "RewardServerError", "RewardInputError",
           "RewardServerUnavailable", "RewardTimeout"]


class RewardServerError(RuntimeError):
    """The server did not score a batch. `index`: the failing sequence's position in the caller's batch (None
    when the failure is not one sequence's); `server_message`: the server's own reason."""

    def __init__(self, message: str, index: Optional[int] = None, server_message: str = ""):
        super().__init__(message)
        self.index = index
        self.server_message = server_message


class RewardInputError(RewardServerError, ValueError):
    """A sequence failed the server's checks (empty, id outside the vocabulary, too long, ...). Never retried."""


class RewardServerUnavailable(RewardServerError, ConnectionError):
    """The server could not be reached (refused, reset, unknown host, 503) after the bounded retries."""


class RewardTimeout(RewardServerError, TimeoutError):
    """A request got no answer within `request_timeout_s`. Not retried: the server may still be working on it."""


class _Retry(Exception):
    """A failure worth another attempt: the connection failed, or the server said it is unavailable."""


@dataclass
class Scores:
    """Everything the server answered for one batch, in input order. `rewards`: [batch, num_labels] (normalized
    when the client has reward_mean / reward_std). `step_rewards`: a process reward model's per-step scores, one
    1-D array per sequence (its `num_steps` values, padding removed), or None when the model returns none."""

    rewards: object
    step_rewards: Optional[list] = None


# ---------------------------------------------------------------------------------------------------- inputs


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _numpy(x) -> np.ndarray:
    """A numpy copy of an array-like (torch tensors on any device included), so the caller may reuse its buffer
    as soon as infer_rm returns."""
    if _is_torch(x):
        return x.detach().cpu().numpy().copy()
    return np.array(x)


def _checked_ids(ids: np.ndarray, where: str) -> np.ndarray:
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise TypeError(f"{where}: token ids must be a 1-D sequence of integers, got {ids.dtype} {list(ids.shape)}")
    return ids


def _wire(row) -> bytes:
    """A `token_ids` row as the server reads it: decimal ids separated by spaces."""
    return row if isinstance(row, bytes) else " ".join(map(str, row.tolist())).encode()


def _is_conversation(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) for m in x)


_TOKEN_KEYS = ("response_tokens", "tokens")
_LENGTH_KEYS = ("response_lengths", "sequence_lengths")


def encode_batch(batch, lengths=None) -> Tuple[str, list, bool]:
    """(input name, one row per sequence, whether the caller used torch). A row is encoded text (bytes) or a
    copy of the sequence's token ids (the worker threads write them out). Accepts:
      - a list of str                               -> `text`, tokenized on the server
      - a list of chat conversations ([{role, content}, ...]) -> `messages`
      - a list of 1-D token id sequences (lists, numpy arrays, torch tensors)   -> `token_ids`
      - a token matrix [batch, L] (numpy / torch) with `lengths` [batch]        -> `token_ids`, padding dropped
      - a rollout-batch dict: `response_tokens` [batch, L] + `response_lengths` [batch] (NeMo-Aligner's names;
        `tokens` + `sequence_lengths` also work)
    """
    if isinstance(batch, dict):
        tokens = next((batch[k] for k in _TOKEN_KEYS if k in batch), None)
        if lengths is None:
            lengths = next((batch[k] for k in _LENGTH_KEYS if k in batch), None)
        if tokens is None or lengths is None:
            raise KeyError(f"a rollout batch needs one of {_TOKEN_KEYS} and one of {_LENGTH_KEYS}; got {list(batch)}")
        batch = tokens
    as_torch = _is_torch(batch)
    if as_torch or isinstance(batch, np.ndarray):
        matrix = _numpy(batch)
        if matrix.ndim != 2:
            raise TypeError(f"a token array must be [batch, length], got shape {list(matrix.shape)}")
        if lengths is None:
            raise ValueError("pass lengths with a token matrix (for rows without padding: [length] * batch)")
        lengths = _numpy(lengths).reshape(-1)
        if lengths.shape[0] != matrix.shape[0]:
            raise ValueError(f"lengths has {lengths.shape[0]} entries, the token matrix {matrix.shape[0]} rows")
        if lengths.size and (lengths.min() < 0 or lengths.max() > matrix.shape[1]):
            raise ValueError(f"lengths must lie in [0, {matrix.shape[1]}]")
        _checked_ids(matrix[0] if len(matrix) else matrix.reshape(-1), "the token matrix")
        return "token_ids", [matrix[i, : int(n)] for i, n in enumerate(lengths)], as_torch
    if lengths is not None:
        raise ValueError("lengths goes with a token matrix or a rollout batch, not with a list of sequences")
    if not isinstance(batch, (list, tuple)):
        raise TypeError(f"cannot score a {type(batch).__name__}; see RemoteGPTRMClient.infer_rm for the inputs")
    if all(isinstance(s, str) for s in batch):
        return "text", [s.encode("utf-8") for s in batch], False
    if all(_is_conversation(s) for s in batch):
        return "messages", [json.dumps(s).encode("utf-8") for s in batch], False
    as_torch = any(_is_torch(s) for s in batch)
    return "token_ids", [_checked_ids(_numpy(s), f"sequence {i}") for i, s in enumerate(batch)], as_torch


# ---------------------------------------------------------------------------------------------------- errors

_EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*): (.*\S)\s*$")
_ROW = re.compile(r"(?:^|; )row (\d+): ")


def server_reason(text: str) -> Tuple[str, str]:
    """(exception class, message) from a server error text: Triton wraps a failed execution's traceback into
    the HTTP error; keep only the last exception line (`reward_server.inputs.InputError: row 3: empty text`).
    Plain messages come back as ("", first line)."""
    found = ("", text.strip().splitlines()[0] if text.strip() else "")
    for line in text.splitlines():
        m = _EXCEPTION_LINE.match(line)
        if m:
            cls = m.group(1).rsplit(".", 1)[-1]
            if cls != "TritonModelException" and (cls.endswith(("Error", "Exception")) or cls == "ShuttingDown"):
                found = (cls, m.group(2))
    return found


def _input_error(message: str, start: int, n: int, flagged: Sequence[int] = ()) -> RewardInputError:
    """The failing sequence's index in the caller's batch: the server's message names a row of the request
    (rows start..start+n-1 of the batch)."""
    rows = _ROW.findall(message)
    if len(rows) == 1:
        index = start + int(rows[0])
        detail = _ROW.sub("", message, count=1)
        return RewardInputError(f"sequence {index} rejected by the reward server: {detail}", index, message)
    if len(rows) == 0 and 0 < len(flagged) < n:
        index = start + flagged[0]
        return RewardInputError(f"sequence {index} rejected by the reward server: {message}", index, message)
    # several messages: Triton merged this request with other clients' failing requests and failed them together
    return RewardInputError(f"one of sequences {start}..{start + n - 1} rejected by the reward server "
                            f"(its message may include other requests' errors): {message}", None, message)


# ---------------------------------------------------------------------------------------------------- futures


class RewardFuture:
    """A batch being scored. `result()` waits for the rewards; `future` is a concurrent.futures.Future of
    `Scores` (use `asyncio.wrap_future(handle.future)` in asyncio code)."""

    def __init__(self, n: int, as_torch: bool, mean, std):
        self.future: Future = Future()
        self._n, self._as_torch, self._mean, self._std = n, as_torch, mean, std
        self._lock = threading.Lock()
        self._parts: List[Tuple[int, Future]] = []
        self._remaining = 0

    def result(self, timeout: Optional[float] = None):
        """Rewards [batch, num_labels] (numpy float32, or torch if the batch was torch), in input order."""
        return self.future.result(timeout).rewards

    def scores(self, timeout: Optional[float] = None) -> Scores:
        return self.future.result(timeout)

    def step_rewards(self, timeout: Optional[float] = None) -> list:
        """A process reward model's per-step scores: one 1-D array per sequence."""
        steps = self.future.result(timeout).step_rewards
        if steps is None:
            raise RewardServerError("the server's model returned no step_rewards (it is not a process reward model)")
        return steps

    def done(self) -> bool:
        return self.future.done()

    def exception(self, timeout: Optional[float] = None):
        return self.future.exception(timeout)

    # called by the client's worker threads

    def _track(self, parts: List[Tuple[int, Future]]) -> None:
        with self._lock:
            self._parts, self._remaining = parts, len(parts)
        for _, part in parts:
            part.add_done_callback(self._on_part)

    def _on_part(self, part: Future) -> None:
        if part.cancelled():
            return self._fail(RewardServerError("cancelled: the client was closed"))
        if part.exception() is not None:
            return self._fail(part.exception())
        with self._lock:
            self._remaining -= 1
            if self._remaining:
                return
        try:
            self._finish()
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """The first failure fails the batch; requests of it not yet sent are dropped."""
        try:
            self.future.set_exception(exc)
        except InvalidStateError:
            return
        for _, part in self._parts:
            part.cancel()

    def _finish(self) -> None:
        parts = [part.result() for _, part in sorted(self._parts, key=lambda p: p[0])]
        rewards = np.concatenate([p[0] for p in parts])
        if self._mean is not None:
            rewards = rewards - self._mean
        if self._std is not None:
            rewards = rewards / self._std
        rewards = rewards.astype(np.float32, copy=False)
        steps = None
        if all(p[1] is not None for p in parts):
            steps = [row for p in parts for row in p[1]]
        if self._as_torch:
            import torch

            rewards = torch.from_numpy(rewards)
            steps = None if steps is None else [torch.from_numpy(s) for s in steps]
        try:
            self.future.set_result(Scores(rewards, steps))
        except InvalidStateError:
            pass


# ---------------------------------------------------------------------------------------------------- workers


class _Workers:
    """A fixed set of daemon threads running jobs from a queue: unlike ThreadPoolExecutor's, a client that is
    never closed cannot hold up the interpreter's exit while a request hangs."""

    def __init__(self, n: int, name: str):
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            self._jobs.put((fut, fn, args))
        return fut

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn, args = job
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:
                    fut.set_exception(exc)

    def shutdown(self) -> None:
        """Cancel the jobs not started; each thread exits after its current job."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[0].cancel()
            for _ in self._threads:
                self._jobs.put(None)

    def join(self) -> None:
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()


# ---------------------------------------------------------------------------------------------------- client


class RemoteGPTRMClient:
    """Client of the reward server's native model for RL actors (PPO, REINFORCE, GRPO, search).

    url               "host:port" or "http://host:port" of the server's HTTP endpoint
    model_name        the server's native model (`server.model_name`)
    max_batch_size    most sequences per request; None reads the model's max_batch_size from the server once
    concurrency       requests in flight at once (worker threads, one keep-alive connection each)
    connect_timeout_s how long to wait for a TCP connection
    request_timeout_s how long a sent request may wait for its answer (queueing on the server included)
    retries           extra attempts after a connection failure or 503, with exponential backoff from
    retry_backoff_s   this delay (0.5 s, 1 s, 2 s, ...); a wrong host/port is reported after
                      (retries + 1) x connect attempts, about 4 s with the defaults
    reward_mean/std   when set, rewards come back as (reward - mean) / std (scalars or one value per label)
    """

    def __init__(self, url: str = "localhost:8000", model_name: str = "reward", *,
                 max_batch_size: Optional[int] = None, concurrency: int = 4, connect_timeout_s: float = 5.0,
                 request_timeout_s: float = 600.0, retries: int = 3, retry_backoff_s: float = 0.5,
                 reward_mean=None, reward_std=None):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"url must be host:port or http://host:port, got {url!r}")
        self.host, self.port = parts.hostname, parts.port or 8000
        self.url = f"http://{self.host}:{self.port}"
        self.model_name = model_name
        self.connect_timeout_s, self.request_timeout_s = connect_timeout_s, request_timeout_s
        self.retries, self.retry_backoff_s = retries, retry_backoff_s
        self.reward_mean = None if reward_mean is None else np.asarray(reward_mean, dtype=np.float32)
        self.reward_std = None if reward_std is None else np.asarray(reward_std, dtype=np.float32)
        if self.reward_std is not None and not (self.reward_std > 0).all():
            raise ValueError(f"reward_std must be positive, got {reward_std}")
        self._max_batch_size = max_batch_size
        self._config_lock = threading.Lock()
        self._local = threading.local()
        self._connections: List[http.client.HTTPConnection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._pool = _Workers(concurrency, "reward-client")
        weakref.finalize(self, self._pool.shutdown)  # a client dropped without close() frees its threads

    # ------------------------------------------------------------------ public API

    def infer_rm(self, batch, lengths=None) -> RewardFuture:
        """Start scoring `batch` (see `encode_batch` for the accepted forms) and return at once. The data is
        copied before returning, so the caller may reuse its buffers. Server failures surface from the handle's
        `result()`, never from here."""
        if self._closed:
            raise RuntimeError("the client is closed")
        if os.getpid() != self._pid:
            raise RuntimeError("this client was made in another process (before a fork); make one in this process")
        name, rows, as_torch = encode_batch(batch, lengths)
        if not rows:
            raise ValueError("empty batch")
        handle = RewardFuture(len(rows), as_torch, self.reward_mean, self.reward_std)
        try:
            job = self._pool.submit(self._dispatch, name, rows, handle)
        except RuntimeError as exc:  # closed concurrently
            job = None
            handle._fail(RewardServerError(f"cannot send: {exc}"))
        if job is not None:  # close() drops jobs not yet started
            job.add_done_callback(lambda j: j.cancelled() and handle._fail(
                RewardServerError("cancelled: the client was closed")))
        return handle

    def score(self, batch, lengths=None, timeout: Optional[float] = None):
        """Blocking form: the rewards of `batch`."""
        return self.infer_rm(batch, lengths).result(timeout)

    async def ainfer_rm(self, batch, lengths=None):
        """asyncio form: `rewards = await client.ainfer_rm(batch)`; for step rewards
        `scores = await asyncio.wrap_future(client.infer_rm(batch).future)`."""
        return (await asyncio.wrap_future(self.infer_rm(batch, lengths).future)).rewards

    @property
    def max_batch_size(self) -> int:
        """Most sequences per request: as set, else the model's max_batch_size read once from the server."""
        with self._config_lock:
            if self._max_batch_size is None:
                status, body, _ = self._request("GET", f"/v2/models/{quote(self.model_name)}/config",
                                                what="model config")
                if status != 200:
                    raise RewardServerError(f"{self.url}: cannot read the config of model {self.model_name!r} "
                                            f"(HTTP {status}): {_error_text(body)}")
                self._max_batch_size = max(1, int(json.loads(body).get("max_batch_size", 0)))
            return self._max_batch_size

    def close(self) -> None:
        """Drop requests not yet sent, abort those in flight (their handles fail), close the connections."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown()
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:  # wake threads blocked on a socket
            if conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._pool.join()
        for conn in connections:
            conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ worker threads

    def _dispatch(self, name: str, rows: list, handle: RewardFuture) -> None:
        try:
            size = self.max_batch_size
            parts = [(start, self._pool.submit(self._score_rows, name, rows[start:start + size], start))
                     for start in range(0, len(rows), size)]
        except BaseException as exc:
            handle._fail(exc)
            return
        handle._track(parts)

    def _score_rows(self, name: str, rows: list, start: int):
        """One request: rewards [n, num_labels] and, from a process reward model, the per-step scores."""
        n = len(rows)
        tensor = InferInput(name, [n, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([_wire(r) for r in rows], dtype=object).reshape(n, 1))
        body, json_size = _Codec.generate_request_body([tensor])
        headers = {"Content-Type": "application/octet-stream"}
        if json_size is not None:
            headers["Inference-Header-Content-Length"] = str(json_size)
        what = f"sequences {start}..{start + n - 1}"
        status, data, header_length = self._request("POST", f"/v2/models/{quote(self.model_name)}/infer", body,
                                                    headers, what=what)
        if status != 200:
            text = _error_text(data)
            cls, message = server_reason(text)
            if status == 400 or cls == "InputError":  # 400: every row of the request failed the server's checks
                raise _input_error(message, start, n)
            raise RewardServerError(f"{self.url} failed {what} (HTTP {status}): {message}", None, message)
        result = _Codec.parse_response_body(data, header_length=header_length)
        errors = result.as_numpy("error")
        if errors is not None:
            flagged = [i for i, e in enumerate(errors.reshape(-1)) if e]
            if flagged:
                raise _input_error(errors.reshape(-1)[flagged[0]].decode("utf-8", "replace"), start, n, flagged)
        rewards = result.as_numpy("rewards")
        if rewards is None or rewards.shape[0] != n:
            raise RewardServerError(f"{self.url} answered {what} without {n} rows of rewards")
        step_rewards, num_steps = result.as_numpy("step_rewards"), result.as_numpy("num_steps")
        steps = None
        if step_rewards is not None and num_steps is not None:
            steps = [step_rewards[i, : int(k)].astype(np.float32) for i, k in enumerate(num_steps.reshape(-1))]
        return rewards.astype(np.float32, copy=False), steps

    # ------------------------------------------------------------------ HTTP with bounded retries

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout_s)
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    def _request(self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None, *,
                 what: str) -> Tuple[int, bytes, Optional[int]]:
        """(HTTP status, body, Inference-Header-Content-Length), retrying connection failures and 503s."""
        started, failures = time.monotonic(), []
        for attempt in range(self.retries + 1):
            if self._closed:
                raise RewardServerError(f"{what}: the client was closed")
            try:
                return self._once(method, path, body, headers or {}, what)
            except _Retry as exc:
                failures.append(str(exc))
            if attempt < self.retries:
                time.sleep(self.retry_backoff_s * 2 ** attempt)
        raise RewardServerUnavailable(
            f"reward server {self.url} unavailable for {what}: {failures[-1]} "
            f"({len(failures)} attempts in {time.monotonic() - started:.1f}s; is the server running at this "
            f"host and port?)", None, failures[-1])

    def _once(self, method, path, body, headers, what):
        conn = self._connection()
        if conn.sock is None:
            try:
                conn.connect()  # bounded by connect_timeout_s
            except OSError as exc:
                conn.close()
                raise _Retry(f"cannot connect ({exc})") from None
            conn.sock.settimeout(self.request_timeout_s)
            if self._closed:  # close() ran while this thread connected
                conn.close()
                raise RewardServerError(f"{what}: the client was closed")
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except TimeoutError:
            conn.close()
            if self._closed:
                raise RewardServerError(f"{what}: the client was closed") from None
            raise RewardTimeout(f"reward server {self.url} did not answer {what} within "
                                f"{self.request_timeout_s:g}s (request_timeout_s)") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise _Retry(f"connection lost ({exc!r})") from None
        if response.will_close:
            conn.close()
        if response.status == 503:
            raise _Retry(f"HTTP 503: {server_reason(_error_text(data))[1]}")
        if response.status != 200 and server_reason(_error_text(data))[0] == "ShuttingDown":
            raise _Retry(f"the server is shutting down (HTTP {response.status})")
        header_length = response.getheader("Inference-Header-Content-Length")
        return response.status, data, None if header_length is None else int(header_length)


def _error_text(body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    try:
        return str(json.loads(text).get("error", text))
    except (ValueError, AttributeError):
        return text
