"""torchtitan 0.3.0 as the client of ``--torchtitan`` output and the producer of ``torch-dcp``
input, on CPU, with its own model classes, ``StateDictAdapter`` and ``CheckpointManager``
(tests/clients/torchtitan_models.py).

* HF -> ``convert --to torch-dcp --torchtitan`` -> torchtitan's ``CheckpointManager.load()``
  (step 0: model-only, the seed-checkpoint path) into its llama3 / qwen3 / qwen3 MoE /
  deepseek_v3 model: every tensor equals what torchtitan's own ``from_hf`` makes of the HF
  weights, bit for bit, and torchtitan's forward gives transformers' logits.
* torchtitan's ``CheckpointManager.save()`` at step 5, after one step of its AdamW container
  and scheduler -> ``convert --to hf``: every tensor equals torchtitan's own ``to_hf`` of the
  model's state dict, bit for bit; the optimizer and scheduler entries are listed as dropped.

Logit tolerances: dense models 1e-5 (fp32 both sides; measured ~1.5e-6). torchtitan 0.3.0's
``GroupedExperts`` casts tokens and expert weights to bf16 for ``torch._grouped_mm`` on every
device, so MoE models differ from transformers' fp32 experts by bf16 rounding (measured max
5e-3 / 1.2e-2 on logits of magnitude ~3): 5e-2, and torchtitan's own random init, before the
load, must miss transformers' logits by far more, so the bound still tells a right load from
a wrong one. The weights themselves are compared exactly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir
from ckpt_ir.converters.storage.dcp_files import DcpReader
from ckpt_ir.ir import ModelConfig
from tests.clients import torchtitan_models as tt
from tests.clients.hf_models import hf_logits, input_ids, make_hf_model
from tests.fixtures import load_hf_tensors

pytestmark = [pytest.mark.clients, pytest.mark.slow]

ARCHS = ("llama", "qwen3", "qwen3_moe", "deepseek_v3")
MOE = ("qwen3_moe", "deepseek_v3")
# torchtitan's llama3 and deepseek_v3 builders use its default RMSNorm eps.
_EPS = {"llama": 1e-5, "deepseek_v3": 1e-5}


def _hf_model(arch: str, tmp: Path) -> Path:
    eps = _EPS.get(arch)
    return make_hf_model(arch, tmp, **({"rms_norm_eps": eps} if eps else {}))


def _hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(hf_dir / "model.safetensors")


def _assert_bits(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert want.keys() == got.keys(), sorted(set(want) ^ set(got))
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def _with_mtp(hf_dir: Path, out: Path) -> Path:
    """``hf_dir`` plus DeepSeek-V3's MTP layer as its releases store it (transformers neither
    builds nor saves one): every tensor of HF layer ``num_layers`` random, its copies of the
    embedding and the head equal to them."""
    out.mkdir()
    for f in hf_dir.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    state = _hf_state(hf_dir)
    config = ModelConfig.from_hf(json.loads((hf_dir / "config.json").read_text()))
    prefix = f"model.layers.{config.num_layers}."
    gen = torch.Generator().manual_seed(5)
    for name, shape in config.schema().items():
        if name.startswith(prefix):
            base = 1.0 if "norm" in name else 0.0
            state[name] = base + 0.1 * torch.randn(shape, generator=gen)
    state[prefix + "embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    state[prefix + "shared_head.head.weight"] = state["lm_head.weight"].clone()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_torchtitan_checkpointer_loads_ckpt_ir_output(tmp_path: Path, arch: str) -> None:
    hf = _hf_model(arch, tmp_path)
    ckpt_ir.convert(hf, tmp_path / "checkpoint", to="torch-dcp", torchtitan=True)
    model = tt.titan_model(hf)
    ids = input_ids()
    want_logits = hf_logits(hf, ids)
    tol = 5e-2 if arch in MOE else 1e-5
    (before,) = tt.titan_logits(model, ids)
    assert (before - want_logits).abs().max() > 10 * tol  # the bound tells loads apart

    # torchtitan's checkpointer finds step-0 (the newest step with a .metadata) and loads it
    # model-only, through dcp.load and the model's own load_state_dict.
    assert tt.checkpointer(model, tmp_path / "checkpoint", hf).load()

    oracle = tt.adapter(hf).from_hf(_hf_state(hf))
    got = dict(model.state_dict())
    if arch == "qwen3_moe":
        # The load-balancing bias HF Qwen3-MoE lacks: ckpt-ir writes torchtitan's initial
        # value, zeros (so transformers' routing); from_hf leaves it out.
        for layer in range(2):
            bias = got.pop(f"layers.{layer}.moe.expert_bias_E")
            assert torch.equal(bias, torch.zeros(6))
    _assert_bits(oracle, got)
    torch.testing.assert_close(tt.titan_logits(model, ids)[0], want_logits, rtol=0, atol=tol)


def test_deepseek_v3_mtp_layer_loads_as_torchtitan_mtp_layers(tmp_path: Path) -> None:
    hf = _with_mtp(_hf_model("deepseek_v3", tmp_path), tmp_path / "with_mtp")
    ckpt_ir.convert(hf, tmp_path / "checkpoint", to="torch-dcp", torchtitan=True)
    keys = set(DcpReader(tmp_path / "checkpoint" / "step-0").index.tensors)
    assert "mtp_layers.0.eh_proj.weight" in keys
    assert not any(k.startswith("layers.3.") for k in keys)  # MTP is not a decoder layer

    model = tt.titan_model(hf, mtp=True)
    assert tt.checkpointer(model, tmp_path / "checkpoint", hf, mtp=True).load()
    # torchtitan's MTP block shares the model's embedding and head: its adapter has no name
    # for the HF layer's copies of them.
    state = {k: v for k, v in _hf_state(hf).items()
             if not k.endswith(("layers.3.embed_tokens.weight", "shared_head.head.weight"))}
    _assert_bits(tt.adapter(hf, mtp=True).from_hf(state), dict(model.state_dict()))
    main, mtp = tt.titan_logits(model, input_ids(), heads=2)
    torch.testing.assert_close(main, hf_logits(hf, input_ids()), rtol=0, atol=5e-2)
    assert mtp.shape == main.shape and torch.isfinite(mtp).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_torchtitan_checkpointer_save_converts_to_its_to_hf(tmp_path: Path, arch: str) -> None:
    hf = _with_mtp(_hf_model(arch, tmp_path), tmp_path / "mtp") if arch == "deepseek_v3" \
        else _hf_model(arch, tmp_path)
    mtp = arch == "deepseek_v3"
    model = tt.titan_model(hf, mtp=mtp)  # torchtitan's own random init
    if arch in MOE:
        with torch.no_grad():  # as if trained: the load-balancing bias moved off zero
            for name, buf in model.named_buffers():
                if name.endswith("expert_bias_E"):
                    buf.copy_(0.01 * torch.arange(buf.numel()))
    manager = tt.checkpointer(model, tmp_path / "checkpoint", hf, mtp=mtp, train=True)
    assert manager.save(curr_step=5)
    step = tmp_path / "checkpoint" / "step-5"
    assert (step / ".metadata").is_file()

    # The checkpoint folder, as a user points at it: detection walks to the newest step.
    report = ckpt_ir.convert(tmp_path / "checkpoint", tmp_path / "back", to="hf", hf_config=hf)
    assert report.source_format == "torch-dcp"
    want = tt.adapter(hf, mtp=mtp).to_hf(dict(model.state_dict()))
    got = load_hf_tensors(tmp_path / "back")
    if mtp:
        # ckpt-ir's hf output also carries the MTP layer's embedding / head copies, as
        # DeepSeek's releases do; torchtitan's to_hf has no name for them.
        p = "model.layers.3."
        assert torch.equal(got.pop(p + "embed_tokens.weight"), want["model.embed_tokens.weight"])
        assert torch.equal(got.pop(p + "shared_head.head.weight"), want["lm_head.weight"])
    _assert_bits(want, got)
    # Everything else is listed: AdamW's state of every parameter, the scheduler, the absent
    # dataloader (a pickled None), and for qwen3 MoE the load-balancing bias (not an HF
    # Qwen3-MoE weight; torchtitan's to_hf drops it silently; deepseek_v3's is
    # e_score_correction_bias, compared above).
    groups: dict[str, set[str]] = {}
    for key, why in report.dropped.items():
        groups.setdefault(key.split(".")[0], set()).add(why)
    assert groups.pop("optimizer") == {"optimizer state"}
    assert groups.pop("lr_scheduler") == {"learning-rate scheduler state"}
    assert groups.pop("dataloader") == {"dataloader state"}
    biases = {k for k in report.dropped if k.endswith("moe.expert_bias_E")}
    assert biases == ({"layers.0.moe.expert_bias_E", "layers.1.moe.expert_bias_E"}
                      if arch == "qwen3_moe" else set()), report.dropped
    assert set(groups) == ({"layers"} if biases else set()), groups
    assert sum(k.endswith(".exp_avg_sq") for k in report.dropped) == \
        len(list(model.parameters()))


# gpt-oss: torchtitan 0.3.0's adapter maps the MXFP4-era names (``inner_experts.mlp1_weight``,
# ``gate_up_proj_blocks``) that neither its model (``mlp1_weight_EGD``, ...) nor a bf16 HF
# checkpoint (``gate_up_proj``) has, so from_hf / to_hf pass the routed experts over (and
# name the expert biases ``mlp1_bias`` / ``mlp2_bias``, which its model lacks too); the
# oracle for them is torchtitan's model code: ``swiglu`` takes gate from the even rows of
# ``mlp1`` and up from the odd ones (transformers: even / odd columns of ``gate_up_proj``), and
# ``_grouped_mm`` multiplies by each weight transposed, so each expert's weight is
# transformers' transposed. Its full forward does not run on CPU (FlexAttention with sinks
# needs the log-sum-exp, which torch.compile on CPU does not return), so the MoE blocks are
# compared, in bf16: torchtitan's gpt-oss MoE runs bf16 only (fp32 tokens fail in its combine).
_GPT_OSS_EXPERTS = (("mlp1_weight_EGD", "gate_up_proj", True), ("mlp1_bias_EG",
                    "gate_up_proj_bias", False), ("mlp2_weight_EDF", "down_proj", True),
                    ("mlp2_bias_ED", "down_proj_bias", False))


def _gpt_oss_expected(hf_state: dict[str, torch.Tensor], oracle: dict[str, torch.Tensor],
                      layers: int) -> dict[str, torch.Tensor]:
    # The adapter maps the HF bias names to inner_experts.mlp1_bias / mlp2_bias, which the
    # model lacks (it has mlp1_bias_EG / mlp2_bias_ED): the same tensors under stale names.
    want = {k: v for k, v in oracle.items() if not k.endswith(("mlp1_bias", "mlp2_bias"))}
    for i in range(layers):
        for titan, hf, transposed in _GPT_OSS_EXPERTS:
            t = hf_state[f"model.layers.{i}.mlp.experts.{hf}"]
            want[f"layers.{i}.moe.routed_experts.inner_experts.{titan}"] = \
                t.transpose(1, 2) if transposed else t
    return want


def test_gpt_oss_both_ways_through_torchtitans_checkpointer(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tests.clients.gpt_oss_models import make_gpt_oss

    hf = make_gpt_oss(tmp_path / "hf")
    ckpt_ir.convert(hf, tmp_path / "checkpoint", to="torch-dcp", torchtitan=True)
    model = tt.titan_model(hf)
    hf_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    x = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def moe_gap() -> float:
        gap = 0.0
        for i, layer in enumerate(hf_model.model.layers):
            want = layer.mlp(x)
            want = want[0] if isinstance(want, tuple) else want
            moe = copy.deepcopy(model.layers[str(i)].moe).to(torch.bfloat16)
            got = moe(x.bfloat16()).float()
            gap = max(gap, (got - want).abs().max().item())
        return gap

    assert moe_gap() > 0.5  # torchtitan's own random init: far outside the bound below
    assert tt.checkpointer(model, tmp_path / "checkpoint", hf).load()
    state = _hf_state(hf)
    got = dict(model.state_dict())
    for i in range(4):  # no HF counterpart: torchtitan's initial value, zeros
        assert torch.equal(got.pop(f"layers.{i}.moe.expert_bias_E"), torch.zeros(4))
    _assert_bits(_gpt_oss_expected(state, tt.adapter(hf).from_hf(state), 4), got)
    assert moe_gap() < 5e-2  # measured ~1.2e-2 on outputs of magnitude ~1.5 (bf16)

    # torchtitan's checkpointer saves after an AdamW step; ckpt-ir gives transformers' layout.
    model = tt.titan_model(hf)
    assert tt.checkpointer(model, tmp_path / "saves", hf, train=True).save(curr_step=2)
    ckpt_ir.convert(tmp_path / "saves" / "step-2", tmp_path / "back", to="hf", hf_config=hf)
    back = load_hf_tensors(tmp_path / "back")
    sd = dict(model.state_dict())
    to_hf = tt.adapter(hf).to_hf(sd)
    for i in range(4):
        for titan, name, transposed in _GPT_OSS_EXPERTS:
            t = sd[f"layers.{i}.moe.routed_experts.inner_experts.{titan}"]
            to_hf[f"model.layers.{i}.mlp.experts.{name}"] = t.transpose(1, 2) if transposed else t
    _assert_bits(to_hf, back)
