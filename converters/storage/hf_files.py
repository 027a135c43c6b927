"""HF side files shared by every format that carries a model config: config.json, tokenizers."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ckpt_ir.errors import CorruptCheckpointError, MissingConfigError

__all__ = ["CARRIED_FILES", "carried_files", "load_hf_config"]

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
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"config.json is not valid JSON: {e}", path=path) from e
    if not isinstance(data, dict):
        raise CorruptCheckpointError("config.json is not a JSON object", path=path)
    return data


def carried_files(directories: Iterable[Path]) -> dict[str, Path]:
    """Tokenizer and generation files found in ``directories`` (later ones win)."""
    found: dict[str, Path] = {}
    for d in directories:
        for name in CARRIED_FILES:
            if (d / name).is_file():
                found[name] = d / name
    return found
