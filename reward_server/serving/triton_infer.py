"""The Triton models' infer functions: each request of a Triton batch decoded (inputs.py, after the drain's
admission rule), the batch scored in one go (RewardService.score_batch), and each result shaped as the response
dict PyTriton sends: the reward kind's outputs with the failed rows merged in (NaN) and the `error` column, or,
when no row was scored, a status of its own (statuses.failure: 400 / 503 / 500, a one-line message). They never
raise: PyTriton would fail the whole Triton batch with a traceback."""

import logging
from typing import Callable, List

import numpy as np

from .requests import ScoreRequest, ScoreResult
from .service import RewardService
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


def response(result: ScoreResult, outputs) -> dict:
    """One request's response dict; `outputs`: the reward kind's (kinds/), for the failed rows' values."""
    if result.error is not None:
        return failure(result.error)
    n = len(result.errors)
    if not any(e is not None for e in result.errors):  # the usual case: nothing to merge
        return {**result.outputs, "error": np.full((n, 1), b"", dtype=object)}
    response = merge_rows(n, result.scored, result.outputs, outputs.failed(n))
    errors = [row_text(i, r).encode() if r is not None else b"" for i, r in enumerate(result.errors)]  # rows' texts
    response["error"] = np.array(errors, dtype=object).reshape(-1, 1)
    return response


class TritonInfer:
    """The infer functions of the `reward` (native) and `reward_model` (NeMo) models over one service."""

    def __init__(self, service: RewardService):
        self.service = service

    def native(self, requests) -> List[dict]:
        return self._infer(requests, self.service.decoder.native, "native")

    def nemo(self, requests) -> List[dict]:
        return self._infer(requests, self.service.decoder.nemo, "nemo")

    def _infer(self, requests, decode: Callable, model: str) -> List[dict]:
        service = self.service
        try:
            admit, refusal = service.admission.admit(requests, model)
            batch = [ScoreRequest.decoded(decode, request) if ok else ScoreRequest(error=refusal)
                     for request, ok in zip(requests, admit)]
            return [response(result, service.outputs) for result in service.score_batch(batch)]
        except Exception as exc:  # our own bug: every request of the batch
            log.exception("a batch of %d request(s) failed", len(requests))
            for _ in requests:
                service.count(exc)
            return [failure(exc) for _ in requests]
