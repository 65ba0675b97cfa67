"""Rank 0's HTTP/gRPC face: PyTriton models whose infer functions decode requests and hand them to the engine.

Two models share one engine:
  server.model_name      (default "reward")        native contract, see inputs.py
  server.nemo_model_name (default "reward_model")  NeMo-Aligner's contract: an existing NeMo actor only
                                                   changes the URL
Both answer `rewards` FP32 [batch, num_labels] and `error` BYTES [batch, 1] ("" when the row was scored);
with reward.kind=prm, `rewards` [batch, 1] plus `step_rewards` and `num_steps` (prm.StepOutputs, docs/prm.md).
Errors are per row: a row that fails its checks gets NaN and its reason in `error`, the request's other rows
are scored. A request with no row left to score gets a status of its own (statuses.py: HTTP 400 / gRPC
INVALID_ARGUMENT with a one-line reason for input errors), the same whether Triton batched it with others or
not. A forward that fails alike on every rank (input that slipped past the checks) is retried apart, request by
request and then row by row, so that only the bad rows fail.
"""

import logging
import os
import secrets
import socket
import sysconfig
import threading
import time
from typing import Callable, List, Optional

import numpy as np
import torch

from .config import ServeConfig
from .engine import ForwardError, Leader, ShuttingDown
from .inputs import MAX_REASON_CHARS, InputError, RequestDecoder, Row, good
from . import proxy_status, statuses, triton_logs
from .statuses import Unavailable, code_of, failure

log = logging.getLogger(__name__)

# Triton API categories only the operator may use (PyTriton's default protected set); clients send the token
# in this header (gRPC: metadata `triton-grpc-protocol-triton-access-token`).
PROTECTED_APIS = ("shared-memory", "model-repository", "statistics", "trace", "logging")
ACCESS_HEADER = "triton-access-token"


def ensure_python_library_path() -> None:
    """PyTriton's Python backend stub links against the running interpreter's libpython; Triton inherits
    our environment, so put its directory on LD_LIBRARY_PATH before starting Triton."""
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in current.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def read_token(env_name: Optional[str], path: Optional[str]) -> str:
    """A token from the environment variable `env_name`, else from the file at `path`; "" when neither has one."""
    token = os.environ.get(env_name, "") if env_name else ""
    if not token and path and os.path.isfile(os.path.expanduser(path)):
        with open(os.path.expanduser(path)) as f:
            token = f.read().strip()
    return token


def resolve_access_token(cfg: ServeConfig) -> str:
    """Token for Triton's protected endpoints: environment variable, else file, else a new random one (written
    to the file when one is configured, so operators and perf_analyzer can read it)."""
    server = cfg.server
    token = read_token(server.access_token_env, server.access_token_file)
    if token:
        log.info("access token for the protected endpoints read from $%s or %s", server.access_token_env,
                 server.access_token_file)
        return token
    token = secrets.token_urlsafe(32)
    if server.access_token_file:
        fd = os.open(os.path.expanduser(server.access_token_file), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        log.info("generated an access token for the protected endpoints; written to %s", server.access_token_file)
    return token


def resolve_inference_token(cfg: ServeConfig) -> Optional[str]:
    """Token required for inference, or None when inference is open (neither setting given)."""
    server = cfg.server
    if not (server.inference_token_env or server.inference_token_file):
        return None
    token = read_token(server.inference_token_env, server.inference_token_file)
    if not token:
        raise ValueError(f"inference protection is configured but no token was found: set the environment variable "
                         f"{server.inference_token_env!r} or write the token to {server.inference_token_file!r}")
    log.info("inference requires a token (header %s)", ACCESS_HEADER)
    return token


LOOPBACK = "127.0.0.1"


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_ports(host: str, ports: List[int], timeout_s: float) -> None:
    """After a restart the previous server may hold our ports for a moment; wait for them rather than fail."""
    deadline = time.monotonic() + timeout_s
    for port in ports:
        while True:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((host, port))
                    break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{host}:{port} still in use after {timeout_s} s: {exc}") from None
            log.info("waiting for %s:%d to be released", host, port)
            time.sleep(1.0)


class ScalarOutputs:
    """`rewards` FP32 [batch, width]: one value per label."""

    specs = [("rewards", np.float32, (-1,))]

    def __init__(self, width: int):
        self.width = width

    def scored(self, values: np.ndarray, seqs) -> dict:
        return {"rewards": values}

    def failed(self, n: int) -> dict:
        return {"rewards": np.full((n, self.width), np.nan, dtype=np.float32)}


def merge_rows(n: int, at: List[int], scored: dict, failed: dict) -> dict:
    """Arrays of n rows: the scored rows at indices `at`, the failed rows' values elsewhere (columns padded with
    NaN, or 0 for integers, where the two differ in width)."""
    out = {}
    for key, values in scored.items():
        fill = failed[key]
        width = max(values.shape[1], fill.shape[1])
        pad = np.nan if np.issubdtype(values.dtype, np.floating) else 0
        merged = np.full((n, width), pad, dtype=values.dtype)
        merged[:, : fill.shape[1]] = fill
        merged[at] = pad
        merged[at, : values.shape[1]] = values
        out[key] = merged
    return out


MESSAGE_ROWS = 3  # rows named in the message of a request whose every row failed


def row_failure(excs: List[BaseException]) -> BaseException:
    """One error for a request none of whose rows could be scored: an input error when every row's is, else a
    server fault (or Unavailable); the message names the first rows."""
    shown = "; ".join(str(e) for e in excs[:MESSAGE_ROWS])
    if len(excs) > MESSAGE_ROWS:
        shown += f"; and {len(excs) - MESSAGE_ROWS} more rows"
    if all(isinstance(e, InputError) for e in excs):
        return InputError(shown)
    return next((type(e)(shown) for e in excs if isinstance(e, Unavailable)), ForwardError(shown))


class RewardService:
    """The infer functions. They never raise (PyTriton would fail the whole Triton batch with a traceback): each
    request gets its rewards, with NaN and a reason in `error` for each row that could not be scored, or, when
    no row of it could be, a status of its own (statuses.py: 400 for input errors, 503 to retry, 500)."""

    def __init__(self, leader: Leader, decoder: RequestDecoder, outputs, metrics=None):
        self.leader = leader
        self.decoder = decoder
        self.outputs = outputs  # ScalarOutputs or prm.StepOutputs
        self.metrics = metrics  # metrics.Metrics, or None
        self.refusing: Optional[Unavailable] = None  # set while draining or failed: new requests get 503 at once
        self._admit: dict = {}  # while draining: per model, requests still to take (queued in Triton before)
        self._dequeued_before = 0.0  # while draining: requests the stub took from Triton's queue before this time
        self.drained = {"in flight": 0, "queued": 0, "refused": 0}  # while draining: requests admitted, by rule
        self._admit_lock = threading.Lock()

    def infer_native(self, requests) -> List[dict]:
        return self._admitted(requests, self.decoder.native, "native")

    def infer_nemo(self, requests) -> List[dict]:
        return self._admitted(requests, self.decoder.nemo, "nemo")

    def infer_openrlhf(self, requests) -> List[dict]:
        """openrlhf.py's requests ({"text": column}); never in Triton's queue, so refused once draining."""
        return self._admitted(requests, self.decoder.native, "openrlhf")

    def drain(self, refusal: Unavailable, pending: dict, dequeued_before: float) -> None:
        """Refuse new requests with `refusal`, except those that Triton had already accepted when the drain began:
        - those its stub took from Triton's queue before `dequeued_before` (time.monotonic(), taken after `pending`
          was read), which may still be on their way to us (proxy_status.py stamps them), and
        - `pending[model]` more (Triton's nv_inference_pending_request_count: requests waiting in its queue,
          handed over first in, first out): the first that many taken from the queue later.
        Requests sent after the signal may take the place of requests counted in `pending` that were taken in
        between and admitted by their stamp; so the rule errs towards scoring a few requests that came after the
        signal, never towards refusing one that came before."""
        with self._admit_lock:
            self._admit = dict(pending)
            self._dequeued_before = dequeued_before
            self.refusing = refusal

    def admitting(self) -> bool:
        """Draining, with requests from Triton's queue still to come."""
        return any(n > 0 for n in self._admit.values())

    def _admitted(self, requests, decode: Callable, model: str) -> List[dict]:
        with self._admit_lock:
            refusal = self.refusing
            admit = [refusal is None or self._accepted_before(request, model) for request in requests]
            if refusal is not None:
                self.drained["refused"] += admit.count(False)
        taken = [request for request, ok in zip(requests, admit) if ok]
        answers = iter(self._infer(taken, decode) if taken else [])
        return [next(answers) if ok else self._failure(refusal) for ok in admit]

    def _accepted_before(self, request, model: str) -> bool:
        """While draining (under the lock): whether this request was accepted before the signal."""
        dequeued = (getattr(request, "parameters", None) or {}).get(proxy_status.DEQUEUED)
        if isinstance(dequeued, float) and dequeued < self._dequeued_before:
            self.drained["in flight"] += 1
            return True
        if self._admit.get(model, 0) > 0:
            self._admit[model] -= 1
            self.drained["queued"] += 1
            return True
        return False

    def _infer(self, requests, decode: Callable) -> List[dict]:
        try:
            decoded = [self._decode(decode, request) for request in requests]
            batches = [good(rows) for rows in decoded if not isinstance(rows, InputError)]
            scored = iter(self._score(batches))
            return [self._failure(rows) if isinstance(rows, InputError) else self._response(rows, next(scored))
                    for rows in decoded]
        except Exception as exc:  # shutting down, ranks failed, or our own bug: every request of the batch
            if code_of(exc) == statuses.INTERNAL:
                log.exception("a batch of %d request(s) failed", len(requests))
            return [self._failure(exc) for _ in requests]

    def _failure(self, exc: BaseException) -> dict:
        self._count(code_of(exc))
        return failure(exc)

    def _count(self, code: str, n: int = 1) -> None:
        if self.metrics is not None and n:
            self.metrics.error(statuses.KINDS[code], n)

    def _response(self, rows: List[Row], results: list) -> dict:
        """One request's response: `rows` as decoded, `results` (a reward row or an exception) for its good rows."""
        results = iter(results)
        outcome = [r if isinstance(r, InputError) else next(results) for r in rows]
        outcome = [type(r)(f"row {i}: {r}") if isinstance(r, BaseException) and not isinstance(r, InputError) else r
                   for i, r in enumerate(outcome)]
        excs = [r for r in outcome if isinstance(r, BaseException)]
        if len(excs) == len(rows):
            return self._failure(row_failure(excs))
        for exc in excs:
            self._count(code_of(exc))
        if not excs:  # the usual case: nothing to merge
            return {**self.outputs.scored(np.stack(outcome), rows),
                    "error": np.full((len(rows), 1), b"", dtype=object)}
        at = [i for i, r in enumerate(outcome) if not isinstance(r, BaseException)]
        scored = self.outputs.scored(np.stack([outcome[i] for i in at]), [rows[i] for i in at])
        response = merge_rows(len(rows), at, scored, self.outputs.failed(len(rows)))
        errors = [str(r).encode() if isinstance(r, BaseException) else b"" for r in outcome]
        response["error"] = np.array(errors, dtype=object).reshape(-1, 1)
        return response

    def _decode(self, decode: Callable, request):
        try:
            return decode(request)
        except InputError as exc:  # without its traceback: its frames hold the request's data (a 50 MB body)
            return exc.with_traceback(None)
        except Exception as exc:  # a check we did not foresee: still this request's error, not the batch's
            log.exception("decoding a request failed")
            return InputError(f"bad request: {type(exc).__name__}: {exc}")

    def _score(self, batches: List[List[np.ndarray]], alone: bool = False) -> List[list]:
        """Each batch's rewards, one row per sequence. The leader may put them in forwards with other batches'
        sequences; when such a forward fails alike on the ranks (input that slipped past the checks), score each
        batch again in forwards of its own, then each sequence of a failing batch alone, so that only the bad
        sequences fail (with ForwardError)."""
        seqs = [torch.from_numpy(ids) for b in batches for ids in b]
        if not seqs:
            return [[] for _ in batches]
        try:
            rewards = self.leader.submit(seqs, alone=alone).result()
        except ForwardError as exc:
            if alone and len(seqs) == 1:  # failed on its own
                return [[exc] if b else [] for b in batches]
            log.warning("a forward of %d request(s), %d sequence(s) failed (%s); scoring them apart", len(batches),
                        len(seqs), exc)
            if len(batches) > 1 or not alone:
                return [self._score([b], alone=True)[0] for b in batches]
            return [[self._score([[ids]], alone=True)[0][0] for ids in batches[0]]]
        results, at = [], 0
        for b in batches:
            results.append(list(rewards[at:at + len(b)]))
            at += len(b)
        return results


def restrictions(access_token: str, inference_token: Optional[str]) -> List[str]:
    """Triton's --http-restricted-api / --grpc-restricted-protocol values: one `<apis>:<header>=<token>` group
    for the operator's endpoints, and one for inference when it is protected."""
    groups = [f"{','.join(PROTECTED_APIS)}:{ACCESS_HEADER}={access_token}"]
    if inference_token:
        groups.append(f"inference:{ACCESS_HEADER}={inference_token}")
    return groups


# batching.instances=0: Triton model instances by the device rank 0 computes on. On GPU, 8 (with batches of 16)
# keep enough requests at rank 0 to fill the next forward (docs/results/tuning/); on the CPU, where forwards are slow
# and small, 2 are enough and each instance less is one Python stub process less to start.
AUTO_INSTANCES = {"cuda": 8, "cpu": 2}


def start_triton(cfg: ServeConfig, service: RewardService, instances: int, access_token: str,
                 inference_token: Optional[str] = None):
    """Start our metrics endpoint, then Triton with our models. PyTriton's Python backend stub sometimes fails its
    start-up handshake when the CPU is busy (it connects to its own socket before that listens): try again rather
    than fail the rank."""
    s = cfg.server
    wait_for_ports(s.host, [s.http_port, s.grpc_port, s.metrics_port], s.port_wait_s)
    triton_metrics_port = s.triton_metrics_port or free_port(LOOPBACK)
    if service.metrics is not None:  # before Triton: serving as soon as the models are ready
        service.metrics.serve(s.host, s.metrics_port, f"http://{LOOPBACK}:{triton_metrics_port}/metrics",
                              s.metrics_scrape_timeout_s)
    for attempt in range(1, s.start_attempts + 1):
        try:
            return _start_triton(cfg, service, instances, access_token, inference_token, triton_metrics_port)
        except Exception as exc:
            if attempt == s.start_attempts:
                raise
            log.warning("Triton did not start (attempt %d of %d: %s); trying again", attempt, s.start_attempts,
                        " ".join(str(exc).split())[:MAX_REASON_CHARS])
            log.debug("why Triton did not start", exc_info=True)


def _start_triton(cfg: ServeConfig, service: RewardService, instances: int, access_token: str,
                  inference_token: Optional[str], triton_metrics_port: int):
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    ensure_python_library_path()
    s, b = cfg.server, cfg.batching
    triton_logs.quiet(s.triton_log_info)
    wait_for_ports(s.host, [s.http_port, s.grpc_port], s.port_wait_s)
    restricted = restrictions(access_token, inference_token)
    triton = Triton(
        config=TritonConfig(
            http_address=s.host, http_port=s.http_port, grpc_address=s.host, grpc_port=s.grpc_port,
            metrics_address=LOOPBACK, metrics_port=triton_metrics_port, log_verbose=s.log_verbose,
            exit_timeout_secs=s.drain_timeout_s, http_restricted_api=restricted, grpc_restricted_protocol=restricted,
        ),
        # We pass the restrictions ourselves (PyTriton's own take one group only); its client calls use the token.
        security_config=TritonSecurityConfig(access_token=access_token, restricted_endpoints=[]),
    )
    triton_logs.set_log_info(triton, s.triton_log_info)
    # Triton refuses a model whose preferred batch size exceeds its max batch size: cap them
    preferred = sorted({min(p, b.max_batch_size) for p in b.preferred_batch_sizes})
    log.info("Triton: %d model instances per model, batches of up to %d sequences (preferred %s), %d us delay",
             instances, b.max_batch_size, preferred or "none", b.max_queue_delay_us)
    model_config = ModelConfig(
        max_batch_size=b.max_batch_size,
        batcher=DynamicBatcher(
            max_queue_delay_microseconds=b.max_queue_delay_us,
            preferred_batch_size=preferred or None,
        ),
    )
    outputs = [Tensor(name=n, dtype=t, shape=shape) for n, t, shape in service.outputs.specs]
    outputs.append(Tensor(name="error", dtype=bytes, shape=(1,)))
    statuses.install()
    triton.bind(
        model_name=s.model_name,
        infer_func=[service.infer_native] * instances,
        inputs=[Tensor(name=n, dtype=bytes, shape=(1,), optional=True) for n in ("text", "messages", "token_ids")],
        outputs=outputs,
        config=model_config,
        strict=False,  # the statuses' keys (statuses.py) are not model outputs
    )
    if s.nemo_model_name:
        triton.bind(
            model_name=s.nemo_model_name,
            infer_func=[service.infer_nemo] * instances,
            inputs=[
                Tensor(name="sentences", dtype=bytes, shape=(-1,), optional=True),
                Tensor(name="tokens", dtype=np.int64, shape=(-1,), optional=True),
                Tensor(name="sequence_lengths", dtype=np.int64, shape=(-1,), optional=True),
            ],
            outputs=outputs,
            config=model_config,
            strict=False,  # the statuses' keys (statuses.py) are not model outputs
        )
    try:
        triton.run()
    except BaseException:
        # a model that loaded first may already have taken requests; answer them before stopping this Triton
        service.leader.reject_queued(ShuttingDown("the reward server is restarting its endpoint; retry"))
        triton.stop()
        raise
    return triton


def ready_line(cfg: ServeConfig, seconds: float) -> str:
    s = cfg.server
    models = " and ".join(f"http://{s.host}:{s.http_port}/v2/models/{m}/infer" for m in (s.model_name, s.nemo_model_name)
                          if m)
    openrlhf = f"; OpenRLHF http://{s.host}:{s.openrlhf_port}/get_reward" if s.openrlhf_port else ""
    return (f"ready after {seconds:.0f} s: {models}; gRPC {s.host}:{s.grpc_port}; "
            f"metrics http://{s.host}:{s.metrics_port}/metrics{openrlhf}")
