"""Steps of a process reward model's sequence: the step tag found in the token ids (every rank finds the same
steps in the ids it received), text tokenized so that each tag occurrence is the tag's ids, the request decoder
that refuses rows without steps, and the outputs: one score per step plus their aggregate."""

import re
from typing import List, Optional

import numpy as np

from ..config import Aggregate, RewardConfig, StepScore, StepTagSource, reward_problems
from ..protocol import InputError
from ..serving.inputs import RequestDecoder

AGGREGATES = {
    Aggregate.min: np.min,
    Aggregate.last: lambda v: v[-1],
    Aggregate.mean: np.mean,
    Aggregate.product: np.prod,
}


def check_config(cfg: RewardConfig) -> None:
    """Fail before loading a model on a reward config that cannot work (config.reward_problems' rules; the CLI has
    checked them already, this covers a RewardConfig built in code)."""
    for key, choices in (("score", StepScore), ("step_tag_source", StepTagSource), ("aggregate", Aggregate)):
        if getattr(cfg, key) not in {c.value for c in choices}:
            raise ValueError(f"reward config: {key}={getattr(cfg, key)!r}, expected one of {[c.value for c in choices]}")
    errors = reward_problems(cfg)
    if errors:
        raise ValueError(f"reward config: {errors[0]}")


def text_token_ids(tokenizer, text: str) -> List[int]:
    """`text` as token ids, without the word-start marker some tokenizers (SentencePiece) put before text that
    does not itself start with a space: `encode("+")` may be ["▁+"] or ["▁", "+"]."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) > 1 and not text[0].isspace() and tokenizer.decode(ids[:1]).strip() == "":
        ids = ids[1:]
    return ids


def generation_prompt_ids(tokenizer) -> List[int]:
    """The tokens the chat template writes before an assistant reply, as they tokenize inside a conversation
    whose reply is "+" (so a template whose header merges with the reply is still matched as it appears)."""
    if not tokenizer.chat_template:
        raise ValueError("step_tag_source=generation_prompt needs a tokenizer with a chat template")
    user = [{"role": "user", "content": "1"}]
    before = tokenizer.apply_chat_template(user, tokenize=False)
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "+"}], tokenize=False)
    if not (len(prompt) > len(before) and prompt.startswith(before) and full.startswith(prompt)):
        raise ValueError("step_tag_source=generation_prompt: the chat template writes no generation prompt "
                         "before the assistant reply; set step_tag_ids instead")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    return [i for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]) if e > s and s >= len(before)
            and e <= len(prompt)]


class StepTag:
    """The token id pattern that marks a step, and (for text tags) the string it comes from."""

    def __init__(self, ids: List[int], text: Optional[str] = None):
        self.ids = list(ids)
        self.text = text
        self._pattern = np.array(self.ids, dtype=np.int64)

    def __repr__(self) -> str:
        return f"step tag {self.text!r} (token ids {self.ids})" if self.text else f"step tag token ids {self.ids}"

    def _found(self, seqs: List[np.ndarray]):
        """(sequence, index in the concatenation) of every tag occurrence, in order, and each sequence's offset.
        One pass over the concatenation; a match across a boundary does not count."""
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        flat, k = np.concatenate(seqs) if len(seqs) else np.zeros(0, np.int64), len(self.ids)
        if len(flat) < k:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), offsets
        hit = (np.lib.stride_tricks.sliding_window_view(flat, k) == self._pattern).all(1)
        segment = np.repeat(np.arange(len(seqs)), lengths)
        starts = np.flatnonzero(hit & (segment[: len(hit)] == segment[k - 1:]))
        return segment[starts], starts, offsets

    def counts(self, seqs: List[np.ndarray]) -> np.ndarray:
        """Steps in each sequence."""
        return np.bincount(self._found(seqs)[0], minlength=len(seqs))

    def positions(self, seqs: List[np.ndarray]):
        """(sequence, scored position = the tag's last token, step number) of every step, as numpy arrays."""
        seq, starts, offsets = self._found(seqs)
        step = np.arange(len(seq)) - np.searchsorted(seq, seq, side="left")
        return seq, starts + len(self.ids) - 1 - offsets[seq], step

    def encode(self, tokenizer, text: str, add_special_tokens: bool) -> List[int]:
        """Tokenize `text` so that every occurrence of the tag string is exactly the tag's ids.

        The text is tokenized once as a whole; where the tokenizer merged a tag occurrence with its neighbours
        (byte-level BPE: "ки" after a space becomes the one token " ки"; SentencePiece: "ки" after a newline
        lacks the word-start marker), only the tokens touching that occurrence are replaced, by the
        tokenization of their text on either side of the tag with the tag's ids in between."""
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if self.text is None:
            return ids
        out, i, done = [], 0, 0
        for match in re.finditer(re.escape(self.text), text):
            a, b = match.span()
            if a < done:  # inside text already re-tokenized with the previous occurrence
                continue
            while i < len(ids) and offsets[i][1] <= a:
                out.append(ids[i])
                i += 1
            j = i
            while j < len(ids) and offsets[j][0] < b and offsets[j][1] > offsets[j][0]:
                j += 1
            if ids[i:j] == self.ids:
                out += self.ids
            else:
                start = min([a] + [offsets[t][0] for t in range(i, j)])
                done = max([b] + [offsets[t][1] for t in range(i, j)])
                out += self._encode_around_tags(tokenizer, text[start:done])
            i = j
        return out + ids[i:]

    def _encode_around_tags(self, tokenizer, text: str) -> List[int]:
        parts = text.split(self.text)
        out = tokenizer.encode(parts[0], add_special_tokens=False) if parts[0] else []
        for part in parts[1:]:
            out += self.ids + (tokenizer.encode(part, add_special_tokens=False) if part else [])
        return out


def make_step_tag(cfg: RewardConfig, tokenizer, vocab_size: int) -> StepTag:
    if cfg.step_tag_source == "text":
        tag = StepTag(text_token_ids(tokenizer, cfg.step_tag), cfg.step_tag)
    elif cfg.step_tag_source == "ids":
        tag = StepTag(cfg.step_tag_ids)
    else:
        tag = StepTag(generation_prompt_ids(tokenizer))
    if not tag.ids or not all(0 <= i < vocab_size for i in tag.ids):
        raise ValueError(f"{tag}: must be one or more token ids in [0, {vocab_size})")
    return tag


def candidate_ids(cfg: RewardConfig, tokenizer, vocab_size: int) -> List[int]:
    if cfg.candidate_token_ids:
        ids = list(cfg.candidate_token_ids)
    else:
        ids = []
        for text in cfg.candidate_tokens:
            tokens = text_token_ids(tokenizer, text)
            if len(tokens) != 1:
                raise ValueError(f"candidate token {text!r} is {len(tokens)} tokens {tokens} for this tokenizer; "
                                 "set reward.candidate_token_ids instead")
            ids += tokens
    if not all(0 <= i < vocab_size for i in ids):
        raise ValueError(f"candidate token ids {ids} outside the vocabulary [0, {vocab_size})")
    return ids


class StepDecoder(RequestDecoder):
    """The usual request decoding, with text tokenized so that every tag occurrence is the tag's ids, and a
    row error for a sequence with no step or more than `max_steps`."""

    def __init__(self, tokenizer, rules, add_special_tokens: bool, tag: StepTag, max_steps: int):
        super().__init__(tokenizer, rules, add_special_tokens)
        self.tag = tag
        self.max_steps = max_steps

    def _tokenize(self, texts: List[str], add_special_tokens: bool) -> List[np.ndarray]:
        return [np.asarray(self.tag.encode(self.tokenizer, t, add_special_tokens), dtype=np.int64) for t in texts]

    def _check(self, ids: np.ndarray, row: int) -> np.ndarray:
        ids = super()._check(ids, row)
        n = int(self.tag.counts([ids])[0])
        if n == 0:
            raise InputError(f"row {row}: no step found: the sequence must contain the {self.tag}")
        if n > self.max_steps:
            raise InputError(f"row {row}: {n} steps, more than reward.max_steps={self.max_steps}")
        return ids


class StepOutputs:
    """`step_rewards` FP32 [batch, max steps of the request] NaN-padded, `num_steps` INT32 [batch, 1],
    `rewards` FP32 [batch, 1] = the configured aggregate of each row's step scores."""

    specs = [("rewards", np.float32, (1,)), ("step_rewards", np.float32, (-1,)), ("num_steps", np.int32, (1,))]

    def __init__(self, tag: StepTag, aggregate: str):
        self.tag = tag
        self.aggregate = AGGREGATES[aggregate]

    def scored(self, values: np.ndarray, seqs: List[np.ndarray]) -> dict:
        counts = self.tag.counts(seqs).tolist()
        steps = np.full((len(seqs), max(counts)), np.nan, dtype=np.float32)
        rewards = np.empty((len(seqs), 1), dtype=np.float32)
        for i, n in enumerate(counts):
            steps[i, :n] = values[i, :n]
            rewards[i, 0] = self.aggregate(steps[i, :n].astype(np.float64))
        return {"rewards": rewards, "step_rewards": steps, "num_steps": np.array(counts, dtype=np.int32)[:, None]}

    def failed(self, n: int) -> dict:
        return {"rewards": np.full((n, 1), np.nan, dtype=np.float32),
                "step_rewards": np.full((n, 1), np.nan, dtype=np.float32),
                "num_steps": np.zeros((n, 1), dtype=np.int32)}
