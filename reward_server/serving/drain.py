"""The drain's admission rule: once a drain begins, new requests are refused at once, except those that Triton
had already accepted (they are scored)."""

import threading
from typing import List, Optional, Tuple

from ..protocol import Unavailable
from . import proxy_status


class Admission:
    """Which requests a draining server still takes. Not draining: all of them."""

    def __init__(self):
        self.refusing: Optional[Unavailable] = None  # set while draining or failed: new requests get 503 at once
        self._admit: dict = {}  # while draining: per model, requests still to take (queued in Triton before)
        self._dequeued_before = 0.0  # while draining: requests the stub took from Triton's queue before this time
        self.drained = {"in flight": 0, "queued": 0, "refused": 0}  # while draining: requests admitted, by rule
        self._lock = threading.Lock()

    def drain(self, refusal: Unavailable, pending: dict, dequeued_before: float) -> None:
        """Refuse new requests with `refusal`, except those that Triton had already accepted when the drain began:
        - those its stub took from Triton's queue before `dequeued_before` (time.monotonic(), taken after `pending`
          was read), which may still be on their way to us (proxy_status.py stamps them), and
        - `pending[model]` more (Triton's nv_inference_pending_request_count: requests waiting in its queue,
          handed over first in, first out): the first that many taken from the queue later.
        Requests sent after the signal may take the place of requests counted in `pending` that were taken in
        between and admitted by their stamp; so the rule errs towards scoring a few requests that came after the
        signal, never towards refusing one that came before."""
        with self._lock:
            self._admit = dict(pending)
            self._dequeued_before = dequeued_before
            self.refusing = refusal

    def admitting(self) -> bool:
        """Draining, with requests from Triton's queue still to come."""
        return any(n > 0 for n in self._admit.values())

    def admit(self, requests, model: str) -> Tuple[List[bool], Optional[Unavailable]]:
        """Whether each request is taken, and the refusal for those that are not."""
        with self._lock:
            refusal = self.refusing
            admit = [refusal is None or self._accepted_before(request, model) for request in requests]
            if refusal is not None:
                self.drained["refused"] += admit.count(False)
        return admit, refusal

    def _accepted_before(self, request, model: str) -> bool:
        """While draining (under the lock): whether this request was accepted before the signal."""
        dequeued = (getattr(request, "parameters", None) or {}).get(proxy_status.DEQUEUED)
        if isinstance(dequeued, float) and dequeued < self._dequeued_before:
            self.drained["in flight"] += 1
            return True
        if self._admit.get(model, 0) > 0:
            self._admit[model] -= 1
            self.drained["queued"] += 1
            return True
        return False
