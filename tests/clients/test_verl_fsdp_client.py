"""verl 0.9.1's ``FSDPCheckpointManager`` (real, under gloo on CPU) against ``verl-fsdp``.

A tiny random llama (GQA, head_dim != hidden / heads, vocab 301: no world size divides it, so
the last shards are short) is saved by verl's manager, wrapped as verl's FSDP engine wraps it
(``tests/clients/verl_fsdp_harness.py``), with optimizer and extra state:

* FSDP2 at W=2 (fp32), FSDP1 with a device mesh at W=2, a PEFT LoRA model at W=2 (full save
  and ``save_lora_only``), FSDP2 at W=3 in bf16, HSDP 2x2 (4 processes, mesh ``("ddp",
  "fsdp")``). Each converts to HF bit for bit (fp32 stays fp32, bf16 stays bf16; the LoRA
  save's base weights), with the optimizer / extra-state files listed as not converted.
* Both LoRA saves give the PEFT adapter bit for bit (``extract-adapter``), and
  ``merge-adapter`` of the full save equals PEFT's ``merge_and_unload()`` bit for bit; the
  LoRA-only save is an adapter, not a model (``convert --to hf`` says so in one line).
* ckpt-ir's ``verl-fsdp`` output at W=3 is loaded by verl's ``load_checkpoint`` at W=3 into an
  FSDP2 model with other random weights, and the gathered state dict equals the HF weights;
  likewise for a model with tied embeddings (qwen2).

Three process launches (W=2, W=3, W=4) carry all of it: the ranks' imports cost more than the
saves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckpt_ir
from ckpt_ir.detect import resolve
from ckpt_ir.errors import FormatError
from ckpt_ir.orchestration import open_reader
from tests.clients import hf_models
from tests.clients.verl_fsdp_harness import _model, launch

pytestmark = [pytest.mark.clients, pytest.mark.slow]

LORA = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def saves(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("verl-fsdp")
    hf = hf_models.make_hf_model("llama", base, seed=3)
    out = {name: base / "run" / name for name in
           ("fsdp2_w2", "fsdp1_w2", "lora_w2", "lora_only_w2", "bf16_w3", "hsdp_w4")}
    common = {"hf_dir": str(hf), "dtype": "float32"}
    launch("batch", [
        {"command": "save", **common, "out": str(out["fsdp2_w2"]), "mode": "fsdp2"},
        {"command": "save", **common, "out": str(out["fsdp1_w2"]), "mode": "fsdp1"},
        {"command": "save", **common, "out": str(out["lora_w2"]), "mode": "fsdp2",
         "lora": LORA},
        {"command": "save", **common, "out": str(out["lora_only_w2"]), "mode": "fsdp2",
         "lora": LORA, "save_lora_only": True},
    ], world_size=2)
    written = base / "written" / "actor"
    ckpt_ir.convert(hf, written, "verl-fsdp", fsdp_world_size=3)
    out["written_w3"] = written
    out["loaded_w3"] = base / "loaded_w3.safetensors"
    # Tied embeddings (qwen2): FSDP2 saves lm_head.weight as its own DTensor over the
    # embedding's storage, and verl loads strictly.
    tied = hf_models.make_hf_model("qwen2", base, seed=4)
    ckpt_ir.convert(tied, base / "tied" / "actor", "verl-fsdp", fsdp_world_size=3)
    out["tied_hf"], out["tied_loaded_w3"] = tied, base / "tied_loaded_w3.safetensors"
    launch("batch", [
        {"command": "save", **common, "dtype": "bfloat16", "out": str(out["bf16_w3"]),
         "mode": "fsdp2"},
        {"command": "load", **common, "ckpt": str(written), "out": str(out["loaded_w3"])},
        {"command": "load", "hf_dir": str(tied), "dtype": "float32",
         "ckpt": str(base / "tied" / "actor"), "out": str(out["tied_loaded_w3"])},
    ], world_size=3)
    launch("save", {**common, "out": str(out["hsdp_w4"]), "mode": "hsdp"}, world_size=4)
    out["hf"] = hf
    return out


def _hf(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                          dtype: torch.dtype) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == dtype, name
        assert torch.equal(got[name], tensor.to(dtype)), name


@pytest.mark.parametrize(("save", "dtype", "world", "mesh"), [
    ("fsdp2_w2", torch.float32, 2, "2 (fsdp)"),
    ("fsdp1_w2", torch.float32, 2, "2 (fsdp)"),
    ("bf16_w3", torch.bfloat16, 3, "3 (fsdp)"),
    ("hsdp_w4", torch.float32, 4, "2x2 (ddp, fsdp)"),
])
def test_verl_saves_convert_to_hf_bit_exact(saves, tmp_path, save, dtype, world, mesh):
    src = saves[save]
    cp = ckpt_ir.open(src)
    assert cp.format == "verl-fsdp"
    report = ckpt_ir.convert(src, tmp_path / "hf", "hf")
    _assert_bit_identical(_hf(tmp_path / "hf"), _hf(saves["hf"]), dtype)
    # Optimizer and extra state are passed over with a note, never silently.
    assert any("optimizer state" in why for why in report.dropped.values())
    assert any("RNG state" in why for why in report.dropped.values())
    reader, _ = open_reader(src, None)
    try:
        info = reader.describe()
    finally:
        reader.close()
    assert info["world_size"] == world and info["mesh"] == mesh
    assert info["fsdp"] == ("FSDP1" if save == "fsdp1_w2" else "FSDP2")
    # HSDP: only the first replica's files are parsed.
    assert info["rank_files_read"] == list(range(2 if save == "hsdp_w4" else world))


def test_lora_save_base_weights_convert_bit_exact(saves, tmp_path):
    report = ckpt_ir.convert(saves["lora_w2"], tmp_path / "hf", "hf")
    _assert_bit_identical(_hf(tmp_path / "hf"), _hf(saves["hf"]), torch.float32)
    assert any("LoRA adapter tensors" in k for k in report.dropped)
    meta = json.loads((saves["lora_w2"] / "lora_train_meta.json").read_text())
    assert meta == {"r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM"}


def _peft_reference(hf: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The PEFT model the harness saved (same seeds): its adapter tensors (PEFT's file names)
    and ``merge_and_unload()``'s weights."""
    model = _model({"hf_dir": str(hf), "dtype": "float32", "lora": LORA})
    adapter = {k.replace(".default", ""): v.detach().clone()
               for k, v in model.state_dict().items() if "lora_" in k}
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    return adapter, merged


@pytest.mark.parametrize("save", ["lora_w2", "lora_only_w2"])
def test_lora_adapter_extracts_bit_exact(saves, tmp_path, save):
    adapter, _ = _peft_reference(saves["hf"])
    ckpt_ir.extract_adapter(saves[save], tmp_path / "peft")
    got = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(got) == sorted(adapter)
    assert all(torch.equal(got[k], adapter[k]) for k in adapter)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_lora_save_merges_like_peft(saves, tmp_path):
    _, merged = _peft_reference(saves["hf"])
    ckpt_ir.merge_adapter(saves["lora_w2"], saves["lora_w2"], tmp_path / "merged")
    got = _hf(tmp_path / "merged")
    assert sorted(got) == sorted(merged)
    assert all(torch.equal(got[k], merged[k]) for k in merged)


def test_lora_only_save_is_an_adapter_not_a_model(saves, tmp_path):
    with pytest.raises(FormatError, match="holds a LoRA adapter"):
        ckpt_ir.convert(saves["lora_only_w2"], tmp_path / "hf", "hf")
    assert not (tmp_path / "hf").exists()


def test_verl_loads_ckpt_ir_written_w3(saves):
    written = saves["written_w3"]
    assert json.loads((written / "fsdp_config.json").read_text()) == {"FSDP_version": 2,
                                                                       "world_size": 3}
    assert (written / "huggingface" / "config.json").is_file()
    loaded = load_file(saves["loaded_w3"])
    _assert_bit_identical(loaded, _hf(saves["hf"]), torch.float32)


def test_verl_loads_ckpt_ir_written_tied_embeddings_w3(saves):
    loaded = load_file(saves["tied_loaded_w3"])
    want = _hf(saves["tied_hf"])
    assert sorted(loaded) == sorted([*want, "lm_head.weight"])
    assert all(torch.equal(loaded[k], want[k]) for k in want)
    assert torch.equal(loaded["lm_head.weight"], want["model.embed_tokens.weight"])


def test_run_root_with_tracker_resolves_to_the_tracked_role(saves, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saves["hsdp_w4"], run / "global_step_1" / "actor")
    shutil.copytree(saves["fsdp2_w2"], run / "global_step_2" / "actor")
    (run / "latest_checkpointed_iteration.txt").write_text("1")
    cp = ckpt_ir.open(run)
    assert cp.format == "verl-fsdp"
    resolved = resolve(run)
    assert resolved.path == run / "global_step_1" / "actor"
    assert resolved.step == 1
    assert "world size 4, FSDP2" in resolved.layout
