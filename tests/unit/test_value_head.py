"""Value heads (verl's critic): HF token classification <-> Megatron ``output_layer [1, H]``."""

from __future__ import annotations

import json
import re

import pytest
import torch

import ckpt_ir
from ckpt_ir.errors import PlanError
from ckpt_ir.ir import ModelConfig
from tests.fixtures import TINY_LLAMA, load_hf_tensors, write_hf

CRITIC = dict(TINY_LLAMA, model_type="qwen2", architectures=["Qwen2ForTokenClassification"],
              vocab_size=96, num_hidden_layers=4,  # verl never pads: TP=2 divides 96
              tie_word_embeddings=True, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
              token_classification_bias=False)


def test_config_and_schema_of_a_value_model():
    cfg = ModelConfig.from_hf(CRITIC)
    assert (cfg.is_value_model, cfg.num_labels, cfg.shares_output_with_embedding) == \
        (True, 1, False)
    schema = cfg.schema()
    assert schema["score.weight"] == (1, 32) and "lm_head.weight" not in schema
    # transformers' default: two labels and a bias, unless the config says otherwise.
    two = ModelConfig.from_hf({**CRITIC, "id2label": None, "token_classification_bias": True})
    assert (two.num_labels, two.has_score_bias) == (2, True)
    assert set(two.schema()) - set(schema) == {"score.bias"}
    # A causal LM config turned into its critic, as a one-row output layer says.
    lm = ModelConfig.from_hf(dict(TINY_LLAMA, architectures=["LlamaForCausalLM"]))
    critic = lm.as_value_model()
    assert critic.hf["architectures"] == ["LlamaForTokenClassification"]
    assert (critic.hf["id2label"], critic.hf["token_classification_bias"]) == \
        ({"0": "LABEL_0"}, False)
    assert ModelConfig.from_hf(critic.hf).num_labels == 1


@pytest.mark.parametrize(("fmt", "layout"), [
    ("mcore-dist", None), ("verl-legacy", {"tp": 2, "pp": 2}),
    ("megatron-legacy", {"tp": 2}), ("verl-legacy", {"tp": 1, "pp": 2, "vpp": 2})])
def test_value_head_round_trips_through_every_format(tmp_path, fmt, layout):
    want = write_hf(tmp_path / "hf", CRITIC)
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "m", to=fmt, layout=layout)
    with ckpt_ir.open(tmp_path / "m") as ckpt:
        assert ckpt.config.is_value_model and ckpt.tensors["score.weight"].shape == (1, 32)
    ckpt_ir.convert(tmp_path / "m", tmp_path / "back", to="hf")
    got = load_hf_tensors(tmp_path / "back")
    assert got.keys() == want.keys()
    # bfloat16 bits: -0.0 and NaN payloads count
    assert all(torch.equal(got[n].view(torch.int16), want[n].view(torch.int16)) for n in want)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForTokenClassification"]
    assert config["token_classification_bias"] is False


def test_one_row_output_layer_is_read_as_a_value_head_whatever_the_config_says(tmp_path):
    write_hf(tmp_path / "hf", CRITIC)
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "actor", to="verl-legacy", layout={"tp": 2})
    # verl saved the base model's causal-LM config beside its critic.
    lm = {k: v for k, v in CRITIC.items() if k not in ("id2label", "label2id",
                                                       "token_classification_bias")}
    lm["architectures"] = ["Qwen2ForCausalLM"]
    (tmp_path / "actor" / "hf_config_and_tokenizer" / "config.json").write_text(json.dumps(lm))
    with ckpt_ir.open(tmp_path / "actor") as ckpt:
        assert ckpt.config.is_value_model
        assert ckpt.config.hf["architectures"] == ["Qwen2ForTokenClassification"]
    report = ckpt_ir.verify(tmp_path / "hf", tmp_path / "actor")
    assert report.equal, report.summary()


def test_a_score_bias_has_no_megatron_place_and_is_refused(tmp_path):
    write_hf(tmp_path / "hf", {**CRITIC, "token_classification_bias": True})
    with pytest.raises(PlanError, match=re.escape(
            "IR tensor score.weight has no place in the qwen2 mcore table of mcore-dist")) as e:
        ckpt_ir.convert(tmp_path / "hf", tmp_path / "m", to="mcore-dist")
    assert "IR tensor score.bias has no place in the qwen2 mcore table of mcore-dist" in \
        e.value.problems
    assert not (tmp_path / "m").exists()


def test_mixture_of_experts_critic_round_trips(tmp_path):
    moe = dict(model_type="mixtral", architectures=["MixtralForTokenClassification"],
               hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=50, intermediate_size=24, num_local_experts=4,
               num_experts_per_tok=2, id2label={"0": "LABEL_0"}, token_classification_bias=False)
    want = write_hf(tmp_path / "hf", moe)
    for fmt, layout in (("mcore-dist", None), ("verl-legacy", {"tp": 2, "ep": 2})):
        ckpt_ir.convert(tmp_path / "hf", tmp_path / fmt, to=fmt, layout=layout)
        ckpt_ir.convert(tmp_path / fmt, tmp_path / f"{fmt}-back", to="hf")
        got = load_hf_tensors(tmp_path / f"{fmt}-back")
        assert got.keys() == want.keys() and "score.weight" in got
        assert all(torch.equal(got[n].view(torch.int16), want[n].view(torch.int16))
                   for n in want)
