"""Gemma 3 VL and Mistral 3 VL records (ckpt_ir/architectures/vl_passthrough.py) without
weights: the Megatron names pinned to Megatron-Bridge's (reference sections 6.6, 7.4), the
projection transpose, Gemma 3's tower spelling detection, the text family's Megatron
arguments, and the configs refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpt_ir.architectures.vl_passthrough import HUB_TOWER, Transpose, gemma3_tower_spelling
from ckpt_ir.errors import FormatError
from ckpt_ir.ir import ModelConfig
from ckpt_ir.megatron_config import megatron_args
from ckpt_ir.table_engine import NativeParams
from ckpt_ir.tables import build_table
from ckpt_ir.transforms import TENSOR
from tests.clients.vl_passthrough_models import config_dict

REPO = Path(__file__).resolve().parents[2]


def _mcore(model_type: str) -> dict[str, tuple[str, str]]:
    """Megatron name -> (IR name, transform) of every non-layer, non-language-model binding."""
    table = build_table("mcore", ModelConfig.from_hf(config_dict(model_type)), NativeParams())
    return {b.native: (next(iter(b.ir.values())), b.transform.describe())
            for b in table.bindings if not b.native.startswith("language_model.")}


def test_gemma3_megatron_names_are_megatron_bridges():
    rows = _mcore("gemma3")
    assert rows["multi_modal_projector.proj.weight"] == (
        "multi_modal_projector.mm_input_projection_weight", "Transpose")
    assert rows["multi_modal_projector.mm_soft_embed_norm.weight"] == (
        "multi_modal_projector.mm_soft_emb_norm.weight", "Identity")
    tower = {n: v for n, v in rows.items() if n.startswith("vision_tower.")}
    assert all(v == (n, "Identity") for n, v in tower.items())  # ReplicatedMapping: copied
    assert len(tower) == 3 + 2 * 16 + 2 and len(rows) == len(tower) + 2


def test_mistral3_megatron_names_are_megatron_bridges():
    rows = _mcore("mistral3")
    assert all(v == (n, "Identity") for n, v in rows.items())
    assert sorted(n for n in rows if n.startswith("multi_modal_projector.")) == [
        "multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.weight",
        "multi_modal_projector.norm.weight",
        "multi_modal_projector.patch_merger.merging_layer.weight"]
    assert len(rows) == 4 + 2 + 2 * 9


def test_the_language_model_is_its_text_familys_under_language_model():
    for vl, text in (("gemma3", "gemma3_text"), ("mistral3", "ministral3")):
        cfg = ModelConfig.from_hf(config_dict(vl))
        flat = ModelConfig.from_hf(dict(cfg.text_hf))
        assert flat.architecture == text
        lm = {b.native.removeprefix("language_model."): dict(b.ir)
              for b in build_table("mcore", cfg, NativeParams()).bindings
              if b.native.startswith("language_model.")}
        assert lm == {b.native: dict(b.ir)
                      for b in build_table("mcore", flat, NativeParams()).bindings}


def test_transpose_is_its_own_inverse_and_shapes_agree():
    w = torch.arange(6.0).reshape(2, 3)
    t = Transpose()
    native = t.apply({TENSOR: w})
    assert torch.equal(native, w.t()) and native.is_contiguous()
    assert torch.equal(t.inverse(native)[TENSOR], w)
    assert t.shapes({TENSOR: (2, 3)}) == (3, 2)


def test_the_tower_spelling_is_read_from_the_names():
    cfg = ModelConfig.from_hf(config_dict("gemma3"))
    hub = {"vision_tower.vision_model.post_layernorm.weight": (32,)}
    assert gemma3_tower_spelling(cfg, hub) == HUB_TOWER
    assert gemma3_tower_spelling(cfg, {"vision_tower.post_layernorm.weight": (32,)}) \
        == "per-expert"
    def native(params: NativeParams) -> str:
        return next(b.native for b in build_table("hf", cfg, params).bindings
                    if dict(b.ir) == {TENSOR: "vision_tower.post_layernorm.weight"})

    assert native(NativeParams(hf_experts=HUB_TOWER)) == \
        "vision_tower.vision_model.post_layernorm.weight"
    assert native(NativeParams()) == "vision_tower.post_layernorm.weight"


def test_megatron_arguments_are_the_text_familys():
    gemma = megatron_args(ModelConfig.from_hf(config_dict("gemma3")))
    assert gemma.transformer_config["layernorm_zero_centered_gamma"] is True
    assert gemma.transformer_config["window_size"] == (3, 0)
    assert gemma.gpt_model["seq_len_interpolation_factor"] == 8.0
    mistral = megatron_args(ModelConfig.from_hf(config_dict("mistral3")))
    assert any("llama_4_scaling_beta=0.1" in n for n in mistral.notes)


@pytest.mark.parametrize(("model_type", "change", "message"), [
    ("gemma3", {"vision_config": {"vision_use_head": True}}, "vision_use_head=true"),
    ("gemma3", {"vision_config": {"patch_size": 5}}, "image_size 16 over patch_size 5"),
    ("mistral3", {"multimodal_projector_bias": True}, "multimodal_projector_bias"),
    ("mistral3", {"vision_config": {"num_hidden_layers": 0}}, "num_hidden_layers must be"),
])
def test_unsupported_or_malformed_vision_configs_are_one_line(model_type, change, message,
                                                              tmp_path):
    config = config_dict(model_type)
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    with pytest.raises(FormatError, match=message):
        ModelConfig.from_hf(config).schema()
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    r = subprocess.run([sys.executable, "-m", "ckpt_ir", "convert", str(src),
                        str(tmp_path / "out"), "--to", "mcore-dist", "--dry-run"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
