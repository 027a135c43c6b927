"""Qwen VL models through real transformers 5.23 (``AutoModelForImageTextToText``): tiny random
Qwen2.5-VL, Qwen3-VL (untied and tied) and Qwen3-VL-MoE round-trip hf -> mcore-dist -> hf and
hf -> verl-legacy / megatron-legacy at TP=2, PP=2 -> hf bit for bit, and the reloaded models'
logits are identical to the source's on a text prompt and on an image + text prompt (pixel
values and ``image_grid_thw`` built directly, no processor). The Megatron side is pinned to
Megatron-Bridge's layout: torch_dist keys under ``language_model.`` / ``vision_model.`` with
stacked blocks, the vision tower on the first pipeline stage only, its linear layers split
over TP (Qwen3-VL) or replicated (Qwen2.5-VL's ``visual.*``). Qwen3-VL-MoE experts are read
in both on-disk orientations. A checkpoint without its tower and a ``vision_config`` that is
not the tower's are refused in one line.

megatron-core 0.16.1 (local spec, CPU, gloo) runs the Qwen2.5-VL language model (contiguous
mrope): the torch_dist ckpt-ir wrote loads under Megatron-Bridge's ``language_model.`` prefix
and, fed the decoder inputs transformers built (image features spliced into the embeddings)
with its 3-D mrope positions, reproduces transformers' logits (fp32, <= 1e-5) on text and on
image + text. It builds neither tower, nor Qwen3-VL's interleaved mrope (architectures-wave2
§10); tests/unit/test_qwen_vl.py pins those tables to Megatron-Bridge's mapping.
"""

from __future__ import annotations

import json
import re
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
from tests.clients import qwen_vl_models as vl
from tests.clients.mcore_harness import job_result, launch

pytestmark = pytest.mark.clients

MODELS = {"qwen2_5_vl": ("qwen2_5_vl", False), "qwen3_vl": ("qwen3_vl", False),
          "qwen3_vl-tied": ("qwen3_vl", True), "qwen3_vl_moe": ("qwen3_vl_moe", False)}
TP2_PP2 = ParallelLayout(tp=2, pp=2)


class Suite:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.src: dict[str, Path] = {}
        self.ref: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, (arch, tied) in MODELS.items():
            path = vl.save_model(arch, root / "src" / key, tied=tied)
            self.src[key] = path
            self.ref[key] = self.logits(path)

    @staticmethod
    def logits(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        model = vl.load_model(path)
        return vl.logits(model, vl.text_inputs()), vl.logits(model, vl.image_inputs())


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Suite:
    return Suite(tmp_path_factory.mktemp("qwen_vl"))


def _assert_same_files(a: Path, b: Path) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(x) == sorted(y)
    for name in x:
        assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), name


def _assert_same_logits(suite: Suite, key: str, path: Path) -> None:
    text, image = suite.logits(path)
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
    layers = vl.config_dict(MODELS[key][0])["text_config"]["num_hidden_layers"]
    qkv = keys["language_model.decoder.layers.self_attention.linear_qkv.weight"]
    assert qkv.shape[0] == layers  # stacked as megatron-core stacks a uniform block
    assert ("language_model.output_layer.weight" in keys) == (not MODELS[key][1])
    if key == "qwen2_5_vl":
        assert keys["visual.blocks.2.attn.qkv.weight"].shape == (96, 32)
        assert not any(k.startswith("vision_model.") for k in keys)
    else:
        assert keys["vision_model.decoder.layers.self_attention.linear_qkv.weight"].shape == \
            (3, 96, 32)
        assert keys["vision_model.decoder.deepstack_merger_list.1.linear_fc1.weight"].shape == \
            (128, 128)
        assert keys["vision_model.merger.patch_norm.weight"].shape == (32,)


@pytest.mark.parametrize(("key", "fmt"), [("qwen2_5_vl", "verl-legacy"),
                                          ("qwen2_5_vl", "megatron-legacy"),
                                          ("qwen3_vl", "megatron-legacy"),
                                          ("qwen3_vl-tied", "verl-legacy"),
                                          ("qwen3_vl_moe", "verl-legacy")])
def test_hf_per_rank_tp2_pp2_hf_is_bit_exact_with_identical_logits(suite, key, fmt, tmp_path):
    ranks, back = tmp_path / "ranks", tmp_path / "hf"
    ckpt_ir.convert(suite.src[key], ranks, to=fmt, layout=TP2_PP2)
    report = ckpt_ir.convert(ranks, back, to="hf")
    assert report.source_layout.endswith("tp=2 pp=2")
    _assert_same_files(suite.src[key], back)
    _assert_same_logits(suite, key, back)
    files = {p.parent.name: p for p in ranks.rglob("mp_rank_*/*.pt")}
    assert sorted(files) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000",
                             "mp_rank_01_001"]
    state = {name: _model_state(path) for name, path in files.items()}
    tower = ("visual.", "vision_model.")
    # The vision tower lives on the first pipeline stage, on every TP rank of it.
    for name, sd in state.items():
        held = [k for k in sd if k.startswith(tower)]
        assert bool(held) == name.endswith("_000"), name
        layers = {k.split(".")[3] for k in sd if k.startswith("language_model.decoder.layers.")}
        assert layers == {"0", "1"}, name  # local layer indices per stage
    first, second = state["mp_rank_00_000"], state["mp_rank_01_000"]
    if key == "qwen2_5_vl":
        # transformers' module, replicated: whole on both TP ranks.
        assert torch.equal(first["visual.blocks.0.attn.qkv.weight"],
                           second["visual.blocks.0.attn.qkv.weight"])
        assert first["visual.blocks.0.attn.qkv.weight"].shape == (96, 32)
    else:
        # A Megatron vision block: QKV by heads, fc1 by rows, proj and fc2 by columns.
        block = "vision_model.decoder.layers.0."
        assert first[block + "self_attention.linear_qkv.weight"].shape == (48, 32)
        assert first[block + "mlp.linear_fc1.weight"].shape == (24, 32)
        assert first[block + "mlp.linear_fc2.weight"].shape == (32, 24)
        assert first[block + "self_attention.linear_proj.weight"].shape == (32, 16)
        assert first["vision_model.pos_embed.weight"].shape == (16, 32)


def _model_state(path: Path) -> dict[str, torch.Tensor]:
    """One rank file's model state: verl's model.pt is a list of virtual-pipeline chunks (one
    here), Megatron-LM's model_optim_rng.pt a dict with ``model``."""
    obj = load_torch(path)
    state = obj[0] if isinstance(obj, list) else obj["model"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_hub_oriented_moe_experts_read_like_transformers_5s(suite, tmp_path):
    """The published Qwen3-VL-MoE files hold [E, H, 2F] / [E, F, H]; transformers 5 saves
    the transpose. Both read to the same Megatron experts and the same model."""
    hub = tmp_path / "hub"
    shutil.copytree(suite.src["qwen3_vl_moe"], hub)
    tensors = load_file(hub / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[name] = tensors[name].transpose(1, 2).contiguous()
    assert tensors["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 80)
    save_file(tensors, hub / "model.safetensors", metadata={"format": "pt"})
    _assert_same_logits(suite, "qwen3_vl_moe", hub)  # transformers loads it as it is
    ckpt_ir.convert(hub, tmp_path / "dist", to="mcore-dist")
    ckpt_ir.convert(suite.src["qwen3_vl_moe"], tmp_path / "ref", to="mcore-dist")
    with ckpt_ir.open(tmp_path / "dist") as a, ckpt_ir.open(tmp_path / "ref") as b:
        assert sorted(a.tensors) == sorted(b.tensors)
        for name in a.tensors:
            assert torch.equal(a.read(name), b.read(name)), name
    ckpt_ir.convert(tmp_path / "dist", tmp_path / "hf", to="hf")
    _assert_same_files(suite.src["qwen3_vl_moe"], tmp_path / "hf")


def _cli(capsys, *args: object) -> tuple[int, str, str]:
    """``ckpt-ir ARGS`` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("key", ["qwen2_5_vl", "qwen3_vl"])
def test_a_checkpoint_without_its_vision_tower_is_one_line(suite, key, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(suite.src[key], bad)
    tensors = load_file(bad / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "visual." not in k},
              bad / "model.safetensors", metadata={"format": "pt"})
    code, _, err = _cli(capsys, "convert", bad, tmp_path / "out", "--to", "mcore-dist")
    assert code == 2
    assert err.count("\n") == 1
    assert f"the {MODELS[key][0]} checkpoint has no vision tower" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"hidden_size": 48, "num_heads": 3},
     "the config disagrees with the checkpoint's vision tower: model.visual.blocks.0.norm1."
     "weight is [32], the config implies [48]"),
    ({"depth": 2}, "it holds model.visual.blocks.2."),
])
def test_a_vision_config_that_disagrees_with_the_tensors_is_one_line(suite, tmp_path, capsys,
                                                                     change, message):
    bad = tmp_path / "bad"
    shutil.copytree(suite.src["qwen3_vl"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["vision_config"].update(change)
    (bad / "config.json").write_text(json.dumps(config))
    code, _, err = _cli(capsys, "convert", bad, tmp_path / "out", "--to", "mcore-dist")
    assert code == 2
    assert err.count("\n") == 1 and message in err, err


def test_inspect_names_the_vision_parts(suite, tmp_path, capsys):
    ckpt_ir.convert(suite.src["qwen3_vl_moe"], tmp_path / "dist", to="mcore-dist")
    code, out, err = _cli(capsys, "inspect", tmp_path / "dist", "--json")
    assert code == 0, err
    parts = {p["part"]: p for p in json.loads(out)["parts"]}
    assert set(parts) == {"language model", "vision tower", "patch merger", "patch embedding",
                          "position embedding", "deepstack mergers"}
    assert parts["vision tower"]["megatron"] == "vision_model.decoder.layers.*"
    assert parts["vision tower"]["tensors"] == 3 * 12
    assert parts["deepstack mergers"]["tensors"] == 2 * 6
    assert parts["language model"]["megatron"] == "language_model.*"


def _decoder_inputs(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """What transformers feeds its language model (embeddings with the image spliced in, 3-D
    mrope positions; text-only positions are t = h = w) and its logits, per prompt."""
    model = vl.load_model(path)
    seen: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs):
        seen.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    inputs, logits = {}, {}
    for name, prompt in (("text", vl.text_inputs()), ("image", vl.image_inputs())):
        seen.clear()
        logits[name] = vl.logits(model, prompt)
        ids = prompt["input_ids"]
        positions = seen.get("position_ids")
        if positions is None:
            positions = torch.arange(ids.shape[1]).expand(3, *ids.shape)
        inputs[name] = {"input_ids": ids, "inputs_embeds": seen["inputs_embeds"].detach(),
                        "position_ids": positions.contiguous()}
    assert not torch.equal(inputs["image"]["position_ids"][0],
                           inputs["image"]["position_ids"][1])  # the image's h/w positions
    return inputs, logits


def test_megatron_core_runs_the_qwen2_5_vl_language_model(suite, tmp_path):
    dist = tmp_path / "dist"
    ckpt_ir.convert(suite.src["qwen2_5_vl"], dist, to="mcore-dist", mcore_spec="local")
    inputs, want = _decoder_inputs(suite.src["qwen2_5_vl"])
    torch.save(inputs, tmp_path / "inputs.pt")
    launch("vl-load-forward", {"ckpt": str(dist), "hf_config": str(dist / "hf_config" /
                                                                      "config.json"),
                               "inputs": str(tmp_path / "inputs.pt"),
                               "out": str(tmp_path / "logits.pt")}, world_size=1)
    got = job_result(tmp_path / "logits.pt")
    for name in ("text", "image"):
        diff = (got[name] - want[name]).abs().max().item()
        assert diff <= 1e-5, f"{name}: megatron-core vs transformers logits differ by {diff:.3g}"


def test_a_vl_torch_dist_without_its_hf_config_asks_for_it(suite, tmp_path, capsys):
    """Megatron arguments describe no vision tower: refused in one line, not guessed."""
    dist = tmp_path / "dist"
    ckpt_ir.convert(suite.src["qwen3_vl"], dist, to="mcore-dist")
    shutil.rmtree(dist / "hf_config")
    (dist / "run_config.yaml").write_text("model:\n  num_layers: 4\n  hidden_size: 64\n")
    code, _, err = _cli(capsys, "convert", dist, tmp_path / "out", "--to", "hf")
    assert code == 2
    assert err.count("\n") == 1 and "holds a vision-language model" in err \
        and "pass --hf-config DIR" in err, err


def test_qwen3_vl_moe_experts_split_over_expert_ranks(suite, tmp_path):
    """EP=2, PP=2: each expert rank holds half the experts; the tower stays on stage 0."""
    ranks, back = tmp_path / "ranks", tmp_path / "hf"
    ckpt_ir.convert(suite.src["qwen3_vl_moe"], ranks, to="verl-legacy",
                    layout=ParallelLayout(tp=1, pp=2, ep=2))
    ckpt_ir.convert(ranks, back, to="hf")
    _assert_same_files(suite.src["qwen3_vl_moe"], back)
    files = {p.parent.name: _model_state(p) for p in ranks.rglob("mp_rank_*/*.pt")}
    assert sorted(files) == ["mp_rank_00_000_000", "mp_rank_00_000_001",
                             "mp_rank_00_001_000", "mp_rank_00_001_001"]
    for name, sd in files.items():
        stage = name.split("_")[3]  # mp_rank_TT_PPP_EEE
        assert any(k.startswith("vision_model.") for k in sd) == (stage == "000"), name
        # TE grouped experts (linear_fc1.weight{k}, local k): 4 experts over 2 expert ranks.
        local = [k for k in sd if re.fullmatch(
            r"language_model\.decoder\.layers\.0\.mlp\.experts\.linear_fc1\.weight\d+", k)]
        assert len(local) == 2, (name, local)
