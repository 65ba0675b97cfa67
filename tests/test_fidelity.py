"""The reward each checkpoint was trained to give: every family we list (Llama, Qwen2, Qwen3, Mistral, Gemma2,
Gemma3), in every layout, in one process and over 4 ranks (2 data-parallel replicas x tensor parallel 2), equal
to a plain transformers forward; a 19-label head in full; one-line start-up errors for checkpoints the server
cannot serve as asked; chat templates (missing, refused, replaced)."""

import json
import subprocess

import numpy as np
import pytest
import torch

from oracles import (FAMILIES, build_tokenizer, load_model, reference_rewards, save_seqcls_checkpoint, scalar_scorer,
                     sharing_cases)
from reward_server.loading.checkpoint import StartupError, read_chat_template
from reward_server.config import BatchingConfig, ModelConfig
from reward_server.distributed import Topology
from reward_server.protocol import InputError
from reward_server.serving.inputs import RequestDecoder, SequenceRules
from reward_server.kinds.scalar import load_scalar_scorer
from servers import REPO, torchrun

ONE_RANK = Topology(rank=0, world_size=1, tp_size=1, dp_size=1, device=torch.device("cpu"))
ATOL = 1e-5  # fp32 on the CPU; the differences seen are ~1e-7


def family_sequences():
    """Shared prefixes (a GRPO group, a tree, a prefix of another), lengths past the families' sliding window,
    and a sequence ending in the pad token (pooled at the last token that is not)."""
    cases = sharing_cases(seed=5)
    seqs = cases["grpo group"] + cases["tree 3 deep"][:7] + cases["prefix of another"] + cases["nothing shared"]
    pad = build_tokenizer().pad_token_id
    return seqs + [np.concatenate([seqs[0][:40], [pad, pad]]).astype(np.int64)]


@pytest.mark.parametrize("layout,sharing", [("packed", True), ("padded", False)])
@pytest.mark.parametrize("arch", FAMILIES + ("llama-19-labels",))
def test_family_in_one_process_matches_plain_transformers(checkpoints, arch, layout, sharing):
    model = load_model(checkpoints[arch])
    seqs = family_sequences()
    got = scalar_scorer(model, layout=layout, sharing=sharing, budget=1024)([torch.from_numpy(s) for s in seqs])
    expected = reference_rewards(checkpoints[arch], seqs)
    assert got.shape == expected.shape == (len(seqs), model.config.num_labels)
    np.testing.assert_allclose(got.numpy(), expected, atol=ATOL, rtol=0)


@pytest.mark.server
def test_every_family_over_four_ranks_tensor_and_data_parallel(checkpoints, tmp_path):
    seqs = family_sequences()
    np.savez(tmp_path / "cases.npz", **{str(i): s for i, s in enumerate(seqs)})
    cmd = torchrun(4, REPO / "tests" / "rank_families.py", tmp_path, tmp_path / "cases.npz",
                   *(f"{name}={path}" for name, path in checkpoints.items()))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    print(run.stdout)
    for name, path in checkpoints.items():
        expected = reference_rewards(path, seqs)
        for layout in ("packed", "padded"):
            got = np.load(tmp_path / f"{name}-{layout}.npy")
            assert got.shape == expected.shape, (name, layout)
            np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0, err_msg=f"{name} {layout}")


def test_gemma2_gets_an_attention_it_supports(checkpoints):
    """Gemma2 has no sdpa in recent transformers (5.24; its soft-capping): auto picks eager on the CPU, as transformers
    does, and asking for sdpa is a one-line error. Older transformers (5.17) still declare sdpa for it."""
    from transformers import Gemma2ForSequenceClassification

    _, _, config = load_scalar_scorer(ModelConfig(path=str(checkpoints["gemma2"])), BatchingConfig(), ONE_RANK)
    if Gemma2ForSequenceClassification._supports_sdpa:
        assert config._attn_implementation == "sdpa"
        return
    assert config._attn_implementation == "eager"
    with pytest.raises(StartupError, match="Gemma2ForSequenceClassification does not support it; use auto"):
        load_scalar_scorer(ModelConfig(path=str(checkpoints["gemma2"]), attn_implementation="sdpa"),
                           BatchingConfig(), ONE_RANK)


CUSTOM_CODE = '''
import torch
from transformers import LlamaConfig, LlamaModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutputWithPast


class MultiHeadRewardConfig(LlamaConfig):
    model_type = "test_custom_reward"


class MultiHeadRewardModel(PreTrainedModel):
    config_class = MultiHeadRewardConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = torch.nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return SequenceClassifierOutputWithPast(logits=self.regression_layer(hidden[:, -1]))
'''


def test_custom_code_and_heads_other_than_score_are_refused_at_start_up_in_one_line(tmp_path):
    """A checkpoint with its own code (like ArmoRM's): refused without model.trust_remote_code; with it, refused
    because its head is not a linear `score`. Both messages say what to change."""
    path = save_seqcls_checkpoint(tmp_path / "custom", num_labels=19)
    (path / "modeling_custom_reward.py").write_text(CUSTOM_CODE)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="test_custom_reward", architectures=["MultiHeadRewardModel"],
                  auto_map={"AutoConfig": "modeling_custom_reward.MultiHeadRewardConfig",
                            "AutoModelForSequenceClassification": "modeling_custom_reward.MultiHeadRewardModel"})
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(StartupError) as untrusted:
        load_scalar_scorer(ModelConfig(path=str(path)), BatchingConfig(), ONE_RANK)
    assert "needs its own code (modeling_custom_reward.MultiHeadRewardConfig, modeling_custom_reward." \
           "MultiHeadRewardModel); set model.trust_remote_code=true" in str(untrusted.value)
    with pytest.raises(StartupError) as no_score:
        load_scalar_scorer(ModelConfig(path=str(path), trust_remote_code=True), BatchingConfig(), ONE_RANK)
    message = str(no_score.value)
    assert message.startswith("MultiHeadRewardModel has no `score` head (its linear layers at the top: "
                              "regression_layer)"), message
    assert "\n" not in message and "*ForSequenceClassification" in message


@pytest.mark.server
def test_start_up_error_is_one_line_in_the_server_log(tmp_path):
    """Through torchrun: the message, no traceback from us, exit code 2."""
    path = save_seqcls_checkpoint(tmp_path / "custom")
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="test_unknown_type", auto_map={"AutoConfig": "modeling_x.Config"})
    (path / "config.json").write_text(json.dumps(config))
    cmd = torchrun(2, REPO / "serve_reward_model.py", f"model.path={path}", f"model.cache_dir={tmp_path / 'cache'}")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    log = run.stdout + run.stderr
    assert run.returncode != 0
    lines = [line for line in log.splitlines() if line.startswith("cannot start: ")]
    assert lines == [f"cannot start: model.path={path}: the checkpoint's model type 'test_unknown_type' needs its "
                     f"own code (modeling_x.Config); set model.trust_remote_code=true if you trust that code"], log
    assert "reward_server/" not in log, log  # no traceback through our code


# ---------------------------------------------------------------- chat templates

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
STRICT = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role here') }}"
          "{% endif %}{{ m['content'] }} {% endfor %}")


def decoder(tokenizer):
    return RequestDecoder(tokenizer, SequenceRules(512, 1024, "error", 10 ** 6, 10 ** 7), True)


def messages_column(*conversations):
    return {"messages": np.array([[json.dumps(c).encode()] for c in conversations], dtype=object)}


def test_messages_without_a_chat_template_get_one_line():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(InputError) as exc:
        decoder(tokenizer).native(messages_column([{"role": "user", "content": "hi"}]))
    assert str(exc.value) == ("this model's tokenizer has no chat template: send text or token_ids, or start the "
                              "server with model.chat_template=FILE|DIR|TEMPLATE")


def test_a_template_that_refuses_a_conversation_fails_that_row_only():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = STRICT
    rows = decoder(tokenizer).native(messages_column([{"role": "user", "content": "hi"}],
                                                     [{"role": "system", "content": "x"}]))
    assert isinstance(rows[0], np.ndarray)
    assert str(rows[1]) == "row 1: the chat template refused these messages: no system role here"


def test_model_chat_template_from_a_string_a_file_or_a_tokenizer_directory(tmp_path):
    file = tmp_path / "template.jinja"
    file.write_text(TEMPLATE)
    donor = tmp_path / "donor"
    tokenizer = build_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(donor)
    for value in (TEMPLATE, str(file), str(donor)):
        assert read_chat_template(value) == TEMPLATE, value
    with pytest.raises(StartupError, match="not a file, not a directory with a tokenizer, and not a Jinja template"):
        read_chat_template("no/such/template.jinja")
    path = save_seqcls_checkpoint(tmp_path / "llama")  # a checkpoint whose template lives elsewhere
    _, served, _ = load_scalar_scorer(ModelConfig(path=str(path), chat_template=str(file)), BatchingConfig(),
                                      ONE_RANK)
    conversation = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ids = decoder(served).native(messages_column(conversation))[0]
    expected = served("[user] 2+2?\n[assistant] 4\n", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == expected


def test_parity_report_measures_distance_and_order():
    from reward_server.check import compare

    rewards = np.random.default_rng(0).normal(size=(300, 1))
    assert compare(rewards, rewards) == {"max_abs_diff": 0.0, "mean_abs_diff": 0.0, "spearman": 1.0,
                                         "pair_agreement": 1.0}
    reversed_ = compare(rewards[:20], -rewards[:20])  # 190 pairs: every one compared
    assert reversed_["spearman"] == pytest.approx(-1.0) and reversed_["pair_agreement"] == 0.0
    swapped = rewards.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # one pair out of order, among 300 x 299 / 2 (sampled: 10,000)
    assert 0.99 < compare(rewards, swapped)["pair_agreement"] < 1.0
