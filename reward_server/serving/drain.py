"""The drain's admission rule: once a drain begins, new requests are refused at once, except those that Triton
had already accepted (they are scored)."""

import logging
import threading
import time
from typing import List, Optional, Tuple

from ..engine import ShuttingDown
from ..protocol import Unavailable
from . import proxy_status

log = logging.getLogger("reward_server.drain")

STUB_HANDOFF_S = 1.0  # while draining: more than Triton ever takes to hand a dequeued batch to its Python stub
DRAIN_POLL_S = 0.05  # while draining: how often to look whether every accepted request was answered


class Admission:
    """Which requests a draining server still takes. Not draining: all of them."""

    def __init__(self):
        self.refusing: Optional[Unavailable] = None  # set while draining or failed: new requests get 503 at once
        self._admit: dict = {}  # while draining: per model, requests still to take (queued in Triton before)
        self._dequeued_before = 0.0  # while draining: requests the stub took from Triton's queue before this time
        self.drained = {"in flight": 0, "queued": 0, "refused": 0}  # while draining: requests admitted, by rule
        self.unready: Optional[str] = None  # why the API port's GET /health fails: set first thing in a drain,
        # before the first refusal, so that a load balancer probing it stops sending before anyone gets a 503
        self._lock = threading.Lock()

    def not_ready(self, why: str) -> None:
        """GET /health (serving/api.py) fails from now on, with `why`."""
        self.unready = self.unready or why

    def health(self) -> Optional[str]:
        """None while this server takes requests; else why not (draining, or the ranks failed)."""
        if self.unready:
            return self.unready
        return str(self.refusing) if self.refusing is not None else None

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


def drain_then_stop(server, service, leader, metrics, triton, signalled: float, ports=()) -> None:
    """The drain after SIGTERM / SIGINT (`signalled`: time.monotonic() of the signal), on a thread of its own: new
    requests get 503 at once while Triton still answers them; those already accepted (at rank 0, or waiting in
    Triton's queue) are scored; then `server.drain_refuse_s` more of refusals, Triton's stop (at most
    `server.triton_exit_timeout_s`) and the leader's, after which every rank exits 0. `ports`: our own aiohttp ports
    (serving/api.py ApiServer), stopped before Triton: they stop listening, answer what is in flight and close
    connections that every drain answer already asked the client to close (`Connection: close`)."""
    queued = metrics.triton_queued()
    service.admission.drain(ShuttingDown("the reward server is shutting down; retry"),
                            {"native": queued.get(server.model_name, 0), "nemo": queued.get(server.nemo_model_name, 0)},
                            dequeued_before=time.monotonic() + STUB_HANDOFF_S)
    log.info("draining: refusing new requests %.1f s after the signal; %d request(s) waiting in Triton's queue, "
             "%d batch(es) at rank 0", time.monotonic() - signalled, sum(queued.values()), leader.queued_batches)
    deadline = time.monotonic() + server.drain_timeout_s
    while (leader.queued_batches or service.admission.admitting()) and time.monotonic() < deadline:
        time.sleep(DRAIN_POLL_S)
    answered = time.monotonic() - signalled
    time.sleep(server.drain_refuse_s)  # clients sending now get a clear 503, not a reset from Triton's stop
    drained = service.admission.drained
    log.info("drained: accepted requests answered %.1f s after the signal; admitted after it: %d on their way from "
             "Triton, %d from its queue; %d refused", answered, drained["in flight"], drained["queued"],
             drained["refused"])
    for port in ports:
        port.stop(timeout_s=server.triton_exit_timeout_s)
    started = time.monotonic()
    triton.stop()  # waits for requests still in flight, at most server.triton_exit_timeout_s
    log.info("Triton stopped in %.1f s (%.1f s after the signal)", time.monotonic() - started,
             time.monotonic() - signalled)
    leader.close()
