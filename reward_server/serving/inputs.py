"""Turn Triton requests into checked token sequences. Every check happens here, on rank 0, before a batch is
broadcast: a malformed request is answered with an error and never reaches the other ranks.

Native model inputs (each request sends exactly one; every input has shape [batch, 1], so requests of any
sequence lengths are merged by Triton's dynamic batcher):
  text       BYTES  UTF-8 text, tokenized on the server (model.add_special_tokens)
  messages   BYTES  a JSON list of {"role": ..., "content": ...}, formatted with the tokenizer's chat template
  token_ids  BYTES  token ids as decimal text separated by spaces or commas ("1 2 3", "[1, 2, 3]")
NeMo-Aligner compatible inputs:
  sentences  BYTES [batch, 1]; or tokens INT64 [batch, L] right-padded + sequence_lengths INT64 [batch, 1]
"""

import json
from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np

from ..protocol import NATIVE_INPUTS, InputError

_ID_SEPARATORS = bytes.maketrans(b",[]", b"   ")
MAX_REASON_CHARS = 300  # a reason quoted from a library (a chat template's own error) is cut here


Row = Union[np.ndarray, InputError]  # a checked sequence, or why that row cannot be scored


def good(rows: List[Row]) -> List[np.ndarray]:
    return [r for r in rows if not isinstance(r, InputError)]


@dataclass
class SequenceRules:
    vocab_size: int
    max_length: int
    truncation: str  # error | left | right
    max_row_bytes: int  # a BYTES row (text, messages, token_ids) longer than this is refused before any parsing
    max_request_bytes: int  # a request whose BYTES inputs hold more than this is refused whole

    def apply(self, ids: np.ndarray, row: int) -> np.ndarray:
        if ids.size == 0:
            raise InputError(f"row {row}: empty sequence")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise InputError(f"row {row}: token id {bad} outside the vocabulary [0, {self.vocab_size})")
        if ids.size > self.max_length:
            if self.truncation == "left":
                return ids[-self.max_length:]
            if self.truncation == "right":
                return ids[: self.max_length]
            raise InputError(f"row {row}: {ids.size} tokens, more than the limit of {self.max_length}")
        return ids


def _per_row(values: list, fn) -> List[Row]:
    """fn(value, row) for each row; an InputError from one row is that row's result, the others go on. A row
    that already failed stays failed."""
    out: List[Row] = []
    for row, value in enumerate(values):
        if isinstance(value, InputError):
            out.append(value)
            continue
        try:
            out.append(fn(value, row))
        except InputError as exc:  # without its traceback, whose frames would keep the row's bytes alive
            out.append(exc.with_traceback(None))
    return out


class RequestDecoder:
    """Each method returns one Row per request row; an error that concerns the whole request (wrong inputs,
    shapes, size) raises InputError."""

    def __init__(self, tokenizer, rules: SequenceRules, add_special_tokens: bool):
        self.tokenizer = tokenizer
        self.rules = rules
        self.add_special_tokens = add_special_tokens

    def _column(self, request, name: str) -> np.ndarray:
        value = np.asarray(request[name])
        if value.ndim != 2 or value.shape[1] != 1:
            raise InputError(f"input {name!r} must have shape [batch, 1], got {list(value.shape)}")
        return value[:, 0]

    def _raw(self, column: np.ndarray) -> List[Union[bytes, InputError]]:
        """Each row's bytes, within the size limits (checked before anything reads the bytes)."""
        raw = [r if isinstance(r, bytes) else str(r).encode() for r in column]
        total, limit = sum(len(r) for r in raw), self.rules.max_request_bytes
        if total > limit:
            raise InputError(f"request of {total} bytes, more than the limit of {limit} (server.max_request_bytes)")
        limit = self.rules.max_row_bytes

        def within(r: bytes, row: int) -> bytes:
            if len(r) > limit:
                raise InputError(f"row {row}: {len(r)} bytes, more than the limit of {limit} (server.max_row_bytes)")
            return r

        return _per_row(raw, within)

    def _strings(self, column: np.ndarray) -> List[Union[str, InputError]]:
        def text(raw: bytes, row: int) -> str:
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"row {row}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not value:
                raise InputError(f"row {row}: empty text")
            return value

        return _per_row(self._raw(column), text)

    def _tokenize(self, texts: List[str], add_special_tokens: bool) -> List[np.ndarray]:
        encoded = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        return [np.asarray(ids, dtype=np.int64) for ids in encoded]

    def _check(self, ids: np.ndarray, row: int) -> np.ndarray:
        return self.rules.apply(ids, row)

    def _tokenized(self, texts: List[Union[str, InputError]], add_special_tokens: bool) -> List[Row]:
        """Tokenize the good rows in one call, then check each."""
        ok = [t for t in texts if not isinstance(t, InputError)]
        encoded = iter(self._tokenize(ok, add_special_tokens) if ok else [])
        return _per_row([t if isinstance(t, InputError) else next(encoded) for t in texts], self._check)

    def texts(self, texts: List[Union[str, InputError]]) -> List[Row]:
        return self._tokenized(texts, self.add_special_tokens)

    def text_rows(self, raw: List[bytes]) -> List[Row]:
        """UTF-8 texts as one request's rows, with the `text` input's checks and limits (OpenRLHF's queries)."""
        return self.texts(self._strings(raw))

    def conversations(self, column: np.ndarray) -> List[Row]:
        def render(text: str, row: int) -> str:
            try:
                messages = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(f"row {row}: messages is not JSON ({exc.msg})") from None
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)):
                raise InputError(f"row {row}: messages must be a non-empty list of {{role, content}} strings")
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False)
            except Exception as exc:  # the template's own checks (raise_exception: roles must alternate, ...)
                message = " ".join(str(exc).split())[:MAX_REASON_CHARS]
                raise InputError(f"row {row}: the chat template refused these messages: {message}") from None

        if not self.tokenizer.chat_template:
            raise InputError("this model's tokenizer has no chat template: send text or token_ids, or start the "
                             "server with model.chat_template=FILE|DIR|TEMPLATE")
        # the template writes the special tokens itself
        return self._tokenized(_per_row(self._strings(column), render), add_special_tokens=False)

    def id_strings(self, column: np.ndarray) -> List[Row]:
        def parse(raw: bytes, row: int) -> np.ndarray:
            try:  # numpy parses the decimal fields in C: ~5x faster than int() per field
                ids = np.array(raw.translate(_ID_SEPARATORS).split(), dtype=np.int64)
            except (ValueError, OverflowError):
                raise InputError(f"row {row}: token_ids must be integers separated by spaces or commas") from None
            return self._check(ids, row)

        return _per_row(self._raw(column), parse)

    def native(self, request) -> List[Row]:
        present = [name for name in NATIVE_INPUTS if name in request]
        if len(present) != 1:
            raise InputError(f"send exactly one of {', '.join(NATIVE_INPUTS)}; got {present or 'none'}")
        name = present[0]
        column = self._column(request, name)
        if name == "text":
            return self.texts(self._strings(column))
        if name == "messages":
            return self.conversations(column)
        return self.id_strings(column)

    def nemo(self, request) -> List[Row]:
        if "sentences" in request:
            if "tokens" in request:
                raise InputError("send either sentences or tokens, not both")
            if "sequence_lengths" in request:
                raise InputError("sequence_lengths without tokens: send sentences alone, or tokens with lengths")
            return self.texts(self._strings(self._column(request, "sentences")))
        if "tokens" not in request:
            raise InputError("send sentences, or tokens with sequence_lengths")
        tokens = np.asarray(request["tokens"])
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise InputError(f"tokens must be an integer matrix [batch, length], got {tokens.dtype} {list(tokens.shape)}")
        lengths: Optional[np.ndarray] = request["sequence_lengths"] if "sequence_lengths" in request else None
        if lengths is None:
            lengths = np.full(tokens.shape[0], tokens.shape[1])
        lengths = np.asarray(lengths).reshape(-1)
        if lengths.shape[0] != tokens.shape[0]:
            raise InputError(f"sequence_lengths has {lengths.shape[0]} rows, tokens has {tokens.shape[0]}")

        def row_ids(row_n, row: int) -> np.ndarray:
            ids, n = row_n
            if not 1 <= n <= tokens.shape[1]:
                raise InputError(f"row {row}: sequence_lengths {int(n)} outside [1, {tokens.shape[1]}]")
            return self._check(ids[: int(n)].astype(np.int64), row)

        return _per_row(list(zip(tokens, lengths)), row_ids)
