"""ckpt-ir's Megatron LoRA in torch_dist, loaded by real megatron-core 0.16.1 (CPU, gloo).

A PEFT adapter (rank and alpha patterns, so q/k/v ranks are stacked and some B carry a scaling
ratio; rsLoRA; a layer-specific rank) is converted to ``mcore-dist``; megatron-core's
``dist_checkpointing.load`` reads it, and the base model ckpt-ir converted, into a GPTModel whose
linear layers carry Megatron-Bridge's LoRA adapters (rebuilt from Bridge's source on megatron-core's
parallel layers: tests/clients/mcore_lora.py; Bridge cannot be installed in this environment). The
forward at TP=1 and TP=2 equals the PeftModel's logits: key names, global shapes, the TP slicing
megatron-core's sharding helpers apply (A on the rank or the input, B like the base rows, fc1's
``[gate; up]`` through the SwiGLU factory), the interleaved B of ``linear_qkv`` and the single
``alpha / dim`` scaling are all as Bridge's adapters need them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt_ir
from tests.clients import hf_models
from tests.clients.mcore_harness import HarnessError, job_result, launch
from tests.clients.test_peft_client import (
    ALL_LINEAR,
    LORA,
    _base_model,
    _logits,
    _randomize_lora,
)

pytestmark = pytest.mark.clients

ATOL = 1e-5
PAD = 128
# (arch, style, tp). CanonicalLoRA at TP=1 only: Bridge's _interleave_qkv reshapes TP-local
# outputs with global head counts.
CASES = (("llama", "fused", 1), ("llama", "fused", 2), ("qwen2", "fused", 2),
         ("qwen3", "fused", 1), ("qwen3", "fused", 2), ("llama", "canonical", 1))


@dataclass
class Run:
    want: torch.Tensor
    out: Path
    error: str | None = None


def _job(root: Path, arch: str, style: str, tp: int, base_dist: Path, adapter: Path,
         hf_config: Path) -> dict[str, Any]:
    dist = root / f"{arch}-{style}-lora"
    if not dist.exists():
        ckpt_ir.convert(adapter, dist, to="mcore-dist", hf_config=hf_config,
                        lora_style=None if style == "fused" else style)
    # Megatron-Bridge's LoRA(dim=..., alpha=...) for this checkpoint, from ckpt-ir's layout file.
    meta = json.loads((dist / "ckpt_ir_lora.json").read_text())["layout"]
    return {"command": "lora-load-forward", "hf_config": str(hf_config / "config.json"),
            "tp": tp, "base_ckpt": str(base_dist), "adapter_ckpt": str(dist),
            "dim": meta["rank"], "alpha": meta["alpha"], "style": style,
            "pad_vocab_to_multiple": PAD,
            "input_ids": hf_models.input_ids(), "out": str(root / f"{arch}-{style}-tp{tp}.pt")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, str, int], Run]:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("mcore-lora")
    jobs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    out: dict[tuple[str, str, int], Run] = {}
    prepared: dict[str, tuple[Path, Path, Path, torch.Tensor]] = {}
    for i, arch in enumerate(dict.fromkeys(a for a, _, _ in CASES)):
        base = hf_models.make_hf_model(arch, root / arch, seed=30 + i, name="base")
        model = get_peft_model(_base_model(base), LoraConfig(
            target_modules=ALL_LINEAR, init_lora_weights=False, **LORA[arch])).eval()
        _randomize_lora(model, 300 + i)
        model.save_pretrained(root / arch / "adapter")
        # An odd vocabulary: padded so that TP=2 divides it (logits are compared unpadded).
        ckpt_ir.convert(base, root / arch / "base-dist", to="mcore-dist",
                        pad_vocab_to_multiple=PAD)
        prepared[arch] = (base, root / arch / "adapter", root / arch / "base-dist",
                          _logits(model))
    for arch, style, tp in CASES:
        base, adapter, base_dist, want = prepared[arch]
        job = _job(root / arch, arch, style, tp, base_dist, adapter, base)
        jobs[tp].append(job)
        out[(arch, style, tp)] = Run(want, Path(job["out"]))
    for tp, batch in jobs.items():
        try:
            launch("batch", batch, world_size=tp)
        except HarnessError as e:
            for run in out.values():
                run.error = run.error or f"TP={tp} launch failed: {e}"
    return out


@pytest.mark.parametrize(("arch", "style", "tp"), CASES,
                         ids=[f"{a}-{s}-tp{t}" for a, s, t in CASES])
def test_megatron_core_with_bridge_lora_matches_peft(runs, arch, style, tp):
    run = runs[(arch, style, tp)]
    if run.error is not None and not run.out.exists():
        pytest.fail(run.error)
    logits = job_result(run.out)
    got = logits[..., : run.want.shape[-1]]
    assert (got - run.want).abs().max() <= ATOL
