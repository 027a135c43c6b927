"""The planner works on metadata alone: shapes, units, drops and every problem at once."""

from __future__ import annotations

import pytest

from ckpt_ir import dtypes
from ckpt_ir.errors import PlanError
from ckpt_ir.ir import ModelConfig, TensorSpec
from ckpt_ir.planner import DestView, SourceView, make_plan
from ckpt_ir.tables import NativeParams, build_table

HF = {"model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": 32,
      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12,
      "intermediate_size": 40, "vocab_size": 99, "tie_word_embeddings": False}


def _hf_specs(cfg: ModelConfig, dtype=dtypes.BFLOAT16) -> dict[str, TensorSpec]:
    return {n: TensorSpec(n, s, dtype) for n, s in cfg.schema().items()}


def _plan(cfg, specs, dest="mcore", params=None, **kw):
    params = params or NativeParams()
    return make_plan(SourceView("hf", "hf", NativeParams(), specs), DestView(dest, dest, params),
                     cfg, **kw)


def test_hf_to_mcore_plan_shapes_and_units():
    cfg = ModelConfig.from_hf(HF)
    plan = _plan(cfg, _hf_specs(cfg), params=NativeParams(padded_vocab_size=128))
    shapes = {s.name: s.shape for s in plan.dest_specs}
    assert shapes["embedding.word_embeddings.weight"] == (128, 32)
    assert shapes["output_layer.weight"] == (128, 32)
    # 2 groups * (2 q heads + k + v) * 12
    assert shapes["decoder.layers.1.self_attention.linear_qkv.weight"] == (96, 32)
    assert shapes["decoder.layers.1.self_attention.linear_qkv.bias"] == (96,)
    assert shapes["decoder.layers.0.mlp.linear_fc1.weight"] == (80, 32)
    assert shapes["decoder.layers.0.self_attention.linear_proj.weight"] == (32, 48)
    # Every destination tensor in exactly one unit, each unit holds one destination tensor here.
    targets = [t.native for u in plan.units for t in u.targets]
    assert sorted(targets) == sorted(shapes)
    qkv_unit = next(u for u in plan.units
                    if u.targets[0].native == "decoder.layers.0.self_attention.linear_qkv.weight")
    assert len(qkv_unit.sources) == 3
    assert plan.bytes_read == sum(s.nbytes for s in _hf_specs(cfg).values())
    # Memory is bounded by the largest unit, not the model.
    assert plan.peak_bytes < plan.bytes_read


def test_mcore_to_hf_reads_each_fused_tensor_once():
    cfg = ModelConfig.from_hf(HF)
    mc = build_table("mcore", cfg, NativeParams())
    sources = {b.native: TensorSpec(b.native, b.transform.shapes(
        {r: cfg.schema()[n] for r, n in b.ir.items()}), dtypes.FLOAT32) for b in mc.bindings}
    plan = make_plan(SourceView("mcore-dist", "mcore", NativeParams(), sources),
                     DestView("hf", "hf", NativeParams()), cfg)
    qkv_units = [u for u in plan.units
                 if u.sources[0].native.endswith("linear_qkv.weight")]
    assert len(qkv_units) == 2
    assert {t.native for t in qkv_units[0].targets} == {
        f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"}
    # Destination tensors come out in the order the writer was told.
    assert [s.name for s in plan.dest_specs] == [t.native for u in plan.units
                                                 for t in u.targets]


def test_tied_lm_head_in_source_is_dropped_with_reason():
    cfg = ModelConfig.from_hf({**HF, "tie_word_embeddings": True})
    specs = _hf_specs(cfg)
    specs["lm_head.weight"] = TensorSpec("lm_head.weight", (99, 32), dtypes.BFLOAT16)
    specs["model.layers.0.self_attn.rotary_emb.inv_freq"] = TensorSpec(
        "model.layers.0.self_attn.rotary_emb.inv_freq", (6,), dtypes.FLOAT32)
    plan = _plan(cfg, specs)
    assert "tied" in plan.dropped["lm_head.weight"]
    assert "rotary" in plan.dropped["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert "output_layer.weight" not in {s.name for s in plan.dest_specs}


def test_every_problem_is_reported_at_once():
    cfg = ModelConfig.from_hf(HF)
    specs = _hf_specs(cfg)
    specs["model.layers.0.mlp.gate_proj.weight"] = TensorSpec(
        "model.layers.0.mlp.gate_proj.weight", (41, 32), dtypes.BFLOAT16)
    del specs["model.norm.weight"]
    specs["model.layers.0.mystery.weight"] = TensorSpec("model.layers.0.mystery.weight", (3,),
                                                        dtypes.BFLOAT16)
    with pytest.raises(PlanError) as e:
        _plan(cfg, specs)
    problems = "\n".join(e.value.problems)
    assert "model.layers.0.mystery.weight [3] is not mapped" in problems
    assert "model.layers.0.mlp.gate_proj.weight has shape [41, 32], but the config implies " \
           "[40, 32]" in problems
    assert "IR tensor model.norm.weight has no source" in problems


def test_mixed_dtypes_need_an_explicit_dtype():
    cfg = ModelConfig.from_hf(HF)
    specs = _hf_specs(cfg)
    name = "model.layers.0.self_attn.k_proj.weight"
    specs[name] = TensorSpec(name, specs[name].shape, dtypes.FLOAT32)
    with pytest.raises(PlanError, match="fuses parts of different dtypes"):
        _plan(cfg, specs)
    plan = _plan(cfg, specs, dtype=dtypes.FLOAT16)
    assert {s.dtype for s in plan.dest_specs} == {dtypes.FLOAT16}


def test_local_norm_variant_uses_spec_names():
    cfg = ModelConfig.from_hf(HF)
    names = {b.native for b in build_table("mcore", cfg, NativeParams(norm_style="local"))
             .bindings}
    assert "decoder.layers.0.input_layernorm.weight" in names
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in names
    assert not any("layer_norm_weight" in n for n in names)
