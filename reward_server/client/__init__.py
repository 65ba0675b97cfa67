"""RemoteGPTRMClient and what it raises: `from reward_server.client import RemoteGPTRMClient`.
Depends on reward_server.protocol alone (no torch): client.py schedules, wire.py encodes, http.py talks to one
server, pool.py chooses among servers and retries, errors.py holds the exceptions."""

from .client import RemoteGPTRMClient, host_port
from .errors import (RewardCancelled, RewardInputError, RewardServerError, RewardServerNotFound,
                     RewardServerUnavailable, RewardTimeout, RowError)
from .futures import RewardFuture
from .wire import Scores, encode_batch

__all__ = ["RemoteGPTRMClient", "RewardFuture", "Scores", "RowError", "RewardServerError", "RewardInputError",
           "RewardServerUnavailable", "RewardServerNotFound", "RewardTimeout", "RewardCancelled", "encode_batch",
           "host_port"]
