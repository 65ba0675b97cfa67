"""The response of a request that failed: an error code and a one-line message, which PyTriton's proxy model
turns into Triton's own error response for that request alone (triton_patches.install, proxy_status.with_status),
with the code's HTTP / gRPC status (protocol.py). Never a traceback."""

import numpy as np

from ..protocol import code_of
from . import proxy_status


def failure(exc: BaseException) -> dict:
    """The response dict of a request that failed with `exc`."""
    message = " ".join(str(exc).split()) or type(exc).__name__  # one line
    return {proxy_status.STATUS: np.array([code_of(exc).encode()], dtype=object),
            proxy_status.MESSAGE: np.array([message.encode()], dtype=object)}
