"""Rank 0's HTTP/gRPC face: PyTriton models whose infer functions decode requests and hand them to the engine.

Two models share one engine:
  server.model_name      (default "reward")        native contract, see inputs.py
  server.nemo_model_name (default "reward_model")  NeMo-Aligner's contract: an existing NeMo actor only
                                                   changes the URL
Both answer `rewards` FP32 [batch, num_labels] and `error` BYTES [batch, 1] ("" when the row was scored);
with reward.kind=prm, `rewards` [batch, 1] plus `step_rewards` and `num_steps` (prm.StepOutputs, docs/prm.md).
A request that fails its checks gets NaN rewards and its message in `error`, and the other requests of the
same dynamic batch are scored as usual; when every request of a batch is bad the whole call fails with the
message (HTTP 400/500 with the text).
"""

import logging
import os
import secrets
import sysconfig
from typing import Callable, List

import numpy as np
import torch

from .config import ServeConfig
from .engine import Leader
from .inputs import InputError, RequestDecoder

log = logging.getLogger(__name__)


def ensure_python_library_path() -> None:
    """PyTriton's Python backend stub links against the running interpreter's libpython; Triton inherits
    our environment, so put its directory on LD_LIBRARY_PATH before starting Triton."""
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in current.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def resolve_access_token(cfg: ServeConfig) -> str:
    """Token for Triton's protected endpoints: environment variable, else file, else a new random one (written
    to the file when one is configured, so operators and perf_analyzer can read it)."""
    server = cfg.server
    token = os.environ.get(server.access_token_env, "")
    path = os.path.expanduser(server.access_token_file) if server.access_token_file else None
    if not token and path and os.path.isfile(path):
        with open(path) as f:
            token = f.read().strip()
    if not token:
        token = secrets.token_urlsafe(32)
        if path:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token)
    return token


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
        self.outputs = outputs  # ScalarOutputs or prm.StepOutputs: the tensors answered besides `error`

    def infer_native(self, requests) -> List[dict]:
        return self._infer(requests, self.decoder.native)

    def infer_nemo(self, requests) -> List[dict]:
        return self._infer(requests, self.decoder.nemo)

    def _infer(self, requests, decode: Callable) -> List[dict]:
        decoded = []
        for request in requests:
            try:
                decoded.append(decode(request))
            except InputError as exc:
                decoded.append(exc)
        errors = [d for d in decoded if isinstance(d, InputError)]
        if len(errors) == len(decoded):
            raise InputError("; ".join(str(e) for e in errors))
        seqs = [torch.from_numpy(ids) for d in decoded if not isinstance(d, InputError) for ids in d]
        rewards = self.leader.submit(seqs).result()
        responses, at = [], 0
        for d in decoded:
            if isinstance(d, InputError):
                n = _batch_size(requests[len(responses)])
                responses.append({**self.outputs.failed(n), "error": np.full((n, 1), str(d).encode(), dtype=object)})
            else:
                responses.append({**self.outputs.scored(rewards[at:at + len(d)], d),
                                  "error": np.full((len(d), 1), b"", dtype=object)})
                at += len(d)
        return responses


def _batch_size(request) -> int:
    return max((np.asarray(v).shape[0] for v in request.values()), default=1)


def start_triton(cfg: ServeConfig, service: RewardService, access_token: str):
    """Start Triton with our models bound. PyTriton 0.7 has a start-up race with several model instances (the
    second instance may connect to the first one's handshake socket between bind and listen, and the model
    fails to load with "Connection refused"); a failed start is retried a few times."""
    for attempt in range(1, cfg.server.startup_attempts + 1):
        triton = _bind_models(cfg, service, access_token)
        try:
            triton.run()
            break
        except Exception as exc:
            triton.stop()
            if attempt == cfg.server.startup_attempts:
                raise
            log.warning("Triton failed to start (attempt %d): %s; retrying", attempt, str(exc).splitlines()[0])
    s = cfg.server
    log.info("serving models %s on http://%s:%d (grpc %d, metrics %d)",
             [m for m in (s.model_name, s.nemo_model_name) if m], s.host, s.http_port, s.grpc_port, s.metrics_port)
    return triton


def _bind_models(cfg: ServeConfig, service: RewardService, access_token: str):
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    ensure_python_library_path()
    s, b = cfg.server, cfg.batching
    triton = Triton(
        config=TritonConfig(
            http_address=s.host, http_port=s.http_port, grpc_address=s.host, grpc_port=s.grpc_port,
            metrics_address=s.host, metrics_port=s.metrics_port, log_verbose=s.log_verbose,
        ),
        security_config=TritonSecurityConfig(access_token=access_token),
    )
    model_config = ModelConfig(
        max_batch_size=b.max_batch_size,
        batcher=DynamicBatcher(
            max_queue_delay_microseconds=b.max_queue_delay_us,
            preferred_batch_size=list(b.preferred_batch_sizes) or None,
        ),
    )
    outputs = [Tensor(name=n, dtype=t, shape=shape) for n, t, shape in service.outputs.specs]
    outputs.append(Tensor(name="error", dtype=bytes, shape=(1,)))
    triton.bind(
        model_name=s.model_name,
        infer_func=[service.infer_native] * b.instances,
        inputs=[Tensor(name=n, dtype=bytes, shape=(1,), optional=True) for n in ("text", "messages", "token_ids")],
        outputs=outputs,
        config=model_config,
        strict=True,
    )
    if s.nemo_model_name:
        triton.bind(
            model_name=s.nemo_model_name,
            infer_func=[service.infer_nemo] * b.instances,
            inputs=[
                Tensor(name="sentences", dtype=bytes, shape=(-1,), optional=True),
                Tensor(name="tokens", dtype=np.int64, shape=(-1,), optional=True),
                Tensor(name="sequence_lengths", dtype=np.int64, shape=(-1,), optional=True),
            ],
            outputs=outputs,
            config=model_config,
            strict=True,
        )
    return triton
