"""``megatron-legacy``: Megatron-LM's non-distributed checkpoints (``--ckpt-format torch``).

A Megatron-LM save directory::

    latest_checkpointed_iteration.txt        "<N>" or "release"; written after the save
    iter_{N:07d}/ (or release/)
        mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt
            {"args": Namespace, "checkpoint_version": 3.0, "iteration": N,
             "model": state_dict  |  "model0", "model1", ... (one per VPP chunk),
             "optimizer", "opt_param_scheduler", "rng_state", ...}
        mp_rank_*/distrib_optim.pt           distributed optimizer state (not converted)

Model weights only: optimizer, scheduler and RNG entries are listed as dropped on read and never
written. The model state dicts are megatron-core GPTModel ``state_dict()`` output, the same keys
as verl's era B (local or TE spec, detected from the keys).

The writer writes a ``release`` checkpoint (tracker ``release``): weights only, which Megatron-LM
loads without optimizer or RNG state and starts at iteration 0 (``--finetune`` semantics). Its
``args`` carry the model and parallel sizes that ``check_checkpoint_args`` compares, and
``release/hf_config/`` keeps the HF config and tokenizer for the way back.
"""

from __future__ import annotations

import argparse
import json
import reprlib
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from ckpt_ir import dtypes
from ckpt_ir.converters.per_rank import PerRankReader, PerRankWriter, RankKey
from ckpt_ir.detect import TRACKER
from ckpt_ir.dtypes import DType
from ckpt_ir.durable import write_synced
from ckpt_ir.errors import CorruptCheckpointError, MissingConfigError
from ckpt_ir.megatron_config import (
    hf_config_from_megatron,
    megatron_args,
    missing_fields,
    plain_arguments,
)

__all__ = ["HF_DIR", "TRACKER", "MegatronLegacyReader", "MegatronLegacyWriter",
           "megatron_lm_args"]

HF_DIR = "hf_config"
"""ckpt-ir keeps the HF config and tokenizer here, inside the iteration directory."""

CHECKPOINT_VERSION = 3.0

# Top-level entries of model_optim_rng.pt besides the model, and why they are skipped.
_NOT_WEIGHTS = {
    "optimizer": "optimizer state",
    "opt_param_scheduler": "LR scheduler state",
    "lr_scheduler": "LR scheduler state",
    "rng_state": "RNG state",
    "args": "training arguments (read for the model config and layout)",
    "checkpoint_version": "checkpoint format version",
    "iteration": "training progress",
    "num_floating_point_operations_so_far": "training progress",
    "rerun_state_machine_state": "training progress",
}


def _args_fields(args: Any) -> dict[str, Any] | None:
    # Only plain values: a pickled args object may carry tensors or stand-ins where numbers
    # are expected, and those must not reach int()/float() as anything but bad input.
    if isinstance(args, argparse.Namespace):
        return plain_arguments(vars(args))
    if isinstance(args, Mapping):
        return plain_arguments(args)
    return None


class MegatronLegacyReader(PerRankReader):
    """``iter_N/mp_rank_*/model_optim_rng.pt`` files (megatron-core GPTModel state dicts)."""

    format: ClassVar[str] = "megatron-legacy"
    FILE_NAME: ClassVar[str] = "model_optim_rng.pt"

    def __init__(self, path: Any, **kwargs: Any) -> None:
        self._iteration: Any = None
        self._version: Any = None
        super().__init__(path, **kwargs)
        if any((f.parent / "distrib_optim.pt").is_file() for f in self._files.values()):
            self._dropped["mp_rank_*/distrib_optim.pt"] = "distributed optimizer state"

    def _chunks(self, obj: Any, path: Path) -> list[Mapping[str, Any]]:
        if not isinstance(obj, Mapping):
            raise CorruptCheckpointError(f"{path} does not hold a Megatron-LM checkpoint dict",
                                         path=path)
        for bad in (k for k in obj if not isinstance(k, str)):  # None is a key too
            raise CorruptCheckpointError(
                f"{path} holds a checkpoint dict with a non-string key {reprlib.repr(bad)}",
                path=path)
        if "model" in obj:
            chunks = [obj["model"]]
        else:
            n = 0
            while f"model{n}" in obj:
                n += 1
            if n == 0:
                raise CorruptCheckpointError(f"{path} holds no model state ('model' or "
                                             "'model0', 'model1', ...)", path=path)
            chunks = [obj[f"model{i}"] for i in range(n)]
        if not all(isinstance(c, Mapping) for c in chunks):
            raise CorruptCheckpointError(f"{path}: the model entry is not a state dict",
                                         path=path)
        for key in obj:
            if key == "model" or (key.startswith("model") and key[5:].isdigit()):
                continue
            self._dropped[key] = _NOT_WEIGHTS.get(key, "training state, not a model weight")
        # Shown by inspect: only validated scalars, never an unpickled object's repr (a
        # structure of shared lists there would print for ever).
        iteration = obj.get("iteration", self._iteration)
        if iteration is not None and (type(iteration) is not int or iteration < 0):
            raise CorruptCheckpointError(f"{path}: 'iteration' is not a non-negative integer",
                                         path=path)
        version = obj.get("checkpoint_version", self._version)
        if version is not None and type(version) not in (int, float):
            raise CorruptCheckpointError(f"{path}: 'checkpoint_version' is not a number",
                                         path=path)
        self._iteration, self._version = iteration, version
        return chunks

    def _own_config_dirs(self) -> list[Path]:
        return [self.path / HF_DIR, self.path.parent / HF_DIR]

    def _config_from_files(self, first: Any) -> tuple[str, dict[str, Any]] | None:
        fields = _args_fields(first.get("args")) if isinstance(first, Mapping) else None
        if fields is None:
            return None
        if not fields.get("vocab_size"):
            self._notes.append("the vocabulary size comes from args.padded_vocab_size (args "
                               "carry no vocab_size); pass --hf-config to trim the padding")
        hf = hf_config_from_megatron(fields)
        missing = missing_fields(hf)
        if missing:
            # Megatron-LM always saves these; a file without them is not guessed at.
            raise MissingConfigError(f"the Megatron-LM args do not record {', '.join(missing)}; "
                                     "pass --hf-config DIR (the model's config.json)",
                                     path=self.path)
        return "Megatron-LM args", hf

    def _parallel_hints(self, first: Any) -> tuple[int | None, int | None]:
        fields = _args_fields(first.get("args")) if isinstance(first, Mapping) else None
        if not fields:
            return None, None
        return (fields.get("pipeline_model_parallel_size"),
                fields.get("expert_model_parallel_size"))

    def _expert_tp_hint(self, first: Any) -> int | None:
        fields = _args_fields(first.get("args")) if isinstance(first, Mapping) else None
        etp = fields.get("expert_tensor_parallel_size") if fields else None
        # Megatron-LM leaves it None until validate_args sets it to TP; only a number counts.
        return etp if type(etp) is int else None

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["iteration"] = self._iteration
        info["checkpoint_version"] = self._version
        return info


def megatron_lm_args(writer: PerRankWriter, dtype: DType | None) -> argparse.Namespace:
    """The ``args`` a Megatron-LM run with this model and layout would have saved.

    Only model-defining and parallel fields: what ``check_checkpoint_args`` compares and what
    ckpt-ir (``hf_config_from_megatron``) reads back.
    """
    cfg, layout, params = writer.config, writer.layout, writer.params
    layout = layout.canonical(cfg.num_layers)
    hf = cfg.hf
    rope = hf.get("rope_parameters") or {}
    return argparse.Namespace(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        group_query_attention=cfg.num_key_value_heads != cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        position_embedding_type="rope",
        add_position_embedding=False,
        rotary_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        # The family's (phi3: partial_rotary_factor), as megatron_args gives GPTModel.
        rotary_percent=float(megatron_args(cfg).gpt_model.get("rotary_percent", 1.0)),
        normalization="RMSNorm",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=cfg.has_qkv_bias,
        qk_layernorm=cfg.has_qk_norm,
        untie_embeddings_and_output_weights=not cfg.shares_output_with_embedding,
        vocab_size=cfg.vocab_size,
        padded_vocab_size=params.padded_vocab_size or cfg.vocab_size,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        decoder_first_pipeline_num_layers=layout.first_stage_layers,
        decoder_last_pipeline_num_layers=layout.last_stage_layers,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        transformer_impl="transformer_engine" if params.norm_style == "te" else "local",
        params_dtype=(dtype or dtypes.FLOAT32).torch,  # pickled as torch's dtype, as Megatron does
        bf16=dtype is dtypes.BFLOAT16,
        fp16=dtype is dtypes.FLOAT16,
        ckpt_format="torch",
        use_dist_ckpt=False,
    )


class MegatronLegacyWriter(PerRankWriter):
    """A Megatron-LM ``release`` checkpoint: tracker, ``release/mp_rank_*``, ``hf_config/``."""

    format: ClassVar[str] = "megatron-legacy"
    FILE_NAME: ClassVar[str] = "model_optim_rng.pt"

    def _rank_root(self) -> Path:
        return self.directory / "release"

    def _file_object(self, key: RankKey, chunks: list[OrderedDict[str, Any]]) -> Any:
        state: dict[str, Any] = {
            "args": megatron_lm_args(self, self.options.dtype or self._dtype),
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": 0,
        }
        if len(chunks) == 1:
            state["model"] = chunks[0]
        else:
            for i, chunk in enumerate(chunks):
                state[f"model{i}"] = chunk
        return state

    def _finish_tree(self, source: Any) -> None:
        hf_dir = self._rank_root() / HF_DIR
        hf_dir.mkdir(parents=True)
        with open(hf_dir / "config.json", "w") as f:
            json.dump(self.config.to_hf_dict(dtype=self.options.dtype), f, indent=2)
            f.write("\n")
        for name, path in source.source_files().files.items():
            shutil.copyfile(path, hf_dir / name)
        # Last: Megatron-LM trusts an iteration only once the tracker names it.
        write_synced(self.directory / TRACKER, "release")
