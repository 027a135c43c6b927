"""Find what a path holds: the format, and the inner directory a reader should open.

Users point ckpt-ir at whatever they have: a torch_dist directory, an HF model, a Megatron-LM
run directory (``latest_checkpointed_iteration.txt`` + ``iter_0000123/``), a Megatron-Bridge
run (``iter_*/`` with ``run_config.yaml``), or a verl role directory (``global_step_N/actor``
holding ``dist_ckpt/``, ``model/dist_ckpt/`` or ``huggingface/``). Only names and small JSON
files are inspected here; nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_ir.errors import CorruptCheckpointError, FormatError

__all__ = ["FORMAT_NAMES", "Resolved", "detect", "resolve"]

FORMAT_NAMES = ("hf", "hf-peft", "mcore-dist", "verl-legacy", "megatron-legacy")

TRACKER = "latest_checkpointed_iteration.txt"
_ITER = re.compile(r"^iter_(\d+)$")
_STEP = re.compile(r"^global_step_(\d+)$")
_RANK_DIR = re.compile(r"^mp_rank_\d{2}(_\d{3})?(_\d{3})?$")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Resolved:
    """The outcome of looking at a path."""

    format: str
    path: Path
    given: Path
    layout: str
    notes: tuple[str, ...] = ()
    step: int | None = None
    config_candidates: tuple[Path, ...] = field(default=())


def is_dist_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "metadata.json").is_file() or (p / ".metadata").is_file())


def is_hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and any((p / n).is_file() for n in _HF_WEIGHTS)


def is_peft_dir(p: Path) -> bool:
    return (p / "adapter_config.json").is_file()


def _read_tracker(p: Path) -> str:
    try:
        return (p / TRACKER).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"cannot read {TRACKER}: {e}", path=p / TRACKER) from e


def _dist_has_model(p: Path) -> bool:
    """Whether a torch_dist dir holds model weights (verl's bridge mode keeps only optimizer)."""
    # The pickled `.metadata` is not opened here; the data file names are enough: verl writes
    # weights under the model's key names, which the `.metadata` lists, so peek at its bytes.
    try:
        raw = (p / ".metadata").read_bytes()
    except OSError:
        return True
    return b"embedding.word_embeddings" in raw or b"decoder.layers" in raw


def _role_dir(p: Path, given: Path, notes: list[str], step: int | None) -> Resolved | None:
    """A verl role directory (global_step_N/actor): v2, v1 or bridge layout."""
    candidates_cfg = tuple(c for c in (p / "huggingface", p / "model" / "huggingface",
                                       p / "hf_config_and_tokenizer") if c.is_dir())
    tc = p / "transformer_config.json"
    cfgs = candidates_cfg + ((tc,) if tc.is_file() else ())
    layouts = (
        (p / "model" / "dist_ckpt", "verl v2 (model/dist_ckpt)"),
        (p / "dist_ckpt", "verl v1 (dist_ckpt)"),
    )
    for d, layout in layouts:
        if is_dist_dir(d) and _dist_has_model(d):
            return Resolved("mcore-dist", d, given, layout, tuple(notes), step, cfgs)
    for d, layout in ((p / "model" / "huggingface", "verl v2 (model/huggingface)"),
                      (p / "huggingface", "verl bridge (huggingface)")):
        if is_hf_dir(d):
            return Resolved("hf", d, given, layout, tuple(notes), step, cfgs)
    if (p / "model").is_dir() and any(_RANK_DIR.match(c.name) for c in (p / "model").iterdir()):
        return Resolved("verl-legacy", p / "model", given, "verl legacy (model/mp_rank_*)",
                        tuple(notes), step, cfgs)
    return None


def resolve(src: str | Path) -> Resolved:
    """Resolve ``src`` to a format and the directory its reader opens."""
    given = Path(src)
    if not given.exists():
        raise FormatError(f"{given} does not exist", path=given)
    if not given.is_dir():
        raise FormatError(f"{given} is a file; ckpt-ir expects a checkpoint directory",
                          path=given)
    notes: list[str] = []
    p, step = given, None
    for _ in range(4):  # run dir -> step dir -> role dir -> inner dir, at most
        if is_peft_dir(p):
            return Resolved("hf-peft", p, given, "hf peft adapter", tuple(notes), step)
        if is_hf_dir(p):
            return Resolved("hf", p, given, "hf model directory", tuple(notes), step)
        if is_dist_dir(p):
            layout = "megatron-bridge iter" if (p / "run_config.yaml").is_file() \
                else "torch_dist directory"
            return Resolved("mcore-dist", p, given, layout, tuple(notes), step)
        if any(_RANK_DIR.match(c.name) for c in p.iterdir() if c.is_dir()):
            has_mlm = any((c / "model_optim_rng.pt").is_file() for c in p.iterdir())
            fmt = "megatron-legacy" if has_mlm else "verl-legacy"
            return Resolved(fmt, p, given, f"{fmt} per-rank files", tuple(notes), step)
        role = _role_dir(p, given, notes, step)
        if role is not None:
            return role
        if (p / TRACKER).is_file():
            value = _read_tracker(p)
            inner = None
            if value == "release":
                inner = p / "release"
            elif value.isdigit():
                n = int(value)
                for cand in (p / f"iter_{n:07d}", p / f"global_step_{n}"):
                    if cand.is_dir():
                        inner, step = cand, n
                        break
            if inner is None:
                raise CorruptCheckpointError(f"{TRACKER} says {value!r} but no matching "
                                             "iter_/global_step_ directory exists",
                                             path=p / TRACKER)
            notes.append(f"{TRACKER} points at {inner.name}")
            p = inner
            continue
        steps = sorted(((int(m.group(1)), c) for c in p.iterdir()
                        if (m := _ITER.match(c.name) or _STEP.match(c.name)) and c.is_dir()),
                       key=lambda t: t[0])
        if steps:
            step, p = steps[-1]
            notes.append(f"no tracker file; using the newest step directory {p.name}")
            continue
        roles = [r for r in ("actor", "critic") if (p / r).is_dir()]
        if roles:
            if len(roles) > 1:
                notes.append(f"{p.name} holds {', '.join(roles)}; reading {roles[0]} "
                             "(point at the role directory to choose)")
            p = p / roles[0]
            continue
        break
    raise FormatError(f"cannot tell what checkpoint format {given} holds (no config.json with "
                      "weights, no metadata.json, no tracker file, no mp_rank_* dirs)",
                      path=given)


def detect(src: str | Path) -> str:
    """The format name of ``src`` (one of :data:`FORMAT_NAMES`)."""
    return resolve(src).format


def read_json_file(path: Path) -> dict:
    """Small JSON config files (metadata.json, transformer_config.json), typed errors."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path.name} is not valid JSON: {e}", path=path) from e
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path.name} is not a JSON object", path=path)
    return data
