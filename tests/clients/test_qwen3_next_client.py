"""qwen3_next (Qwen3-Next-80B-A3B) with transformers 5.23: round trips bit for bit.

A tiny random ``Qwen3NextForCausalLM`` built from Qwen3-Next-80B-A3B's config shrunk, every
structural flag kept: both layer kinds (``layer_types`` linear, full, linear, full), Gated
DeltaNet with 2 value heads per key head, gated full attention with GQA (4:2) and q/k norms,
partial rotary 0.25 in ``rope_parameters``, every layer routed (4 experts, top 2, renormalised)
with a shared expert and its sigmoid gate, untied head. transformers neither builds nor saves
the MTP layer (``_keys_to_ignore_on_load_unexpected = [r"^mtp.*"]``), so the hub's
``mtp.*`` tensors are added to the saved file with the names and shapes of the published
checkpoint (reference §5.2).

megatron-core 0.16.1 cannot build this model on CPU (the GDN layer needs
flash-linear-attention and the TE-only experimental block spec; reference §5.4, §10): the
Megatron side is pinned by ``tests/unit/test_qwen3_next.py`` against Megatron-Bridge's mapping.
Here: HF -> ``mcore-dist`` / ``verl-legacy`` (TP=2) / ``megatron-legacy`` (PP=2, EP=2) -> HF
reproduces every tensor's bytes (MTP included) and the config, and the model transformers
reloads from the result gives logits identical to the source's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import ckpt_ir
from ckpt_ir.ir import ModelConfig
from tests.clients import hf_models
from tests.fixtures import safetensors_bytes

pytestmark = pytest.mark.clients

# Qwen3-Next-80B-A3B's config (reference §5.1) shrunk; the published values in comments.
TINY = {
    "hidden_size": 64,                    # 2048
    "num_hidden_layers": 4,               # 48
    "num_attention_heads": 4,             # 16
    "num_key_value_heads": 2,             # 2
    "head_dim": 16,                       # 256
    "intermediate_size": 96,              # 5120 (unused: every layer routed)
    "vocab_size": hf_models.VOCAB_SIZE,   # 151936
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "linear_num_key_heads": 2,            # 16
    "linear_key_head_dim": 8,             # 128
    "linear_num_value_heads": 4,          # 32 (2 per key head)
    "linear_value_head_dim": 8,           # 128
    "linear_conv_kernel_dim": 4,          # 4
    "num_experts": 4,                     # 512
    "num_experts_per_tok": 2,             # 10
    "moe_intermediate_size": 32,          # 512
    "shared_expert_intermediate_size": 48,  # 512
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "full_attention_interval": 2,         # 4
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e7,
                        "partial_rotary_factor": 0.25},
}

CASES = {
    "mcore-dist": {"to": "mcore-dist"},
    "verl-legacy-tp2": {"to": "verl-legacy", "layout": {"tp": 2, "pp": 1},
                        "pad_vocab_to_multiple": 128},
    "megatron-legacy-pp2": {"to": "megatron-legacy", "layout": {"tp": 1, "pp": 2}},
    "megatron-legacy-ep2": {"to": "megatron-legacy", "layout": {"tp": 1, "pp": 1, "ep": 2}},
}


@dataclass
class Model:
    path: Path
    ids: list[list[int]]
    ref: torch.Tensor


@torch.no_grad()
def _make(path: Path) -> Path:
    import transformers
    from safetensors.torch import load_file, save_file

    config = transformers.Qwen3NextConfig(**TINY)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf_models.randomize_(model, 5)
    for name, p in model.named_parameters():
        if name.endswith("linear_attn.norm.weight"):
            # The plain GDN output norm is stored as w - 1 by Megatron: draw it where that is
            # exact in fp32 (ZeroCentre refuses anything else).
            p.uniform_(0.5, 2.0)
    model.save_pretrained(path)
    # The hub's MTP layer (a full-attention MoE layer with fc and three norms), which
    # transformers does not build: added with the published names and shapes.
    file = path / "model.safetensors"
    tensors = load_file(file)
    gen = torch.Generator().manual_seed(11)
    for name, shape in ModelConfig.from_hf(json.loads((path / "config.json").read_text())
                                           ).schema().items():
        if name not in tensors:
            assert name.startswith("mtp."), name
            scale = torch.randn(shape, generator=gen)
            tensors[name] = 1.0 + 0.3 * scale if "norm" in name else 0.1 * scale
    save_file(tensors, file, metadata={"format": "pt"})
    return path


@torch.no_grad()
def _logits(path: Path, ids: list[list[int]]) -> torch.Tensor:
    """transformers' fp32 logits of the model at ``path``, its parameters copied out of the
    mapped file first: CPU kernels round differently with a tensor's alignment in memory, and
    a file written in another tensor order maps them at other offsets (1.8e-6 apart for the
    same bytes, measured); fresh allocations make equal weights give equal logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager")
    for p in model.parameters():
        p.data = p.data.clone()
    model.eval()
    return model(input_ids=torch.tensor(ids)).logits.float()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    path = _make(tmp_path_factory.mktemp("qwen3_next") / "hf")
    ids = hf_models.input_ids()
    return Model(path, ids, _logits(path, ids))


def test_the_tiny_model_has_every_qwen3_next_tensor_kind(model: Model) -> None:
    shapes = {n: s for n, (_, s, _) in safetensors_bytes(model.path).items()}
    assert shapes["model.layers.0.linear_attn.in_proj_qkvz.weight"] == (2 * 16 + 2 * 32, 64)
    assert shapes["model.layers.0.linear_attn.in_proj_ba.weight"] == (8, 64)
    assert shapes["model.layers.0.linear_attn.conv1d.weight"] == (2 * 16 + 32, 1, 4)
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (2 * 4 * 16, 64)
    assert shapes["model.layers.1.mlp.shared_expert_gate.weight"] == (1, 64)
    assert shapes["mtp.fc.weight"] == (64, 128)
    assert "mtp.layers.0.self_attn.q_proj.weight" in shapes
    assert "model.layers.1.linear_attn.A_log" not in shapes
    assert "model.layers.0.self_attn.q_proj.weight" not in shapes
    assert model.ref.std() > 0.1


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_exact_and_reloads_with_identical_logits(
        model: Model, case: str, tmp_path: Path) -> None:
    native, back = tmp_path / case, tmp_path / f"{case}-hf"
    ckpt_ir.convert(model.path, native, **CASES[case])
    report = ckpt_ir.convert(native, back, to="hf")
    assert report.architecture == "qwen3_next"
    assert safetensors_bytes(back) == safetensors_bytes(model.path)
    src_config = json.loads((model.path / "config.json").read_text())
    out_config = json.loads((back / "config.json").read_text())
    assert out_config == src_config, set(out_config.items()) ^ set(src_config.items())
    logits = _logits(back, model.ids)
    assert torch.equal(logits, model.ref)


def test_the_torch_dist_output_holds_megatron_cores_gdn_sub_keys(
        model: Model, tmp_path: Path) -> None:
    from tests.fixtures import load_dcp_tensors

    ckpt_ir.convert(model.path, tmp_path / "dist", to="mcore-dist")
    keys = {k: tuple(t.shape) for k, t in load_dcp_tensors(tmp_path / "dist").items()}
    a = "decoder.layers.0.self_attention."
    assert {k.removeprefix(a): s for k, s in keys.items()
            if k.startswith(a + "in_proj.weight.")} == {
        "in_proj.weight.query": (16, 64), "in_proj.weight.key": (16, 64),
        "in_proj.weight.value": (32, 64), "in_proj.weight.z": (32, 64),
        "in_proj.weight.beta": (4, 64), "in_proj.weight.alpha": (4, 64)}
    assert keys[a + "conv1d.weight.value"] == (32, 1, 4)
    assert a + "in_proj.weight" not in keys
    assert keys["decoder.layers.1.self_attention.linear_qkv.weight"] == (2 * (2 * 2 + 2) * 16, 64)
    assert keys["mtp.layers.0.eh_proj.weight"] == (64, 128)
