"""Rank 0's Triton binding: the PyTriton models whose infer functions (triton_infer.py) hand requests to the
service, their ports, and the tokens that protect them.

Two models share one service:
  server.model_name      (default "reward")        native contract, see inputs.py
  server.nemo_model_name (default "reward_model")  NeMo-Aligner's contract: an existing NeMo actor only
                                                   changes the URL
Both answer `rewards` FP32 [batch, num_labels] and `error` BYTES [batch, 1] ("" when the row was scored);
with reward.kind=prm, `rewards` [batch, 1] plus `step_rewards` and `num_steps` (kinds/prm.py StepOutputs, docs/prm.md).
"""

import logging
import os
import secrets
import socket
import sysconfig
import time
from typing import List, Optional

import numpy as np

from ..config import ServeConfig
from ..engine import ShuttingDown
from . import triton_patches
from .inputs import MAX_REASON_CHARS
from .service import RewardService
from .triton_infer import TritonInfer

log = logging.getLogger("reward_server.server")

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


PORTS = ("http_port", "grpc_port", "metrics_port", "openrlhf_port")  # ours that 0 sets to a free port


def pick_free_ports(server) -> None:
    """server.<port>=0: a free port, chosen once at start-up and printed in the ready line (a torchrun restart
    chooses again). For several servers on one machine; a fixed port is what clients of a long-lived server want."""
    for name in PORTS:
        if getattr(server, name) == 0:
            setattr(server, name, free_port(server.host))


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


def restrictions(access_token: str, inference_token: Optional[str]) -> List[str]:
    """Triton's --http-restricted-api / --grpc-restricted-protocol values: one `<apis>:<header>=<token>` group
    for the operator's endpoints, and one for inference when it is protected."""
    groups = [f"{','.join(PROTECTED_APIS)}:{ACCESS_HEADER}={access_token}"]
    if inference_token:
        groups.append(f"inference:{ACCESS_HEADER}={inference_token}")
    return groups


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
    triton_patches.quiet(s.triton_log_info)
    wait_for_ports(s.host, [s.http_port, s.grpc_port], s.port_wait_s)
    restricted = restrictions(access_token, inference_token)
    triton = Triton(
        config=TritonConfig(
            http_address=s.host, http_port=s.http_port, grpc_address=s.host, grpc_port=s.grpc_port,
            metrics_address=LOOPBACK, metrics_port=triton_metrics_port, log_verbose=s.log_verbose,
            exit_timeout_secs=s.triton_exit_timeout_s, http_restricted_api=restricted, grpc_restricted_protocol=restricted,
        ),
        # We pass the restrictions ourselves (PyTriton's own take one group only); its client calls use the token.
        security_config=TritonSecurityConfig(access_token=access_token, restricted_endpoints=[]),
    )
    triton_patches.set_log_info(triton, s.triton_log_info)
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
    infer = TritonInfer(service)
    triton_patches.install()
    triton.bind(
        model_name=s.model_name,
        infer_func=[infer.native] * instances,
        inputs=[Tensor(name=n, dtype=bytes, shape=(1,), optional=True) for n in ("text", "messages", "token_ids")],
        outputs=outputs,
        config=model_config,
        strict=False,  # the statuses' keys (statuses.py) are not model outputs
    )
    if s.nemo_model_name:
        triton.bind(
            model_name=s.nemo_model_name,
            infer_func=[infer.nemo] * instances,
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
    openrlhf = f"; OpenRLHF http://{s.host}:{s.openrlhf_port}/get_reward" if s.openrlhf_port is not None else ""
    return (f"ready after {seconds:.0f} s: {models}; gRPC {s.host}:{s.grpc_port}; "
            f"metrics http://{s.host}:{s.metrics_port}/metrics{openrlhf}; rank 0 is pid {os.getpid()} "
            f"(kill -TERM {os.getpid()} drains and stops every rank with exit code 0)")
