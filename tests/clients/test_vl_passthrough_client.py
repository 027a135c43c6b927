"""Gemma 3 VL and Mistral 3 VL through real transformers 5.23 (``AutoModelForImageTextToText``):
tiny random models round-trip hf -> mcore-dist -> hf and hf -> verl-legacy TP=2 PP=2 -> hf bit
for bit, and the reloaded models' logits are identical to the source's on a text prompt and on
an image + text prompt (pixel values built directly, no processor).

The Megatron side is pinned to Megatron-Bridge's layout: the language model under
``language_model.`` (gemma3_text / ministral3 rows), the towers and projectors as
transformers' modules (``vision_tower.*``, ``multi_modal_projector.*``, one torch_dist key per
tensor), whole on every TP rank of the first pipeline stage; Gemma 3's projection transposed
into ``multi_modal_projector.proj.weight``. Gemma 3's hub spelling of the tower
(``vision_tower.vision_model.*``) reads like transformers 5.23's. A checkpoint without its
tower and a ``vision_config`` that is not the tower's are refused in one line; ``inspect``
names the parts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir
from ckpt_ir.cli import main
from ckpt_ir.converters.storage.dcp_files import DcpReader
from ckpt_ir.layout import ParallelLayout
from ckpt_ir.safety.unpickler import load_torch
from tests.clients import vl_passthrough_models as vm

pytestmark = pytest.mark.clients

MODELS = {"gemma3": ("gemma3", True), "mistral3": ("mistral3", True),
          "mistral3-untied": ("mistral3", False)}


class Suite:
    def __init__(self, root: Path) -> None:
        self.src: dict[str, Path] = {}
        self.ref: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, (arch, tied) in MODELS.items():
            self.src[key] = vm.save_model(arch, root / key, tied=tied)
            self.ref[key] = self.logits(key, self.src[key])

    @staticmethod
    def logits(key: str, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        model = vm.load_model(path)
        return (vm.logits(model, vm.text_inputs()),
                vm.logits(model, vm.image_inputs(MODELS[key][0])))


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Suite:
    return Suite(tmp_path_factory.mktemp("vl_passthrough"))


def _assert_same_files(a: Path, b: Path) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(x) == sorted(y)
    for name in x:
        assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), name


def _assert_same_logits(suite: Suite, key: str, path: Path) -> None:
    text, image = suite.logits(key, path)
    ref_text, ref_image = suite.ref[key]
    assert torch.equal(text, ref_text), f"{key}: text logits differ"
    assert torch.equal(image, ref_image), f"{key}: image + text logits differ"


@pytest.mark.parametrize("key", list(MODELS))
def test_hf_mcore_dist_hf_is_bit_exact_with_identical_logits(suite, key, tmp_path):
    dist, back = tmp_path / "dist", tmp_path / "hf"
    ckpt_ir.convert(suite.src[key], dist, to="mcore-dist")
    report = ckpt_ir.convert(dist, back, to="hf")
    assert report.source_format == "mcore-dist"
    _assert_same_files(suite.src[key], back)
    _assert_same_logits(suite, key, back)
    keys = DcpReader(dist).index.tensors
    assert keys["language_model.decoder.layers.self_attention.linear_qkv.weight"].shape[0] == \
        vm.config_dict(MODELS[key][0])["text_config"]["num_hidden_layers"]
    assert ("language_model.output_layer.weight" in keys) == (not MODELS[key][1])
    assert not any(k.startswith("vision_model.") for k in keys)
    if key == "gemma3":
        # Megatron-Bridge's Linear: [H, Hv], the transpose of transformers' x @ W parameter.
        assert keys["multi_modal_projector.proj.weight"].shape == (64, 32)
        assert "multi_modal_projector.mm_soft_embed_norm.weight" in keys
        assert keys["vision_tower.encoder.layers.1.self_attn.q_proj.weight"].shape == (32, 32)
        assert keys["language_model.decoder.layers.self_attention.linear_proj.post_layernorm."
                    "weight"].shape == (4, 64)
    else:
        assert keys["vision_tower.transformer.layers.1.attention.q_proj.weight"].shape == \
            (32, 32)
        assert keys["multi_modal_projector.patch_merger.merging_layer.weight"].shape == \
            (32, 128)


@pytest.mark.parametrize("key", ["gemma3", "mistral3-untied"])
def test_hf_verl_legacy_tp2_pp2_hf_is_bit_exact_with_identical_logits(suite, key, tmp_path):
    ranks, back = tmp_path / "ranks", tmp_path / "hf"
    ckpt_ir.convert(suite.src[key], ranks, to="verl-legacy", layout=ParallelLayout(tp=2, pp=2))
    report = ckpt_ir.convert(ranks, back, to="hf")
    assert report.source_layout.endswith("tp=2 pp=2")
    _assert_same_files(suite.src[key], back)
    _assert_same_logits(suite, key, back)
    files = {p.parent.name: p for p in ranks.rglob("mp_rank_*/*.pt")}
    assert sorted(files) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000",
                             "mp_rank_01_001"]
    state = {}
    for name, path in files.items():
        obj = load_torch(path)
        state[name] = {k: v for k, v in (obj[0] if isinstance(obj, list) else obj).items()
                       if isinstance(v, torch.Tensor)}
    tower = ("vision_tower.", "multi_modal_projector.")
    for name, sd in state.items():
        # The tower and projector live on the first pipeline stage, on every TP rank of it.
        assert bool([k for k in sd if k.startswith(tower)]) == name.endswith("_000"), name
    first, second = state["mp_rank_00_000"], state["mp_rank_01_000"]
    held = sorted(k for k in first if k.startswith(tower))
    assert held == sorted(k for k in second if k.startswith(tower))
    for k in held:
        assert torch.equal(first[k], second[k]), k  # replicated: whole on both TP ranks


def test_gemma3_hub_tower_spelling_reads_like_transformers_5s(suite, tmp_path):
    """The published Gemma 3 files spell the tower ``vision_tower.vision_model.*``;
    transformers 5.23 writes (and reads both as) ``vision_tower.*``."""
    hub = tmp_path / "hub"
    shutil.copytree(suite.src["gemma3"], hub)
    tensors = load_file(hub / "model.safetensors")
    tensors = {(k.replace("vision_tower.", "vision_tower.vision_model.", 1)
                if k.startswith("vision_tower.") else k): v for k, v in tensors.items()}
    save_file(tensors, hub / "model.safetensors", metadata={"format": "pt"})
    _assert_same_logits(suite, "gemma3", hub)  # transformers loads it as it is
    ckpt_ir.convert(hub, tmp_path / "dist", to="mcore-dist")
    ckpt_ir.convert(suite.src["gemma3"], tmp_path / "ref", to="mcore-dist")
    with ckpt_ir.open(tmp_path / "dist") as a, ckpt_ir.open(tmp_path / "ref") as b:
        assert sorted(a.tensors) == sorted(b.tensors)
        for name in a.tensors:
            assert torch.equal(a.read(name), b.read(name)), name
    ckpt_ir.convert(hub, tmp_path / "hf", to="hf")
    _assert_same_files(suite.src["gemma3"], tmp_path / "hf")  # written as transformers 5.23


def _cli(capsys, *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("key", ["gemma3", "mistral3"])
def test_a_checkpoint_without_its_vision_tower_is_one_line(suite, key, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(suite.src[key], bad)
    tensors = load_file(bad / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("vision_tower.")},
              bad / "model.safetensors", metadata={"format": "pt"})
    code, _, err = _cli(capsys, "convert", bad, tmp_path / "out", "--to", "mcore-dist")
    assert code == 2
    assert err.count("\n") == 1
    assert f"the {key} checkpoint has no vision tower" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("key", "change", "message"), [
    ("gemma3", {"intermediate_size": 40},
     "vision tower: vision_tower.encoder.layers.0.mlp.fc1.weight is [48, 32], the config "
     "implies [40, 32]"),
    ("gemma3", {"num_hidden_layers": 1}, "it holds vision_tower.encoder.layers.1."),
    ("mistral3", {"hidden_size": 48, "head_dim": 24},
     "vision tower: vision_tower.patch_conv.weight is [32, 3, 4, 4], the config implies "
     "[48, 3, 4, 4]"),
])
def test_a_vision_config_that_disagrees_with_the_tensors_is_one_line(suite, tmp_path, capsys,
                                                                     key, change, message):
    bad = tmp_path / "bad"
    shutil.copytree(suite.src[key], bad)
    config = json.loads((bad / "config.json").read_text())
    config["vision_config"].update(change)
    (bad / "config.json").write_text(json.dumps(config))
    code, _, err = _cli(capsys, "convert", bad, tmp_path / "out", "--to", "mcore-dist")
    assert code == 2
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(("key", "tower", "projector"), [("gemma3", 3 + 2 * 16 + 2, 2),
                                                         ("mistral3", 2 + 2 * 9, 4)])
def test_inspect_names_the_vision_parts(suite, tmp_path, capsys, key, tower, projector):
    ckpt_ir.convert(suite.src[key], tmp_path / "dist", to="mcore-dist")
    code, out, err = _cli(capsys, "inspect", tmp_path / "dist", "--json")
    assert code == 0, err
    parts = {p["part"]: p for p in json.loads(out)["parts"]}
    assert set(parts) == {"language model", "vision tower", "multi-modal projector"}
    assert parts["vision tower"]["tensors"] == tower
    assert parts["multi-modal projector"]["tensors"] == projector
    assert parts["language model"]["megatron"] == "language_model.*"
    assert parts["vision tower"]["megatron"] == "vision_tower.*"
