"""The wire contract that the server and the client share. Torch-free: the client imports this module alone.

Error codes. A request that fails gets one of these codes; Triton answers it with the code's HTTP / gRPC status,
and its error text carries the code as a fixed token (see `encode_error` below), so that a client decides by code,
never by the wording of a message:

  INVALID_ARG  HTTP 400, gRPC INVALID_ARGUMENT   the request is wrong; do not retry (InputError)
  UNAVAILABLE  HTTP 503, gRPC UNAVAILABLE        retry later (Unavailable; its reason says why)
  INTERNAL     HTTP 500, gRPC INTERNAL           a server fault; details in the server's log

Error tokens. Triton's HTTP error body is a plain string ({"error": "<text>"}) and gRPC gives a status message, so
the machine-readable part travels at the start of the text, as one short token before the human message:

  [reward_server:UNAVAILABLE:overloaded] the reward server is overloaded (...)     a request's status (503)
  [reward_server:INVALID_ARG:row=3] empty sequence                                 a row's `error` output
  [reward_server:INVALID_ARG] [reward_server:INVALID_ARG:row=0] empty text; [reward_server:INVALID_ARG:row=1] ...
                                                       a request every row of which failed: its own token first,
                                                       then one per row named (the first MESSAGE_ROWS rows)

  token := "[reward_server:" CODE ( ":" REASON )? ( ":row=" N )? "]"    CODE one of the codes below, REASON one of
  REASONS (UNAVAILABLE only), N the row's index in the request (0-based).
A text's first token is its own code; a token with a row is that row's. parse_error / parse_errors find tokens
anywhere in a text (a prefix added by Triton or a proxy does no harm); a text without one parses to code None.
"""

import re
from typing import List, NamedTuple, Optional

# error code names (they are also the names of Triton's Python backend codes, pb_utils.TritonError.<name>)
INVALID_ARG, UNAVAILABLE, INTERNAL = "INVALID_ARG", "UNAVAILABLE", "INTERNAL"
HTTP_STATUS = {INVALID_ARG: 400, UNAVAILABLE: 503, INTERNAL: 500}
GRPC_STATUS = {INVALID_ARG: "INVALID_ARGUMENT", UNAVAILABLE: "UNAVAILABLE", INTERNAL: "INTERNAL"}
ERROR_KINDS = {INVALID_ARG: "input", UNAVAILABLE: "unavailable", INTERNAL: "internal"}  # metrics' error kinds

# machine-readable reasons of UNAVAILABLE
OVERLOADED, SHUTTING_DOWN, RANKS_FAILED = "overloaded", "shutting_down", "ranks_failed"
REASONS = (OVERLOADED, SHUTTING_DOWN, RANKS_FAILED)

# native model: inputs (each request sends one, shape [batch, 1]) and outputs
NATIVE_INPUTS = ("text", "messages", "token_ids")
REWARDS, ERROR, STEP_REWARDS, NUM_STEPS = "rewards", "error", "step_rewards", "num_steps"


class InputError(ValueError):
    """A request or a row that cannot be scored; the message names the row."""


class Unavailable(RuntimeError):
    """The server cannot take this request now: retry later. `reason` is one of REASONS (or "")."""

    reason = ""


def code_of(exc: BaseException) -> str:
    """The error code of a request that failed with `exc`."""
    if isinstance(exc, InputError):
        return INVALID_ARG
    if isinstance(exc, Unavailable):
        return UNAVAILABLE
    return INTERNAL


# ------------------------------------------------------------------------------------------------ error tokens

TOKEN_NAME = "reward_server"
_FIELD = re.compile(r"[a-z0-9_]+")
TOKEN = re.compile(r"\[reward_server:([A-Z_]+)((?::[a-z0-9_]+(?:=[0-9]+)?)*)\]")


class ParsedError(NamedTuple):
    """One token of an error text: its code (None: the text carries no token), the 503 reason ("" if none), the
    row it concerns (None: not one row's) and the human message (without tokens)."""

    code: Optional[str]
    reason: str
    row: Optional[int]
    message: str


def error_token(code: str, reason: str = "", row: Optional[int] = None) -> str:
    """`[reward_server:CODE(:REASON)(:row=N)]`."""
    if not re.fullmatch(r"[A-Z_]+", code):
        raise ValueError(f"bad error code {code!r}")
    if reason and not _FIELD.fullmatch(reason):
        raise ValueError(f"bad error reason {reason!r}: lower-case letters, digits and _ only")
    if row is not None and (isinstance(row, bool) or int(row) != row or row < 0):
        raise ValueError(f"bad row {row!r}")
    return "[" + ":".join([TOKEN_NAME, code] + ([reason] if reason else []) +
                          ([f"row={int(row)}"] if row is not None else [])) + "]"


def encode_error(code: str, message: str, reason: str = "", row: Optional[int] = None) -> str:
    """An error text: the token, a space, the human message."""
    token = error_token(code, reason, row)
    return f"{token} {message}" if message else token


def _parsed(match: "re.Match", message: str) -> ParsedError:
    reason, row = "", None
    for field in match.group(2).split(":")[1:]:
        if field.startswith("row="):
            row = int(field[4:])
        elif "=" not in field and not reason:
            reason = field
    return ParsedError(match.group(1), reason, row, message)


def _human(text: str) -> str:
    """The text without its tokens, on one line."""
    return " ".join(TOKEN.sub(" ", text).split())


def parse_errors(text: str) -> List[ParsedError]:
    """Every token of `text`, in order, each with its own message: the text from after it to the next token
    (without the "; " that joins several rows' messages). [] when the text carries none."""
    matches = list(TOKEN.finditer(text or ""))
    ends = [m.start() for m in matches[1:]] + [len(text or "")]
    return [_parsed(m, _human(text[m.end():end]).rstrip(";").rstrip()) for m, end in zip(matches, ends)]


def parse_error(text: str) -> ParsedError:
    """The text's own code (its first token) and its whole human message (every token taken out);
    ParsedError(None, "", None, text) for a text without a token."""
    match = TOKEN.search(text or "")
    if match is None:
        return ParsedError(None, "", None, (text or "").strip())
    return _parsed(match, _human(text))
