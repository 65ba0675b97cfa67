"""What RemoteGPTRMClient raises, and how a server's error text becomes one of these (client.py's users import them
from reward_server.client)."""

import re
from typing import Optional, Sequence, Tuple

class RewardServerError(RuntimeError):
    """The server did not score a batch. `index`: the failing sequence's position in the caller's batch (None
    when the failure is not one sequence's); `server_message`: the server's own reason."""

    def __init__(self, message: str, index: Optional[int] = None, server_message: str = ""):
        super().__init__(message)
        self.index = index
        self.server_message = server_message


class RewardInputError(RewardServerError, ValueError):
    """A sequence failed the server's checks (empty, id outside the vocabulary, too long, ...). Never retried."""


class RewardServerUnavailable(RewardServerError, ConnectionError):
    """The server could not be reached (refused, reset, unknown host, 503) after the bounded retries."""


class RewardTimeout(RewardServerError, TimeoutError):
    """A request got no answer within `request_timeout_s`. Not retried: the server may still be working on it."""


class RewardCancelled(RewardServerError):
    """The call was cancelled (RewardFuture.cancel(), a cancelled ainfer_rm, or the client was closed)."""


_EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*): (.*\S)\s*$")
_ROW = re.compile(r"(?:^|; )row (\d+): ")


def server_reason(text: str) -> Tuple[str, str]:
    """(exception class, message) from a server error text: Triton wraps a failed execution's traceback into
    the HTTP error; keep only the last exception line (`reward_server.inputs.InputError: row 3: empty text`).
    Plain messages come back as ("", first line)."""
    found = ("", text.strip().splitlines()[0] if text.strip() else "")
    for line in text.splitlines():
        m = _EXCEPTION_LINE.match(line)
        if m:
            cls = m.group(1).rsplit(".", 1)[-1]
            if cls != "TritonModelException" and (cls.endswith(("Error", "Exception")) or cls == "ShuttingDown"):
                found = (cls, m.group(2))
    return found


def input_error(message: str, start: int, n: int, flagged: Sequence[int] = ()) -> RewardInputError:
    """The failing sequence's index in the caller's batch: the server's message names a row of the request
    (rows start..start+n-1 of the batch)."""
    rows = _ROW.findall(message)
    if len(rows) == 1:
        index = start + int(rows[0])
        detail = _ROW.sub("", message, count=1)
        return RewardInputError(f"sequence {index} rejected by the reward server: {detail}", index, message)
    if len(rows) == 0 and 0 < len(flagged) < n:
        index = start + flagged[0]
        return RewardInputError(f"sequence {index} rejected by the reward server: {message}", index, message)
    # several messages: Triton merged this request with other clients' failing requests and failed them together
    return RewardInputError(f"one of sequences {start}..{start + n - 1} rejected by the reward server "
                            f"(its message may include other requests' errors): {message}", None, message)
