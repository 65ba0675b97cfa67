"""SGLang's reward routes on the API port (reference: shared engine-apis.md section 3): POST /classify with SGLang's
native body (`text` or `input_ids`; api_routes.py decides by the body), POST /v1/embeddings (what verl's SGLang
backend calls), GET /get_model_info.

The value is what SGLang's *ForSequenceClassification reward models return: the head's raw outputs, one per label
(no activation, no normalisation); a process reward model's is its one aggregate reward (reward.aggregate).
  /classify          one input  -> {"embedding": [v, ...], "meta_info": {"id", "prompt_tokens", "e2e_latency"}}
                     a list     -> a JSON list of those, in order
  /v1/embeddings     {"object": "list", "data": [{"object": "embedding", "embedding": [v, ...], "index"}], "model",
                     "usage"}; verl reads data[-1].embedding[-1], the last label's output
Errors: /classify {"error": {"message"}}, /v1/embeddings SGLang's OpenAI shape {"object": "error", "message", "type",
"param", "code"}. A request whose input (any of them) fails its checks fails whole with 400, as SGLang's does.
"""

import time
import uuid

from .api_errors import bad_request, dumps, read_json, scored_whole
from .api_inputs import request as make_request


def sglang_inputs(body, key: str = "text"):
    """("texts" | "ids", values, single) of SGLang's `text` or `input_ids` (key "text"), or /v1/embeddings' `input`
    (key "input": either kind), or a 400."""
    if not isinstance(body, dict):
        raise bad_request(f'expected a JSON object with "{key}"' + (' or "input_ids"' if key == "text" else ""))
    if key == "text":
        if ("text" in body) == ("input_ids" in body):
            raise bad_request('send "text" (a text or a list of texts) or "input_ids" (token ids or a list of lists '
                              "of token ids), one of them")
        key = "text" if "text" in body else "input_ids"
    elif key not in body:
        raise bad_request(f'expected "{key}": a text or a list of texts, or token ids or a list of lists of them')
    value = body[key]
    texts_ok, ids_ok = key != "input_ids", key != "text"
    if isinstance(value, list) and not value or value == "":
        raise bad_request(f'"{key}" is empty')
    if texts_ok and isinstance(value, str):
        return "texts", [value], True
    if isinstance(value, list):
        if texts_ok and all(isinstance(v, str) for v in value):
            return "texts", value, False
        if ids_ok and all(type(v) is int for v in value):
            return "ids", [value], True
        if texts_ok and all(isinstance(v, list) and v and all(isinstance(x, str) for x in v) for v in value):
            raise bad_request("text pairs (a cross-encoder's input) are not served: send one text per input")
        if ids_ok and all(isinstance(v, list) for v in value):
            return "ids", value, False
    what = {"text": "a text or a list of texts", "input_ids": "token ids or a list of lists of token ids",
            "input": "a text, a list of texts, token ids or a list of lists of token ids"}[key]
    raise bad_request(f'"{key}" must be {what}')


class SGLangRoutes:
    """The SGLang routes over one ApiServer (`api`) and its ApiInputs."""

    def __init__(self, api, inputs, model_name: str, model_path: str):
        self.api, self.inputs, self.model_name, self.model_path = api, inputs, model_name, model_path

    def add_to(self, api) -> None:
        api.add("POST", "/v1/embeddings", self.embeddings, "openai")
        api.add("GET", "/get_model_info", self.model_info, "sglang")

    def _decode(self, kind: str, values):
        if kind == "texts":
            return lambda: make_request(lambda: self.inputs.texts(values), whole=True)
        return lambda: make_request(lambda: self.inputs.token_lists(values), whole=True)

    async def classify(self, request, body: dict):
        """POST /classify with an SGLang body (api_routes.py dispatches)."""
        from aiohttp import web

        started = time.monotonic()
        kind, values, single = sglang_inputs(body)
        result, job = await self.api.score(request, self._decode(kind, values))
        rewards = scored_whole(result).rewards()
        rids = body.get("rid")
        rids = rids if isinstance(rids, list) and len(rids) == len(values) else [rids] * len(values)
        elapsed = time.monotonic() - started
        items = [{"embedding": row.tolist(),
                  "meta_info": {"id": rid if isinstance(rid, str) else uuid.uuid4().hex,
                                "prompt_tokens": int(len(ids)), "e2e_latency": elapsed}}
                 for row, rid, ids in zip(rewards, rids, job.request.rows)]
        return web.Response(text=dumps(items[0] if single else items), content_type="application/json")

    async def embeddings(self, request):
        from aiohttp import web

        body = await read_json(request)
        if isinstance(body, dict) and body.get("encoding_format") not in (None, "float"):
            raise bad_request('only "encoding_format": "float" is served', param="encoding_format")
        if isinstance(body, dict) and body.get("dimensions") is not None:
            raise bad_request('"dimensions" must be null', param="dimensions")
        kind, values, _ = sglang_inputs(body, key="input")
        result, job = await self.api.score(request, self._decode(kind, values))
        rewards = scored_whole(result).rewards()
        data = [{"object": "embedding", "embedding": row.tolist(), "index": i} for i, row in enumerate(rewards)]
        tokens = job.tokens()
        answer = {"object": "list", "data": data, "model": body.get("model") or self.model_name,
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return web.Response(text=dumps(answer), content_type="application/json")

    async def model_info(self, request):
        from aiohttp import web

        info = {"model_path": self.model_path, "tokenizer_path": self.model_path, "is_generation": False,
                "preferred_sampling_params": None, "weight_version": "default"}
        return web.Response(text=dumps(info), content_type="application/json")
