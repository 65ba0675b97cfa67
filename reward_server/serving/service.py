"""Rank 0's service: decoded requests in, one response per request out, never an exception.

Errors are per row: a row that fails its checks gets NaN and its reason in `error`, the request's other rows
are scored. A request with no row left to score gets a status of its own (statuses.py: HTTP 400 / gRPC
INVALID_ARGUMENT with a one-line reason for input errors), the same whether Triton batched it with others or
not. A forward that fails alike on every rank (input that slipped past the checks) is retried apart by the leader,
request by request and then row by row, so that only the bad rows fail.
"""

import logging
from typing import Callable, List

import numpy as np
import torch

from ..engine import ForwardError, Leader
from ..protocol import ERROR_KINDS, INTERNAL, InputError, Unavailable, code_of
from .drain import Admission
from .inputs import RequestDecoder, Row, good
from .statuses import failure, row_text

log = logging.getLogger("reward_server.server")


def merge_rows(n: int, at: List[int], scored: dict, failed: dict) -> dict:
    """Arrays of n rows: the scored rows at indices `at`, the failed rows' values elsewhere (columns padded with
    NaN, or 0 for integers, where the two differ in width)."""
    out = {}
    for key, values in scored.items():
        fill = failed[key]
        width = max(values.shape[1], fill.shape[1])
        pad = np.nan if np.issubdtype(values.dtype, np.floating) else 0
        merged = np.full((n, width), pad, dtype=values.dtype)
        merged[:, : fill.shape[1]] = fill
        merged[at] = pad
        merged[at, : values.shape[1]] = values
        out[key] = merged
    return out


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
    """The infer functions. They never raise (PyTriton would fail the whole Triton batch with a traceback): each
    request gets its rewards, with NaN and a reason in `error` for each row that could not be scored, or, when
    no row of it could be, a status of its own (statuses.py: 400 for input errors, 503 to retry, 500)."""

    def __init__(self, leader: Leader, decoder: RequestDecoder, outputs, metrics=None):
        self.leader = leader
        self.decoder = decoder
        self.outputs = outputs  # ScalarOutputs or prm.StepOutputs
        self.metrics = metrics  # metrics.Metrics, or None
        self.admission = Admission()  # drain.py: which requests a draining server still takes

    def infer_native(self, requests) -> List[dict]:
        return self._admitted(requests, self.decoder.native, "native")

    def infer_nemo(self, requests) -> List[dict]:
        return self._admitted(requests, self.decoder.nemo, "nemo")

    def infer_openrlhf(self, requests) -> List[dict]:
        """openrlhf.py's requests ({"text": column}); never in Triton's queue, so refused once draining."""
        return self._admitted(requests, self.decoder.native, "openrlhf")

    def _admitted(self, requests, decode: Callable, model: str) -> List[dict]:
        admit, refusal = self.admission.admit(requests, model)
        taken = [request for request, ok in zip(requests, admit) if ok]
        answers = iter(self._infer(taken, decode) if taken else [])
        return [next(answers) if ok else self._failure(refusal) for ok in admit]

    def _infer(self, requests, decode: Callable) -> List[dict]:
        try:
            decoded = [self._decode(decode, request) for request in requests]
            batches = [good(rows) for rows in decoded if not isinstance(rows, InputError)]
            scored = iter(self._score(batches))
            return [self._failure(rows) if isinstance(rows, InputError) else self._response(rows, next(scored))
                    for rows in decoded]
        except Exception as exc:  # shutting down, ranks failed, or our own bug: every request of the batch
            if code_of(exc) == INTERNAL:
                log.exception("a batch of %d request(s) failed", len(requests))
            return [self._failure(exc) for _ in requests]

    def _failure(self, exc: BaseException) -> dict:
        self._count(code_of(exc))
        return failure(exc)

    def _count(self, code: str, n: int = 1) -> None:
        if self.metrics is not None and n:
            self.metrics.error(ERROR_KINDS[code], n)

    def _response(self, rows: List[Row], results: list) -> dict:
        """One request's response: `rows` as decoded, `results` (a reward row or an exception) for its good rows."""
        results = iter(results)
        outcome = [r if isinstance(r, InputError) else next(results) for r in rows]
        outcome = [type(r)(f"row {i}: {r}") if isinstance(r, BaseException) and not isinstance(r, InputError) else r
                   for i, r in enumerate(outcome)]
        excs = [r for r in outcome if isinstance(r, BaseException)]
        if len(excs) == len(rows):
            return self._failure(row_failure(excs))
        for exc in excs:
            self._count(code_of(exc))
        if not excs:  # the usual case: nothing to merge
            return {**self.outputs.scored(np.stack(outcome), rows),
                    "error": np.full((len(rows), 1), b"", dtype=object)}
        at = [i for i, r in enumerate(outcome) if not isinstance(r, BaseException)]
        scored = self.outputs.scored(np.stack([outcome[i] for i in at]), [rows[i] for i in at])
        response = merge_rows(len(rows), at, scored, self.outputs.failed(len(rows)))
        errors = [row_text(i, r).encode() if isinstance(r, BaseException) else b"" for i, r in enumerate(outcome)]
        response["error"] = np.array(errors, dtype=object).reshape(-1, 1)
        return response

    def _decode(self, decode: Callable, request):
        try:
            return decode(request)
        except InputError as exc:  # without its traceback: its frames hold the request's data (a 50 MB body)
            return exc.with_traceback(None)
        except Exception as exc:  # a check we did not foresee: still this request's error, not the batch's
            log.exception("decoding a request failed")
            return InputError(f"bad request: {type(exc).__name__}: {exc}")

    def _score(self, batches: List[List[np.ndarray]]) -> List[list]:
        """Each batch's rows: a reward row per sequence, or the ForwardError of a sequence that failed in a forward
        of its own (the leader scores the works of a failed forward apart, engine/retry.py). An Unavailable error
        (shutting down, overloaded, ranks failed) fails the whole batch."""
        futures = self.leader.submit_batch([[torch.from_numpy(ids) for ids in b] for b in batches])
        return [[row if exc is None else exc for row, exc in zip(scored.rewards, scored.errors)]
                for scored in (f.result() for f in futures)]
