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
A sequence that fails the server's checks is never retried and is reported by its index in the caller's batch,
the other sequences' rewards kept (on_row_error: raised with them attached, or returned with NaN in its row);
what a failure means is read from the error code that the server's text carries (protocol.py), never its wording.
Whatever the client raises for a server's failure is a RewardServerError (errors.py), its cause chained.
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

from ..protocol import INVALID_ARG
from .errors import RewardCancelled, RewardServerError, RewardServerNotFound, read_failure, request_error
from .futures import ON_ROW_ERROR, RewardFuture, _Workers
from .http import NO_MODEL, NOT_TRITON, HttpTransport, body_start, has_token
from .pool import ServerPool
from .wire import MalformedAnswer, Part, encode_batch, error_text, read_response, request_body, triton_error


# ---------------------------------------------------------------------------------------------------- client


def host_port(url: str) -> Tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    try:
        port = parts.port
    except ValueError as exc:  # not a number, or out of range
        raise ValueError(f"url must be host:port or http://host:port, got {url!r} ({exc})") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"url must be host:port or http://host:port, got {url!r}")
    try:
        parts.hostname.encode("idna")
    except UnicodeError as exc:  # an empty or too long label: no host could have this name
        raise ValueError(f"url {url!r}: not a valid host name ({exc})") from None
    return parts.hostname, port or 8000


class RemoteGPTRMClient:
    """Client of the reward server's native model for RL actors (PPO, REINFORCE, GRPO, search).

    url               "host:port" or "http://host:port" of the server's HTTP endpoint, or a list of them: several
                      servers of the same model (one per node or replica group); each request goes to the one
                      with the fewest of this client's requests in flight, and a request whose server fails is
                      sent to another at once (pool.py)
    model_name        the server's native model (`server.model_name`)
    max_batch_size    most sequences per request; None reads the model's max_batch_size from the server once
    concurrency       requests in flight at once (worker threads, one keep-alive connection each)
    connect_timeout_s how long to wait for a TCP connection (one attempt)
    request_timeout_s how long a sent request may wait for its answer (queueing on the server included)
    wait_for_server_s how long a request keeps trying while no server of `url` has ever answered as a reward
                      server with the model (a wrong URL, or a server not started yet): then RewardServerUnavailable
                      (refused, unknown host, ...) or RewardServerNotFound (not Triton, no such model) names the URL
                      and the cause. Never longer than restart_budget_s
    restart_budget_s  how long a request keeps being retried, once a server has answered, while it is unreachable,
                      restarting, loading its models, draining or overloaded (refused or lost connections, HTTP
                      503, HTTP 404 while not ready), with exponential backoff from retry_backoff_s up to
                      max_backoff_s, with jitter; then RewardServerUnavailable says what it saw
    retries           None: as many attempts as the budget allows; a number: also at most this many retries
    model_load_grace_s a 404 for the model is retried while the server is not ready, and for this long after it
                      reports ready (it loads its models one by one); past that it means a wrong model_name
    reward_mean/std   when set, rewards come back as (reward - mean) / std (scalars or one value per label;
                      NaN stays NaN)
    on_row_error      what a call does with rows the server refuses or fails (an empty sequence, a token id outside
                      the vocabulary, ...; the others are scored all the same): "raise" (default) raises
                      RewardInputError / RewardServerError carrying every row's reward (NaN in the failed rows,
                      `exc.rewards`) and the reasons (`exc.errors`, {index: reason}); "nan" returns the rewards
                      with NaN in those rows, the reasons in `handle.errors()` / `Scores.errors`. infer_rm, score
                      and ainfer_rm take it per call too
    """

    def __init__(self, url: Union[str, Sequence[str]] = "localhost:8000", model_name: str = "reward", *,
                 max_batch_size: Optional[int] = None, concurrency: int = 4, connect_timeout_s: float = 5.0,
                 request_timeout_s: float = 600.0, restart_budget_s: float = 120.0, retries: Optional[int] = None,
                 retry_backoff_s: float = 0.5, max_backoff_s: float = 5.0, model_load_grace_s: float = 15.0,
                 reward_mean=None, reward_std=None, wait_for_server_s: float = 10.0, on_row_error: str = "raise"):
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("url: give at least one server")
        if on_row_error not in ON_ROW_ERROR:
            raise ValueError(f"on_row_error must be one of {ON_ROW_ERROR}, got {on_row_error!r}")
        if not wait_for_server_s >= 0:
            raise ValueError(f"wait_for_server_s must be >= 0, got {wait_for_server_s}")
        self.model_name = model_name
        self.on_row_error = on_row_error
        self.reward_mean = None if reward_mean is None else np.asarray(reward_mean, dtype=np.float32)
        self.reward_std = None if reward_std is None else np.asarray(reward_std, dtype=np.float32)
        if self.reward_std is not None and not (self.reward_std > 0).all():
            raise ValueError(f"reward_std must be positive, got {reward_std}")
        transports = [HttpTransport(*host_port(u), connect_timeout_s, request_timeout_s, model_load_grace_s)
                      for u in urls]
        self._http = ServerPool(transports, restart_budget_s, retry_backoff_s, max_backoff_s, retries,
                                wait_for_server_s)
        self.url = self._http.url
        self._max_batch_size = max_batch_size
        self._config: Optional[dict] = None  # the model's config, once read
        self._config_lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._pool = _Workers(concurrency, "reward-client")
        weakref.finalize(self, self._pool.shutdown)  # a client dropped without close() frees its threads

    # ------------------------------------------------------------------ public API

    def infer_rm(self, batch, lengths=None, *, on_row_error: Optional[str] = None) -> RewardFuture:
        """Start scoring `batch` (see `encode_batch` for the accepted forms) and return at once. The data is
        copied before returning, so the caller may reuse its buffers. Server failures surface from the handle's
        `result()`, never from here; `handle.cancel()` drops the requests not sent yet. `on_row_error`: this
        call's, instead of the client's ("raise" or "nan")."""
        if self._closed:
            raise RuntimeError("the client is closed")
        if os.getpid() != self._pid:
            raise RuntimeError("this client was made in another process (before a fork); make one in this process")
        mode = self.on_row_error if on_row_error is None else on_row_error
        if mode not in ON_ROW_ERROR:
            raise ValueError(f"on_row_error must be one of {ON_ROW_ERROR}, got {on_row_error!r}")
        name, rows, as_torch = encode_batch(batch, lengths)
        if not rows:
            raise ValueError("empty batch")
        handle = RewardFuture(len(rows), as_torch, self.reward_mean, self.reward_std, mode, self._model_shape)
        try:
            job = self._pool.submit(self._dispatch, name, rows, handle)
        except RuntimeError as exc:  # closed concurrently
            handle._fail(RewardCancelled(f"cannot send: {exc}"))
            return handle
        handle._job = job
        job.add_done_callback(lambda j: j.cancelled() and handle._fail(
            RewardCancelled("cancelled: the client was closed")))
        return handle

    def score(self, batch, lengths=None, timeout: Optional[float] = None, *, on_row_error: Optional[str] = None):
        """Blocking form: the rewards of `batch`."""
        return self.infer_rm(batch, lengths, on_row_error=on_row_error).result(timeout)

    async def ainfer_rm(self, batch, lengths=None, *, on_row_error: Optional[str] = None):
        """asyncio form: `rewards = await client.ainfer_rm(batch)`; for step rewards and row errors
        `scores = await asyncio.wrap_future(client.infer_rm(batch).future)`. Cancelling the await (e.g.
        asyncio.wait_for timing out) cancels the call: its requests not yet sent are dropped."""
        return (await asyncio.wrap_future(self.infer_rm(batch, lengths, on_row_error=on_row_error).future)).rewards

    @property
    def max_batch_size(self) -> int:
        """Most sequences per request: as set, else the model's max_batch_size read once from the server."""
        with self._config_lock:
            if self._max_batch_size is None:
                config = self._read_config()
                try:
                    self._max_batch_size = max(1, int(config.get("max_batch_size", 0)))
                except (TypeError, ValueError) as exc:
                    raise RewardServerError(f"{self.url}: the config of model {self.model_name!r} has a bad "
                                            f"max_batch_size {config.get('max_batch_size')!r}") from exc
            return self._max_batch_size

    def _read_config(self) -> dict:
        """The model's config (GET /v2/models/<model>/config), read once; under _config_lock."""
        if self._config is None:
            self._config = self._http.request("GET", f"/v2/models/{quote(self.model_name)}/config",
                                              what="model config", read=self._read_config_answer)
        return self._config

    def _read_config_answer(self, status: int, body: bytes, _header_length, url: str) -> dict:
        what = f"GET /v2/models/{self.model_name}/config"
        if status == 404:
            raise self._no_model(body, url, what)
        if status != 200:
            raise self._not_200(status, body, url, what, f"cannot read the config of model {self.model_name!r}")
        try:
            config = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise RewardServerNotFound(f"{url} is not a Triton server: {what} answered HTTP 200 with "
                                       f"{body_start(body)}, not JSON (the server's metrics port?)",
                                       reason=NOT_TRITON) from exc
        if not isinstance(config, dict):
            raise RewardServerNotFound(f"{url} is not a Triton server: {what} answered HTTP 200 with "
                                       f"{body_start(body)}, not a model config", reason=NOT_TRITON)
        return config

    def _model_shape(self, fetch: bool) -> Optional[Tuple[int, bool]]:
        """(num_labels, whether the model is a process reward model) from the model's config, for a call none of
        whose requests was scored; `fetch`: read the config if the client has not yet (else None), and (1, False)
        when it cannot be read or says nothing."""
        config = self._config
        if config is None and fetch:
            try:
                with self._config_lock:
                    config = self._read_config()
            except RewardServerError:
                config = {}
        if config is None:
            return None
        outputs = {o.get("name"): o for o in config.get("output", []) if isinstance(o, dict)}
        try:
            width = int(outputs["rewards"]["dims"][-1])
        except (KeyError, IndexError, TypeError, ValueError):
            width = 1
        return (width if width > 0 else 1), "step_rewards" in outputs

    def _no_model(self, body: bytes, url: str, what: str) -> RewardServerError:
        """A 404 for the model past the load grace (http.py retried it while it might be loading)."""
        text = triton_error(body)
        if text is None:
            return RewardServerNotFound(f"{url} is not a Triton server: {what} answered HTTP 404 with "
                                        f"{body_start(body)}", None, "", None, NOT_TRITON)
        failure = read_failure(404, text)
        return RewardServerNotFound(f"{url} answered HTTP 404 for model {self.model_name!r}: {failure.message} (a "
                                    f"wrong model_name, or not a reward server)", None, failure.message, None,
                                    NO_MODEL)

    def _not_triton(self, status: int, body: bytes, url: str) -> bool:
        """A failed answer that is neither Triton's ({"error": ...}) nor a reward server's (its token), from a server
        never seen answering as a reward server: something else listens at the URL."""
        return triton_error(body) is None and not has_token(status, body) and not self._http.seen(url)

    def _not_200(self, status: int, body: bytes, url: str, what: str, doing: str) -> RewardServerError:
        """A failed answer that is neither the rows' nor a retry: a server fault, or something not Triton."""
        failure = read_failure(status, error_text(body))
        if self._not_triton(status, body, url):
            return RewardServerNotFound(f"{url} is not a Triton server: {what} answered HTTP {status} with "
                                        f"{body_start(body)}", None, failure.message, None, NOT_TRITON)
        return RewardServerError(f"{url}: {doing} (HTTP {status}): {failure.message}", None, failure.message,
                                 failure.code)

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

    def _score_rows(self, name: str, rows: list, start: int, handle: RewardFuture) -> Part:
        """One request: its rows' rewards (NaN where a row failed), a process reward model's per-step scores, and
        the rows that failed."""
        n = len(rows)
        what = f"sequences {start}..{start + n - 1}"
        body, headers = request_body(name, rows)

        def read(status: int, data: bytes, header_length: Optional[int], url: str) -> Part:
            if status == 200:
                try:
                    return read_response(data, header_length, n, start, what, url)
                except MalformedAnswer as exc:
                    if self._http.seen(url):
                        raise
                    raise RewardServerNotFound(str(exc), None, "", None, NOT_TRITON) from exc
            if status == 404:
                raise self._no_model(data, url, f"POST /v2/models/{self.model_name}/infer")
            # decided by the answer's error code (UNAVAILABLE was retried by the pool)
            failure = read_failure(status, error_text(data))
            if self._not_triton(status, data, url):
                raise RewardServerNotFound(f"{url} is not a Triton server: POST /v2/models/{self.model_name}/infer"
                                           f" answered HTTP {status} with {body_start(data)}", None,
                                           failure.message, None, NOT_TRITON)
            if failure.code == INVALID_ARG or failure.rows:  # the request's rows failed: every one of them
                return Part(start, n, failure=failure)
            raise request_error(status, error_text(data), start, n, url, what)

        return self._http.request("POST", f"/v2/models/{quote(self.model_name)}/infer", body, headers, what=what,
                                  cancelled=handle.future.done, read=read)
