"""The settings' fixed choices: StrEnums whose member names are their values, so code comparing a setting to a
string (`cfg.model.pooling == "last_non_pad"`) or looking it up in a dict keyed by strings keeps working."""

from enum import StrEnum



class DType(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Attention(StrEnum):
    auto = "auto"
    flex_attention = "flex_attention"
    sdpa = "sdpa"
    eager = "eager"
    # padded layout only (the packed layout's masks take flex_attention, sdpa or eager); CUDA, with their packages
    flash_attention_2 = "flash_attention_2"
    flash_attention_3 = "flash_attention_3"


class Truncation(StrEnum):
    error = "error"
    left = "left"
    right = "right"


class Pooling(StrEnum):
    last_non_pad = "last_non_pad"
    last = "last"


class Quantization(StrEnum):  # the recipes of reward_server/loading/quantization.py
    fp8 = "fp8"
    fp8_tensor = "fp8_tensor"
    fp8_mlp = "fp8_mlp"
    fp8_skip_ends = "fp8_skip_ends"
    fp8_mlp_skip_ends = "fp8_mlp_skip_ends"


class Backend(StrEnum):
    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


class BatchLayout(StrEnum):
    packed = "packed"
    padded = "padded"


class OpenRLHFEos(StrEnum):
    strip_and_append = "strip_and_append"
    as_is = "as_is"


class RewardKind(StrEnum):
    scalar = "scalar"
    prm = "prm"


class StepTagSource(StrEnum):
    text = "text"
    ids = "ids"
    generation_prompt = "generation_prompt"


class StepScore(StrEnum):
    softmax = "softmax"
    logit = "logit"
    classifier = "classifier"


class Aggregate(StrEnum):
    min = "min"
    last = "last"
    mean = "mean"
    product = "product"
