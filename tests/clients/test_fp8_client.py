"""Block-FP8 releases (DeepSeek-V3 with its 576-row ``kv_a_proj_with_mqa`` and MTP layer,
Qwen3-FP8 with 136-row MLPs) built from tiny transformers models: read exactly, loaded by
transformers, written back as FP8, refused when damaged.

transformers 5.23's own CPU FP8 loader raises on 576 rows and mis-scales 136 (reference §9.3),
so the dequantized weights are compared with the reference formula (tests/clients/fp8_models.py)
and the converted bf16 model is what transformers loads.

Logit bound. Each FP8 weight is ``W + δ`` with ``|δ| <= 2**-4 |W|`` (e4m3 keeps 3 mantissa
bits: half an ulp is 2**-4 relative) plus ``S * 2**-10`` for the values that fall to e4m3
subnormals, and the bf16 rounding adds ``2**-8 |W|``. A linear layer's output then moves by
at most ``(2**-4 + 2**-8) |W| |x|``; through the tiny models' few layers (each a residual
update, the errors of independent weights summing like a random walk rather than adding up) the
logits move by a fraction of that relative error of their own size. The test allows
``max |Δlogits| <= 2**-3 * max |logits|`` (twice one e4m3 rounding of the largest logit).
Measured here: 0.240 of max |logits| 3.23 for deepseek_v3 (bound 0.403), 0.211 of 3.19 for
qwen3 (bound 0.399). The bound checks the model is the one the FP8 was made from; exactness is
the bit-for-bit comparison with the reference formula before it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir
from ckpt_ir.cli import main
from tests.clients.fp8_models import reference_dequant, write_fp8_release
from tests.clients.hf_models import hf_logits, input_ids
from tests.hostile import siblings

FP8 = torch.float8_e4m3fn
RELATIVE_LOGIT_BOUND = 2.0 ** -3


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8 else t.view(torch.uint8).reshape(-1)


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3"])
def test_fp8_release_dequantizes_exactly_and_keeps_the_model(arch: str, tmp_path: Path):
    src, fp8 = write_fp8_release(arch, tmp_path)
    report = ckpt_ir.convert(fp8, tmp_path / "bf16", "hf")
    assert any(n.startswith("source is block FP8 e4m3, 128x128 blocks") for n in report.notes)
    raw = load_file(fp8 / "model.safetensors")
    out = load_file(tmp_path / "bf16" / "model.safetensors")
    scales = {n for n in raw if n.endswith("_scale_inv")}
    assert scales and set(out) == set(raw) - scales
    ragged = {"deepseek_v3": "self_attn.kv_a_proj_with_mqa.weight",
              "qwen3": "mlp.gate_proj.weight"}[arch]
    assert raw[f"model.layers.0.{ragged}"].shape[0] in (576, 136)
    for name, t in out.items():
        if raw[name].dtype == FP8:
            want = reference_dequant(raw[name], raw[name + "_scale_inv"]).to(torch.bfloat16)
            assert t.dtype == torch.bfloat16 and torch.equal(_bits(t), _bits(want)), name
        else:
            assert torch.equal(_bits(t), _bits(raw[name])), name
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert config["ckpt_ir_dequantized_from"]["quant_method"] == "fp8"

    # transformers loads the bf16 result; its logits are the fp32 model's within the bound.
    ids = input_ids()
    ref = hf_logits(src, ids)
    got = hf_logits(tmp_path / "bf16", ids)
    bound = RELATIVE_LOGIT_BOUND * ref.abs().max().item()
    diff = (got - ref).abs().max().item()
    assert 0 < diff <= bound, f"{arch}: max |Δlogits| {diff:.3g} > {bound:.3g}"



def test_round_trip_through_mcore_dist_writes_the_release_back(tmp_path: Path):
    """DeepSeek-V3 with UE8M0 (power-of-two) scales: every dequantized value is exact in bf16,
    so FP8 -> mcore-dist (bf16) -> hf --quantize fp8 gives the release's bytes and scales back
    for every block whose largest FP8 value is above 224 (the re-quantizer picks the smallest
    power of two that fits, as the release's did unless its amax rounded down onto 224), and
    the same dequantized values everywhere. The MTP layer's embedding and head come back as
    copies of the model's."""
    _, fp8 = write_fp8_release("deepseek_v3", tmp_path, ue8m0=True)
    ckpt_ir.convert(fp8, tmp_path / "dist", "mcore-dist")
    report = ckpt_ir.convert(tmp_path / "dist", tmp_path / "back", "hf", quantize="fp8")
    assert any("MTP layers get copies" in n for n in report.notes)
    assert any(n.startswith("destination is block FP8 e4m3, 128x128 blocks, power-of-two")
               for n in report.notes)
    raw = load_file(fp8 / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert set(back) == set(raw)
    same = 0
    for name, t in raw.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype != FP8:
            assert torch.equal(_bits(back[name]), _bits(t)), name
            continue
        s, s2 = raw[name + "_scale_inv"], back[name + "_scale_inv"]
        assert torch.equal(reference_dequant(back[name], s2), reference_dequant(t, s)), name
        canonical = bool((_block_amax(t) > 224).all())
        if canonical:
            assert torch.equal(_bits(back[name]), _bits(t)) and torch.equal(s2, s), name
            same += 1
    assert same >= 0.8 * sum(t.dtype == FP8 for t in raw.values())
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["quantization_config"] == json.loads(
        (fp8 / "config.json").read_text())["quantization_config"]
    mtp = "model.layers.3."
    assert torch.equal(back[mtp + "embed_tokens.weight"], back["model.embed_tokens.weight"])
    assert torch.equal(back[mtp + "shared_head.head.weight"], back["lm_head.weight"])


def _block_amax(q: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    a = q.float().abs()
    a = torch.nn.functional.pad(a, (0, -cols % 128, 0, -rows % 128))
    return a.reshape(a.shape[0] // 128, 128, a.shape[1] // 128, 128).amax(dim=(1, 3))


def test_float_scales_round_trip_bit_for_bit_through_fp32(tmp_path: Path):
    """Qwen3-FP8 with float32 scales: through mcore-dist in fp32 (where ``q * S`` is exact for
    these scales) the re-quantized release is byte for byte the original."""
    _, fp8 = write_fp8_release("qwen3", tmp_path)
    ckpt_ir.convert(fp8, tmp_path / "dist", "mcore-dist", dtype="fp32")
    ckpt_ir.convert(tmp_path / "dist", tmp_path / "back", "hf", quantize="fp8", dtype="bf16")
    raw = load_file(fp8 / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert set(back) == set(raw)
    for name, t in raw.items():
        assert back[name].dtype == t.dtype and torch.equal(_bits(back[name]), _bits(t)), name


def _damage(fp8: Path, how: str) -> None:
    path = fp8 / "model.safetensors"
    state = load_file(path)
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    config = json.loads((fp8 / "config.json").read_text())
    if how == "scale shape":
        state[name + "_scale_inv"] = state[name + "_scale_inv"][:4]
    elif how == "no scale":
        del state[name + "_scale_inv"]
    elif how == "no weight":
        state[name] = state[name].to(torch.bfloat16)
    elif how == "quant_method":
        config["quantization_config"]["quant_method"] = "bitsandbytes_4bit"
    save_file(state, path, metadata={"format": "pt"})
    (fp8 / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("how", "message"), [
    ("scale shape", r"weight_scale_inv has shape \[4, 1\], but .* needs \[5, 1\]"),
    ("no scale", r"FP8 tensor .*kv_a_proj_with_mqa.weight has no .*_scale_inv"),
    ("no weight", r"scales .*kv_a_proj_with_mqa.weight, which is torch.bfloat16"),
    ("quant_method", r"quant_method 'bitsandbytes_4bit' is not supported"),
])
def test_bad_fp8_input_is_one_line_exit_2_nothing_written(how: str, message: str,
                                                          tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]):
    _, fp8 = write_fp8_release("deepseek_v3", tmp_path)
    _damage(fp8, how)
    capsys.readouterr()  # transformers' save progress bar
    out = tmp_path / "out"
    for args in (["--dry-run"], []):
        code = main(["convert", str(fp8), str(out), "--to", "mcore-dist", "--no-progress",
                     *args])
        err = capsys.readouterr().err
        assert code == 2, err
        [line] = err.splitlines()
        assert line.startswith("ckpt-ir: error: ")
        assert re.search(message, line), line
    assert siblings(out) == [] and not out.exists()


def test_cli_dry_run_says_fp8_and_quantize_is_hf_only(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]):
    _, fp8 = write_fp8_release("qwen3", tmp_path)
    capsys.readouterr()
    code = main(["convert", str(fp8), str(tmp_path / "out"), "--to", "hf", "--quantize", "fp8",
                 "--dry-run", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    notes = json.loads(out)["notes"]
    assert any(n.startswith("source is block FP8 e4m3, 128x128 blocks, float32 scales: 14 ")
               for n in notes)
    assert any(n.startswith("destination is block FP8 e4m3, 128x128 blocks, float32 scales: "
                            "14 linear weights") for n in notes)
    # A published config alone (no weights) plans too, and says what it declares.
    (fp8 / "model.safetensors").unlink()
    report = ckpt_ir.convert(fp8, tmp_path / "out", "mcore-dist", dry_run=True)
    assert any(n.startswith("source config declares block FP8") for n in report.notes)
    code = main(["convert", str(fp8), str(tmp_path / "out"), "--to", "mcore-dist",
                 "--quantize", "fp8", "--dry-run"])
    [line] = capsys.readouterr().err.splitlines()
    assert code == 2 and "quantize (--quantize) writes hf, not mcore-dist" in line


def test_quantized_export_in_small_shards_keeps_each_scale_with_its_weight(tmp_path: Path):
    """Shards capped small: every weight_scale_inv lands in its weight's shard (a torchrun
    export splits work by file), and the index lists both."""
    _, fp8 = write_fp8_release("qwen3", tmp_path)
    ckpt_ir.convert(fp8, tmp_path / "back", "hf", quantize="fp8", max_shard_size=40_000)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert len(set(weight_map.values())) > 3
    scales = [n for n in weight_map if n.endswith("_scale_inv")]
    assert len(scales) == 14
    assert all(weight_map[n] == weight_map[n.removesuffix("_scale_inv")] for n in scales)
    back = {}
    for file in set(weight_map.values()):
        back.update(load_file(tmp_path / "back" / file))
    raw = load_file(fp8 / "model.safetensors")
    assert back.keys() == raw.keys()


def test_dtype_fp32_keeps_the_float32_product(tmp_path: Path):
    """``--dtype fp32``: the reference formula's float32 product itself, no bf16 rounding."""
    _, fp8 = write_fp8_release("qwen3", tmp_path)
    ckpt_ir.convert(fp8, tmp_path / "fp32", "hf", dtype="fp32")
    raw = load_file(fp8 / "model.safetensors")
    out = load_file(tmp_path / "fp32" / "model.safetensors")
    fp8_names = [n for n, t in raw.items() if t.dtype == FP8]
    assert len(fp8_names) == 14
    for name in fp8_names:
        want = reference_dequant(raw[name], raw[name + "_scale_inv"])
        assert out[name].dtype == torch.float32 and torch.equal(_bits(out[name]), _bits(want))
