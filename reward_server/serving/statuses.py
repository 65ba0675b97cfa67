"""The response of a request that failed: an error code and a one-line message, which PyTriton's proxy model
turns into Triton's own error response for that request alone (triton_patches.install, proxy_status.with_status),
with the code's HTTP / gRPC status (protocol.py). Never a traceback.

Every error text the server sends starts with its machine-readable token (protocol.encode_error): a request's
status carries its code and, for UNAVAILABLE, the reason; a row's `error` output carries its code and row. The
client decides by these alone, never by the wording after them.

REWORD_ENV (tests only): when set to 1, every human message is replaced by a scrambled one ("zzz " + the text
reversed), tokens kept, so that a test can show that no client decision depends on the wording.
"""

import os
from typing import Optional

import numpy as np

from ..protocol import TOKEN, code_of, encode_error, parse_errors
from . import proxy_status

REWORD_ENV = "REWARD_SERVER_TEST_REWORD"
_SCRAMBLED = "zzz "


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _scrambled(message: str) -> str:
    if not message or message.startswith(_SCRAMBLED):
        return message
    return _SCRAMBLED + message[::-1]


def _reworded(text: str) -> str:
    """The text as sent: itself, or under REWORD_ENV its words scrambled between its tokens, which stay."""
    if os.environ.get(REWORD_ENV) != "1":
        return text
    matches = list(TOKEN.finditer(text))
    if not matches:
        return _scrambled(text)
    head = text[: matches[0].start()].strip()
    return "; ".join(([_scrambled(head)] if head else []) +
                     [f"{m.group(0)} {_scrambled(p.message)}".rstrip() for m, p in zip(matches, parse_errors(text))])


def error_text(exc: BaseException, row: Optional[int] = None) -> str:
    """The error text of `exc`: its token (code, reason, row) and its one-line message. A message that already
    carries tokens (the rows of a request whose every row failed, service.row_failure) keeps them, after this
    one."""
    message = _one_line(exc)
    if row is not None and message.startswith(f"row {row}: "):  # the row is in the token
        message = message[len(f"row {row}: "):]
    return encode_error(code_of(exc), _reworded(message), getattr(exc, "reason", "") or "", row)


def row_text(row: int, exc: BaseException) -> str:
    """A failed row's `error` output: `[reward_server:CODE:row=N] message`."""
    return error_text(exc, row)


def failure(exc: BaseException) -> dict:
    """The response dict of a request that failed with `exc`."""
    return {proxy_status.STATUS: np.array([code_of(exc).encode()], dtype=object),
            proxy_status.MESSAGE: np.array([error_text(exc).encode()], dtype=object)}
