"""A verl 0.9.1 LoRA save whose adapters real megatron-core 0.16.1 wrote (issue #12 item 2).

verl with Megatron-Bridge and PEFT (``use_dist_checkpointing=False``) saves, per role
directory: ``model/dist_ckpt`` with the adapter keys only (Bridge's
``apply_peft_adapter_filter_to_state_dict``); ``model/huggingface/`` with the base config and
tokenizer, and Bridge's ``save_hf_adapter`` export in ``adapter/`` (the manifest's
``peft_adapter_path``); ``transformer_config.json``; ``ckpt_contents.json`` (reference
verl-formats.md §2.4, §7.2; verl ``MegatronCheckpointManager.save_checkpoint``). Here a llama
GPTModel at TP=2 on two gloo ranks, its linear layers wrapped in Bridge's LoRA
(tests/clients/mcore_lora.py) with random adapters, saves ``model/dist_ckpt`` itself with
``dist_checkpointing.save``. The export's ``adapter_config.json`` carries Bridge's fields; its
tensors are ckpt-ir's extraction (Bridge cannot run here, and ckpt-ir reads only the config
from the export when ``dist_ckpt`` is there).

Proven: with no ``--lora-alpha`` anywhere, ``extract-adapter <run>`` gives an adapter whose
``PeftModel`` logits equal megatron-core's own forward with the adapters (TP=2), and
``merge-adapter BASE <run>`` a model with those logits; ``inspect`` and ``verify`` read the
tree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import ckpt_ir
from ckpt_ir.adapters import AdapterConfig
from ckpt_ir.cli import main
from ckpt_ir.ir import ModelConfig
from tests.clients import hf_models
from tests.clients.mcore_harness import job_result, launch
from tests.clients.test_peft_client import _base_model, _logits
from tests.unit.test_verl_lora_tree import manifest

pytestmark = pytest.mark.clients

ATOL = 1e-5
PAD = 128
DIM, ALPHA = 8, 16
LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, Path, torch.Tensor]:
    """(run directory, HF base model, megatron-core's logits with the adapters)."""
    root = tmp_path_factory.mktemp("verl-lora")
    base = hf_models.make_hf_model("llama", root, seed=61, name="base")
    ckpt_ir.convert(base, root / "base-dist", to="mcore-dist", pad_vocab_to_multiple=PAD)
    role = root / "run" / "global_step_9" / "actor"
    dist = role / "model" / "dist_ckpt"
    launch("lora-save-random", {
        "hf_config": str(base / "config.json"), "tp": 2, "base_ckpt": str(root / "base-dist"),
        "dim": DIM, "alpha": ALPHA, "seed": 9, "adapter_out": str(dist),
        "input_ids": hf_models.input_ids(), "out": str(root / "megatron-logits.pt"),
        "pad_vocab_to_multiple": PAD}, world_size=2)
    hf = role / "model" / "huggingface"
    hf.mkdir(parents=True)
    for f in base.iterdir():
        if f.name == "config.json" or f.name.startswith("tokenizer"):
            shutil.copy(f, hf / f.name)
    # Bridge's save_hf_adapter export: its adapter_config.json, its two files.
    ckpt_ir.extract_adapter(dist, root / "export", lora_alpha=ALPHA, hf_config=base)
    (hf / "adapter").mkdir()
    shutil.copy(root / "export" / "adapter_model.safetensors", hf / "adapter")
    peft = AdapterConfig.create(ModelConfig.from_hf(json.loads((base / "config.json").read_text())),
                                r=DIM, lora_alpha=ALPHA, leaves=LEAVES,
                                base_model_name_or_path="meta-llama/Llama-3.2-1B")
    (hf / "adapter" / "adapter_config.json").write_text(json.dumps(peft.to_peft_dict()))
    (role / "transformer_config.json").write_text(json.dumps({"num_layers": 2}))
    (role / "ckpt_contents.json").write_text(json.dumps(manifest(step=9), sort_keys=True))
    (root / "run" / "latest_checkpointed_iteration.txt").write_text("9")
    return root / "run", base, job_result(root / "megatron-logits.pt")


def test_the_tree_is_verls_lora_layout(tree):
    run, _, _ = tree
    dist = run / "global_step_9" / "actor" / "model" / "dist_ckpt"
    assert (dist / "metadata.json").is_file() and not (dist / "ckpt_ir_lora.json").exists()
    assert not (run / "global_step_9" / "actor" / "model" / "huggingface" / "model.safetensors"
                ).exists()


def test_extracted_adapter_gives_megatrons_logits_without_lora_alpha(tree, tmp_path):
    from peft import PeftModel

    run, base, megatron = tree
    report = ckpt_ir.extract_adapter(run, tmp_path / "adapter")
    assert report.adapter["source"]["lora_alpha"] == ALPHA
    model = PeftModel.from_pretrained(_base_model(base), tmp_path / "adapter").eval()
    want = _logits(model)
    assert (megatron[..., : want.shape[-1]] - want).abs().max() <= ATOL


def test_merged_into_the_base_gives_megatrons_logits(tree, tmp_path):
    run, base, megatron = tree
    ckpt_ir.merge_adapter(base, run, tmp_path / "merged")
    got = _logits(_base_model(tmp_path / "merged"))
    assert (megatron[..., : got.shape[-1]] - got).abs().max() <= ATOL


def test_inspect_and_verify_read_the_tree(tree, capsys):
    run, _, _ = tree
    assert main(["inspect", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "adapter" and info["step"] == 9
    assert info["adapter"]["megatron"]["rank"] == DIM and info["adapter"]["lora_alpha"] == ALPHA
    export = run / "global_step_9" / "actor" / "model" / "huggingface" / "adapter"
    assert ckpt_ir.verify(run, export).equal
