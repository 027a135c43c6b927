"""Small checkpoints written directly (no transformers): fast inputs for format and CLI tests."""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ckpt_ir.converters.storage.dcp_files import DcpReader
from ckpt_ir.ir import ModelConfig

TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2,
    "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12,
    "intermediate_size": 40, "vocab_size": 97, "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 64,
}


def random_state(hf_config: dict[str, Any], *, dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = ModelConfig.from_hf(hf_config)
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in cfg.schema().items()}


def write_hf(path: Path, hf_config: dict[str, Any] | None = None, *,
             dtype: torch.dtype = torch.bfloat16, seed: int = 0, shards: int = 1,
             extra_files: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """An HF directory with random weights; returns the tensors written."""
    hf_config = dict(hf_config or TINY_LLAMA)
    state = random_state(hf_config, dtype=dtype, seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config))
    names = list(state)
    if shards == 1:
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: state[n] for n in names[i * per:(i + 1) * per]}
            save_file(part, path / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
             "weight_map": weight_map}))
    for name, text in (extra_files or {}).items():
        (path / name).write_text(text)
    return state


def tree_bytes(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (to prove a source was not touched)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def load_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors shard in ``path`` (through the reference library)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def load_dcp_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist directory, whole (stacked keys stay stacked), as copies."""
    with DcpReader(path) as r:
        return {fqn: r.read_region(fqn, (0,) * len(t.shape), t.shape)
                .clone(memory_format=torch.contiguous_format)
                for fqn, t in r.index.tensors.items()}


@dataclass
class Outcome:
    """A value, or the traceback of the exception that prevented it: module-scoped client runs
    record failures here so that each test reports its own case instead of erroring them all."""

    value: Any = None
    error: str | None = None

    def get(self, what: str) -> Any:
        import pytest

        if self.error is not None:
            pytest.fail(f"{what} failed:\n{self.error}", pytrace=False)
        return self.value


def attempt(fn: Callable[[], Any]) -> Outcome:
    """Run ``fn``; its value, or the traceback of what it raised, as an :class:`Outcome`."""
    try:
        return Outcome(fn())
    except Exception:
        return Outcome(error=traceback.format_exc())


def safetensors_bytes(directory: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, raw bytes) over every ``*.safetensors`` file of ``directory``;
    a tensor stored in two files is an error."""
    from safetensors import safe_open

    out: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name).contiguous()
                assert name not in out, f"{name} stored twice"
                out[name] = (str(t.dtype), tuple(t.shape), t.view(torch.uint8).numpy().tobytes())
    return out


def assert_same_tensors(source: Path, result: Path) -> None:
    """The HF directories ``source`` and ``result`` hold the same tensor names, each with the
    same dtype, shape and bytes (file packing and header order may differ)."""
    a, b = safetensors_bytes(source), safetensors_bytes(result)
    assert sorted(b) == sorted(a), f"names differ: {sorted(set(a) ^ set(b))}"
    changed = [n for n in a if a[n] != b[n]]
    assert not changed, f"tensors differ after the round trip: {changed}"


def assert_same_hf(source: Path, result: Path) -> None:
    """:func:`assert_same_tensors`, and the same ``config.json``."""
    assert_same_tensors(source, result)
    assert json.loads((result / "config.json").read_text()) == \
        json.loads((source / "config.json").read_text())


def with_mtp_copies(hf_config: dict[str, Any], state: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """``state`` as an hf destination writes it: each MTP layer the state holds also gets its
    copies of the embedding and the untied head (``embed_tokens``, ``shared_head.head``), as
    DeepSeek's releases store them."""
    cfg = ModelConfig.from_hf(hf_config)
    out = dict(state)
    for k in range(cfg.num_mtp_layers):
        p = f"model.layers.{cfg.num_layers + k}."
        if not any(n.startswith(p) for n in state):
            continue
        out[p + "embed_tokens.weight"] = state["model.embed_tokens.weight"]
        if "lm_head.weight" in state:
            out[p + "shared_head.head.weight"] = state["lm_head.weight"]
    return out
