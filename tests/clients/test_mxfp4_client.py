"""gpt-oss MXFP4 releases (``*_blocks`` / ``*_scales``, output-major) read end to end: the bf16
checkpoint ckpt-ir writes holds, tensor for tensor and bit for bit, what transformers 5.23 loads
from the MXFP4 files with ``Mxfp4Config(dequantize=True)``, and gives the same logits; the
dequantized model round-trips through mcore-dist.

The MXFP4 file is built from a tiny ``GptOssForCausalLM`` (tests/clients/gpt_oss_models.py,
``intermediate_size`` 96 so both expert tensors have whole 32-value groups and F != H): its
expert weights are replaced by random E2M1 bytes and E8M0 scales in the releases' range, the
rest is stored bf16, and config.json gets the release's ``quantization_config``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir
from tests.clients.gpt_oss_models import input_ids, make_gpt_oss

EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mxfp4")
    src = make_gpt_oss(root / "src", intermediate_size=96)
    gen = torch.Generator().manual_seed(11)
    out: dict[str, torch.Tensor] = {}
    for name, t in load_file(src / "model.safetensors").items():
        if name.endswith(EXPERTS):
            experts, k, rows = t.shape  # bf16 layout [E, in, out]; the blocks are output-major
            out[name + "_blocks"] = torch.randint(0, 256, (experts, rows, k // 32, 16),
                                                  generator=gen, dtype=torch.uint8)
            out[name + "_scales"] = torch.randint(119, 127, (experts, rows, k // 32),
                                                  generator=gen, dtype=torch.uint8)
        else:
            out[name] = t.to(torch.bfloat16)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"]}
    config["dtype"] = "bfloat16"
    mx = root / "mx"
    mx.mkdir()
    (mx / "config.json").write_text(json.dumps(config, indent=2))
    save_file(out, mx / "model.safetensors", metadata={"format": "pt"})
    return mx


def _transformers_dequantized(path: Path):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16)
    return model.eval()


@torch.no_grad()
def test_mxfp4_reads_as_transformers_dequantizes_it(mxfp4: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    report = ckpt_ir.convert(mxfp4, tmp_path / "bf16", "hf")
    assert any(n.startswith("source is MXFP4") for n in report.notes)
    got = load_file(tmp_path / "bf16" / "model.safetensors")
    assert not any(n.endswith(("_blocks", "_scales")) for n in got)
    want = _transformers_dequantized(mxfp4)
    state = want.state_dict()
    assert set(got) == set(state)
    for name, t in state.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].view(torch.int16), t.view(torch.int16)), name
    ids = torch.tensor(input_ids())
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    assert torch.equal(ours(input_ids=ids).logits, want(input_ids=ids).logits)


def test_mxfp4_round_trips_through_mcore_dist(mxfp4: Path, tmp_path: Path):
    ckpt_ir.convert(mxfp4, tmp_path / "bf16", "hf")
    ckpt_ir.convert(mxfp4, tmp_path / "dist", "mcore-dist")
    ckpt_ir.convert(tmp_path / "dist", tmp_path / "back", "hf")
    a = load_file(tmp_path / "bf16" / "model.safetensors")
    b = load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n].view(torch.int16), b[n].view(torch.int16)) for n in a)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["ckpt_ir_dequantized_from"]["quant_method"] == "mxfp4"


@pytest.mark.parametrize(("how", "message"), [
    ("short blocks", r"MXFP4 blocks \[4, 192, 2, 15\] do not match scales \[4, 192, 2\]"),
    ("no scales", r"MXFP4 blocks .*gate_up_proj_blocks have no .*gate_up_proj_scales"),
])
def test_bad_mxfp4_input_is_one_line_exit_2_nothing_written(mxfp4: Path, how: str, message: str,
                                                            tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]):
    import re
    import shutil

    from ckpt_ir.cli import main
    from tests.hostile import siblings

    bad = shutil.copytree(mxfp4, tmp_path / "bad")
    state = load_file(bad / "model.safetensors")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    if how == "short blocks":
        state[name + "_blocks"] = state[name + "_blocks"][..., :15].contiguous()
    else:
        del state[name + "_scales"]
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code = main(["convert", str(bad), str(out), "--to", "mcore-dist", "--no-progress"])
    [line] = capsys.readouterr().err.splitlines()
    assert code == 2 and line.startswith("ckpt-ir: error: ") and re.search(message, line), line
    assert siblings(out) == []
