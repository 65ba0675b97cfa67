"""The wire contract that the server and the client share. Torch-free: the client imports this module alone.

Error codes. A request that fails gets one of these codes; Triton answers it with the code's HTTP / gRPC status,
and its error text carries the code as a fixed token (see `error_token` below), so that a client decides by code,
never by the wording of a message:

  INVALID_ARG  HTTP 400, gRPC INVALID_ARGUMENT   the request is wrong; do not retry (InputError)
  UNAVAILABLE  HTTP 503, gRPC UNAVAILABLE        retry later (Unavailable; its reason says why)
  INTERNAL     HTTP 500, gRPC INTERNAL           a server fault; details in the server's log
"""

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
