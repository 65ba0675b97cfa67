"""OpenRLHF's remote reward model contract, beside Triton on rank 0 (server.openrlhf_port; off by default).

OpenRLHF actors started with `--remote_rm_url http://host:port/get_reward` POST JSON `{"query": [text, ...]}`
(newer versions add `"prompts"` and `"labels"`, which a reward model does not need: accepted and ignored) and
read `"rewards"` (newer versions also `"scores"` and `"extra_logs"`). Each query is the prompt and the response
as one text. Its own `serve_rm` removes pad and EOS tokens from both ends of each query and appends one EOS
before tokenizing; `server.openrlhf_eos=strip_and_append` (default) does the same with whole tokens
(serve_rm's `str.strip(token)` removes any of the token's characters, which can eat the end of the text);
`as_is` tokenizes the query as sent.

The queries are one request's rows (ScoreRequest) for the same RewardService as Triton's `reward` model (same
checks, limits, tokenizer, engine batching and prefix sharing). Answers:
  200 {"rewards": [r, ...], "scores": [r, ...], "extra_logs": {}, "errors": ["", ...]}
      a query that fails its checks gets NaN (json.dumps writes NaN, which Python's json and requests read,
      and torch.tensor takes) and its reason in "errors"; a multi-label model gives a list per query
  400 / 503 / 500 {"error": "..."}: no query could be scored (bad request / retry later / server fault);
      OpenRLHF's client retries any of these a few times, then raises with our message in its log
  401 without the inference token, when server.inference_token_* is set (header triton-access-token)
"""

import asyncio
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

from ..protocol import HTTP_STATUS, code_of
from .requests import ScoreRequest, ScoreResult
from .statuses import error_text, row_text

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
    """The queries of an OpenRLHF request body."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not JSON ({exc})") from None
    if not isinstance(data, dict) or "query" not in data:
        raise BadRequest('expected a JSON object with "query": a list of texts (and optionally "prompts", "labels")')
    queries = data["query"]
    if isinstance(queries, str):
        queries = [queries]
    if not isinstance(queries, list) or not queries or not all(isinstance(q, str) for q in queries):
        raise BadRequest('"query" must be a non-empty list of texts')
    for key in ("prompts", "labels"):
        if isinstance(data.get(key), list) and len(data[key]) != len(queries):
            raise BadRequest(f'"{key}" has {len(data[key])} entries, "query" has {len(queries)}')
    return queries


class OpenRLHFEndpoint:
    """An aiohttp server (already in our dependency tree through tritonclient[all]) in a thread of its own; each
    request is scored on a worker thread, so that many callers wait on the engine at once."""

    def __init__(self, service, tokenizer, host: str, port: int, eos_mode: str, concurrency: int,
                 token: Optional[str], token_header: str):
        self.service, self.host, self.port = service, host, port
        self.pad = tokenizer.pad_token if eos_mode == "strip_and_append" else None
        self.eos = tokenizer.eos_token if eos_mode == "strip_and_append" else None
        self.token, self.token_header = token, token_header
        self._workers = ThreadPoolExecutor(concurrency, thread_name_prefix="openrlhf")
        self._ready = threading.Event()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._error: Optional[BaseException] = None

    def start(self) -> None:
        threading.Thread(target=self._run, name="openrlhf-endpoint", daemon=True).start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        from aiohttp import web

        self._loop = asyncio.new_event_loop()
        app = web.Application(client_max_size=self.service.decoder.rules.max_request_bytes + (1 << 20))
        app.router.add_post(ROUTE, self._handle)
        runner = web.AppRunner(app, access_log=None)
        try:
            self._loop.run_until_complete(runner.setup())
            self._loop.run_until_complete(web.TCPSite(runner, self.host, self.port).start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, request):
        from aiohttp import web

        if self.token and request.headers.get(self.token_header) != self.token:
            return web.json_response({"error": f"inference needs the token (header {self.token_header})"},
                                     status=401)
        try:
            queries = parse(await request.read())
        except BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        raw = [openrlhf_text(q, self.pad, self.eos).encode("utf-8", "surrogatepass") for q in queries]
        result = await asyncio.get_running_loop().run_in_executor(self._workers, self.score, raw)
        if result.error is not None:
            return web.json_response({"error": error_text(result.error)}, status=HTTP_STATUS[code_of(result.error)])
        rewards = result.rewards()
        values = rewards[:, 0].tolist() if rewards.shape[1] == 1 else rewards.tolist()
        errors = [row_text(i, e) if e is not None else "" for i, e in enumerate(result.errors)]
        return web.json_response({"rewards": values, "scores": values, "extra_logs": {}, "errors": errors})

    def score(self, raw: List[bytes]) -> ScoreResult:
        """One request of UTF-8 queries, on a worker thread. Never in Triton's queue: refused once draining."""
        admit, refusal = self.service.admission.admit([None], "openrlhf")
        request = ScoreRequest.decoded(self.service.decoder.text_rows, raw) if admit[0] else ScoreRequest(error=refusal)
        return self.service.score(request)
