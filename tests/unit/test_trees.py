"""verl checkpoint trees (v1, v2, bridge, legacy, incomplete saves) and what inspect says."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import ckpt_ir
from ckpt_ir.cli import main
from ckpt_ir.converters.storage.dcp_files import DcpDataFile, write_metadata
from ckpt_ir.detect import resolve
from ckpt_ir.errors import CorruptCheckpointError, FormatError
from ckpt_ir.ir import ModelConfig
from ckpt_ir.megatron_config import transformer_config_json
from tests.fixtures import TINY_LLAMA, write_hf

CONFIG = dict(TINY_LLAMA, vocab_size=96)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    write_hf(root / "hf", CONFIG, extra_files={"tokenizer.json": "{}"})
    ckpt_ir.convert(root / "hf", root / "dist", to="mcore-dist")
    shutil.rmtree(root / "dist" / "hf_config")  # verl's dist_ckpt carries no HF config
    ckpt_ir.convert(root / "hf", root / "legacy", to="verl-legacy", layout={"tp": 2, "pp": 2})
    return {"hf": root / "hf", "dist": root / "dist", "legacy": root / "legacy"}


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst)


def _hf_config_only(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(src / name, dst / name)


def _optimizer_only_dist(path: Path, *, complete: bool = True) -> None:
    """A torch_dist directory with optimizer state and no model weights (bridge / v2)."""
    path.mkdir(parents=True)
    with DcpDataFile(path) as data:
        data.add_tensor("optimizer.state.exp_avg.x", (0,), torch.zeros(4))
    write_metadata(path, data.close(), {"optimizer.state.exp_avg.x": ((4,), torch.float32)})
    if complete:
        (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))


def _manifest(role: Path, model_path: str, fmt: str) -> None:
    (role / "ckpt_contents.json").write_text(json.dumps({
        "schema_version": 2, "framework": "megatron", "role": "actor", "global_step": 5,
        "contents": {"model": {"path": model_path, "format": fmt},
                     "optimizer": {"path": "optimizer/dist_ckpt",
                                   "format": "megatron_dist_checkpoint"}},
    }, indent=2, sort_keys=True))


def build_v1(sources: dict[str, Path], role: Path) -> None:
    _copy(sources["dist"], role / "dist_ckpt")
    _hf_config_only(sources["hf"], role / "huggingface")
    (role / "transformer_config.json").write_text("{}")


def build_v2(sources: dict[str, Path], role: Path, *, manifest: bool = True) -> None:
    _copy(sources["hf"], role / "model" / "huggingface")
    _optimizer_only_dist(role / "optimizer" / "dist_ckpt")
    _optimizer_only_dist(role / "extra" / "dist_ckpt")
    if manifest:
        _manifest(role, "model/huggingface", "huggingface")


def build_bridge(sources: dict[str, Path], role: Path) -> None:
    _copy(sources["hf"], role / "huggingface")
    _optimizer_only_dist(role / "dist_ckpt")


def build_legacy(sources: dict[str, Path], role: Path) -> None:
    _copy(sources["legacy"], role)
    for d in ("optim", "rng_states"):
        (role / d).mkdir()


def _inspect(path: Path, capsys) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _tree(info: dict) -> dict[str, str]:
    return {e["path"]: e["holds"] for e in info["tree"]}


@pytest.mark.parametrize(("build", "fmt", "layout", "holds"), [
    (build_v1, "mcore-dist", "verl v1 (dist_ckpt)",
     {"actor/dist_ckpt/": "torch_dist model weights",
      "actor/huggingface/": "HF config and tokenizer (no weights)",
      "actor/transformer_config.json": "megatron-core TransformerConfig as JSON"}),
    (build_v2, "hf", "verl v2 (model/huggingface, from ckpt_contents.json)",
     {"actor/ckpt_contents.json": "verl v2 manifest: the save completed; names what each "
                                  "directory holds",
      "actor/model/": "model weights (verl v2): huggingface/",
      "actor/model/huggingface/": "HF weights, config and tokenizer",
      "actor/optimizer/": "optimizer and LR scheduler (torch_dist, not converted)",
      "actor/extra/": "RNG state (torch_dist, not converted)"}),
    (build_bridge, "hf", "verl bridge (huggingface)",
     {"actor/huggingface/": "HF weights, config and tokenizer",
      "actor/dist_ckpt/": "torch_dist without model weights (optimizer / RNG)"}),
    (build_legacy, "verl-legacy", "verl legacy (model/mp_rank_*)",
     {"actor/model/": "per-rank model files (4 mp_rank_* directories of model.pt)",
      "actor/hf_config_and_tokenizer/": "HF config and tokenizer",
      "actor/optim/": "distributed optimizer state per rank (not converted)",
      "actor/rng_states/": "RNG state per rank (not converted)"}),
], ids=["v1", "v2", "bridge", "legacy"])
def test_inspect_explains_each_verl_layout(sources, tmp_path, capsys, build, fmt, layout,
                                           holds):
    run = tmp_path / "run"
    build(sources, run / "global_step_5" / "actor")
    (run / "global_step_5" / "data.pt").write_bytes(b"")
    (run / "latest_checkpointed_iteration.txt").write_text("5")  # verl: no trailing newline
    info = _inspect(run, capsys)
    assert (info["format"], info["layout"], info["step"]) == (fmt, layout, 5)
    tree = _tree(info)
    assert tree["latest_checkpointed_iteration.txt"] == "tracker: the last completed save"
    assert tree["global_step_5/"] == "a saved step"
    assert tree["global_step_5/data.pt"] == "dataloader state (not converted)"
    for path, what in holds.items():
        assert tree[f"global_step_5/{path}"] == what, path
    # The step directory and the role directory resolve alike.
    assert resolve(run / "global_step_5").format == fmt
    assert resolve(run / "global_step_5" / "actor").format == fmt
    ckpt_ir.convert(run, tmp_path / "out", to="hf")  # and the weights convert


def test_v2_manifest_decides_between_model_trees(sources, tmp_path):
    role = tmp_path / "actor"
    build_v2(sources, role, manifest=False)
    _copy(sources["dist"], role / "model" / "dist_ckpt")
    _manifest(role, "model/dist_ckpt", "megatron_dist_checkpoint")
    r = resolve(role)
    assert (r.format, r.path) == ("mcore-dist", role / "model" / "dist_ckpt")
    _manifest(role, "model/huggingface", "huggingface")
    r = resolve(role)
    assert (r.format, r.path) == ("hf", role / "model" / "huggingface")


def test_incomplete_async_save_without_tracker_is_skipped(sources, tmp_path, capsys):
    run = tmp_path / "run"
    build_v2(sources, run / "global_step_5" / "actor")
    # An async save of step 10 still running: no manifest yet, and no tracker anywhere.
    build_v2(sources, run / "global_step_10" / "actor", manifest=False)
    shutil.rmtree(run / "global_step_10" / "actor" / "extra")
    info = _inspect(run, capsys)
    assert info["step"] == 5
    assert info["notes"] == [
        "global_step_10 is incomplete (actor/ has no ckpt_contents.json (verl writes it last)):"
        " an async save in progress or a failed one; skipped",
        "no latest_checkpointed_iteration.txt; using global_step_5, the newest completed save"]
    assert _tree(info)["global_step_10/"] == (
        "a saved step, INCOMPLETE: actor/ has no ckpt_contents.json (verl writes it last)")


def test_tracker_wins_over_newer_steps(sources, tmp_path):
    run = tmp_path / "run"
    build_v1(sources, run / "global_step_5" / "actor")
    build_v1(sources, run / "global_step_10" / "actor")
    (run / "global_step_10" / "actor" / "dist_ckpt" / "metadata.json").unlink()
    (run / "latest_checkpointed_iteration.txt").write_text("5")
    r = resolve(run)
    assert r.step == 5
    assert ("global_step_10 is newer than the tracker's step 5: an unfinished or failed save, "
            "not used") in r.notes
    (run / "latest_checkpointed_iteration.txt").unlink()
    r = resolve(run)
    assert r.step == 5 and r.notes[0].startswith(
        "global_step_10 is incomplete (actor/dist_ckpt/ has no metadata.json (torch_dist writes "
        "it last))")


def test_no_completed_save_is_an_error(sources, tmp_path):
    run = tmp_path / "run"
    build_v2(sources, run / "global_step_3" / "actor", manifest=False)
    # Unfinished: the extra (RNG) torch_dist has no metadata.json yet, and no manifest.
    (run / "global_step_3" / "actor" / "extra" / "dist_ckpt" / "metadata.json").unlink()
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            "no completed save under")) as e:
        resolve(run)
    assert "global_step_3 is incomplete (actor/ has no ckpt_contents.json" in str(e.value)


def build_migrated_v1(sources: dict[str, Path], role: Path, *, mode: str = "copy") -> None:
    """What verl's scripts/migrate_megatron_checkpoint_layout.py makes of a v1 save: the one
    dist_ckpt/ linked into model/, optimizer/ and extra/ (``--mode copy`` or ``symlink``),
    huggingface/ moved under model/, and no ckpt_contents.json."""
    if mode == "symlink":
        _copy(sources["dist"], role / "dist_ckpt")
    for d in ("model", "optimizer", "extra"):
        if mode == "symlink":
            (role / d).mkdir(parents=True)
            (role / d / "dist_ckpt").symlink_to(role / "dist_ckpt", target_is_directory=True)
        else:
            _copy(sources["dist"], role / d / "dist_ckpt")
    _hf_config_only(sources["hf"], role / "model" / "huggingface")
    (role / "transformer_config.json").write_text("{}")


@pytest.mark.parametrize("mode", ["copy", "symlink"])
def test_migrated_v1_tree_without_manifest_or_tracker_is_read_with_a_note(sources, tmp_path,
                                                                          capsys, mode):
    run = tmp_path / "run"
    build_migrated_v1(sources, run / "global_step_7" / "actor", mode=mode)
    info = _inspect(run, capsys)
    assert (info["format"], info["step"]) == ("mcore-dist", 7)
    assert info["layout"] == "verl v2 (model/dist_ckpt)"
    why = ("actor/ has no ckpt_contents.json (verl writes it last): a tree migrated from "
           "verl's v1 layout or copied without it; completeness could not be confirmed")
    assert info["notes"] == [
        "no latest_checkpointed_iteration.txt; using global_step_7, the newest completed save",
        f"global_step_7: {why}"]
    assert _tree(info)["global_step_7/"] == \
        "a saved step (no manifest: completeness not confirmed)"
    # The role directory alone (copied without its run root): the same note.
    r = resolve(run / "global_step_7" / "actor")
    assert r.format == "mcore-dist"
    assert r.notes == ("actor: no ckpt_contents.json (verl writes it last): a tree migrated "
                       "from verl's v1 layout or copied without it; completeness could not be "
                       "confirmed",)
    with ckpt_ir.open(run, hf_config=sources["hf"]) as ckpt, \
            ckpt_ir.open(sources["hf"]) as ref:
        assert ckpt.tensors.keys() == ref.tensors.keys()
        assert all(torch.equal(ckpt.read(n), ref.read(n)) for n in ref.tensors)


def test_empty_dist_ckpt_dirs_are_not_checkpoints(sources, tmp_path, capsys):
    # verl 0.9.1 pointed at a legacy tree makes model/, optimizer/ and extra/dist_ckpt and
    # leaves them empty when its load fails; the legacy save stays complete and readable.
    run = tmp_path / "run"
    role = run / "global_step_5" / "actor"
    build_legacy(sources, role)
    for d in ("model", "optimizer", "extra"):
        (role / d / "dist_ckpt").mkdir(parents=True, exist_ok=True)
    info = _inspect(run, capsys)
    assert (info["format"], info["step"]) == ("verl-legacy", 5)
    assert info["notes"] == [
        "no latest_checkpointed_iteration.txt; using global_step_5, the newest completed save"]
    assert _tree(info)["global_step_5/"] == "a saved step"
    # Beside a complete v2 save (manifest present) an empty root dist_ckpt/ changes nothing.
    role2 = run / "global_step_9" / "actor"
    build_v2(sources, role2)
    (role2 / "dist_ckpt").mkdir()
    info = _inspect(run, capsys)
    assert (info["format"], info["step"]) == ("hf", 9)
    assert _tree(info)["global_step_9/actor/dist_ckpt/"] == \
        "empty (left by verl's path helpers): not a checkpoint"


def test_role_dir_without_manifest_is_read_with_a_warning(sources, tmp_path):
    role = tmp_path / "actor"
    build_v2(sources, role, manifest=False)
    r = resolve(role)
    assert r.format == "hf"
    assert r.notes == ("actor: no ckpt_contents.json (verl writes it last): a tree migrated "
                       "from verl's v1 layout or copied without it; completeness could not be "
                       "confirmed",)
    shutil.rmtree(role / "extra")  # a part missing: an unfinished save, read only when asked
    r = resolve(role)
    assert r.format == "hf"
    assert r.notes == ("actor: no ckpt_contents.json (verl writes it last); this save may be "
                       "incomplete",)


def test_megatron_lm_run_tree(sources, tmp_path, capsys):
    ckpt_ir.convert(sources["hf"], tmp_path / "m", to="megatron-legacy", layout={"tp": 2})
    info = _inspect(tmp_path / "m", capsys)
    assert (info["format"], info["details"]["layout"]) == ("megatron-legacy", "tp=2 pp=1")
    tree = _tree(info)
    assert tree["release/"] == "a saved step"
    assert tree["release/hf_config/"] == "HF config and tokenizer (written by ckpt-ir)"
    assert tree["release/mp_rank_00/"] == "one model-parallel rank's files"
    assert info["notes"] == ["latest_checkpointed_iteration.txt points at release"]


def test_convert_verl_tree_writes_a_role_directory_verl_opens(sources, tmp_path, capsys):
    """--verl-tree: what verl 0.9.1's MegatronCheckpointManager writes for a dist-only model
    save, which its load_checkpoint and model merger read (verl-formats.md §2.4)."""
    role = tmp_path / "run" / "global_step_3" / "actor"
    assert main(["convert", str(sources["hf"]), str(role), "--to", "mcore-dist",
                 "--verl-tree", "--no-progress"]) == 0
    capsys.readouterr()
    assert sorted(str(p.relative_to(role)) for p in role.rglob("*")
                  if p.is_file() and "dist_ckpt" not in p.parts) == [
        "ckpt_contents.json", "model/huggingface/config.json",
        "model/huggingface/tokenizer.json", "transformer_config.json"]
    dist = role / "model" / "dist_ckpt"
    assert sorted(p.name for p in dist.iterdir()) == [
        ".metadata", "__0_0.distcp", "common.pt", "metadata.json"]
    manifest = json.loads((role / "ckpt_contents.json").read_text())
    assert (manifest["schema_version"], manifest["role"], manifest["global_step"],
            manifest["save_contents"]) == (2, "actor", 3, ["model"])
    assert manifest["contents"] == {
        "model": {"path": "model/dist_ckpt", "format": "megatron_dist_checkpoint",
                  "backend": "dist_checkpointing"},
        "transformer_config": {"path": "transformer_config.json", "format": "json"},
        "hf_config": {"path": "model/huggingface", "format": "huggingface",
                      "note": "config.json, tokenizer, and optional generation_config.json"},
        "tokenizer": {"path": "model/huggingface", "format": "huggingface"}}
    tc = json.loads((role / "transformer_config.json").read_text())
    assert (tc["num_layers"], tc["hidden_size"], tc["num_query_groups"], tc["kv_channels"]) \
        == (CONFIG["num_hidden_layers"], CONFIG["hidden_size"],
            CONFIG["num_key_value_heads"], CONFIG["head_dim"])
    # ckpt-ir reads the tree back from the run directory, bit for bit.
    info = _inspect(tmp_path / "run", capsys)
    assert (info["format"], info["step"]) == ("mcore-dist", 3)
    assert info["layout"] == "verl v2 (model/dist_ckpt, from ckpt_contents.json)"
    report = ckpt_ir.verify(sources["hf"], tmp_path / "run")
    assert report.equal, report.summary()
    with pytest.raises(FormatError, match=re.escape("verl_tree (--verl-tree) writes "
                                                    "mcore-dist, not hf")):
        ckpt_ir.convert(sources["hf"], tmp_path / "x", to="hf", verl_tree=True)


@pytest.mark.parametrize("tied", [True, False])
def test_tying_comes_from_the_checkpoint_when_transformer_config_cannot_say(tmp_path, tied):
    """A torch_dist save of a tied model holds no output_layer.weight; TransformerConfig has
    no tying field. (Its rotary base and sequence length, absent from verl's file, are added
    here by hand so that nothing else is missing.)"""
    hf = dict(CONFIG, tie_word_embeddings=tied, rope_parameters={"rope_type": "default",
                                                                  "rope_theta": 1e6})
    write_hf(tmp_path / "hf", hf)
    role = tmp_path / "actor"
    ckpt_ir.convert(tmp_path / "hf", role / "model" / "dist_ckpt", to="mcore-dist")
    shutil.rmtree(role / "model" / "dist_ckpt" / "hf_config")
    tc = transformer_config_json(ModelConfig.from_hf(hf))
    assert not {"share_embeddings_and_output_weights", "rotary_base"} & set(tc)
    tc.update(rotary_base=1e6, max_position_embeddings=64)
    (role / "transformer_config.json").write_text(json.dumps(tc))
    with ckpt_ir.open(role) as ckpt:
        assert ckpt.config.tie_word_embeddings is tied
        assert ("lm_head.weight" in ckpt.tensors) is not tied
    report = ckpt_ir.verify(tmp_path / "hf", role)
    assert report.equal, report.summary()
