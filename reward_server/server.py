"""Rank 0's HTTP/gRPC face: PyTriton models whose infer functions decode requests and hand them to the engine.

Two models share one engine:
  server.model_name      (default "reward")        native contract, see inputs.py
  server.nemo_model_name (default "reward_model")  NeMo-Aligner's contract: an existing NeMo actor only
                                                   changes the URL
Both answer `rewards` FP32 [batch, num_labels] and `error` BYTES [batch, 1] ("" when the row was scored);
with reward.kind=prm, `rewards` [batch, 1] plus `step_rewards` and `num_steps` (prm.StepOutputs, docs/prm.md).
A request that fails its checks gets NaN rewards and its message in `error`, and the other requests of the
same dynamic batch are scored as usual; when every request of a batch is bad the whole call fails with the
message (HTTP 500; PyTriton can only fail a whole batch). A forward that fails alike on every rank (a request
that slipped past the checks) is retried one request at a time, so only the bad request fails.
"""

import logging
import os
import secrets
import socket
import sysconfig
import time
from typing import Callable, List, Optional

import numpy as np
import torch

from .config import ServeConfig
from .engine import ForwardError, Leader, ShuttingDown
from .inputs import InputError, RequestDecoder

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


class RewardService:
    def __init__(self, leader: Leader, decoder: RequestDecoder, outputs):
        self.leader = leader
        self.decoder = decoder
        self.outputs = outputs  # ScalarOutputs or prm.StepOutputs

    def infer_native(self, requests) -> List[dict]:
        return self._infer(requests, self.decoder.native)

    def infer_nemo(self, requests) -> List[dict]:
        return self._infer(requests, self.decoder.nemo)

    def _infer(self, requests, decode: Callable) -> List[dict]:
        decoded = [self._decode(decode, request) for request in requests]
        good = [d for d in decoded if not isinstance(d, InputError)]
        scored = iter(self._score(good) if good else [])
        results = [d if isinstance(d, InputError) else next(scored) for d in decoded]
        if all(isinstance(r, Exception) for r in results):  # nothing to answer: fail the call with the reasons
            raise InputError("; ".join(str(r) for r in results))
        responses = []
        for request, seqs, r in zip(requests, decoded, results):
            if isinstance(r, Exception):
                n = _batch_size(request)
                responses.append({**self.outputs.failed(n), "error": np.full((n, 1), str(r).encode(), dtype=object)})
            else:
                responses.append({**self.outputs.scored(r, seqs), "error": np.full((len(r), 1), b"", dtype=object)})
        return responses

    def _decode(self, decode: Callable, request):
        try:
            return decode(request)
        except InputError as exc:
            return exc
        except Exception as exc:  # a check we did not foresee: still this request's error, not the batch's
            log.exception("decoding a request failed")
            return InputError(f"bad request: {type(exc).__name__}: {exc}")

    def _score(self, good: List[List[np.ndarray]], alone: bool = False) -> list:
        """Rewards for each request's sequences, one array per request. The leader may put them in forwards with
        other requests' sequences; when such a forward fails alike on the ranks (a request that slipped past the
        checks), score each request again in forwards of its own, so that only the bad one fails."""
        seqs = [torch.from_numpy(ids) for d in good for ids in d]
        try:
            rewards = self.leader.submit(seqs, alone=alone).result()
        except ForwardError as exc:
            if alone and len(good) == 1:
                return [exc]
            log.warning("a forward with %d request(s) failed (%s); scoring them one at a time", len(good), exc)
            return [self._score([d], alone=True)[0] for d in good]
        results, at = [], 0
        for d in good:
            results.append(rewards[at:at + len(d)])
            at += len(d)
        return results


def _batch_size(request) -> int:
    return max((np.asarray(v).shape[0] for v in request.values() if np.ndim(v) > 0), default=1)


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
    """Start Triton with our models. PyTriton's Python backend stub sometimes fails its start-up handshake when
    the CPU is busy (it connects to its own socket before that listens): try again rather than fail the rank."""
    for attempt in range(1, cfg.server.start_attempts + 1):
        try:
            return _start_triton(cfg, service, instances, access_token, inference_token)
        except Exception:
            if attempt == cfg.server.start_attempts:
                raise
            log.warning("Triton did not start (attempt %d of %d); trying again", attempt, cfg.server.start_attempts,
                        exc_info=True)


def _start_triton(cfg: ServeConfig, service: RewardService, instances: int, access_token: str,
                  inference_token: Optional[str]):
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    ensure_python_library_path()
    s, b = cfg.server, cfg.batching
    wait_for_ports(s.host, [s.http_port, s.grpc_port, s.metrics_port], s.port_wait_s)
    restricted = restrictions(access_token, inference_token)
    triton = Triton(
        config=TritonConfig(
            http_address=s.host, http_port=s.http_port, grpc_address=s.host, grpc_port=s.grpc_port,
            metrics_address=s.host, metrics_port=s.metrics_port, log_verbose=s.log_verbose,
            exit_timeout_secs=s.drain_timeout_s, http_restricted_api=restricted, grpc_restricted_protocol=restricted,
        ),
        # We pass the restrictions ourselves (PyTriton's own take one group only); its client calls use the token.
        security_config=TritonSecurityConfig(access_token=access_token, restricted_endpoints=[]),
    )
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
    triton.bind(
        model_name=s.model_name,
        infer_func=[service.infer_native] * instances,
        inputs=[Tensor(name=n, dtype=bytes, shape=(1,), optional=True) for n in ("text", "messages", "token_ids")],
        outputs=outputs,
        config=model_config,
        strict=True,
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
            strict=True,
        )
    try:
        triton.run()
    except BaseException:
        # a model that loaded first may already have taken requests; answer them before stopping this Triton
        service.leader.reject_queued(ShuttingDown("the reward server is restarting its endpoint; retry"))
        triton.stop()
        raise
    log.info("serving models %s on http://%s:%d (grpc %d, metrics %d)",
             [m for m in (s.model_name, s.nemo_model_name) if m], s.host, s.http_port, s.grpc_port, s.metrics_port)
    return triton
