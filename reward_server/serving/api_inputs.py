"""JSON inputs of the API port's routes as one request's rows, through the service's decoder (inputs.py: the same
checks, limits, tokenizer, chat template and, for a process reward model, step tags as Triton's inputs).

The rule for text (every text route: vLLM's `input`, SGLang's `text` and `input` / `/v1/embeddings`, slime's string
prompt + response, OpenRLHF's query): tokenized with the tokenizer's special tokens (model.add_special_tokens, or
vLLM's `add_special_tokens`), except that when the tokenizer adds the BOS token itself, a text that already starts
with the BOS string loses that string first (the tokenizer puts BOS back). So a conversation rendered with the chat
template scores as the same conversation sent as `messages` does, whether the client kept its leading BOS or
stripped it (verl strips it and expects the server to add it, as vLLM's default add_special_tokens=true does), and
a plain text gets the one BOS that Triton's `text` input gives it. Conversations (`messages`, slime's list prompt)
are rendered by the chat template with its own special tokens only; token ids are scored as sent.
"""

import json
import logging
from typing import Any, Callable, List, Optional

import numpy as np

from ..protocol import InputError
from .inputs import Row, _per_row
from .requests import ScoreRequest
from .statuses import row_text

log = logging.getLogger("reward_server.api")

MESSAGE_ROWS = 3  # failed rows named in the error of a request that must be scored whole


def bos_added(tokenizer) -> Optional[str]:
    """The BOS string when the tokenizer adds the BOS token itself with add_special_tokens=True, else None."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return None
    try:
        with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
        without = tokenizer("x", add_special_tokens=False)["input_ids"]
    except Exception:  # a tokenizer that cannot say: keep texts as sent
        return None
    return bos if with_special[:1] == [bos_id] and without[:1] != [bos_id] else None


class ApiInputs:
    """Rows of texts, token id lists and conversations, for the service's `decoder` (inputs.RequestDecoder or
    kinds/steps.StepDecoder)."""

    def __init__(self, decoder, tokenizer):
        self.decoder = decoder
        self.bos = bos_added(tokenizer) if tokenizer is not None else None

    def strip_bos(self, text: str, add_special_tokens: bool) -> str:
        """The text rule (module docstring) before tokenizing with `add_special_tokens`."""
        if add_special_tokens and self.bos and text.startswith(self.bos):
            return text[len(self.bos):]
        return text

    def texts(self, texts: List[str], add_special_tokens: Optional[bool] = None) -> List[Row]:
        add = self.decoder.add_special_tokens if add_special_tokens is None else add_special_tokens
        raw = [t.encode("utf-8", "surrogatepass") for t in texts]
        strings = self.decoder._strings(raw)  # the size limits, UTF-8 and empty-text checks, on the bytes as sent
        strings = [s if isinstance(s, InputError) else self.strip_bos(s, add) for s in strings]
        return self.decoder._tokenized(strings, add)

    def token_lists(self, lists: List[Any]) -> List[Row]:
        def ids(value, row: int) -> np.ndarray:
            if not (isinstance(value, list) and value and all(type(v) is int for v in value)):
                raise InputError(f"row {row}: token ids must be a non-empty list of integers")
            try:
                array = np.asarray(value, dtype=np.int64)
            except OverflowError:
                raise InputError(f"row {row}: a token id does not fit in 64 bits") from None
            return self.decoder._check(array, row)

        return _per_row(lists, ids)

    def conversations(self, conversations: List[Any]) -> List[Row]:
        """Each a list of {"role", "content"}: the `messages` input's checks and chat template."""
        return self.decoder.conversations([json.dumps(c).encode() for c in conversations])


def request(make_rows: Callable[[], List[Row]], whole: bool) -> ScoreRequest:
    """The ScoreRequest of `make_rows()`; with `whole` (vLLM's and SGLang's routes, which fail a request when one of
    its prompts fails), a row that fails its checks fails the request before anything is scored."""
    decoded = ScoreRequest.decoded(lambda _: make_rows(), None)
    if not whole or decoded.error is not None:
        return decoded
    bad = [(i, r) for i, r in enumerate(decoded.rows) if isinstance(r, InputError)]
    if not bad:
        return decoded
    shown = "; ".join(row_text(i, e) for i, e in bad[:MESSAGE_ROWS])
    if len(bad) > MESSAGE_ROWS:
        shown += f"; and {len(bad) - MESSAGE_ROWS} more rows"
    return ScoreRequest(error=InputError(shown))
