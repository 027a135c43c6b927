"""``verl-legacy``: verl's original per-rank Megatron checkpoints (March - June 2025).

A verl role directory (``global_step_N/actor``) of that era::

    model/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model.pt   torch.save([state_dict per VPP chunk])
    hf_config_and_tokenizer/     config.json, tokenizer files (since verl #1562)
    optim/, rng_states/, optimizer_scheduler/               not model weights: listed, skipped

Era B (verl #884 onwards) holds megatron-core GPTModel keys with chunk-local layer indices,
TP shards (fused QKV as whole KV groups, fc1 as ``[gate_t; up_t]``) and ``_extra_state``
entries; the TE spec's norm names (``linear_qkv.layer_norm_weight``) or the local spec's
(``input_layernorm.weight``) are detected from the keys. Era A (verl #687, the two weeks before)
holds verl's own model names (``model.layers.i.self_attn.qkv_proj`` as ``[q_t; k_t; v_t]``,
``mlp.gate_up_proj``); it is read, never written. The layout comes from the directory names
and the list length; see docs/formats/verl-legacy.md.

The writer writes era B: ``model/`` plus ``hf_config_and_tokenizer/``, which verl's legacy
loader (``load_contents=['model']``) and ckpt-ir read back.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from ckpt_ir.converters.per_rank import PerRankReader, PerRankWriter, RankKey
from ckpt_ir.errors import CorruptCheckpointError

__all__ = ["HF_DIR", "VerlLegacyReader", "VerlLegacyWriter"]

HF_DIR = "hf_config_and_tokenizer"
"""Where verl (and this writer) keep the HF config and tokenizer, beside ``model/``."""

# Sibling directories of model/ in a legacy role directory that hold no weights.
_NOT_WEIGHTS = {
    "optim": "distributed optimizer state (not converted)",
    "rng_states": "RNG state (not converted)",
    "optimizer_scheduler": "LR scheduler state (not converted)",
}


class VerlLegacyReader(PerRankReader):
    """``model/mp_rank_*/model.pt`` files of verl eras A and B."""

    format: ClassVar[str] = "verl-legacy"
    FILE_NAME: ClassVar[str] = "model.pt"

    def __init__(self, path: Any, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        role = self._role_dir()
        for name, why in _NOT_WEIGHTS.items():
            if (role / name).is_dir():
                self._dropped[f"{name}/"] = why
        if self.naming == "verl-native":
            self._notes.append("era A (verl-native model names, before verl #884)")

    def _role_dir(self) -> Path:
        return self.path.parent if self.path.name == "model" else self.path

    def _chunks(self, obj: Any, path: Path) -> list[Mapping[str, Any]]:
        if isinstance(obj, Mapping):
            return [obj]  # a single state dict: a file saved without the VPP list
        if not isinstance(obj, list) or not obj or not all(isinstance(c, Mapping) for c in obj):
            raise CorruptCheckpointError(
                f"{path} does not hold a list of state dicts (one per virtual pipeline chunk)",
                path=path)
        return obj

    def _own_config_dirs(self) -> list[Path]:
        role = self._role_dir()
        return [role / HF_DIR, role / "huggingface", self.path / HF_DIR]


class VerlLegacyWriter(PerRankWriter):
    """Era-B ``model/mp_rank_*/model.pt`` files plus ``hf_config_and_tokenizer/``."""

    format: ClassVar[str] = "verl-legacy"
    FILE_NAME: ClassVar[str] = "model.pt"

    def _rank_root(self) -> Path:
        return self.directory / "model"

    def _file_object(self, key: RankKey, chunks: list[OrderedDict[str, Any]]) -> Any:
        return list(chunks)  # verl: torch.save([m.state_dict() for m in self.model])

    def _finish_tree(self, source: Any) -> None:
        hf_dir = self.directory / HF_DIR
        hf_dir.mkdir()
        with open(hf_dir / "config.json", "w") as f:
            json.dump(self.config.to_hf_dict(dtype=self.options.dtype), f, indent=2)
            f.write("\n")
        for name, path in source.source_files().files.items():
            if name != "config.json":
                shutil.copyfile(path, hf_dir / name)
