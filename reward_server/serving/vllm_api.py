"""vLLM's pooling routes on the API port (reference: shared engine-apis.md section 2): POST /classify (its vLLM
body: `input` or `messages`; SGLang's body goes to sglang_api.py, api_routes.py decides), POST /pooling, GET /v1/models.

/classify answers `data[i] = {"index", "label", "probs", "num_classes"}`: `probs` are the head's outputs, one per
label, through vLLM's default activation unless `use_activation` is false (then the raw head outputs: what verl reads
as `data[-1].probs[-1]`): the checkpoint's `problem_type` "regression" none, "multi_label_classification" a sigmoid
per label, else a sigmoid for one label and a softmax over two or more.

/pooling: a sequence reward model's pooling task is `classify` (`data[i].data` = the probs above); a process reward
model's is `token_classify`: `data[i].data` = one list per step, the columns vLLM's STEP pooler returns for the
preset's labels (step_columns): math_shepherd / rlhflow (score=softmax over the two candidate tokens ["+", "-"]):
[P(+), P(-)], our step reward is column 0; qwen_prm (score=classifier, two labels): [P(label 0), P(label 1)], our
step reward is column reward.positive_label (1); any other form: one column, our step score. Step scores are read as
probabilities, so `use_activation: false` is refused there (except score=logit, whose column is the raw logit).

Errors: vLLM's `{"error": {"message", "type", "param", "code"}}`. A request whose prompt (any of them) fails its
checks fails whole with 400, as vLLM's does; 503 (with Retry-After), 504, 500 likewise whole.
"""

import time
import uuid
from typing import Any, List, Optional

import numpy as np

from .api_errors import ApiError, bad_request, dumps, scored_whole
from .api_inputs import request as make_request

NOT_SUPPORTED = ("truncate_prompt_tokens", "chat_template", "chat_template_kwargs", "mm_processor_kwargs",
                 "add_generation_prompt", "continue_final_message")  # refused when set (not null / false)


def activation(values: np.ndarray, problem_type: Optional[str], use_activation: Optional[bool]) -> np.ndarray:
    """vLLM's classify activation of the head's outputs [n, labels] (float64 inside, float32 out)."""
    x = values.astype(np.float64)
    if use_activation is False or problem_type == "regression":
        return values
    if problem_type == "multi_label_classification" or x.shape[-1] < 2:
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def step_columns(reward, num_labels: int):
    """(columns, ours) of a process reward model's steps: a function p -> the step's row of columns, and which
    column is our step reward (module docstring)."""
    n_candidates = len(reward.candidate_token_ids or reward.candidate_tokens)
    if reward.score == "softmax" and n_candidates == 2:
        return (lambda p: [p, 1.0 - p]), 0
    if reward.score == "classifier" and num_labels == 2:
        pos = reward.positive_label
        return (lambda p: [1.0 - p, p] if pos == 1 else [p, 1.0 - p]), pos
    return (lambda p: [p]), 0


def prompts(body: dict):
    """("texts" | "ids" | "messages", the values) of a vLLM body, or a 400."""
    if not isinstance(body, dict):
        raise bad_request('expected a JSON object with "input" or "messages"')
    for key in NOT_SUPPORTED:
        if body.get(key) not in (None, False, {}, []):
            raise bad_request(f'"{key}" is not supported by this server (its model.truncation and chat template '
                              "apply)", param=key)
    if body.get("normalize") is not None:
        raise bad_request('"normalize" is not a classify option: use "use_activation" instead', param="normalize")
    for key in ("use_activation", "add_special_tokens"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise bad_request(f'"{key}" must be true, false or null', param=key)
    if ("input" in body) == ("messages" in body):
        raise bad_request('send "input" (a text, a list of texts, a list of token ids or a list of such lists) or '
                          '"messages" (one conversation), one of them', param="input")
    if "messages" in body:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise bad_request('"messages" must be a non-empty list of {"role", "content"}', param="messages")
        return "messages", [messages]
    value = body["input"]
    if isinstance(value, str):
        return "texts", [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return "texts", value
        if all(type(v) is int for v in value):
            return "ids", [value]
        if all(isinstance(v, list) for v in value):
            return "ids", value
    if value == []:
        raise bad_request('"input" is empty', param="input")
    raise bad_request('"input" must be a text, a list of texts, a list of token ids or a list of lists of token ids',
                      param="input")


def usage(tokens: int) -> dict:
    return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "prompt_tokens_details": None}


class VLLMRoutes:
    """The vLLM routes over one ApiServer (`api`) and its ApiInputs."""

    def __init__(self, api, inputs, model_name: str, max_model_len: int, prm: bool, num_labels: int,
                 id2label: dict, problem_type: Optional[str], steps=None, step_score: str = "softmax"):
        self.api, self.inputs, self.model_name = api, inputs, model_name
        self.max_model_len, self.prm = max_model_len, prm
        self.num_labels, self.id2label, self.problem_type = num_labels, id2label, problem_type
        self.steps, self.step_score = steps, step_score  # step_columns(...) for a PRM

    def add_to(self, api) -> None:
        api.add("POST", "/pooling", self.pooling, "vllm")
        api.add("GET", "/v1/models", self.models, "vllm")

    def _decode(self, body: dict):
        kind, values = prompts(body)
        add = body.get("add_special_tokens")
        if kind == "texts":
            return lambda: make_request(lambda: self.inputs.texts(values, add), whole=True)
        if kind == "ids":
            return lambda: make_request(lambda: self.inputs.token_lists(values), whole=True)
        return lambda: make_request(lambda: self.inputs.conversations(values), whole=True)

    def _answer(self, prefix: str, body: dict, data: List[dict], tokens: int):
        from aiohttp import web

        answer = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                  "model": body.get("model") or self.model_name, "data": data, "usage": usage(tokens)}
        return web.Response(text=dumps(answer), content_type="application/json")

    async def classify(self, request, body: dict):
        """POST /classify with a vLLM body (api_routes.py dispatches)."""
        if self.prm:
            raise ApiError(501, "this server serves a process reward model: its step scores come from POST /pooling "
                           '(task "token_classify"); SGLang\'s /classify body ("text") answers its aggregate reward')
        decode = self._decode(body)
        result, job = await self.api.score(request, decode)
        probs = activation(scored_whole(result).rewards(), self.problem_type, body.get("use_activation"))
        data = [{"index": i, "label": label_of(self.id2label, int(np.argmax(row))), "probs": row.tolist(),
                 "num_classes": int(row.shape[0])} for i, row in enumerate(probs)]
        return self._answer("classify", body, data, job.tokens())

    async def pooling(self, request):
        from .api_errors import read_json

        body = await read_json(request)
        if not isinstance(body, dict):
            raise bad_request('expected a JSON object with "input" or "messages"')
        task = body.get("task")
        own = "token_classify" if self.prm else "classify"
        if task not in (None, own):
            raise bad_request(f'this server\'s pooling task is "{own}" ('
                              f'{"a process reward model" if self.prm else "a sequence reward model"}), not {task!r}',
                              param="task")
        if body.get("encoding_format") not in (None, "float"):
            raise bad_request('only "encoding_format": "float" is served', param="encoding_format")
        if body.get("dimensions") is not None:
            raise bad_request('"dimensions" must be null', param="dimensions")
        use = body.get("use_activation")
        if self.prm and use is False and self.step_score != "logit":
            raise bad_request("raw step logits are not available: this server reads each step's score as a "
                              f"probability (reward.score={self.step_score}); omit use_activation",
                              param="use_activation")
        decode = self._decode(body)
        result, job = await self.api.score(request, decode)
        out = scored_whole(result).outputs
        if self.prm:
            columns, _ = self.steps
            data = [[columns(float(p)) for p in out["step_rewards"][i, :int(n)]]
                    for i, n in enumerate(out["num_steps"][:, 0])]
        else:
            data = activation(out["rewards"], self.problem_type, use).tolist()
        items = [{"index": i, "object": "pooling", "data": d} for i, d in enumerate(data)]
        return self._answer("pool", body, items, job.tokens())

    async def models(self, request):
        from aiohttp import web

        card = {"id": self.model_name, "object": "model", "created": int(time.time()), "owned_by": "reward-server",
                "root": self.model_name, "parent": None, "max_model_len": self.max_model_len, "permission": []}
        return web.Response(text=dumps({"object": "list", "data": [card]}), content_type="application/json")


def label_of(id2label: dict, index: int) -> Any:
    """config.id2label's name of a label (its keys are ints, or strings in a config read as JSON), else None."""
    return id2label.get(index, id2label.get(str(index)))
