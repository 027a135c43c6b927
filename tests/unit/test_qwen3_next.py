"""qwen3_next (Qwen3-Next-80B-A3B): the mapping pinned to Megatron-Bridge's, the transforms
checked against transformers' own GDN / gated-attention code, the config read both ways, TP
limits, and the published config planned (--dry-run) without weights.

megatron-core 0.16.1 cannot build this model on CPU (reference §5.4, §10: the GDN layer
imports flash-linear-attention, the experimental block spec is TE-only, the local norm refuses
zero-centred gamma), so the Megatron side is the table Megatron-Bridge's
``qwen/qwen3_next_bridge.py`` @067f987d implements, as /work/shared/reference/
architectures-wave2.md §5.3 documents it, and megatron-core 0.16.1's
``GatedDeltaNet.sharded_state_dict`` sub-keys (read in the installed wheel).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import ckpt_ir
from ckpt_ir.errors import FormatError, IncompatibleLayoutError
from ckpt_ir.ir import ModelConfig
from ckpt_ir.layout import ParallelLayout, Partition
from ckpt_ir.megatron_config import hf_config_from_megatron, megatron_args
from ckpt_ir.tables import build_table
from ckpt_ir.transforms import (
    ConcatGateUp,
    GroupGDNInProj,
    Identity,
    InterleaveGatedQKV,
    RowBlocks,
    ZeroCentre,
)

# Qwen/Qwen3-Next-80B-A3B-Instruct config.json: the sizes are the reference's §5.1;
# intermediate_size 5120 and max_position_embeddings 262144 are the published file's (not in
# the reference; intermediate_size sizes no tensor since every layer is routed). The file has
# no MTP count (ckpt-ir assumes the hub's one MTP layer).
QWEN3_NEXT_80B = {
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "decoder_sparse_step": 1,
    "full_attention_interval": 4,
    "head_dim": 256,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_value_head_dim": 128,
    "max_position_embeddings": 262144,
    "mlp_only_layers": [],
    "moe_intermediate_size": 512,
    "norm_topk_prob": True,
    "num_attention_heads": 16,
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "num_hidden_layers": 48,
    "num_key_value_heads": 2,
    "output_router_logits": False,
    "partial_rotary_factor": 0.25,
    "rms_norm_eps": 1e-6,
    "rope_scaling": None,
    "rope_theta": 10000000,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 512,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# A tiny config of every structural kind (layers: linear, full, linear, full; the MTP layer
# assumed), for tests that loop over the registry (tests/unit/test_architectures.py).
TINY = dict(model_type="qwen3_next", hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, vocab_size=50, intermediate_size=40,
            linear_num_key_heads=2, linear_key_head_dim=4, linear_num_value_heads=4,
            linear_value_head_dim=4, linear_conv_kernel_dim=4, full_attention_interval=2,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
            shared_expert_intermediate_size=36, partial_rotary_factor=0.25)

# The reference's symbols for the 80B: H, nh, G, d, nk, dk, nv, dv, K, E, Fm, Fs.
H, NH, G, D = 2048, 16, 2, 256
NK, DK, NV, DV, K = 16, 128, 32, 128, 4
E, FM, FS = 512, 512, 512


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return ModelConfig.from_hf(QWEN3_NEXT_80B)


@pytest.fixture(scope="module")
def table(config):
    return build_table("mcore", config)


def test_layer_kinds_follow_full_attention_interval(config):
    # Layers 3, 7, 11, ... are full attention (reference §5.1).
    full = [i for i in range(48) if not config.is_linear_attention_layer(i)]
    assert full == list(range(3, 48, 4))
    assert not config.has_uniform_layers  # per-layer torch_dist keys
    assert config.num_mtp_layers == 1
    assert not config.is_linear_attention_layer(48)  # the MTP layer has full attention
    explicit = ModelConfig.from_hf({**QWEN3_NEXT_80B, "layer_types": [
        "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(48)]})
    assert explicit.linear_attention_layers == config.linear_attention_layers


def test_the_80b_schema_is_the_published_size(config):
    schema = config.schema()
    params = sum(math.prod(s) for s in schema.values())
    mtp = sum(math.prod(s) for n, s in schema.items() if n.startswith("mtp."))
    # 80B total without the MTP layer (79.67e9), 1.65e9 in the MTP layer.
    assert 79.5e9 < params - mtp < 80.0e9
    assert 1.6e9 < mtp < 1.7e9
    lin, att = "model.layers.0.linear_attn.", "model.layers.3.self_attn."
    assert schema[lin + "in_proj_qkvz.weight"] == (2 * NK * DK + 2 * NV * DV, H)
    assert schema[lin + "in_proj_ba.weight"] == (2 * NV, H)
    assert schema[lin + "conv1d.weight"] == (2 * NK * DK + NV * DV, 1, K)
    assert schema[lin + "A_log"] == schema[lin + "dt_bias"] == (NV,)
    assert schema[lin + "norm.weight"] == (DV,)
    assert schema[lin + "out_proj.weight"] == (H, NV * DV)
    assert schema[att + "q_proj.weight"] == (NH * 2 * D, H)
    assert schema[att + "k_proj.weight"] == (G * D, H)
    assert schema["model.layers.0.mlp.shared_expert_gate.weight"] == (1, H)
    assert schema["mtp.fc.weight"] == (H, 2 * H)
    assert "mtp.layers.0.self_attn.q_proj.weight" in schema
    assert "model.layers.3.linear_attn.A_log" not in schema


# Megatron name (in-memory, TP=1) -> (HF parts, transform type, TP partition, native shape):
# Megatron-Bridge's table, reference §5.3, for linear layer 0, full layer 3 and the MTP layer.
L0, L3, M = "decoder.layers.0.", "decoder.layers.3.", "mtp.layers.0."
H0, H3 = "model.layers.0.", "model.layers.3."
MB_ROWS = {
    L0 + "self_attention.in_proj.layer_norm_weight":
        ([H0 + "input_layernorm.weight"], Identity, Partition.REPLICATED, (H,)),
    L0 + "self_attention.in_proj.weight":
        ([H0 + "linear_attn.in_proj_qkvz.weight", H0 + "linear_attn.in_proj_ba.weight"],
         GroupGDNInProj, Partition.BLOCKS, (2 * NK * DK + 2 * NV * DV + 2 * NV, H)),
    L0 + "self_attention.conv1d.weight":
        ([H0 + "linear_attn.conv1d.weight"], RowBlocks, Partition.BLOCKS,
         (2 * NK * DK + NV * DV, 1, K)),
    L0 + "self_attention.A_log": ([H0 + "linear_attn.A_log"], Identity, Partition.COLUMN, (NV,)),
    L0 + "self_attention.dt_bias":
        ([H0 + "linear_attn.dt_bias"], Identity, Partition.COLUMN, (NV,)),
    L0 + "self_attention.out_norm.weight":
        ([H0 + "linear_attn.norm.weight"], ZeroCentre, Partition.REPLICATED, (DV,)),
    L0 + "self_attention.out_proj.weight":
        ([H0 + "linear_attn.out_proj.weight"], Identity, Partition.ROW, (H, NV * DV)),
    L3 + "self_attention.linear_qkv.layer_norm_weight":
        ([H3 + "input_layernorm.weight"], Identity, Partition.REPLICATED, (H,)),
    L3 + "self_attention.linear_qkv.weight":
        ([H3 + "self_attn.q_proj.weight", H3 + "self_attn.k_proj.weight",
          H3 + "self_attn.v_proj.weight"], InterleaveGatedQKV, Partition.QKV,
         (G * (2 * NH // G + 2) * D, H)),
    L3 + "self_attention.q_layernorm.weight":
        ([H3 + "self_attn.q_norm.weight"], Identity, Partition.REPLICATED, (D,)),
    L3 + "self_attention.k_layernorm.weight":
        ([H3 + "self_attn.k_norm.weight"], Identity, Partition.REPLICATED, (D,)),
    L3 + "self_attention.linear_proj.weight":
        ([H3 + "self_attn.o_proj.weight"], Identity, Partition.ROW, (H, NH * D)),
    L3 + "pre_mlp_layernorm.weight":
        ([H3 + "post_attention_layernorm.weight"], Identity, Partition.REPLICATED, (H,)),
    L3 + "mlp.router.weight": ([H3 + "mlp.gate.weight"], Identity, Partition.REPLICATED, (E, H)),
    L3 + "mlp.experts.experts.511.linear_fc1.weight":
        ([H3 + "mlp.experts.511.gate_proj.weight", H3 + "mlp.experts.511.up_proj.weight"],
         ConcatGateUp, Partition.SWIGLU, (2 * FM, H)),
    L3 + "mlp.experts.experts.511.linear_fc2.weight":
        ([H3 + "mlp.experts.511.down_proj.weight"], Identity, Partition.ROW, (H, FM)),
    L3 + "mlp.shared_experts.linear_fc1.weight":
        ([H3 + "mlp.shared_expert.gate_proj.weight", H3 + "mlp.shared_expert.up_proj.weight"],
         ConcatGateUp, Partition.SWIGLU, (2 * FS, H)),
    L3 + "mlp.shared_experts.linear_fc2.weight":
        ([H3 + "mlp.shared_expert.down_proj.weight"], Identity, Partition.ROW, (H, FS)),
    L3 + "mlp.shared_experts.gate_weight":
        ([H3 + "mlp.shared_expert_gate.weight"], Identity, Partition.REPLICATED, (1, H)),
    M + "eh_proj.weight": (["mtp.fc.weight"], Identity, Partition.COLUMN, (H, 2 * H)),
    M + "enorm.weight":
        (["mtp.pre_fc_norm_embedding.weight"], Identity, Partition.REPLICATED, (H,)),
    M + "hnorm.weight": (["mtp.pre_fc_norm_hidden.weight"], Identity, Partition.REPLICATED, (H,)),
    M + "final_layernorm.weight": (["mtp.norm.weight"], Identity, Partition.REPLICATED, (H,)),
    # megatron-core 0.16.1 names the MTP decoder layer transformer_layer (MB: mtp_model_layer).
    M + "transformer_layer.self_attention.linear_qkv.weight":
        (["mtp.layers.0.self_attn.q_proj.weight", "mtp.layers.0.self_attn.k_proj.weight",
          "mtp.layers.0.self_attn.v_proj.weight"], InterleaveGatedQKV, Partition.QKV,
         (G * (2 * NH // G + 2) * D, H)),
    M + "transformer_layer.mlp.shared_experts.gate_weight":
        (["mtp.layers.0.mlp.shared_expert_gate.weight"], Identity, Partition.REPLICATED, (1, H)),
    "embedding.word_embeddings.weight":
        (["model.embed_tokens.weight"], None, Partition.VOCAB, (151936, H)),
    "decoder.final_layernorm.weight":
        (["model.norm.weight"], Identity, Partition.REPLICATED, (H,)),
    "output_layer.weight": (["lm_head.weight"], None, Partition.VOCAB, (151936, H)),
}


@pytest.mark.parametrize("native", list(MB_ROWS))
def test_the_mcore_row_is_megatron_bridges(config, table, native):
    parts, kind, partition, shape = MB_ROWS[native]
    b = table.by_native[native]
    assert list(b.ir.values()) == parts
    if kind is not None:
        assert type(b.transform) is kind
    assert b.partition is partition
    schema = config.schema()
    assert b.transform.shapes({r: schema[n] for r, n in b.ir.items()}) == shape


def test_the_mcore_table_covers_the_80b_exactly(config, table):
    assert set(table.by_ir) == set(config.schema())
    # Linear layers have no attention rows, full layers no GDN rows; every layer is routed.
    assert L0 + "self_attention.linear_qkv.weight" not in table.by_native
    assert L3 + "self_attention.in_proj.weight" not in table.by_native
    assert L0 + "mlp.linear_fc1.layer_norm_weight" not in table.by_native
    gdn = table.by_native[L0 + "self_attention.in_proj.weight"].transform
    assert gdn == GroupGDNInProj(NK, DK, NV // NK, DV)
    schema = config.schema()
    # megatron-core's _split_tensor_factory sizes: qk_dim, qk_dim, v_dim, v_dim, nv, nv.
    assert gdn.tp_blocks({}) == (NK * DK, NK * DK, NV * DV, NV * DV, NV, NV)
    conv = table.by_native[L0 + "self_attention.conv1d.weight"].transform
    assert conv.tp_blocks({"tensor": schema[H0 + "linear_attn.conv1d.weight"]}) == \
        (NK * DK, NK * DK, NV * DV)


def _gdn_module(**sizes):
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    cfg = Qwen3NextConfig(hidden_size=12, num_hidden_layers=1, layer_types=["linear_attention"],
                          **sizes)
    torch.manual_seed(0)
    return Qwen3NextGatedDeltaNet(cfg, 0)


@torch.no_grad()
def test_group_gdn_in_proj_is_transformers_split_by_component():
    # transformers' own fix_query_key_value_ordering gives q, k, v, z, b, a per head; the
    # regrouped weight's row blocks must project to exactly those, component by component.
    gdn = _gdn_module(linear_num_key_heads=2, linear_key_head_dim=3, linear_num_value_heads=6,
                      linear_value_head_dim=2, linear_conv_kernel_dim=4)
    op = GroupGDNInProj(2, 3, 3, 2)
    native = op.apply({"qkvz": gdn.in_proj_qkvz.weight, "ba": gdn.in_proj_ba.weight})
    x = torch.randn(1, 5, 12, dtype=torch.float64)
    q, k, v, z, b, a = gdn.fix_query_key_value_ordering(
        x @ gdn.in_proj_qkvz.weight.double().T, x @ gdn.in_proj_ba.weight.double().T)
    blocks = (x @ native.double().T).split(op.tp_blocks({}), dim=-1)
    for ours, theirs in zip(blocks, (q, k, v, z, b, a), strict=True):
        assert torch.equal(ours, theirs.reshape(1, 5, -1))


@torch.no_grad()
def test_conv1d_channels_are_q_k_v_in_the_order_transformers_convolves():
    # transformers concatenates the flattened q, k, v (head-major) before the depthwise conv:
    # the channels are [q_all; k_all; v_all], Megatron's order too (a copy at TP=1).
    gdn = _gdn_module(linear_num_key_heads=2, linear_key_head_dim=3, linear_num_value_heads=4,
                      linear_value_head_dim=2, linear_conv_kernel_dim=4)
    assert gdn.conv1d.weight.shape == (2 * 2 * 3 + 4 * 2, 1, 4)
    assert gdn.key_dim == 6 and gdn.value_dim == 8


@torch.no_grad()
def test_gated_qkv_matches_transformers_query_and_gate_split():
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextAttention

    cfg = Qwen3NextConfig(hidden_size=12, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=3, num_hidden_layers=1, layer_types=["full_attention"])
    attn = Qwen3NextAttention(cfg, 0)
    # transformers' forward: q_proj(x).view(..., heads, 2d).chunk(2, -1) -> query, gate; the
    # same view of the weight gives the rows of each.
    query, gate = torch.chunk(attn.q_proj.weight.view(4, 6, 12), 2, dim=1)
    fused = InterleaveGatedQKV(2, 2, 3).apply({"q": attn.q_proj.weight, "k": attn.k_proj.weight,
                                               "v": attn.v_proj.weight})
    groups = fused.view(2, 2 * 2 * 3 + 2 * 3, 12)
    for g in range(2):
        heads = slice(2 * g, 2 * g + 2)
        assert torch.equal(groups[g, :6], query[heads].reshape(6, 12))
        assert torch.equal(groups[g, 6:12], gate[heads].reshape(6, 12))
        assert torch.equal(groups[g, 12:15], attn.k_proj.weight[3 * g: 3 * g + 3])
        assert torch.equal(groups[g, 15:], attn.v_proj.weight[3 * g: 3 * g + 3])


def test_megatron_args_are_megatron_bridges_provider(config):
    args = megatron_args(config)
    tc = args.transformer_config
    assert tc["experimental_attention_variant"] == "gated_delta_net"
    assert tc["linear_attention_freq"] == [0 if (i + 1) % 4 == 0 else 1 for i in range(48)]
    assert (tc["linear_num_key_heads"], tc["linear_key_head_dim"], tc["linear_num_value_heads"],
            tc["linear_value_head_dim"], tc["linear_conv_kernel_dim"]) == (NK, DK, NV, DV, K)
    assert tc["attention_output_gate"] and tc["layernorm_zero_centered_gamma"]
    assert tc["qk_layernorm"] and tc["moe_shared_expert_gate"]
    assert tc["hetereogenous_dist_checkpoint"]
    assert tc["mtp_num_layers"] == 1 and tc["num_moe_experts"] == E
    assert "moe_router_pre_softmax" not in tc  # norm_topk_prob: softmax, then top k
    assert args.gpt_model["rotary_percent"] == 0.25
    assert args.gpt_model["rotary_base"] == 1e7
    assert any("TE layer spec" in n for n in args.notes)


def test_hf_config_from_megatron_reads_the_same_model_back(config):
    args = megatron_args(config)
    fields = {**args.transformer_config, **args.gpt_model}
    back = hf_config_from_megatron(fields, architecture="qwen3_next", tied=False)
    again = ModelConfig.from_hf(back)
    assert again.schema() == config.schema()
    assert back["rope_parameters"]["partial_rotary_factor"] == 0.25
    # Megatron arguments that name no architecture: linear_attention_freq says qwen3_next.
    assert hf_config_from_megatron(fields, tied=False)["model_type"] == "qwen3_next"


@pytest.mark.parametrize(("tp", "message"), [
    (4, "TP=4 does not divide the 2 KV groups of the gated attention"),
    (32, "TP=32 does not divide the 16 linear-attention key heads"),
])
def test_tp_must_keep_kv_groups_and_key_heads_whole(config, tp, message):
    with pytest.raises(IncompatibleLayoutError, match=message):
        ParallelLayout(tp=tp).check_model(config, 151936 + (-151936 % (128 * tp)))


def test_tp2_is_accepted(config):
    ParallelLayout(tp=2).check_model(config, 151936)


@pytest.mark.parametrize(("change", "message"), [
    ({"num_nextn_predict_layers": 2}, "2 MTP layers is not supported"),
    ({"linear_num_value_heads": 24, "linear_num_key_heads": 16}, "not a multiple"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types must list"),
    ({"attention_bias": True}, "attention_bias=True"),
])
def test_configs_ckpt_ir_cannot_map_are_refused_by_name(change, message):
    with pytest.raises(FormatError, match=message):
        ModelConfig.from_hf({**QWEN3_NEXT_80B, **change})


def _write(tmp_path: Path, config: dict) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    return src


def test_the_80b_config_plans_without_weights(tmp_path, config, table):
    src = _write(tmp_path, QWEN3_NEXT_80B)
    report = ckpt_ir.convert(src, tmp_path / "out", to="mcore-dist", dry_run=True)
    assert report.architecture == "qwen3_next"
    assert report.tensors_written == len(table.bindings)
    params = sum(math.prod(s) for s in config.schema().values())
    assert 2 * params <= report.bytes_written < 2 * params + 2**30  # bf16
    assert not (tmp_path / "out").exists()


def test_the_cli_dry_run_plans_the_80b_config_per_rank(tmp_path, capsys):
    from ckpt_ir.cli import main

    src = _write(tmp_path, QWEN3_NEXT_80B)
    dst = tmp_path / "out"
    code = main(["convert", str(src), str(dst), "--to", "megatron-legacy", "--tp", "2",
                 "--pp", "4", "--ep", "8", "--dry-run", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    plan = json.loads(out.out)
    assert plan["dry_run"] is True and plan["architecture"] == "qwen3_next"
    assert not dst.exists()


def test_the_cli_refuses_tp4_in_one_line(tmp_path, capsys):
    from ckpt_ir.cli import main

    src = _write(tmp_path, QWEN3_NEXT_80B)
    code = main(["convert", str(src), str(tmp_path / "out"), "--to", "verl-legacy", "--tp", "4",
                 "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "gated attention" in err
    assert not (tmp_path / "out").exists()


def test_an_out_norm_weight_that_w_minus_1_would_round_is_refused_in_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    from ckpt_ir.cli import main
    from tests.fixtures import write_hf

    state = write_hf(tmp_path / "hf", TINY)
    norm = "model.layers.0.linear_attn.norm.weight"
    # bf16 155 * 2^-9: w - 1 needs a bit bf16 lacks there (ZeroCentre's exactness check).
    state[norm] = torch.tensor([1.0, 0.302734375, 1.5, 2.0], dtype=torch.bfloat16)
    state["model.layers.2.linear_attn.norm.weight"] = torch.ones(4, dtype=torch.bfloat16)
    save_file(state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    code = main(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--to", "mcore-dist"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "1 norm weight(s)" in err and "--dtype fp32" in err
    assert not (tmp_path / "out").exists()
    # In fp32 the same weights are exact: converted, and back bit for bit.
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--to", "mcore-dist",
                 "--dtype", "fp32"]) == 0
    assert main(["convert", str(tmp_path / "out"), str(tmp_path / "back"), "--to", "hf"]) == 0
    back = ckpt_ir.open(tmp_path / "back")
    assert torch.equal(back.read(norm), state[norm].float())


def _tiny_hf(path: Path) -> dict[str, torch.Tensor]:
    """A random fp32 TINY checkpoint whose GDN output norms are exact under w - 1."""
    from safetensors.torch import save_file

    from tests.fixtures import write_hf

    state = write_hf(path, TINY, dtype=torch.float32)
    for name in state:
        if name.endswith("linear_attn.norm.weight"):
            state[name] = torch.linspace(0.5, 2.0, state[name].numel())
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return state


def test_a_split_gdn_tensor_missing_a_sub_key_is_corrupt(tmp_path):
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from ckpt_ir.errors import CorruptCheckpointError
    from tests.fixtures import load_dcp_tensors

    _tiny_hf(tmp_path / "hf")
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "dist", to="mcore-dist")
    state = load_dcp_tensors(tmp_path / "dist")
    key = "decoder.layers.0.self_attention.in_proj.weight.alpha"
    assert state[key].shape == (4, 32)
    # Re-saved by torch's own DCP writer (the same format) without one sub-key.
    del state[key]
    bad = tmp_path / "bad"
    dcp.save(state, storage_writer=FileSystemWriter(bad), no_dist=True)
    shutil.copy(tmp_path / "dist" / "metadata.json", bad)
    shutil.copytree(tmp_path / "dist" / "hf_config", bad / "hf_config")
    with pytest.raises(CorruptCheckpointError, match=r"in_proj.weight is stored split but "
                                                     r"lacks \['decoder.layers.0"):
        ckpt_ir.open(bad)
    # The complete re-save reads back as the same model.
    shutil.rmtree(bad)
    dcp.save(load_dcp_tensors(tmp_path / "dist"), storage_writer=FileSystemWriter(bad),
             no_dist=True)
    shutil.copy(tmp_path / "dist" / "metadata.json", bad)
    shutil.copytree(tmp_path / "dist" / "hf_config", bad / "hf_config")
    with ckpt_ir.open(bad) as ours, ckpt_ir.open(tmp_path / "hf") as theirs:
        name = "model.layers.0.linear_attn.in_proj_qkvz.weight"
        assert torch.equal(ours.read(name), theirs.read(name))


@pytest.mark.parametrize(("targets", "module"), [
    (["q_proj", "v_proj"], "model.layers.1.self_attn.q_proj"),
    (["in_proj_qkvz"], "model.layers.0.linear_attn.in_proj_qkvz"),
    (["out_proj"], "model.layers.0.linear_attn.out_proj"),
])
def test_lora_on_the_attention_is_refused_by_name(targets, module):
    from ckpt_ir.adapters import AdapterConfig

    peft = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets}
    with pytest.raises(FormatError, match=rf"targets {module}: LoRA on qwen3_next's attention"):
        AdapterConfig.from_peft(peft, ModelConfig.from_hf(TINY))


def test_lora_on_the_mlp_maps_like_qwen2_moes():
    from ckpt_ir.adapters import AdapterConfig

    peft = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["gate_proj"]}
    adapter = AdapterConfig.from_peft(peft, ModelConfig.from_hf(TINY))
    assert "model.layers.0.mlp.shared_expert.gate_proj" in adapter.modules()
    assert "model.layers.0.mlp.experts.3.gate_proj" in adapter.modules()
