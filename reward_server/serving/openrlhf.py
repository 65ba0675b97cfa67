"""OpenRLHF's remote reward model contract: POST /get_reward on the API port (server.api_port), and on a port of its
own when server.openrlhf_port is set (OpenRLHFEndpoint; off by default).

OpenRLHF actors started with `--remote_rm_url http://host:port/get_reward` POST JSON `{"query": [text, ...]}`
(newer versions add `"prompts"` and `"labels"`, which a reward model does not need: accepted and ignored) and
read `"rewards"` (newer versions also `"scores"` and `"extra_logs"`). Each query is the prompt and the response
as one text. Its own `serve_rm` removes pad and EOS tokens from both ends of each query and appends one EOS
before tokenizing; `server.openrlhf_eos=strip_and_append` (default) does the same with whole tokens
(serve_rm's `str.strip(token)` removes any of the token's characters, which can eat the end of the text);
`as_is` tokenizes the query as sent. Then the API port's text rule (api_inputs.py): a query that starts with the
BOS string (decoded with skip_special_tokens=False from a templated prompt) gets no second BOS.

The queries are one request's rows (ScoreRequest) for the same RewardService as Triton's `reward` model (same
checks, limits, tokenizer, engine batching and prefix sharing). Answers:
  200 {"rewards": [r, ...], "scores": [r, ...], "extra_logs": {}, "errors": ["", ...]}
      a query that fails its checks gets NaN (json.dumps writes NaN, which Python's json and requests read,
      and torch.tensor takes; null would fail torch.tensor) and its reason in "errors"; a multi-label model gives a
      list per query. An empty "query" list gets empty lists (OpenRLHF sends one to every URL after the first when
      it is given several).
  400 / 503 (Retry-After) / 504 / 500 {"error": "..."}: no query could be scored (bad request / retry later / not
      scored within server.request_timeout_s / server fault); OpenRLHF's client retries any of these a few times,
      then logs our message
  401 without the inference token, when server.inference_token_* is set (`Authorization: Bearer <token>` or the
      triton-access-token header)
"""

import json
import logging
from typing import List, Optional

from .api import ApiServer
from .api_errors import bad_request, dumps, failure
from .api_inputs import bos_added
from .requests import ScoreRequest
from .statuses import row_text

log = logging.getLogger(__name__)

EOS_MODES = ("strip_and_append", "as_is")
ROUTE = "/get_reward"


def openrlhf_text(query: str, pad: Optional[str], eos: Optional[str]) -> str:
    """serve_rm's query preparation with whole tokens: pad and EOS tokens off both ends, then one EOS."""
    marks = [t for t in (pad, eos) if t]
    changed = True
    while changed:
        changed = False
        for t in marks:
            if query.startswith(t):
                query, changed = query[len(t):], True
            if query.endswith(t):
                query, changed = query[: -len(t)], True
    return query + (eos or "")


class BadRequest(ValueError):
    pass


def parse(body: bytes) -> List[str]:
    """The queries of an OpenRLHF request body (possibly none)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not JSON ({exc})") from None
    if not isinstance(data, dict) or "query" not in data:
        raise BadRequest('expected a JSON object with "query": a list of texts (and optionally "prompts", "labels")')
    queries = data["query"]
    if isinstance(queries, str):
        queries = [queries]
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise BadRequest('"query" must be a list of texts')
    for key in ("prompts", "labels"):
        if isinstance(data.get(key), list) and len(data[key]) != len(queries):
            raise BadRequest(f'"{key}" has {len(data[key])} entries, "query" has {len(queries)}')
    return queries


class OpenRLHFRoute:
    """POST /get_reward over an ApiServer: JSON -> ScoreRequest (the decoder's text rows) -> ScoreResult -> JSON."""

    def __init__(self, api: ApiServer, tokenizer, eos_mode: str):
        self.api, self.service = api, api.service
        self.pad = tokenizer.pad_token if eos_mode == "strip_and_append" else None
        self.eos = tokenizer.eos_token if eos_mode == "strip_and_append" else None
        # text_rows tokenizes with model.add_special_tokens: the BOS rule applies when that adds the BOS token
        self.bos = bos_added(tokenizer) if getattr(self.service.decoder, "add_special_tokens", False) else None

    def add_to(self, api: ApiServer) -> None:
        api.add("POST", ROUTE, self.handle, "plain")

    def prepared(self, query: str) -> bytes:
        text = openrlhf_text(query, self.pad, self.eos)
        if self.bos and text.startswith(self.bos):
            text = text[len(self.bos):]
        return text.encode("utf-8", "surrogatepass")

    async def handle(self, request):
        from aiohttp import web

        try:
            queries = parse(await request.read())
        except BadRequest as exc:
            raise bad_request(str(exc)) from None
        if not queries:
            return web.json_response({"rewards": [], "scores": [], "extra_logs": {}, "errors": []})
        raw = [self.prepared(q) for q in queries]
        result, _ = await self.api.score(request, lambda: ScoreRequest.decoded(self.service.decoder.text_rows, raw))
        if result.error is not None:
            raise failure(result.error)
        rewards = result.rewards()
        values = rewards[:, 0].tolist() if rewards.shape[1] == 1 else rewards.tolist()
        errors = [row_text(i, e) if e is not None else "" for i, e in enumerate(result.errors)]
        answer = {"rewards": values, "scores": values, "extra_logs": {}, "errors": errors}
        return web.Response(text=dumps(answer), content_type="application/json")


class OpenRLHFEndpoint:
    """POST /get_reward alone on server.openrlhf_port (aiohttp, a thread of its own): each request scored on its own
    worker thread, as before the API port; with the API port's auth, deadline and disconnect handling."""

    def __init__(self, service, tokenizer, host: str, port: int, eos_mode: str, concurrency: int,
                 token: Optional[str], token_header: str = "triton-access-token", timeout_s: Optional[float] = None):
        self.api = ApiServer(service, host, port, token, timeout_s, gather_s=0.0, max_batch=1,
                             concurrency=concurrency, name="OpenRLHF port")
        OpenRLHFRoute(self.api, tokenizer, eos_mode).add_to(self.api)

    def start(self) -> None:
        self.api.start()
