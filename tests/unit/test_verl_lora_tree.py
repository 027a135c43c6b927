"""verl 0.9.1's LoRA trees and adapters in ``inspect`` / ``verify`` (issue #12 items 2 and 7).

A verl LoRA save (Megatron-Bridge + PEFT, ``use_dist_checkpointing=False``) holds no base
weights: ``model/dist_ckpt`` has only the adapter keys (Bridge's PEFT filter), and
``model/huggingface/`` the HF config and tokenizer plus ``adapter/``, Bridge's
``save_hf_adapter`` export, which the manifest names as ``peft_adapter_path``
(verl ``MegatronCheckpointManager._build_checkpoint_manifest``; reference verl-formats.md §2.4,
§7.2). The trees here are assembled in that layout; the torch_dist adapter keys are the ones
megatron-core 0.16.1 loads into Bridge's LoRA wrappers
(tests/clients/test_mcore_lora_client.py), with ckpt-ir's layout file removed, as verl wrote
none. The adapter has one A per fused layer (q/k/v and gate/up share it), as Bridge's export
writes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir
from ckpt_ir.adapter_api import convert_adapter
from ckpt_ir.adapters import AdapterConfig
from ckpt_ir.cli import main
from ckpt_ir.errors import CorruptCheckpointError, FormatError
from ckpt_ir.ir import ModelConfig
from tests.fixtures import TINY_LLAMA, tree_bytes, write_hf
from tests.strategies import bits_equal

BASE = ModelConfig.from_hf(TINY_LLAMA)
LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 4, 16


def bridge_export(path: Path, *, seed: int = 0, r: int = RANK, alpha: float = ALPHA,
                  dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """An HF PEFT directory as Megatron-Bridge's ``save_hf_adapter`` writes it: its
    adapter_config.json fields, one A shared by q/k/v and by gate/up."""
    adapter = AdapterConfig.create(BASE, r=r, lora_alpha=alpha, leaves=LEAVES,
                                   base_model_name_or_path="Qwen/Qwen2.5-0.5B")
    g = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=g).to(dtype) for n, s in adapter.schema().items()}
    for layer in range(BASE.num_layers):
        p = f"model.layers.{layer}."
        for first, others in (("self_attn.q_proj", ("self_attn.k_proj", "self_attn.v_proj")),
                              ("mlp.gate_proj", ("mlp.up_proj",))):
            for other in others:
                tensors[p + other + ".lora_A.weight"] = tensors[p + first + ".lora_A.weight"]
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(adapter.to_peft_dict(), indent=2))
    save_file({"base_model.model." + k: v.clone() for k, v in tensors.items()},
              path / "adapter_model.safetensors")
    return tensors


def megatron_adapter(export: Path, out: Path, base_config: Path) -> None:
    """The Bridge torch_dist adapter of ``export`` (adapter keys only), as verl writes it: no
    ckpt-ir layout file, no config inside."""
    convert_adapter(export, out, "mcore-dist", hf_config=base_config)
    (out / "ckpt_ir_lora.json").unlink()
    shutil.rmtree(out / "hf_config")


def manifest(*, step: int) -> dict:
    """verl 0.9.1's ckpt_contents.json for mbridge + PEFT, save_contents model/optimizer/extra."""
    return {
        "schema_version": 2, "framework": "megatron", "role": "actor",
        "arch": "LlamaForCausalLM", "global_step": step, "world_size": 2,
        "backend": {"has_bridge": True, "use_dist_checkpointing": False, "peft": True},
        "save_contents": ["model", "optimizer", "extra"],
        "contents": {
            "model": {"path": "model/huggingface", "format": "huggingface", "backend": "mbridge",
                      "peft_adapter_path": "model/huggingface/adapter"},
            "peft_adapters": {"path": "model/dist_ckpt", "format": "megatron_dist_checkpoint",
                              "note": "PEFT adapter shards sit next to base-model HF weights, "
                                      "under model/dist_ckpt/."},
            "rng_state": {"path": "extra/dist_ckpt", "format": "megatron_dist_checkpoint",
                          "key": "rng_state"},
            "transformer_config": {"path": "transformer_config.json", "format": "json"},
            "hf_config": {"path": "model/huggingface", "format": "huggingface"},
            "tokenizer": {"path": "model/huggingface", "format": "huggingface"},
        },
        "directories": {"model/huggingface": "HuggingFace-format artifacts written via mbridge",
                        "model/dist_ckpt": "Megatron dist_checkpointing shards for model "
                                           "weights (or PEFT adapter shards when mbridge is "
                                           "enabled)."},
        "saved_any_dist_ckpt": True,
    }


def build_lora_tree(root: Path, *, layout: str = "v2", step: int = 3,
                    export_fields: dict | None = None) -> tuple[Path, Path, dict]:
    """A verl run with one LoRA save: returns (run dir, the HF PEFT export, its tensors)."""
    run = root / "run"
    role = run / f"global_step_{step}" / "actor"
    hf = role / ("model/huggingface" if layout == "v2" else "huggingface")
    tensors = bridge_export(hf / "adapter")
    if export_fields:
        cfg = json.loads((hf / "adapter" / "adapter_config.json").read_text())
        (hf / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg,
                                                                        **export_fields}))
    (hf / "config.json").write_text(json.dumps(TINY_LLAMA))
    (hf / "tokenizer_config.json").write_text("{}")
    dist = role / ("model/dist_ckpt" if layout == "v2" else "dist_ckpt")
    dist.parent.mkdir(parents=True, exist_ok=True)
    tmp = root / "export-for-dist"
    bridge_export(tmp)  # the same tensors (same seed), fields unchanged
    (tmp / "config.json").write_text(json.dumps(TINY_LLAMA))
    megatron_adapter(tmp, dist, tmp)
    shutil.rmtree(tmp)
    if layout == "v2":
        (role / "transformer_config.json").write_text(json.dumps(
            {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4}))
        (role / "extra" / "dist_ckpt").mkdir(parents=True)
        (role / "ckpt_contents.json").write_text(json.dumps(manifest(step=step), indent=2,
                                                            sort_keys=True))
    (run / "latest_checkpointed_iteration.txt").write_text(str(step))
    return run, hf / "adapter", tensors


def _cli_json(capsys, *args: str) -> tuple[int, dict]:
    code = main([*args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else {}


# --- item 2: verl's LoRA tree ------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["v2", "v1"])
def test_extract_adapter_takes_alpha_rank_and_targets_from_the_peft_export(tmp_path, layout):
    run, export, tensors = build_lora_tree(tmp_path, layout=layout)
    before = tree_bytes(run)
    report = ckpt_ir.extract_adapter(run, tmp_path / "out")  # no lora_alpha
    assert report.source_format == "mcore-dist" and "verl LoRA tree" in report.source_layout
    got = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert got.keys() == {"base_model.model." + k for k in tensors}
    assert all(bits_equal(got["base_model.model." + k], v) for k, v in tensors.items())
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written == json.loads((export / "adapter_config.json").read_text())
    assert tree_bytes(run) == before


def test_convert_and_inspect_do_not_take_the_adapter_only_dist_ckpt_for_a_model(tmp_path,
                                                                                capsys):
    run, _, _ = build_lora_tree(tmp_path)
    with pytest.raises(FormatError, match=r"holds a LoRA adapter .* and no base model weights"):
        ckpt_ir.open(run)
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a LoRA adapter, which converts to hf-peft" in err
    report = ckpt_ir.convert(run, tmp_path / "peft", to="hf-peft")
    assert report.adapter["source"]["lora_alpha"] == ALPHA
    code, info = _cli_json(capsys, "inspect", str(run))
    assert code == 0 and info["kind"] == "adapter" and info["format"] == "mcore-dist"
    assert info["resolved_path"] == str(run / "global_step_3/actor/model/dist_ckpt")
    assert info["adapter"]["r"] == RANK and info["adapter"]["lora_alpha"] == ALPHA
    assert info["adapter"]["target_modules"] == sorted(LEAVES)
    assert info["adapter"]["megatron"] == {
        "style": "fused", "rank": RANK, "alpha": ALPHA,
        "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]}
    assert info["adapter"]["alpha_from"].endswith(
        "model/huggingface/adapter/adapter_config.json")
    tree = {e["path"]: e["holds"] for e in info["tree"]}
    assert tree["global_step_3/actor/model/dist_ckpt/"] == \
        "torch_dist LoRA adapters only (Megatron-Bridge keys), no base weights"
    assert tree["global_step_3/actor/model/huggingface/"] == "HF config and tokenizer (no weights)"


def test_merge_adapter_reads_the_lora_tree(tmp_path):
    run, export, _ = build_lora_tree(tmp_path)
    write_hf(tmp_path / "base", dtype=torch.float32)
    ckpt_ir.merge_adapter(tmp_path / "base", run, tmp_path / "m1")
    ckpt_ir.merge_adapter(tmp_path / "base", export, tmp_path / "m2")
    assert ckpt_ir.verify(tmp_path / "m1", tmp_path / "m2").equal


def test_a_peft_export_that_disagrees_with_the_tensors_is_refused(tmp_path):
    run, _, _ = build_lora_tree(tmp_path, export_fields={"r": 8})
    with pytest.raises(CorruptCheckpointError,
                       match=r"does not describe the torch_dist adapter beside it: r=8, the "
                             r"tensors have rank 4"):
        ckpt_ir.extract_adapter(run, tmp_path / "out")
    run, _, _ = build_lora_tree(tmp_path / "b", export_fields={"target_modules": ["q_proj"]})
    with pytest.raises(CorruptCheckpointError, match=r"target_modules \['q_proj'\] are not"):
        ckpt_ir.extract_adapter(run, tmp_path / "out")


def test_peft_adapter_path_outside_the_role_directory_is_refused(tmp_path):
    run, _, _ = build_lora_tree(tmp_path)
    role = run / "global_step_3" / "actor"
    data = json.loads((role / "ckpt_contents.json").read_text())
    data["contents"]["model"]["peft_adapter_path"] = "../../../elsewhere"
    (role / "ckpt_contents.json").write_text(json.dumps(data))
    with pytest.raises(CorruptCheckpointError, match=r"peft_adapter_path .* outside the role"):
        ckpt_ir.extract_adapter(run, tmp_path / "out")


# --- item 7: adapters in inspect and verify -----------------------------------------------------


def test_inspect_describes_every_adapter_form(tmp_path, capsys):
    export = tmp_path / "peft"
    bridge_export(export)
    (export / "config.json").write_text(json.dumps(TINY_LLAMA))
    code, info = _cli_json(capsys, "inspect", str(export))
    assert code == 0 and (info["kind"], info["format"]) == ("adapter", "hf-peft")
    assert (info["adapter"]["r"], info["adapter"]["lora_alpha"], info["adapter"]["modules"]) == \
        (RANK, ALPHA, 14)
    assert info["ir_tensors"] == 28 and info["dtypes"] == ["bfloat16"]
    # ckpt-ir's own torch_dist output (adapter-only, with its layout file)
    convert_adapter(export, tmp_path / "dist", "mcore-dist")
    code, info = _cli_json(capsys, "inspect", str(tmp_path / "dist"))
    assert code == 0 and (info["kind"], info["format"]) == ("adapter", "mcore-dist")
    assert info["adapter"]["megatron"]["rank"] == RANK
    # verl's per-rank adapter files (TP=2): alpha from ckpt-ir's layout file, or --lora-alpha
    convert_adapter(export, tmp_path / "verl", "verl-legacy", layout={"tp": 2})
    code, info = _cli_json(capsys, "inspect", str(tmp_path / "verl"))
    assert code == 0 and (info["kind"], info["format"]) == ("adapter", "verl-legacy")
    assert info["resolved_path"] == str(tmp_path / "verl" / "adapter_checkpoint")
    assert info["details"]["layout"] == "tp=2 pp=1"
    (tmp_path / "verl" / "adapter_checkpoint" / "ckpt_ir_lora.json").unlink()
    assert main(["inspect", str(tmp_path / "verl")]) == 2
    assert "pass --lora-alpha" in capsys.readouterr().err
    code, info = _cli_json(capsys, "inspect", str(tmp_path / "verl"), "--lora-alpha", "16")
    assert code == 0 and info["adapter"]["lora_alpha"] == 16
    # human-readable form
    assert main(["inspect", str(tmp_path / "dist")]) == 0
    text = capsys.readouterr().out
    assert "mcore-dist (LoRA adapter, torch_dist directory)" in text
    assert "LoRA adapter: r=4 lora_alpha=16 on 14 modules: down_proj, gate_proj" in text
    assert "Megatron-Bridge LoRA: dim=4 alpha=16 target_modules=['linear_qkv'" in text


def test_inspect_of_a_base_plus_adapter_dist_describes_both(tmp_path, capsys):
    from tests.unit.test_adapters import _combine_dist

    export = tmp_path / "peft"
    bridge_export(export)
    write_hf(tmp_path / "hf")
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "base", to="mcore-dist")
    convert_adapter(export, tmp_path / "lora", "mcore-dist", hf_config=tmp_path / "hf")
    _combine_dist([tmp_path / "base", tmp_path / "lora"], tmp_path / "both")
    code, info = _cli_json(capsys, "inspect", str(tmp_path / "both"))
    assert code == 0 and info["kind"] == "model" and info["ir_tensors"] == 21
    assert "pass --lora-alpha" in info["adapter"]["error"]
    code, info = _cli_json(capsys, "inspect", str(tmp_path / "both"), "--lora-alpha", "16")
    assert code == 0 and info["adapter"]["r"] == RANK and info["adapter"]["lora_alpha"] == 16
    # an adapter against a base + adapter checkpoint: the adapters are compared
    code, result = _cli_json(capsys, "verify", str(export), str(tmp_path / "both"),
                             "--lora-alpha", "16", "--hf-config", str(tmp_path / "hf"))
    assert code == 0 and result["equal"] and result["compared"] == 28


def test_verify_compares_adapters_across_formats(tmp_path, capsys):
    run, export, _ = build_lora_tree(tmp_path)
    code, result = _cli_json(capsys, "verify", str(run), str(export))
    assert code == 0 and result["equal"] and result["compared"] == 28
    assert (result["format_a"], result["format_b"]) == ("mcore-dist", "hf-peft")
    convert_adapter(export, tmp_path / "verl", "verl-legacy", layout={"tp": 2},
                    hf_config=export.parent)
    assert ckpt_ir.verify(tmp_path / "verl", export).equal


def test_verify_reports_adapters_that_differ(tmp_path, capsys):
    a = tmp_path / "a"
    bridge_export(a)
    (a / "config.json").write_text(json.dumps(TINY_LLAMA))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    cfg = json.loads((b / "adapter_config.json").read_text())
    (b / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 32}))
    report = ckpt_ir.verify(a, b)
    assert not report.equal and report.tensors and all(t.ok for t in report.tensors)
    assert [(c.field, c.a, c.b) for c in report.config] == [
        ("LoRA scaling (14 modules, e.g. model.layers.0.self_attn.q_proj)", 4.0, 8.0)]
    c = tmp_path / "c"
    shutil.copytree(a, c)
    state = load_file(c / "adapter_model.safetensors")
    name = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    state[name] = state[name].clone()
    state[name][0, 0] += 1
    save_file(state, c / "adapter_model.safetensors")
    code, result = _cli_json(capsys, "verify", str(a), str(c))
    assert code == 1 and result["differing"] == 1
    assert [(t["name"], t["status"], t["mismatched"]) for t in result["tensors"]
            if t["status"] != "equal"] == [
        ("model.layers.1.mlp.down_proj.lora_B.weight", "differs", 1)]


def test_verify_refuses_an_adapter_against_a_model(tmp_path, capsys):
    bridge_export(tmp_path / "peft")
    (tmp_path / "peft" / "config.json").write_text(json.dumps(TINY_LLAMA))
    write_hf(tmp_path / "hf")
    assert main(["verify", str(tmp_path / "peft"), str(tmp_path / "hf")]) == 2
    assert "holds a LoRA adapter and" in capsys.readouterr().err


@pytest.mark.parametrize("via", ["mcore-dist", "verl-legacy"])
def test_verify_roundtrip_takes_an_adapter(tmp_path, capsys, via):
    bridge_export(tmp_path / "peft")
    (tmp_path / "peft" / "config.json").write_text(json.dumps(TINY_LLAMA))
    extra = ["--tp", "2"] if via == "verl-legacy" else []
    code, result = _cli_json(capsys, "verify", "--roundtrip", str(tmp_path / "peft"), "--via",
                             via, *extra, "--workdir", str(tmp_path))
    assert code == 0 and result["equal"] and result["back_format"] == "hf-peft"
    assert result["there"]["compared"] == result["back"]["compared"] == 28


def test_dist_keys_are_read_from_metadata_names(tmp_path):
    """Optimizer state named after model keys is neither a model nor an adapter; a key whose
    pickled length byte is "." (46 characters) is still a key."""
    import pickle

    from ckpt_ir.detect import dist_key_kinds

    def kinds(*keys: str) -> tuple[bool, bool]:
        (tmp_path / ".metadata").write_bytes(pickle.dumps(list(keys), protocol=4))
        return dist_key_kinds(tmp_path)

    qkv = "decoder.layers.self_attention.linear_qkv.weight"
    lora = "decoder.layers.self_attention.linear_qkv.adapter.linear_in.weight"
    assert kinds(qkv) == (True, False)
    assert kinds(lora) == (False, True)
    assert kinds(qkv, lora) == (True, True)
    assert kinds("optimizer.state.exp_avg." + qkv, "optimizer.state.exp_avg." + lora) == \
        (False, False)
    key46 = "decoder.layers.mlp.linear_fc2.weight".ljust(46, "x")
    assert len(key46) == 46 and kinds(key46) == (True, False)
