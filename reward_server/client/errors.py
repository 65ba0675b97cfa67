"""What RemoteGPTRMClient raises (client.py's users import them from reward_server.client), and how a server's
failed answer becomes one of these: by the error code in its text's token (protocol.py), or by its HTTP status
when it carries none (a server older than the tokens, a proxy in between); the row from the token. The wording of
a message is only ever shown, never read."""

from typing import List, NamedTuple, Optional, Tuple

from ..protocol import HTTP_STATUS, INTERNAL, INVALID_ARG, ParsedError, parse_error, parse_errors


class RewardServerError(RuntimeError):
    """The server did not score a batch. `index`: the failing sequence's position in the caller's batch (the
    first one when several failed; None when the failure is not one sequence's); `server_message`: the server's
    own words; `code`: the server's error code (protocol.py: INVALID_ARG, UNAVAILABLE, INTERNAL), None when the
    failure is not a server's answer."""

    def __init__(self, message: str, index: Optional[int] = None, server_message: str = "",
                 code: Optional[str] = None):
        super().__init__(message)
        self.index = index
        self.server_message = server_message
        self.code = code


class RewardInputError(RewardServerError, ValueError):
    """A sequence failed the server's checks (empty, id outside the vocabulary, too long, ...). Never retried."""


class RewardServerUnavailable(RewardServerError, ConnectionError):
    """The server could not be reached (refused, reset, unknown host, 503) after the bounded retries. `reason`:
    what the last attempt met (http.py: cannot_connect, connection_lost, loading; or the server's own 503 reason:
    overloaded, shutting_down, ranks_failed, unavailable)."""

    def __init__(self, message: str, index: Optional[int] = None, server_message: str = "",
                 code: Optional[str] = None, reason: str = ""):
        super().__init__(message, index, server_message, code)
        self.reason = reason


class RewardTimeout(RewardServerError, TimeoutError):
    """A request got no answer within `request_timeout_s`. Not retried: the server may still be working on it."""


class RewardCancelled(RewardServerError):
    """The call was cancelled (RewardFuture.cancel(), a cancelled ainfer_rm, or the client was closed)."""


CODE_OF_HTTP = {status: code for code, status in HTTP_STATUS.items()}
MAX_SHOWN_CHARS = 2000  # of a server text without a token (a traceback from a server older than the tokens)


class ServerFailure(NamedTuple):
    """A failed answer (not 200) as the client reads it."""

    code: str  # the token's code, or the one of the HTTP status (anything but 400 and 503: INTERNAL)
    reason: str  # UNAVAILABLE's reason ("" if none)
    rows: List[ParsedError]  # the rows named, when every row of the request failed
    message: str  # the human message, tokens taken out


def read_failure(status: int, text: str) -> ServerFailure:
    own = parse_error(text)
    code = own.code if own.code in HTTP_STATUS else CODE_OF_HTTP.get(status, INTERNAL)
    message = own.message if own.code else " ".join(text.split())[:MAX_SHOWN_CHARS]
    return ServerFailure(code, own.reason, [p for p in parse_errors(text) if p.row is not None], message)


def rows_error(failed: List[Tuple[int, ParsedError]], start: int, n: int, every: bool) -> RewardServerError:
    """The error of a request some rows of which failed ((row, its token) in row order; every: all n did), by
    the first: RewardInputError for INVALID_ARG (or no code: a row error of a server without tokens), else
    RewardServerError; `index` is its position in the caller's batch (rows start..start+n-1 of it)."""
    row, first = failed[0]
    index, code = start + row, first.code or INVALID_ARG
    what = "rejected by the reward server" if code == INVALID_ARG else f"failed on the reward server ({code})"
    message = f"sequence {index} {what}: {first.message}"
    if every and n > 1:
        message += f" (every sequence of {start}..{start + n - 1} failed)"
    elif len(failed) > 1:
        message += f" ({len(failed) - 1} more of sequences {start}..{start + n - 1} failed too)"
    return (RewardInputError if code == INVALID_ARG else RewardServerError)(message, index, first.message, code)


def request_error(status: int, text: str, start: int, n: int, url: str, what: str) -> RewardServerError:
    """The error of a request that the server failed whole (rows start..start+n-1 of the caller's batch), which
    is not to be retried (http.py retries UNAVAILABLE)."""
    failure = read_failure(status, text)
    if failure.rows:  # every row failed: the first rows' codes and indices
        return rows_error([(p.row, p) for p in failure.rows], start, n, every=True)
    if failure.code == INVALID_ARG:
        return RewardInputError(f"sequences {start}..{start + n - 1} rejected by the reward server: "
                                f"{failure.message}", None, failure.message, INVALID_ARG)
    return RewardServerError(f"{url} failed {what} (HTTP {status}): {failure.message}", None, failure.message,
                             failure.code)
