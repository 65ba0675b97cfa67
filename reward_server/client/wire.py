"""The wire format of RemoteGPTRMClient: what a caller's batch becomes (one row per sequence: text, a chat
conversation as JSON, or token ids as decimal text) and the Triton binary request and response bodies
(tritonclient's codec)."""

import json
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from tritonclient.http import InferenceServerClient as _Codec
from tritonclient.http import InferInput

from ..protocol import parse_error
from .errors import RewardServerError, rows_error


@dataclass
class Scores:
    """Everything the server answered for one batch, in input order. `rewards`: [batch, num_labels] (normalized
    when the client has reward_mean / reward_std). `step_rewards`: a process reward model's per-step scores, one
    1-D array per sequence (its `num_steps` values, padding removed), or None when the model returns none."""

    rewards: object
    step_rewards: Optional[list] = None


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


def parse_response(data: bytes, header_length: Optional[int], n: int, start: int, what: str, url: str):
    """(rewards [n, num_labels], per-step scores or None) from a 200 answer. Rows with an `error` raise the first
    one's error (errors.rows_error: by its token's code; its row from the token, else its place in `error`; the
    index in the caller's batch is start + row)."""
    result = _Codec.parse_response_body(data, header_length=header_length)
    errors = result.as_numpy("error")
    if errors is not None:
        parsed = [(i, parse_error(bytes(e).decode("utf-8", "replace"))) for i, e in enumerate(errors.reshape(-1)) if e]
        if parsed:
            raise rows_error([(i if p.row is None else p.row, p) for i, p in parsed], start, n, every=False)
    rewards = result.as_numpy("rewards")
    if rewards is None or rewards.shape[0] != n:
        raise RewardServerError(f"{url} answered {what} without {n} rows of rewards")
    step_rewards, num_steps = result.as_numpy("step_rewards"), result.as_numpy("num_steps")
    steps = None
    if step_rewards is not None and num_steps is not None:
        steps = [step_rewards[i, : int(k)].astype(np.float32) for i, k in enumerate(num_steps.reshape(-1))]
    return rewards.astype(np.float32, copy=False), steps


def error_text(body: bytes) -> str:
    """The text of a failed answer: Triton's {"error": text}, or the body itself (a proxy's page)."""
    text = body.decode("utf-8", "replace")
    try:
        return str(json.loads(text).get("error", text))
    except (ValueError, AttributeError):
        return text
