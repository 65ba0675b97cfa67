"""The engine's errors: what a caller's future fails with."""

import torch

from ..protocol import RANKS_FAILED, OVERLOADED, SHUTTING_DOWN, Unavailable


class ForwardError(RuntimeError):
    """The forward failed alike for this batch (e.g. a request that slipped past the checks); the group is healthy."""


class RankFault(RuntimeError):
    """A rank cannot go on (out of memory): every rank exits non-zero so that torchrun restarts the group."""


class ShuttingDown(Unavailable):
    """The server is draining and takes no new work."""

    reason = SHUTTING_DOWN


class Overloaded(Unavailable):
    """More tokens are queued than batching.max_queued_tokens: retry later."""

    reason = OVERLOADED


class RanksFailed(Unavailable):
    """The ranks' group broke (a rank died, hung or ran out of memory); torchrun restarts the server."""

    reason = RANKS_FAILED


# Errors after which a rank's state cannot be trusted; anything else counts as a bad batch.
FATAL_ERRORS = (torch.OutOfMemoryError, MemoryError)
