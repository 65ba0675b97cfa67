"""The `server` section: ports, tokens, the drain, the API port, limits (one dataclass of the schema)."""

from dataclasses import dataclass
from typing import Optional

from .choices import OpenRLHFEos
from .fields import setting


@dataclass
class ServerConfig:
    """Rank 0's front doors: Triton (HTTP, gRPC), metrics, OpenRLHF; tokens, request limits, shutdown."""

    model_name: str = setting("reward", "Native model (text / messages / token_ids, any lengths batch together).")
    nemo_model_name: str = setting(
        "reward_model", "NeMo-Aligner compatible model (sentences / tokens + sequence_lengths). Empty string disables "
        "it.")
    host: str = setting(
        "127.0.0.1", "Loopback by default: a reward server has no authentication on inference unless configured.")
    http_port: int = setting(8000, "Triton's HTTP port.")
    grpc_port: int = setting(8001, "Triton's gRPC port.")
    metrics_port: int = setting(
        8002, "Prometheus metrics: ours and Triton's (docs/operations.md, Metrics). Triton's own metrics endpoint "
        "moves to triton_metrics_port on the loopback; each scrape of metrics_port includes them.")
    triton_metrics_port: int = setting(0, "Triton's own metrics endpoint, on the loopback; 0: any free port.")
    api_port: Optional[int] = setting(
        30000, "The API port (docs/frameworks.md): vLLM's POST /classify, /pooling, GET /v1/models; SGLang's POST "
        "/classify, /v1/embeddings, GET /get_model_info; slime's POST /slime/reward; OpenRLHF's POST /get_reward; GET "
        "/health. 30000 is SGLang's default port, so AReaL's default http://localhost:30000/classify works unchanged. "
        "Needs the aiohttp package. 0: any free port (printed in the ready line); null: off.")
    api_host: Optional[str] = setting(None, "Address of the API port; null: server.host.")
    api_concurrency: int = setting(
        256, "API port: batches of requests scored at once (each waits on the engine on a thread of its own); more "
        "wait their turn, their request_timeout_s running.")
    request_timeout_s: Optional[float] = setting(
        600.0, "API and OpenRLHF ports: a request not answered this many seconds after it arrived gets 504, and its "
        "sequences that no forward has taken leave the queue uncomputed (so does a request whose client disconnects). "
        "null: no limit.")
    slime_reward_key: Optional[str] = setting(
        None, "slime's POST /slime/reward answers a bare number (null), or {key: reward} for slime's --reward-key.")
    openrlhf_port: Optional[int] = setting(
        None, "OpenRLHF's remote reward model contract, POST /get_reward, on a port of its own (serving/openrlhf.py); "
        "the API port serves the same route. null: off.")
    openrlhf_eos: OpenRLHFEos = setting(
        OpenRLHFEos.strip_and_append, "strip_and_append: like OpenRLHF's serve_rm, pad and EOS tokens off both ends "
        "of each query, then one EOS; as_is: the query as sent.")
    openrlhf_concurrency: int = setting(
        64, "OpenRLHF requests scored at once (each waits on the engine on a thread of its own).")
    metrics_scrape_timeout_s: float = setting(2.0, "How long a scrape of metrics_port waits for Triton's metrics.")
    access_token_env: str = setting(
        "REWARD_SERVER_ACCESS_TOKEN", "Token for Triton's protected endpoints (model-repository, statistics, trace, "
        "logging, shared-memory). Read from this environment variable, else from access_token_file, else generated "
        "and written to access_token_file if that is set. Clients send it in the `triton-access-token` header. Never "
        "logged.")
    access_token_file: Optional[str] = setting(
        None, "See access_token_env: read from this file, or the generated token written to it.")
    inference_token_env: Optional[str] = setting(
        None, "Optional token for inference (Triton's `inference` API category, HTTP and gRPC), same header. Read "
        "from this environment variable, else from inference_token_file; both null: inference is open to anyone who "
        "can reach the port. When either is set but yields no token the server refuses to start.")
    inference_token_file: Optional[str] = setting(None, "See inference_token_env.")
    drain_timeout_s: int = setting(
        20, "SIGTERM: how long requests already accepted may take to finish before Triton gives up on them (Triton's "
        "exit timeout). Keep it under torchrun's 30 s between SIGTERM and SIGKILL.")
    drain_refuse_s: float = setting(
        1.0, "SIGTERM: once the accepted requests are answered, keep answering new ones with 503 this long before "
        "Triton stops (while Triton stops, a request can meet a reset; after it, its port refuses connections).")
    triton_exit_timeout_s: int = setting(
        1, "SIGTERM: once the drain is done (every accepted request answered, then drain_refuse_s of refusals), how "
        "long Triton may take to stop. It waits for the requests in flight, and under steady load new ones (refused "
        "at once) keep coming, so without a short limit it would wait out drain_timeout_s.")
    port_wait_s: float = setting(
        60.0, "At start-up (e.g. a torchrun restart) wait this long for a previous server to release the ports.")
    start_attempts: int = setting(
        3, "Tries to start Triton before the rank gives up (PyTriton's start-up handshake can fail under CPU load).")
    log_verbose: int = setting(0, "Triton's --log-verbose level.")
    triton_log_info: bool = setting(
        False, "Triton's own info-level log (its option and model tables, per-model load lines); warnings and errors "
        "are always on.")
    max_row_bytes: Optional[int] = setting(
        None, "Size limits checked before a request is parsed or tokenized: a BYTES row (text, messages, token_ids, "
        "sentences) longer than max_row_bytes fails that row, a request whose BYTES inputs hold more than "
        "max_request_bytes fails whole (HTTP 400). null = auto: bytes_per_token x model.max_length per row, the row "
        "limit x batching.max_batch_size per request. A token of text is rarely more than a few bytes, so the auto "
        "limits refuse only what could never fit (or is far beyond what truncation keeps).")
    max_request_bytes: Optional[int] = setting(None, "See max_row_bytes.")
    bytes_per_token: int = setting(16, "See max_row_bytes.")
    stats_log_s: float = setting(
        60.0, "Log the engine's counts (forwards, tokens per forward, tokens/s, busy share) this often; 0: only at "
        "exit.")
