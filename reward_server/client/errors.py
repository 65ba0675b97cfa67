"""What RemoteGPTRMClient raises (client.py's users import them from reward_server.client), and how a server's
failed answer becomes one of these: by the error code in its text's token (protocol.py), or by its HTTP status
when it carries none (a server older than the tokens, a proxy in between); the row from the token. The wording of
a message is only ever shown, never read."""

from typing import Dict, List, NamedTuple, Optional, Tuple

from ..protocol import HTTP_STATUS, INTERNAL, INVALID_ARG, ParsedError, parse_error, parse_errors


class RowError(str):
    """Why the server did not score one sequence: its message (a str, so `errors[3] == "empty sequence"` works)
    and `code`, the server's error code for the row (INVALID_ARG: the row failed the checks; INTERNAL: its
    forward failed)."""

    code: str

    def __new__(cls, message: str, code: str = INVALID_ARG):
        self = super().__new__(cls, message)
        self.code = code
        return self

    def __reduce__(self):
        return (RowError, (str(self), self.code))

    def __repr__(self) -> str:
        return f"RowError({str(self)!r}, code={self.code!r})"


class RewardServerError(RuntimeError):
    """The server did not score a batch, or not all of it. `index`: the failing sequence's position in the
    caller's batch (the first one when several failed; None when the failure is not one sequence's);
    `server_message`: the server's own words; `code`: the server's error code (protocol.py: INVALID_ARG,
    UNAVAILABLE, INTERNAL), None when the failure is not a server's answer.

    Raised by a call (`handle.result()`), it also carries what the call did score: `rewards` [batch, num_labels]
    as `result()` would have returned them (normalized; numpy or torch), NaN in every row not scored; `scored`,
    a bool numpy array [batch], True where the server scored the row; `errors` {index: RowError} of the rows
    the server refused or failed; `step_rewards` (a process reward model's, an empty array for a row not
    scored). `rewards` is None when nothing was scored and the model's width is not known (the call failed
    before any answer)."""

    rewards = None
    step_rewards = None
    scored = None
    errors: Dict[int, RowError] = {}

    def __init__(self, message: str, index: Optional[int] = None, server_message: str = "",
                 code: Optional[str] = None):
        super().__init__(message)
        self.index = index
        self.server_message = server_message
        self.code = code

    def _attach(self, rewards, step_rewards, scored, errors: Dict[int, RowError]) -> None:
        self.rewards, self.step_rewards, self.scored, self.errors = rewards, step_rewards, scored, errors


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


class RewardServerNotFound(RewardServerError):
    """The URL does not lead to the reward server's model: the host answers, but not as a Triton server (a
    metrics or gRPC port, another web service, a 404 to Triton's paths), or it is a Triton server without the
    model (a wrong `model_name`, or not a reward server). For a server never seen answering as a reward server,
    after `wait_for_server_s` (at once for an answer that cannot be a server starting up); `reason`: "not_triton"
    or "no_model"."""

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


# ------------------------------------------------------------------------------------------ per-row results


def row_errors(failed: List[Tuple[int, ParsedError]], start: int) -> Dict[int, RowError]:
    """{index in the caller's batch: RowError} of a request's failed rows ((row, its token) each; a row error
    without a token is an input error)."""
    return {start + row: RowError(p.message, p.code or INVALID_ARG) for row, p in failed}


def whole_request_rows(failure: ServerFailure, start: int, n: int) -> Dict[int, RowError]:
    """The rows of a request that the server failed as a whole (every row failed, or the request was refused):
    each row it named gets its own message and code, the others the request's."""
    named = {p.row: p for p in failure.rows if 0 <= p.row < n}
    verb = "refused" if failure.code == INVALID_ARG else "failed"
    rest = RowError(f"its request (sequences {start}..{start + n - 1}) was {verb} as a whole: {failure.message}",
                    failure.code)
    return {start + i: RowError(named[i].message, named[i].code or failure.code) if i in named else rest
            for i in range(n)}


def whole_request_error(failure: ServerFailure, start: int, n: int) -> RewardServerError:
    """The error of a request that the server failed as a whole, by its rows when it names them (request_error)."""
    rows = [(p.row, p) for p in failure.rows if 0 <= p.row < n]
    if rows:  # every row failed: the first rows' codes and indices
        return rows_error(rows, start, n, every=True)
    if failure.code == INVALID_ARG:
        return RewardInputError(f"sequences {start}..{start + n - 1} rejected by the reward server: "
                                f"{failure.message}", None, failure.message, INVALID_ARG)
    return RewardServerError(f"sequences {start}..{start + n - 1} failed on the reward server ({failure.code}): "
                             f"{failure.message}", None, failure.message, failure.code)


SHOWN_INDICES = 8  # of the other failed sequences, in the message of a call whose requests failed in several places


def call_error(firsts: List[Tuple[RewardServerError, int, int]], failed: List[int], batch: int) -> RewardServerError:
    """The error of a call some rows of which the server refused or failed: `firsts`, each failed request's own
    error with its rows (start, n), in batch order; `failed`, every failed index. One failed request: its error as
    ever; several: the first's, its message counting the others."""
    first, start, n = firsts[0]
    if len(firsts) == 1:
        return first
    mine = {first.index} if first.index is not None else set(range(start, start + n))
    others = [i for i in failed if i not in mine]
    shown = ", ".join(map(str, others[:SHOWN_INDICES])) + (", ..." if len(others) > SHOWN_INDICES else "")
    code = first.code or INVALID_ARG
    what = "rejected by the reward server" if code == INVALID_ARG else f"failed on the reward server ({code})"
    where = f"sequence {first.index}" if first.index is not None else f"sequences {start}..{start + n - 1}"
    message = (f"{where} {what}: {first.server_message} ({len(others)} more of the {batch} sequences failed too: "
               f"{shown})")
    return type(first)(message, first.index, first.server_message, first.code)
