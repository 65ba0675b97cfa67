"""The wire format of RemoteGPTRMClient: what a caller's batch becomes (one row per sequence: text, a chat
conversation as JSON, or token ids as decimal text) and the Triton binary request and response bodies
(tritonclient's codec)."""

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from tritonclient.http import InferenceServerClient as _Codec
from tritonclient.http import InferInput

from ..protocol import ParsedError, parse_error
from .errors import (RewardServerError, RowError, ServerFailure, row_errors, rows_error, whole_request_error,
                     whole_request_rows)


@dataclass
class Scores:
    """Everything the server answered for one batch, in input order. `rewards`: [batch, num_labels] (normalized
    when the client has reward_mean / reward_std), NaN in the rows that failed. `step_rewards`: a process reward
    model's per-step scores, one 1-D array per sequence (its `num_steps` values, padding removed; empty for a
    row that failed), or None when the model returns none. `errors`: {index: RowError} of the rows the server
    refused or failed (only ever non-empty with on_row_error="nan"; otherwise the call raises)."""

    rewards: object
    step_rewards: Optional[list] = None
    errors: Dict[int, RowError] = field(default_factory=dict)


@dataclass
class Part:
    """One request's answer: rows start..start+n-1 of the caller's batch. `rewards` [n, num_labels] with NaN in
    the failed rows, None when the request failed as a whole (`failure`: that answer); `steps` a PRM's per-step
    scores (empty for a failed row) or None; `rows` the failed rows of a 200 answer, (row, its token) each."""

    start: int
    n: int
    rewards: Optional[np.ndarray] = None
    steps: Optional[list] = None
    rows: List[Tuple[int, ParsedError]] = field(default_factory=list)
    failure: Optional[ServerFailure] = None

    @property
    def failed(self) -> bool:
        return self.failure is not None or bool(self.rows)

    def errors(self) -> Dict[int, RowError]:
        """{index in the caller's batch: RowError} of the rows that failed."""
        if self.failure is not None:
            return whole_request_rows(self.failure, self.start, self.n)
        return row_errors(self.rows, self.start)

    def error(self) -> RewardServerError:
        """This request's error, as the client raised it before per-row results (by its first failed row)."""
        if self.failure is not None:
            return whole_request_error(self.failure, self.start, self.n)
        return rows_error(self.rows, self.start, self.n, every=False)


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _numpy(x) -> np.ndarray:
    """A numpy copy of an array-like (torch tensors on any device included), so the caller may reuse its buffer
    as soon as infer_rm returns."""
    if _is_torch(x):
        return x.detach().cpu().numpy().copy()
    return np.array(x)


def _checked_ids(ids: np.ndarray, where: str) -> np.ndarray:
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise TypeError(f"{where}: token ids must be a 1-D sequence of integers, got {ids.dtype} {list(ids.shape)}")
    return ids


def _wire(row) -> bytes:
    """A `token_ids` row as the server reads it: decimal ids separated by spaces."""
    return row if isinstance(row, bytes) else " ".join(map(str, row.tolist())).encode()


def _is_conversation(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) for m in x)


_TOKEN_KEYS = ("response_tokens", "tokens")
_LENGTH_KEYS = ("response_lengths", "sequence_lengths")


def encode_batch(batch, lengths=None) -> Tuple[str, list, bool]:
    """(input name, one row per sequence, whether the caller used torch). A row is encoded text (bytes) or a
    copy of the sequence's token ids (the worker threads write them out). Accepts:
      - a list of str                               -> `text`, tokenized on the server
      - a list of chat conversations ([{role, content}, ...]) -> `messages`
      - a list of 1-D token id sequences (lists, numpy arrays, torch tensors)   -> `token_ids`
      - a token matrix [batch, L] (numpy / torch) with `lengths` [batch]        -> `token_ids`, padding dropped
      - a rollout-batch dict: `response_tokens` [batch, L] + `response_lengths` [batch] (NeMo-Aligner's names;
        `tokens` + `sequence_lengths` also work)
    """
    if isinstance(batch, dict):
        tokens = next((batch[k] for k in _TOKEN_KEYS if k in batch), None)
        if lengths is None:
            lengths = next((batch[k] for k in _LENGTH_KEYS if k in batch), None)
        if tokens is None or lengths is None:
            raise KeyError(f"a rollout batch needs one of {_TOKEN_KEYS} and one of {_LENGTH_KEYS}; got {list(batch)}")
        batch = tokens
    as_torch = _is_torch(batch)
    if as_torch or isinstance(batch, np.ndarray):
        matrix = _numpy(batch)
        if matrix.ndim != 2:
            raise TypeError(f"a token array must be [batch, length], got shape {list(matrix.shape)}")
        if lengths is None:
            raise ValueError("pass lengths with a token matrix (for rows without padding: [length] * batch)")
        lengths = _numpy(lengths).reshape(-1)
        if lengths.shape[0] != matrix.shape[0]:
            raise ValueError(f"lengths has {lengths.shape[0]} entries, the token matrix {matrix.shape[0]} rows")
        if lengths.size and (lengths.min() < 0 or lengths.max() > matrix.shape[1]):
            raise ValueError(f"lengths must lie in [0, {matrix.shape[1]}]")
        _checked_ids(matrix[0] if len(matrix) else matrix.reshape(-1), "the token matrix")
        return "token_ids", [matrix[i, : int(n)] for i, n in enumerate(lengths)], as_torch
    if lengths is not None:
        raise ValueError("lengths goes with a token matrix or a rollout batch, not with a list of sequences")
    if not isinstance(batch, (list, tuple)):
        raise TypeError(f"cannot score a {type(batch).__name__}; see RemoteGPTRMClient.infer_rm for the inputs")
    if all(isinstance(s, str) for s in batch):
        return "text", [s.encode("utf-8") for s in batch], False
    if all(_is_conversation(s) for s in batch):
        return "messages", [json.dumps(s).encode("utf-8") for s in batch], False
    as_torch = any(_is_torch(s) for s in batch)
    return "token_ids", [_checked_ids(_numpy(s), f"sequence {i}") for i, s in enumerate(batch)], as_torch


def request_body(name: str, rows: list) -> Tuple[bytes, dict]:
    """(body, headers) of one request scoring `rows` with input `name`."""
    n = len(rows)
    tensor = InferInput(name, [n, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([_wire(r) for r in rows], dtype=object).reshape(n, 1))
    body, json_size = _Codec.generate_request_body([tensor])
    headers = {"Content-Type": "application/octet-stream"}
    if json_size is not None:
        headers["Inference-Header-Content-Length"] = str(json_size)
    return body, headers


class MalformedAnswer(RewardServerError):
    """A 200 answer that is not what a reward server answers (wire.read_response)."""


def _outputs(data: bytes, header_length: Optional[int], what: str, url: str) -> dict:
    """{name: numpy array} of a Triton inference answer (binary or JSON); MalformedAnswer if it is not one."""
    try:
        result = _Codec.parse_response_body(data, header_length=header_length)
        names = [o.get("name") for o in result.get_response().get("outputs", [])]
        return {name: result.as_numpy(name) for name in names if isinstance(name, str)}
    except Exception as exc:  # tritonclient's own, json's, numpy's: the body is not a Triton answer
        start = data[:80].decode("utf-8", "replace") if isinstance(data, bytes) else repr(data)[:80]
        raise MalformedAnswer(f"{url} answered {what} with HTTP 200 but not a Triton inference answer "
                              f"({type(exc).__name__}: {exc}; it starts {start!r}): is this the server's HTTP "
                              f"port?") from exc


def read_response(data: bytes, header_length: Optional[int], n: int, start: int, what: str, url: str) -> Part:
    """A 200 answer to a request of n rows (rows start.. of the caller's batch) as a Part: the rewards with NaN in
    the rows that failed, a PRM's per-step scores, the failed rows (by their token: its code; its row from the
    token, else its place in `error`). MalformedAnswer when the answer is not a reward server's: no `rewards`,
    a shape or type that does not fit n rows."""
    outputs = _outputs(data, header_length, what, url)

    def bad(why: str) -> MalformedAnswer:
        return MalformedAnswer(f"{url} answered {what} with {why}")

    rewards, errors = outputs.get("rewards"), outputs.get("error")
    if rewards is None:
        raise bad(f"no `rewards` output (outputs: {sorted(outputs)}): is model the reward server's native model?")
    if rewards.ndim == 1:
        rewards = rewards.reshape(-1, 1)
    if rewards.ndim != 2 or rewards.shape[0] != n or not np.issubdtype(rewards.dtype, np.number):
        raise bad(f"`rewards` {rewards.dtype} {list(rewards.shape)}, not {n} rows of numbers")
    rewards = rewards.astype(np.float32)  # a copy: failed rows are set to NaN below
    rows: List[Tuple[int, ParsedError]] = []
    if errors is not None:
        if errors.size != n or errors.dtype != object:
            raise bad(f"`error` {errors.dtype} {list(errors.shape)}, not {n} texts")
        for i, e in enumerate(errors.reshape(-1)):
            if e:
                p = parse_error(bytes(e).decode("utf-8", "replace"))
                rows.append((p.row if p.row is not None and 0 <= p.row < n else i, p))
    rows.sort(key=lambda r: r[0])
    failed = [r for r, _ in rows]
    rewards[failed] = np.nan
    steps = None
    step_rewards, num_steps = outputs.get("step_rewards"), outputs.get("num_steps")
    if step_rewards is not None and num_steps is not None:
        if (step_rewards.ndim != 2 or step_rewards.shape[0] != n or num_steps.size != n
                or not np.issubdtype(step_rewards.dtype, np.number) or not np.issubdtype(num_steps.dtype, np.integer)
                or num_steps.min(initial=0) < 0 or num_steps.max(initial=0) > step_rewards.shape[1]):
            raise bad(f"`step_rewards` {list(step_rewards.shape)} / `num_steps` {list(num_steps.shape)} that do "
                      f"not fit {n} rows")
        steps = [step_rewards[i, : int(k)].astype(np.float32) for i, k in enumerate(num_steps.reshape(-1))]
        for i in failed:
            steps[i] = np.zeros(0, dtype=np.float32)
    return Part(start, n, rewards, steps, [(r, p) for r, p in rows])


def parse_response(data: bytes, header_length: Optional[int], n: int, start: int, what: str, url: str):
    """(rewards [n, num_labels], per-step scores or None) from a 200 answer in which every row was scored; rows
    with an `error` raise the first one's error (errors.rows_error; the index in the caller's batch is
    start + row). The client itself keeps every row (read_response)."""
    part = read_response(data, header_length, n, start, what, url)
    if part.rows:
        raise part.error()
    return part.rewards, part.steps


def triton_error(body: bytes) -> Optional[str]:
    """The text of Triton's error answer ({"error": text}), None when `body` is not one (another server's page)."""
    try:
        text = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return text["error"] if isinstance(text, dict) and isinstance(text.get("error"), str) else None


def error_text(body: bytes) -> str:
    """The text of a failed answer: Triton's {"error": text}, or the body itself (a proxy's page)."""
    text = triton_error(body)
    return body.decode("utf-8", "replace") if text is None else text
