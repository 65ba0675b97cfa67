"""RemoteGPTRMClient: what an RL actor uses to score its rollouts on a reward server.

    with RemoteGPTRMClient("localhost:8000") as client:
        handle = client.infer_rm(rollout_batch)  # returns at once; requests go out on worker threads
        ...                                      # the actor keeps working
        rewards = handle.result()                # [batch, num_labels] in input order, or one clear exception

This module schedules: a batch larger than the server's max batch size is split into requests sent concurrently
by worker threads and put back in order (RewardFuture); a cancelled call drops its requests not yet sent. The
wire format is wire.py (Triton's binary tensors over plain HTTP), the transport to one server http.py, the
choice of server and the retry policy pool.py (rides through server restarts for up to `restart_budget_s`; with
several servers, moves a failed request to another), the exceptions errors.py.
A sequence that fails the server's checks is never retried and is reported by its index in the caller's batch;
what a failure means is read from the error code that the server's text carries (protocol.py), never its wording.
torch is imported only when the caller passes torch tensors (and then rewards come back as torch tensors).
Nothing here touches torch.distributed: in a data-parallel actor every rank makes its own client and sends only
its own shard (docs/client.md).
"""

import asyncio
import json
import os
import threading
import weakref
from typing import Optional, Sequence, Tuple, Union
from urllib.parse import quote, urlsplit

import numpy as np

from .errors import RewardCancelled, RewardServerError, read_failure, request_error
from .futures import RewardFuture, _Workers
from .http import HttpTransport
from .pool import ServerPool
from .wire import encode_batch, error_text, parse_response, request_body



# ---------------------------------------------------------------------------------------------------- client


def host_port(url: str) -> Tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"url must be host:port or http://host:port, got {url!r}")
    return parts.hostname, parts.port or 8000


class RemoteGPTRMClient:
    """Client of the reward server's native model for RL actors (PPO, REINFORCE, GRPO, search).

    url               "host:port" or "http://host:port" of the server's HTTP endpoint, or a list of them: several
                      servers of the same model (one per node or replica group); each request goes to the one
                      with the fewest of this client's requests in flight, and a request whose server fails is
                      sent to another at once (pool.py)
    model_name        the server's native model (`server.model_name`)
    max_batch_size    most sequences per request; None reads the model's max_batch_size from the server once
    concurrency       requests in flight at once (worker threads, one keep-alive connection each)
    connect_timeout_s how long to wait for a TCP connection
    request_timeout_s how long a sent request may wait for its answer (queueing on the server included)
    restart_budget_s  how long a request keeps being retried while the server is unreachable, restarting,
                      loading its models, draining or overloaded (refused or lost connections, HTTP 503, HTTP
                      404 while not ready), with exponential backoff from retry_backoff_s up to max_backoff_s,
                      with jitter; then RewardServerUnavailable says what it saw
    retries           None: as many attempts as the budget allows; a number: also at most this many retries
    model_load_grace_s a 404 for the model is retried while the server is not ready, and for this long after it
                      reports ready (it loads its models one by one); past that it means a wrong model_name
    reward_mean/std   when set, rewards come back as (reward - mean) / std (scalars or one value per label)
    """

    def __init__(self, url: Union[str, Sequence[str]] = "localhost:8000", model_name: str = "reward", *,
                 max_batch_size: Optional[int] = None, concurrency: int = 4, connect_timeout_s: float = 5.0,
                 request_timeout_s: float = 600.0, restart_budget_s: float = 120.0, retries: Optional[int] = None,
                 retry_backoff_s: float = 0.5, max_backoff_s: float = 5.0, model_load_grace_s: float = 15.0,
                 reward_mean=None, reward_std=None):
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("url: give at least one server")
        self.model_name = model_name
        self.reward_mean = None if reward_mean is None else np.asarray(reward_mean, dtype=np.float32)
        self.reward_std = None if reward_std is None else np.asarray(reward_std, dtype=np.float32)
        if self.reward_std is not None and not (self.reward_std > 0).all():
            raise ValueError(f"reward_std must be positive, got {reward_std}")
        transports = [HttpTransport(*host_port(u), connect_timeout_s, request_timeout_s, model_load_grace_s)
                      for u in urls]
        self._http = ServerPool(transports, restart_budget_s, retry_backoff_s, max_backoff_s, retries)
        self.url = self._http.url
        self._max_batch_size = max_batch_size
        self._config_lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._pool = _Workers(concurrency, "reward-client")
        weakref.finalize(self, self._pool.shutdown)  # a client dropped without close() frees its threads

    # ------------------------------------------------------------------ public API

    def infer_rm(self, batch, lengths=None) -> RewardFuture:
        """Start scoring `batch` (see `encode_batch` for the accepted forms) and return at once. The data is
        copied before returning, so the caller may reuse its buffers. Server failures surface from the handle's
        `result()`, never from here; `handle.cancel()` drops the requests not sent yet."""
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
            handle._fail(RewardCancelled(f"cannot send: {exc}"))
            return handle
        handle._job = job
        job.add_done_callback(lambda j: j.cancelled() and handle._fail(
            RewardCancelled("cancelled: the client was closed")))
        return handle

    def score(self, batch, lengths=None, timeout: Optional[float] = None):
        """Blocking form: the rewards of `batch`."""
        return self.infer_rm(batch, lengths).result(timeout)

    async def ainfer_rm(self, batch, lengths=None):
        """asyncio form: `rewards = await client.ainfer_rm(batch)`; for step rewards
        `scores = await asyncio.wrap_future(client.infer_rm(batch).future)`. Cancelling the await (e.g.
        asyncio.wait_for timing out) cancels the call: its requests not yet sent are dropped."""
        return (await asyncio.wrap_future(self.infer_rm(batch, lengths).future)).rewards

    @property
    def max_batch_size(self) -> int:
        """Most sequences per request: as set, else the model's max_batch_size read once from the server."""
        with self._config_lock:
            if self._max_batch_size is None:
                status, body, _, url = self._http.request("GET", f"/v2/models/{quote(self.model_name)}/config",
                                                          what="model config")
                if status != 200:
                    failure = read_failure(status, error_text(body))
                    raise RewardServerError(f"{url}: cannot read the config of model {self.model_name!r} "
                                            f"(HTTP {status}): {failure.message}", None, failure.message, failure.code)
                self._max_batch_size = max(1, int(json.loads(body).get("max_batch_size", 0)))
            return self._max_batch_size

    def close(self) -> None:
        """Drop requests not yet sent, abort those in flight (their handles fail), close the connections."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown()
        self._http.close()  # wakes threads blocked on a socket or in a backoff
        self._pool.join()
        self._http.close_connections()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ worker threads

    def _dispatch(self, name: str, rows: list, handle: RewardFuture) -> None:
        if handle.future.done():  # cancelled before its turn
            return
        try:
            size = self.max_batch_size
            parts = [(start, self._pool.submit(self._score_rows, name, rows[start:start + size], start, handle))
                     for start in range(0, len(rows), size)]
        except BaseException as exc:
            handle._fail(exc)
            return
        handle._track(parts)

    def _score_rows(self, name: str, rows: list, start: int, handle: RewardFuture):
        """One request: rewards [n, num_labels] and, from a process reward model, the per-step scores."""
        n = len(rows)
        what = f"sequences {start}..{start + n - 1}"
        body, headers = request_body(name, rows)
        status, data, header_length, url = self._http.request("POST", f"/v2/models/{quote(self.model_name)}/infer",
                                                              body, headers, what=what, cancelled=handle.future.done)
        if status != 200:  # decided by the answer's error code (UNAVAILABLE was retried by the pool)
            raise request_error(status, error_text(data), start, n, url, what)
        return parse_response(data, header_length, n, start, what, url)
