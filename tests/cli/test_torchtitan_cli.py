"""torchtitan's deepseek_v3 and MoE names from the command line: older key spellings of MoE
tensors, the qwen3 MoE load-balancing bias, and what has no torchtitan naming (one line on
stderr, exit 2, nothing written). torchtitan itself loads and saves these in
tests/clients/test_torchtitan_client.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

import ckpt_ir
from tests.cli.test_torch_dcp_cli import QWEN3_MOE, cli
from tests.fixtures import load_dcp_tensors, load_hf_tensors, with_mtp_copies, write_hf
from tests.strategies import bits_equal

DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
    "num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 4,
    "num_key_value_heads": 4, "vocab_size": 31, "intermediate_size": 20,
    "moe_intermediate_size": 8, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
    "q_lora_rank": 8, "kv_lora_rank": 6, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4,
    "v_head_dim": 6, "num_nextn_predict_layers": 1, "routed_scaling_factor": 2.5,
    "rope_interleave": True, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "max_position_embeddings": 64,
}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys(), set(got) ^ set(want)
    for name, t in want.items():
        assert bits_equal(got[name], t), name


def test_deepseek_v3_torchtitan_names(tmp_path: Path) -> None:
    want = write_hf(tmp_path / "hf", DEEPSEEK_V3, dtype=torch.bfloat16)
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "tt", to="torch-dcp", torchtitan=True)
    got = load_dcp_tensors(tmp_path / "tt" / "step-0")
    h, a = "model.layers.1.", "layers.1.attention."
    # DeepSeekV3StateDictAdapter.from_hf_map, name for name (MLA rope rows unpermuted).
    for tt, hf in (("wq_a", "q_a_proj"), ("q_norm", "q_a_layernorm"), ("wq_b", "q_b_proj"),
                   ("wkv_a", "kv_a_proj_with_mqa"), ("kv_norm", "kv_a_layernorm"),
                   ("wkv_b", "kv_b_proj"), ("wo", "o_proj")):
        assert bits_equal(got[f"{a}{tt}.weight"], want[f"{h}self_attn.{hf}.weight"]), tt
    assert bits_equal(got["layers.1.moe.expert_bias_E"],
                      want[h + "mlp.gate.e_score_correction_bias"])
    assert bits_equal(got["layers.1.moe.shared_experts.w2.weight"],
                      want[h + "mlp.shared_experts.down_proj.weight"])
    assert bits_equal(got["layers.1.moe.routed_experts.inner_experts.w3_EFD"],
                      torch.stack([want[f"{h}mlp.experts.{e}.up_proj.weight"]
                                   for e in range(4)]))
    assert "layers.0.feed_forward.w1.weight" in got  # first_k_dense_replace: a dense layer
    # MTP layer 0 is HF layer 2 (num_hidden_layers + 0); enorm / hnorm / eh_proj / mtp_norm.
    assert bits_equal(got["mtp_layers.0.mtp_norm.weight"],
                      want["model.layers.2.shared_head.norm.weight"])
    assert bits_equal(got["mtp_layers.0.attention.wkv_b.weight"],
                      want["model.layers.2.self_attn.kv_b_proj.weight"])
    assert not any(k.startswith("layers.2.") for k in got)


def test_older_moe_spellings_and_buffers_are_read(tmp_path: Path) -> None:
    """Keys from before #3859 (``moe.experts.w1``) and before the ``_E`` suffix
    (``moe.expert_bias``), with the token counter older torchtitan saved: the bias is
    deepseek_v3's routing bias, the counter is listed."""
    want = write_hf(tmp_path / "hf", DEEPSEEK_V3, dtype=torch.float32)
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "tt", to="torch-dcp", torchtitan=True)
    state = {k.replace("routed_experts.inner_experts.", "experts.").replace("_EFD", "")
             .replace("_EDF", "").replace("expert_bias_E", "expert_bias"): v
             for k, v in load_dcp_tensors(tmp_path / "tt" / "step-0").items()}
    assert "layers.1.moe.experts.w2" in state and "layers.1.moe.expert_bias" in state
    state["layers.1.moe.tokens_per_expert"] = torch.arange(4.0)
    old = tmp_path / "dump" / "checkpoint" / "step-3"
    dcp.save(state, checkpoint_id=str(old), no_dist=True)
    shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "dump" / "config.json")
    report = ckpt_ir.convert(tmp_path / "dump" / "checkpoint", tmp_path / "back", to="hf")
    _assert_same(load_hf_tensors(tmp_path / "back"), with_mtp_copies(DEEPSEEK_V3, want))
    assert report.dropped == {
        "layers.1.moe.tokens_per_expert": "torchtitan MoE token counter buffer"}


def test_qwen3_moe_gets_torchtitans_zero_bias_and_lists_it_on_read(tmp_path: Path) -> None:
    want = write_hf(tmp_path / "hf", QWEN3_MOE, dtype=torch.bfloat16)
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "tt", to="torch-dcp", torchtitan=True)
    got = load_dcp_tensors(tmp_path / "tt" / "step-0")
    # Layer 0 is dense (mlp_only_layers): only layer 1 routes, so only it has the buffer.
    assert "layers.0.moe.expert_bias_E" not in got
    bias = got["layers.1.moe.expert_bias_E"]
    assert bias.dtype == torch.float32 and torch.equal(bias, torch.zeros(3))
    report = ckpt_ir.convert(tmp_path / "tt", tmp_path / "back", to="hf")
    _assert_same(load_hf_tensors(tmp_path / "back"), want)
    assert list(report.dropped) == ["layers.1.moe.expert_bias_E"]
    assert "load-balancing bias" in report.dropped["layers.1.moe.expert_bias_E"]


def _refused(tmp_path: Path, config: dict, *expected: str) -> None:
    write_hf(tmp_path / "hf", config)
    run = cli("convert", tmp_path / "hf", tmp_path / "out", "--to", "torch-dcp", "--torchtitan",
              "--no-progress")
    assert run.returncode == 2, run.stderr
    line, = run.stderr.strip().splitlines()
    for text in expected:
        assert text in line, line
    assert not (tmp_path / "out").exists() and not any(tmp_path.glob(".out*"))


def test_half_split_mla_rope_has_no_torchtitan_naming(tmp_path: Path) -> None:
    _refused(tmp_path, {**DEEPSEEK_V3, "rope_interleave": False}, "rope_interleave=false",
             "torchtitan")


def test_glm_4_7_flash_has_no_torchtitan_naming(tmp_path: Path) -> None:
    # deepseek_v3's tensors under GLM's name: torchtitan has no GLM model to load them.
    _refused(tmp_path, {**DEEPSEEK_V3, "model_type": "glm4_moe_lite",
                        "architectures": ["Glm4MoeLiteForCausalLM"]},
             "torchtitan", "glm4_moe_lite")
