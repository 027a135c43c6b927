"""Phase 4 of a save, *commit*, on rank 0 once every rank's files are durable: per-directory
metadata, the files verl writes beside the weights, the manifest, rename, tracker, retention."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ckpt_ir.ir import ModelConfig
from ckpt_ir.layout import ParallelLayout
from ckpt_ir.manager import disk, sharded
from ckpt_ir.manager.job import CarriedFiles, SaveJob, as_chunks

log = logging.getLogger(__name__)

TRANSFORMER_CONFIG = "transformer_config.json"


class CommitPhase:
    """The commit phase of :class:`~ckpt_ir.manager.core.CheckpointManager` (a base class of
    it, so the phase reads the manager's settings as attributes)."""

    # Set by CheckpointManager.__init__.
    config: ModelConfig
    layout: ParallelLayout
    disk: disk.DiskLayout
    root: Path
    world_size: int
    model_format: str
    mcore_spec: str
    keep_last: int | None
    tokenizer: Path | None
    _source: CarriedFiles

    def _content_path(self, content: str) -> str:
        """Where ``content`` goes inside a step (also used while staging)."""
        if content == "model" and self.model_format == "hf":
            # verl's bridge mode: the model *is* the HF tree; hf_model then shares it.
            return self.disk.content_path("hf_model")
        return self.disk.content_path(content)

    def _commit(self, job: SaveJob, parts: Sequence[Mapping[str, Any]]) -> None:
        """Rank 0, once every rank's files are durable: metadata, manifest, rename, tracker,
        retention, in that order."""
        if "model" in job.writers:
            job.writers["model"].finish_all(self._source, [p["model"] for p in parts])
        if "hf_model" in job.writers:
            job.writers["hf_model"].finish_all(self._source, [None] * len(parts))
        for content, snap in job.snapshots.items():
            if content == "model":
                self._write_hf_config(job.dirs[content])
            sharded.finish_sharded(job.dirs[content], [p[content] for p in parts], snap.common)
        if self.disk.kind == "verl":
            self._write_verl_files(job)
        disk.write_manifest(job.unit, self._manifest(job))
        disk.publish(self.root, self.disk, job.step, job.unit)
        disk.write_tracker(self.root, job.step)
        removed = disk.retain(self.root, self.disk, self.keep_last)
        if removed:
            log.info("retention (keep_last=%s) removed steps %s", self.keep_last, removed)

    def _transformer_config(self, model: Any) -> dict[str, Any]:
        """verl's ``transformer_config.json``: the live model's megatron-core
        ``TransformerConfig`` as JSON values (callables, process groups and other objects
        dropped, dtypes and enums as strings, as verl writes it); for a model given as a
        sharded state dict, the fields ckpt-ir derives from the HF config and the layout."""
        from ckpt_ir.megatron_config import json_safe_fields, transformer_config_json

        chunks = as_chunks(model)
        config = getattr(chunks[0], "config", None) if chunks else None
        if config is not None and dataclasses.is_dataclass(config):
            return json_safe_fields({f.name: getattr(config, f.name)
                                     for f in dataclasses.fields(config)})
        layout = self.layout
        return transformer_config_json(
            self.config, tp=layout.tp, pp=layout.pp, vpp=layout.vpp, ep=layout.ep,
            etp=layout.etp, first_stage_layers=layout.first_stage_layers,
            last_stage_layers=layout.last_stage_layers)

    def _write_verl_files(self, job: SaveJob) -> None:
        """What verl 0.9.1 writes beside the weights (verl layout, rank 0, before the
        manifest): the HF config and tokenizer in ``model/huggingface/`` (verl's model merger
        reads the config there, also for a torch_dist-only save), and
        ``transformer_config.json`` when ``extra`` is saved."""
        if {"model", "hf_model"} & set(job.contents):
            hf_dir = job.unit / self.disk.content_path("hf_model")
            if not (hf_dir / "config.json").is_file():
                hf_dir.mkdir(parents=True, exist_ok=True)
                disk.atomic_write_text(hf_dir / "config.json",
                                       json.dumps(self.config.to_hf_dict(), indent=2) + "\n")
                for name, path in self._source.source_files().files.items():
                    shutil.copyfile(path, hf_dir / name)
        if job.transformer_config is not None:
            disk.atomic_write_text(job.unit / TRANSFORMER_CONFIG,
                                   json.dumps(job.transformer_config, indent=2) + "\n")

    def _write_hf_config(self, directory: Path) -> None:
        """The HF config beside a passed-through torch_dist model, where ckpt-ir's own
        torch_dist writer puts it, so ``ckpt_ir.convert`` can read the model without help."""
        from ckpt_ir.converters.mcore_dist import HF_CONFIG_DIR

        out = directory / HF_CONFIG_DIR
        out.mkdir(exist_ok=True)
        disk.atomic_write_text(out / "config.json",
                               json.dumps(self.config.to_hf_dict(), indent=2) + "\n")
        for name, path in self._source.source_files().files.items():
            shutil.copyfile(path, out / name)

    def _verl_entries(self, job: SaveJob, contents: dict[str, Any]) -> None:
        """The entries verl 0.9.1's manifest adds beside the saved contents
        (``MegatronCheckpointManager._build_checkpoint_manifest``): where the LR scheduler
        and the RNG state sit, the transformer config, the HF config and tokenizer."""
        if "model" in contents and contents["model"]["format"] == disk.FORMAT_DIST:
            contents["model"]["backend"] = "dist_checkpointing"
        optimizer = self._content_path("optimizer")
        if "optimizer" in job.contents and "lr_scheduler" in job.state_keys.get("optimizer", ()):
            contents["lr_scheduler"] = {"path": optimizer, "format": disk.FORMAT_DIST,
                                        "key": "lr_scheduler"}
        if "extra" in job.contents and "rng_state" in job.state_keys.get("extra", ()):
            contents["rng_state"] = {"path": self._content_path("extra"),
                                     "format": disk.FORMAT_DIST, "key": "rng_state"}
        if job.transformer_config is not None:
            contents["transformer_config"] = {"path": TRANSFORMER_CONFIG, "format": "json"}
        if {"model", "hf_model"} & set(job.contents):
            hf = self.disk.content_path("hf_model")
            contents["hf_config"] = {"path": hf, "format": disk.FORMAT_HF,
                                     "note": "config.json, tokenizer, and optional "
                                             "generation_config.json"}
            if self.tokenizer is not None:
                contents["tokenizer"] = {"path": hf, "format": disk.FORMAT_HF}

    def _manifest(self, job: SaveJob) -> dict[str, Any]:
        """verl's ``ckpt_contents.json`` (schema 2), plus what ckpt-ir needs to load it."""
        contents: dict[str, Any] = {}
        directories: dict[str, str] = {}
        for c in job.contents:
            path = self._content_path(c)
            is_hf = c == "hf_model" or (c == "model" and self.model_format == "hf")
            contents[c] = {"path": path,
                           "format": disk.FORMAT_HF if is_hf else disk.FORMAT_DIST,
                           "backend": "ckpt-ir"}
            directories[path] = {
                "model": "model weights", "hf_model": "HF weights, config and tokenizer",
                "optimizer": "optimizer state (torch_dist)",
                "extra": "RNG / scheduler / other state (torch_dist)"}[c]
        if self.model_format == "hf" and {"model", "hf_model"} <= set(job.contents):
            contents["hf_model"]["note"] = "same directory as model: written once"
        if self.disk.kind == "verl":
            self._verl_entries(job, contents)
        from ckpt_ir import __version__

        hf = self.config.hf
        archs = hf.get("architectures") or [self.config.architecture]
        return {
            "schema_version": disk.MANIFEST_SCHEMA_VERSION,
            "framework": "megatron",
            "role": self.disk.role,
            "arch": archs[0] if isinstance(archs, list) and archs else self.config.architecture,
            "global_step": job.step,
            "world_size": self.world_size,
            "backend": {"has_bridge": False,
                        "use_dist_checkpointing": self.model_format == "torch_dist",
                        "peft": False},
            "save_contents": list(job.contents),
            "contents": contents,
            "directories": directories,
            "saved_any_dist_ckpt": any(v["format"] == disk.FORMAT_DIST
                                       for v in contents.values()),
            "writer": {"name": "ckpt-ir", "version": __version__,
                       "layout": self.layout.describe(), "mcore_spec": self.mcore_spec},
        }
