"""The API port's errors and JSON: ApiError (a status and one line), each route family's error shape, the request
body read as JSON."""

import json
from typing import Any, Optional

from ..engine.admission import Withdrawn
from ..protocol import HTTP_STATUS, OVERLOADED, UNAVAILABLE, code_of, encode_error
from .requests import ScoreResult
from .statuses import error_text

TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 413: "BadRequestError",
         500: "InternalServerError", 501: "NotImplementedError", 503: "ServiceUnavailableError", 504: "TimeoutError"}
RETRY_AFTER_S = {OVERLOADED: 1}  # Retry-After of a 503, by reason; others (shutting down, ranks failed): DEFAULT
DEFAULT_RETRY_AFTER_S = 5


class ApiError(Exception):
    """A request answered with an error: its HTTP status and one line (and vLLM's `param`, a 503's Retry-After)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, retry_after: Optional[int] = None):
        super().__init__(" ".join(message.split()))
        self.status, self.param, self.retry_after = status, param, retry_after


def bad_request(message: str, param: Optional[str] = None) -> ApiError:
    """400 for a body the route cannot read; the text carries the INVALID_ARG token like every error we send."""
    return ApiError(400, encode_error("INVALID_ARG", message), param)


def failure(exc: BaseException) -> ApiError:
    """The ApiError of a request that failed with `exc` (its code's status; 504 for a request that ran out of time)."""
    if isinstance(exc, Withdrawn) and exc.cause == "timeout":
        return ApiError(504, encode_error(UNAVAILABLE, str(exc), "timeout"))
    code = code_of(exc)
    retry = RETRY_AFTER_S.get(getattr(exc, "reason", ""), DEFAULT_RETRY_AFTER_S) if code == UNAVAILABLE else None
    return ApiError(HTTP_STATUS[code], error_text(exc), retry_after=retry)


def scored_whole(result: ScoreResult) -> ScoreResult:
    """`result` when every row was scored; else the ApiError of the request (its own error, or its first failed
    row's): vLLM and SGLang fail a whole request when one of its prompts fails."""
    if result.error is not None:
        raise failure(result.error)
    failed = [(i, e) for i, e in enumerate(result.errors) if e is not None]
    if failed:
        i, exc = failed[0]
        raise ApiError(HTTP_STATUS[code_of(exc)], error_text(exc, i))
    return result


def error_body(family: str, status: int, message: str, param: Optional[str] = None) -> Any:
    """The error JSON of each route family: vLLM's, SGLang's native routes', SGLang's OpenAI routes', or a plain
    {"error": line} (slime, OpenRLHF, /health)."""
    if family == "vllm":
        return {"error": {"message": message, "type": TYPES.get(status, "Error"), "param": param, "code": status}}
    if family == "sglang":
        return {"error": {"message": message}}
    if family == "openai":
        return {"object": "error", "message": message, "type": TYPES.get(status, "Error"), "param": param,
                "code": status}
    return {"error": message}


def dumps(value: Any) -> str:
    """JSON as Python writes it (NaN for a failed row's reward: OpenRLHF's readers take it)."""
    return json.dumps(value, separators=(",", ":"))


async def read_json(request) -> Any:
    """The request's body as JSON, or a 400."""
    from aiohttp import web

    try:
        body = await request.read()
    except web.HTTPException as exc:  # over the size limit
        raise ApiError(exc.status, encode_error("INVALID_ARG", f"{exc.reason}: {exc.text}")) from None
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not JSON ({exc})") from None
