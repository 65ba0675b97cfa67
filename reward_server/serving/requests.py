"""The service's typed API (RewardService.score), shared by the front doors and the service. Torch-free.

A front door (Triton's infer functions, triton_infer.py; the OpenRLHF adapter, openrlhf.py) decodes each request
into a ScoreRequest, the service scores it into a ScoreResult, and the door shapes that into its own answer."""

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import numpy as np

from ..protocol import InputError
from .inputs import Row

log = logging.getLogger("reward_server.server")


@dataclass
class ScoreRequest:
    """One request: its decoded rows (checked token ids, or that row's InputError), or the error that failed it
    before scoring (its decoding, the drain's refusal)."""

    rows: List[Row] = field(default_factory=list)
    error: Optional[BaseException] = None

    @classmethod
    def decoded(cls, decode: Callable[[Any], List[Row]], raw) -> "ScoreRequest":
        """`decode(raw)` (an inputs.RequestDecoder method); its request-level InputError, or a check we did not
        foresee, becomes this request's error, never the batch's."""
        try:
            return cls(decode(raw))
        except InputError as exc:  # without its traceback: its frames hold the request's data (a 50 MB body)
            return cls(error=exc.with_traceback(None))
        except Exception as exc:
            log.exception("decoding a request failed")
            return cls(error=InputError(f"bad request: {type(exc).__name__}: {exc}"))


@dataclass
class ScoreResult:
    """One request's outcome: per row its outputs or its error; `error` when no row could be scored (then it is
    the request's answer: 400 when every row's error is an input error, else 503 or 500)."""

    errors: List[Optional[BaseException]] = field(default_factory=list)  # per row; None where scored. Each
    # message names its row ("row 3: ...")
    outputs: Optional[dict] = None  # the reward kind's outputs (kinds/: `rewards`, PRM's `step_rewards` and
    # `num_steps`) of the scored rows, in row order: one row per index of `scored`
    error: Optional[BaseException] = None

    @property
    def scored(self) -> List[int]:
        """Indices of the rows that were scored."""
        return [i for i, e in enumerate(self.errors) if e is None]

    def rewards(self) -> np.ndarray:
        """`rewards` of every row [n, width], NaN in the rows that failed (after checking `error`)."""
        values = self.outputs["rewards"]
        out = np.full((len(self.errors), values.shape[1]), np.nan, dtype=values.dtype)
        out[self.scored] = values
        return out
