"""HF side files shared by every format that carries a model config: config.json, tokenizers."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ckpt_ir.errors import CorruptCheckpointError, MissingConfigError, PlanError
from ckpt_ir.ir import ModelConfig
from ckpt_ir.safety.files import read_text

__all__ = ["CARRIED_FILES", "carried_files", "check_layer_count", "load_hf_config"]

# Files a model directory needs besides weights and config.json (tokenizers, generation).
CARRIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json",
    "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "spiece.model", "qwen.tiktoken", "tiktoken.model",
)


def load_hf_config(directory: Path) -> dict[str, Any]:
    """Parse ``config.json``; a missing or malformed file is a typed error."""
    path = directory / "config.json"
    if not path.is_file():
        raise MissingConfigError(f"no config.json in {directory}", path=directory)
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


def carried_files(directories: Iterable[Path]) -> dict[str, Path]:
    """Tokenizer and generation files found in ``directories`` (later ones win)."""
    found: dict[str, Path] = {}
    for d in directories:
        for name in CARRIED_FILES:
            if (d / name).is_file():
                found[name] = d / name
    return found
