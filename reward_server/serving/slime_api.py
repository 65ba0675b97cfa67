"""slime's remote reward model contract on the API port: POST /slime/reward (give slime `--rm-url
http://host:30000/slime/reward`; reference: shared engine-apis.md section 4.3).

slime posts one sample per request, `{"prompt": str | [{"role", "content"}, ...], "response": str, "label": ...}`,
and stores the parsed JSON answer as the sample's reward. A list prompt is a conversation: the response is its
assistant turn, rendered by the chat template (the `messages` input). A string prompt (slime's prompt as the policy
saw it, usually already templated) is followed by the response as one text (api_inputs.py's text rule). `label`
is accepted and ignored: a reward model scores the text.
Answer: a bare number (server.slime_reward_key=null, the default), or {key: number} for slime's --reward-key; a
multi-label head gives a list per sample; a process reward model its aggregate reward. Errors: {"error": line}
with 400 / 401 / 503 (Retry-After) / 504 / 500; slime retries any failure up to 10 times.
"""

from typing import Optional

from .api_errors import ApiError, bad_request, dumps, read_json, scored_whole
from .api_inputs import request as make_request

ROUTE = "/slime/reward"


class SlimeRoute:
    def __init__(self, api, inputs, key: Optional[str]):
        self.api, self.inputs, self.key = api, inputs, key

    def add_to(self, api) -> None:
        api.add("POST", ROUTE, self.handle, "plain")

    async def handle(self, request):
        from aiohttp import web

        body = await read_json(request)
        if not isinstance(body, dict) or "prompt" not in body or "response" not in body:
            raise bad_request('expected a JSON object with "prompt" (a text or a list of {"role", "content"}), '
                              '"response" (a text) and optionally "label"')
        prompt, response = body["prompt"], body["response"]
        if not isinstance(response, str):
            raise bad_request('"response" must be a text')
        if isinstance(prompt, str):
            text = prompt + response
            decode = lambda: make_request(lambda: self.inputs.texts([text]), whole=True)  # noqa: E731
        elif isinstance(prompt, list) and prompt:
            conversation = prompt + [{"role": "assistant", "content": response}]
            decode = lambda: make_request(lambda: self.inputs.conversations([conversation]), whole=True)  # noqa: E731
        else:
            raise bad_request('"prompt" must be a text or a non-empty list of {"role", "content"}')
        result, _ = await self.api.score(request, decode)
        row = scored_whole(result).rewards()[0]
        value = float(row[0]) if row.shape[0] == 1 else row.tolist()
        if value != value:  # NaN never answers a sample
            raise ApiError(500, "the reward is NaN")
        return web.Response(text=dumps(value if self.key is None else {self.key: value}),
                            content_type="application/json")
