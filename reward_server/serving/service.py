"""Rank 0's service: `score` takes decoded requests (requests.py) to the leader and back, never raising.

Errors are per row: a row that fails its checks gets its error, the request's other rows are scored. A request
with no row left to score gets an error of its own (row_failure: an input error when every row's is), the same
whether it came with others or not. A forward that fails alike on every rank (input that slipped past the checks)
is retried apart by the leader (engine/retry.py), so that only the bad rows fail. The front doors shape the
results (triton_infer.py, openrlhf.py).
"""

import logging
from concurrent.futures import Future
from typing import List

import numpy as np
import torch

from ..engine import ForwardError, Leader
from ..protocol import ERROR_KINDS, INTERNAL, InputError, Unavailable, code_of
from .drain import Admission
from .inputs import RequestDecoder, good
from .requests import ScoreRequest, ScoreResult
from .statuses import row_text

log = logging.getLogger("reward_server.server")

MESSAGE_ROWS = 3  # rows named in the message of a request whose every row failed


def row_failure(excs: List[BaseException]) -> BaseException:
    """One error for a request none of whose rows could be scored: an input error when every row's is, else a
    server fault (or Unavailable); the message names the first rows."""
    shown = "; ".join(row_text(i, e) for i, e in enumerate(excs[:MESSAGE_ROWS]))  # every row failed: i is its row
    if len(excs) > MESSAGE_ROWS:
        shown += f"; and {len(excs) - MESSAGE_ROWS} more rows"
    if all(isinstance(e, InputError) for e in excs):
        return InputError(shown)
    return next((type(e)(shown) for e in excs if isinstance(e, Unavailable)), ForwardError(shown))


class RewardService:
    """Scores decoded requests: each request's good rows are one work of the leader; the results come back per
    row. The front doors hold the service's decoder (their requests' decoding), its outputs (the reward kind's
    shapes) and its admission (the drain's rule)."""

    def __init__(self, leader: Leader, decoder: RequestDecoder, outputs, metrics=None):
        self.leader = leader
        self.decoder = decoder
        self.outputs = outputs  # ScalarOutputs or prm.StepOutputs
        self.metrics = metrics  # metrics.Metrics, or None
        self.admission = Admission()  # drain.py: which requests a draining server still takes

    def score(self, request: ScoreRequest) -> ScoreResult:
        return self.score_batch([request])[0]

    def score_batch(self, requests: List[ScoreRequest]) -> List[ScoreResult]:
        """One result per request, never an exception. The requests go to the leader together (a Triton batch:
        the leader takes them in one go), each its own work; every error is counted in the metrics."""
        try:
            live = [r for r in requests if r.error is None]
            futures = iter(self.leader.submit_batch([[torch.from_numpy(ids) for ids in good(r.rows)] for r in live]))
            results = [ScoreResult(error=r.error) if r.error is not None else self._result(r, next(futures))
                       for r in requests]
        except Exception as exc:  # our own bug: every request of the batch
            log.exception("a batch of %d request(s) failed", len(requests))
            results = [ScoreResult(error=exc) for _ in requests]
        for result in results:
            if result.error is not None:
                self.count(result.error)
            else:
                for exc in result.errors:
                    if exc is not None:
                        self.count(exc)
        return results

    def count(self, exc: BaseException) -> None:
        """Count an error in the metrics (by its code's kind)."""
        if self.metrics is not None:
            self.metrics.error(ERROR_KINDS[code_of(exc)], 1)

    def _result(self, request: ScoreRequest, fut: Future) -> ScoreResult:
        """One request's result: its rows as decoded, its good rows' work in `fut` (engine.Scored)."""
        try:
            scored = fut.result()
        except Exception as exc:  # the whole work: shutting down, overloaded, ranks failed
            if code_of(exc) == INTERNAL:
                log.exception("a request of %d row(s) failed", len(request.rows))
            return ScoreResult(errors=[r if isinstance(r, InputError) else exc for r in request.rows], error=exc)
        values, failed = iter(scored.rewards), iter(scored.errors)
        kept, errors = [], []  # the scored rows' rewards; each row's error
        for i, row in enumerate(request.rows):
            if isinstance(row, InputError):
                errors.append(row)
                continue
            value, exc = next(values), next(failed)
            if exc is None:
                kept.append(value)
            errors.append(None if exc is None else type(exc)(f"row {i}: {exc}"))  # the leader's errors name no row
        if all(e is not None for e in errors):
            return ScoreResult(errors=errors, error=row_failure(errors))
        at = [i for i, e in enumerate(errors) if e is None]
        return ScoreResult(errors=errors, outputs=self.outputs.scored(np.stack(kept), [request.rows[i] for i in at]))
