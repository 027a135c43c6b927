"""HF side files shared by every format that carries a model config: config.json, tokenizers."""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_ir.errors import CorruptCheckpointError, MissingConfigError, PlanError
from ckpt_ir.ir import ModelConfig
from ckpt_ir.safety.files import read_text

__all__ = ["CARRIED_FILES", "SourceFiles", "carried_files", "carried_source_files",
           "check_layer_count",
           "load_hf_config"]

log = logging.getLogger(__name__)

# Files a model directory needs besides weights and config.json (tokenizers, generation).
CARRIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json",
    "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "spiece.model", "qwen.tiktoken", "tiktoken.model",
)


@dataclass(frozen=True)
class SourceFiles:
    """Non-weight files a reader carries along (tokenizer, generation config), by file name;
    ``skipped``: path -> why a file by one of those names was not carried."""

    files: Mapping[str, Path] = field(default_factory=dict)
    skipped: Mapping[str, str] = field(default_factory=dict)


def load_hf_config(directory: Path) -> dict[str, Any]:
    """Parse ``config.json``; a missing or malformed file is a typed error."""
    path = directory / "config.json"
    if not path.is_file():
        raise MissingConfigError(f"no config.json in {directory}; pass --hf-config DIR (the "
                                 "model's config.json)", path=directory)
    text = read_text(path, "config.json")
    try:
        data = json.loads(text, parse_constant=_not_json, parse_float=_finite)
    except (ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError, NaN/Infinity and integers past Python's digit
        # limit; RecursionError absurd nesting.
        raise CorruptCheckpointError(f"config.json is not valid JSON: {e}", path=path) from e
    if not isinstance(data, dict):
        raise CorruptCheckpointError("config.json is not a JSON object", path=path)
    return data


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    # 1e400 is valid JSON but becomes inf, which int() cannot take (OverflowError).
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} does not fit a float")
    return value


def check_layer_count(config: ModelConfig, num_tensors: int, path: str | Path) -> None:
    """Refuse a config declaring more layers than the checkpoint has tensors.

    Every layer has tensors of its own in every format, so such a config cannot describe these
    weights; and planning it would take time and memory in proportion to the declared count,
    not to the input (a config.json claiming 10**12 layers would hang the planner). Readers call
    this once they know both their config and their tensors.
    """
    if config.num_layers > num_tensors:
        raise PlanError([f"the model config declares {config.num_layers} layers but the "
                         f"checkpoint holds only {num_tensors} tensors"], path=path)
    if config.vision_blocks > num_tensors:
        # A VL config's vision_config.depth, bounded the same way.
        raise PlanError([f"the model config declares {config.vision_blocks} vision blocks but "
                         f"the checkpoint holds only {num_tensors} tensors"], path=path)


def _tree_root(directory: Path) -> Path:
    """The tree a carried file of ``directory`` may resolve into: the directory itself, or
    for a Hugging Face hub cache snapshot (``models--org--name/snapshots/<rev>/``, whose files
    are symlinks to ``../../blobs/<hash>``) the model's cache directory."""
    resolved = directory.resolve()
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith(
            ("models--", "datasets--")):
        return resolved.parent.parent
    return resolved


def _why_not_carried(path: Path, root: Path) -> str | None:
    """None if ``path`` is a regular file inside ``root`` (after following symlinks), else
    why it is not carried."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    target = path.resolve()
    if target != root and root not in target.parents:
        return f"a symlink leading out of the checkpoint, to {target}"
    return None


def carried_source_files(directories: Iterable[Path]) -> SourceFiles:
    """Tokenizer and generation files found in ``directories`` (later ones win), each the
    regular file it resolves to. A name that is a symlink leading out of its directory's tree
    (``tokenizer.json`` -> ``/etc/passwd``) or not a regular file (a FIFO, a device) is not
    carried: it is listed in ``skipped`` with the reason (the report says which)."""
    found: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for d in directories:
        root = _tree_root(d)
        for name in CARRIED_FILES:
            path = d / name
            if not os.path.lexists(path):
                continue
            why = _why_not_carried(path, root)
            if why is None:
                found[name] = path.resolve()
            else:
                skipped[str(path)] = why
                log.debug("not carrying %s: %s", path, why)
    return SourceFiles(found, skipped)


def carried_files(directories: Iterable[Path]) -> dict[str, Path]:
    """The files of :func:`carried_source_files` by name."""
    return dict(carried_source_files(directories).files)
