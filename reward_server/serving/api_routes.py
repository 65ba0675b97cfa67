"""The API port's routes put together (docs/frameworks.md has the table of clients and their settings):

  POST /classify        vLLM's body (`input` / `messages`) -> vllm_api.py; SGLang's (`text` / `input_ids`) ->
                        sglang_api.py; both kinds of keys -> 400 (one /classify serves AReaL, verl and scripts of either)
  POST /pooling         vLLM (process reward models: task token_classify, per-step columns)
  GET  /v1/models       vLLM / OpenAI model list
  POST /v1/embeddings   SGLang's OpenAI-style route (verl's SGLang backend)
  GET  /get_model_info  SGLang
  POST /slime/reward    slime's --rm-url
  POST /get_reward      OpenRLHF's --remote_rm_url
  GET  /health          200 when ready, 503 while starting, draining or failed (also /health_generate)
"""

from typing import Optional

from ..config import ServeConfig
from .api import ApiServer
from .api_errors import bad_request, read_json
from .api_inputs import ApiInputs
from .openrlhf import OpenRLHFRoute
from .sglang_api import SGLangRoutes
from .slime_api import SlimeRoute
from .vllm_api import VLLMRoutes, step_columns

VLLM_KEYS, SGLANG_KEYS = ("input", "messages"), ("text", "input_ids")
DEFAULT_MODEL_NAME = "reward-server-default"  # the embedded default model's name (model.path=null)


def api_server(cfg: ServeConfig, service, tokenizer, model_config, token: Optional[str], max_length: int) -> ApiServer:
    """The API port's server on server.api_host (null: server.host) : server.api_port, not started."""
    s, b = cfg.server, cfg.batching
    preferred = [p for p in b.preferred_batch_sizes if p >= 1]
    api = ApiServer(service, s.api_host or s.host, s.api_port, token, s.request_timeout_s,
                    gather_s=b.max_queue_delay_us / 1e6, max_batch=min(max(preferred, default=b.max_batch_size),
                                                                       b.max_batch_size),
                    concurrency=s.api_concurrency, port_wait_s=s.port_wait_s)
    inputs = ApiInputs(service.decoder, tokenizer)
    name = cfg.model.path or DEFAULT_MODEL_NAME
    prm = cfg.reward.kind == "prm"
    num_labels = getattr(model_config, "num_labels", 1)
    vllm = VLLMRoutes(api, inputs, name, max_length, prm, num_labels, dict(getattr(model_config, "id2label", {}) or {}),
                      getattr(model_config, "problem_type", None),
                      steps=step_columns(cfg.reward, num_labels) if prm else None, step_score=str(cfg.reward.score))
    sglang = SGLangRoutes(api, inputs, name, cfg.model.path or DEFAULT_MODEL_NAME)

    async def classify(request):
        body = await read_json(request)
        if not isinstance(body, dict):
            raise bad_request("expected a JSON object: vLLM's (\"input\" or \"messages\") or SGLang's (\"text\" or "
                              "\"input_ids\")")
        is_vllm, is_sglang = any(k in body for k in VLLM_KEYS), any(k in body for k in SGLANG_KEYS)
        if is_vllm and is_sglang:
            raise bad_request('send vLLM\'s "input" / "messages" or SGLang\'s "text" / "input_ids", not both')
        if is_sglang:
            try:
                return await sglang.classify(request, body)
            except Exception as exc:  # SGLang's error shape for SGLang's body
                exc.family = "sglang"
                raise
        return await vllm.classify(request, body)

    api.add("POST", "/classify", classify, "vllm")
    vllm.add_to(api)
    sglang.add_to(api)
    SlimeRoute(api, inputs, s.slime_reward_key).add_to(api)
    OpenRLHFRoute(api, tokenizer, s.openrlhf_eos).add_to(api)
    api.add_health()
    return api


def ready_text(api: ApiServer) -> str:
    """The API port's part of the ready line."""
    return (f"; API http://{api.host}:{api.port} (/classify /pooling /v1/embeddings /slime/reward /get_reward "
            "/health)")
