"""Find what a path holds: the format, and the inner directory a reader should open.

Users point ckpt-ir at whatever they have: a torch_dist directory, an HF model, a Megatron-LM
run directory (``latest_checkpointed_iteration.txt`` + ``iter_0000123/``), a Megatron-Bridge
run (``iter_*/`` with ``run_config.yaml``), or a verl run / step / role directory
(``global_step_N/actor``) in any of verl's layouts:

* v2 (verl #6014): ``ckpt_contents.json`` manifest, ``model/{huggingface,dist_ckpt}``,
  ``optimizer/dist_ckpt``, ``extra/dist_ckpt``;
* v1: ``dist_ckpt/`` (model + optimizer + RNG) and ``huggingface/`` (config, tokenizer);
* bridge: ``huggingface/`` with the weights, ``dist_ckpt/`` without them;
* legacy: ``model/mp_rank_*/model.pt`` (verl-legacy), ``hf_config_and_tokenizer/``.

Only completed saves are trusted: the tracker ``latest_checkpointed_iteration.txt`` names one
(verl and Megatron-LM write it after the save, async saves in their finalize step), a v2 role
directory is complete once its ``ckpt_contents.json`` exists, a torch_dist directory once its
``metadata.json`` does. Without a tracker the newest *complete* step is used and newer
incomplete ones are reported. :attr:`Resolved.tree` says what each directory on the way holds
(``ckpt-ir inspect`` prints it). Only names and small JSON files are inspected here; nothing is
unpickled.

One walk (:func:`_walk`) serves models (:func:`resolve`) and adapters
(:func:`resolve_adapter`); at each directory it asks the probes of the format registry
(:mod:`ckpt_ir.formats`), whose evidence lives in :mod:`ckpt_ir.probes`. A plain PyTorch DCP
directory (``.metadata`` without ``metadata.json`` or Megatron parameter names) is told
apart from a torch_dist one and read as ``torch-dcp``; DCP trainers' trees are walked too:
torchtitan's ``step-N/``, verl's torchtitan engine (``global_step_N/step-N/``), NeMo-RL's
``step_N/policy/weights/[model/]``. A Megatron-FSDP ``fsdp_dtensor`` directory
(``model.module.`` keys) is read as ``megatron-fsdp``, also where verl's ``use_megatron_fsdp``
puts it (``global_step_N/{actor,critic}/model/dist_ckpt``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_ir.errors import CorruptCheckpointError, FormatError
from ckpt_ir.formats import FORMAT_NAMES, REGISTRY, FormatSpec
from ckpt_ir.probes import (  # noqa: F401  (re-exported: the old home of these helpers)
    ADAPTER_DIR,
    RANK_DIR,
    dist_has_adapter,
    dist_key_kinds,
    has_rank_dirs,
    has_verl_adapter_files,
    is_dist_dir,
    is_fsdp_dtensor_dir,
    is_hf_dir,
    is_peft_dir,
    is_plain_dcp_dir,
)
from ckpt_ir.safety.files import read_text

__all__ = ["FORMAT_NAMES", "MANIFEST", "TRACKER", "Resolved", "detect", "has_files", "parse_step",
           "resolve", "resolve_adapter", "save_state", "save_status"]

TRACKER = "latest_checkpointed_iteration.txt"
"""Megatron-LM's and verl's tracker: the last completed save's step, or ``release``. The one
definition: the manager and the megatron-legacy writer import it, and read it with
:func:`parse_step`."""
MANIFEST = "ckpt_contents.json"
_ITER = re.compile(r"^iter_(\d+)$", re.ASCII)
_STEP = re.compile(r"^global_step_(\d+)$", re.ASCII)
# DCP trainers' step folders: torchtitan's step-N (also inside verl's torchtitan engine's
# global_step_N/), NeMo-RL's step_N (tmp_step_N while incomplete, never matched).
_DCP_STEP = re.compile(r"^step[-_](\d+)$", re.ASCII)
# Directories that hold a DCP trainer's model below a step: NeMo-RL's policy/weights/ (v1) and
# policy/weights/model/ (v2), torchtitan's sharded/ (HF safetensors before consolidation).
_DCP_INNER = ("policy", "weights", "model", "sharded")


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
    # (path relative to `given`, what it holds) for the directories passed through.
    tree: tuple[tuple[str, str], ...] = field(default=())
    # Adapters: the HF PEFT export beside Megatron adapter tensors (verl's LoRA tree writes
    # model/huggingface/adapter/ next to model/dist_ckpt/), whose adapter_config.json records
    # the alpha, rank and targets the torch_dist files do not.
    peft_export: Path | None = None


MAX_STEP_DIGITS = 18
"""A step number fits an int64; a 5,000-digit one is no step (and past int()'s digit limit)."""


def parse_step(value: str) -> int | None:
    """A tracker's step number, None if ``value`` is not one: plain ASCII digits of sane
    length ("²".isdigit() is True, and int("²") raises ValueError)."""
    if value.isascii() and value.isdigit() and len(value) <= MAX_STEP_DIGITS:
        return int(value)
    return None


def _is_step(value: str) -> bool:
    return parse_step(value) is not None


def _read_tracker(p: Path) -> str:
    return read_text(p / TRACKER, TRACKER, limit=4096).strip()


def _dist_has_model(p: Path) -> bool:
    """Whether a torch_dist dir holds model weights: verl's bridge mode keeps only the
    optimizer there, and with LoRA only the adapters (Bridge's PEFT filter), which are not a
    model either."""
    return dist_key_kinds(p)[0]


def _manifest(p: Path) -> dict | None:
    """verl v2's ``ckpt_contents.json`` of a role directory, or None."""
    path = p / MANIFEST
    return read_json_file(path) if path.is_file() else None


_CONFIG_DIRS = ("huggingface", "model/huggingface", "hf_config_and_tokenizer")
"""Where a verl role directory keeps the HF config (v1/bridge, v2, legacy)."""


def config_candidates(role: Path, *, with_parent: bool = False) -> tuple[Path, ...]:
    """Where the model config of what ``role`` holds may be, in the order readers try them
    (:attr:`Resolved.config_candidates`, searched with :func:`ckpt_ir.probes.find_config_dir`):
    verl's HF config directories, then its ``transformer_config.json``. ``with_parent``: also
    the parent's (an adapter directory inside a role directory)."""
    dirs = [role / d for d in _CONFIG_DIRS]
    files = [role / "transformer_config.json"]
    if with_parent:
        dirs += [role.parent / "huggingface", role.parent / "hf_config_and_tokenizer"]
        files.append(role.parent / "transformer_config.json")
    return tuple(d for d in dirs if d.is_dir()) + tuple(f for f in files if f.is_file())


def _role_dir(p: Path, given: Path, notes: list[str], step: int | None) -> Resolved | None:
    """A verl role directory (global_step_N/actor): v2, v1, bridge or legacy layout."""
    cfgs = config_candidates(p)
    manifest = _manifest(p)
    if manifest is not None:
        chosen = _from_manifest(p, manifest, given, notes, step, cfgs)
        if chosen is not None:
            return chosen
    elif _is_v2_role(p):
        state, why = save_state(p)
        if state == "incomplete":
            notes.append(f"{p.name}: {why}; this save may be incomplete")
        elif state == "unconfirmed" and not any(why in n for n in notes):
            notes.append(f"{p.name}: {why}")
    layouts = (
        (p / "model" / "dist_ckpt", "verl v2 (model/dist_ckpt)"),
        (p / "dist_ckpt", "verl v1 (dist_ckpt)"),
    )
    for d, layout in layouts:
        if is_fsdp_dtensor_dir(d):
            # verl's use_megatron_fsdp writes Megatron-FSDP's DCP where torch_dist would go.
            return Resolved("megatron-fsdp", d, given, f"{layout}, Megatron-FSDP fsdp_dtensor",
                            tuple(notes), step, cfgs)
    for d, layout in layouts:
        if is_dist_dir(d) and _dist_has_model(d):
            return Resolved("mcore-dist", d, given, layout, tuple(notes), step, cfgs)
    for d, layout in ((p / "model" / "huggingface", "verl v2 (model/huggingface)"),
                      (p / "huggingface", "verl bridge (huggingface)")):
        if is_hf_dir(d):
            return Resolved("hf", d, given, layout, tuple(notes), step, cfgs)
    if (p / "model").is_dir() and has_rank_dirs(p / "model"):
        return Resolved("verl-legacy", p / "model", given, "verl legacy (model/mp_rank_*)",
                        tuple(notes), step, cfgs)
    for d in (p / "model" / "dist_ckpt", p / "dist_ckpt"):
        if is_dist_dir(d) and dist_has_adapter(d):
            # verl's LoRA tree: Bridge's PEFT filter keeps only the adapters in dist_ckpt and
            # the bridge writes no base weights, so there is no model here to read.
            raise FormatError(
                f"{given} holds a LoRA adapter ({_rel(d, given) or d.name + '/'}: Megatron-Bridge "
                "adapter tensors) and no base model weights, as verl saves LoRA training; use "
                "extract-adapter, convert --to hf-peft / mcore-dist, or merge-adapter BASE "
                f"{given} DST", path=given)
    return None


def _from_manifest(p: Path, manifest: dict, given: Path, notes: list[str], step: int | None,
                   cfgs: tuple[Path, ...]) -> Resolved | None:
    """The model directory verl's v2 manifest names (``contents.model`` / ``hf_model``)."""
    contents = manifest.get("contents")
    if not isinstance(contents, dict):
        raise CorruptCheckpointError(f"{MANIFEST} has no 'contents' object", path=p / MANIFEST)
    for key in ("model", "hf_model"):
        entry = contents.get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        d = p / entry["path"]
        try:
            inside = p.resolve() in d.resolve().parents
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop
            inside = False
        if not inside:
            raise CorruptCheckpointError(f"{MANIFEST} names {entry['path']!r}, outside the role "
                                         "directory", path=p / MANIFEST)
        fmt = entry.get("format")
        layout = f"verl v2 ({entry['path']}, from {MANIFEST})"
        if is_fsdp_dtensor_dir(d):
            # use_megatron_fsdp: Megatron-FSDP's DCP where the manifest's model entry points,
            # whatever format name it records.
            return Resolved("megatron-fsdp", d, given, f"{layout}, Megatron-FSDP fsdp_dtensor",
                            tuple(notes), step, cfgs)
        if fmt == "megatron_dist_checkpoint" and is_dist_dir(d) and _dist_has_model(d):
            return Resolved("mcore-dist", d, given, layout, tuple(notes), step, cfgs)
        if fmt == "huggingface" and is_hf_dir(d):
            return Resolved("hf", d, given, layout, tuple(notes), step, cfgs)
        if fmt == "huggingface" and is_peft_dir(d / "adapter"):
            continue  # a PEFT adapter export, not model weights
        # Shown by inspect: the manifest's values as short reprs, whatever they hold.
        notes.append(f"{MANIFEST} lists {key} at {reprlib.repr(entry['path'])} "
                     f"({reprlib.repr(fmt)}), which holds no readable weights")
    return None


def _rel(p: Path, base: Path) -> str:
    """``p`` relative to ``base`` as ``"a/b/"``; ``""`` when they are the same directory."""
    try:
        rel = p.relative_to(base)
    except ValueError:
        return f"{p}/"
    return "" if str(rel) == "." else f"{rel}/"


def _has_no(d: Path, base: Path, what: str) -> str:
    rel = _rel(d, base)
    return f"{rel} has no {what}" if rel else f"no {what}"


def has_files(d: Path) -> bool:
    """Whether anything but empty directories lies under ``d`` (stops at the first file).

    verl 0.9.1's path helpers create ``model/dist_ckpt``, ``optimizer/dist_ckpt`` and
    ``extra/dist_ckpt`` before loading (and leave them empty when the load fails, as it does on
    a legacy tree): such directories hold no checkpoint and say nothing about one.
    """
    # Symlinked directories count (verl's migration script can link dist_ckpt/ into place);
    # each real directory is visited once, so a link loop ends.
    seen: set[Path] = set()
    stack = [d]
    try:
        while stack:
            current = stack.pop()
            real = current.resolve()
            if real in seen or not current.is_dir():
                continue
            seen.add(real)
            for child in current.iterdir():
                if child.is_file():
                    return True
                if child.is_dir():
                    stack.append(child)
    except (OSError, RuntimeError):  # unreadable: assume it holds something
        return True
    return False


def _is_v2_role(role: Path) -> bool:
    """A verl v2 role directory: non-empty ``optimizer/`` or ``extra/``, or a ``model/``
    that is not a legacy one (``model/mp_rank_*``)."""
    return any(has_files(role / d) for d in ("optimizer", "extra")) or (
        has_files(role / "model") and not has_rank_dirs(role / "model"))


def _dist_incomplete(d: Path) -> bool:
    return d.is_dir() and ((d / ".metadata").is_file() or any(d.glob("*.distcp"))) \
        and not (d / "metadata.json").is_file()


def _v2_without_manifest(role: Path, base: Path) -> tuple[str, str]:
    """A v2 role directory with no ``ckpt_contents.json``: "incomplete" when a part is
    missing or unfinished, else "unconfirmed" (what verl's
    ``scripts/migrate_megatron_checkpoint_layout.py`` makes of a v1 save: no manifest, but the
    model, optimizer and extra directories are all there and finished)."""
    no_manifest = f"{_has_no(role, base, MANIFEST)} (verl writes it last)"
    for d in ("model/dist_ckpt", "optimizer/dist_ckpt", "extra/dist_ckpt"):
        if _dist_incomplete(role / d):
            return "incomplete", no_manifest
    model = role / "model"
    has_model = is_hf_dir(model / "huggingface") or (
        is_dist_dir(model / "dist_ckpt") and (model / "dist_ckpt" / "metadata.json").is_file())
    if has_model and all(has_files(role / d) for d in ("optimizer", "extra")):
        return "unconfirmed", (f"{no_manifest}: a tree migrated from verl's v1 layout or "
                               "copied without it; completeness could not be confirmed")
    return "incomplete", no_manifest


def save_state(p: Path) -> tuple[str, str]:
    """Whether the save in ``p`` (a step, role or iteration directory) completed:
    ("complete" | "unconfirmed" | "incomplete", why).

    Markers: a v2 role directory's ``ckpt_contents.json``; a torch_dist directory's
    ``metadata.json`` (megatron-core writes it after every rank finished). Formats without a
    marker (per-rank files, HF weights) count as complete; a v2 role directory without its
    manifest whose parts are all there and finished is "unconfirmed" (read, with a note).
    """
    roles = [p / r for r in ("actor", "critic") if (p / r).is_dir()]
    unconfirmed = ""
    for role in roles or [p]:
        if (role / MANIFEST).is_file():
            continue
        if _is_v2_role(role):
            state, why = _v2_without_manifest(role, p)
            if state == "incomplete":
                return state, why
            unconfirmed = unconfirmed or why
            continue
        for d in (role / "dist_ckpt", role):
            # A DCP trainer's step directory (torchtitan's step-N) is plain DCP, without
            # metadata.json: its .metadata, written last, is its completion mark.
            if _dist_incomplete(d) and not (d == role and is_plain_dcp_dir(d)):
                return "incomplete", \
                    f"{_has_no(d, p, 'metadata.json')} (torch_dist writes it last)"
    return ("unconfirmed", unconfirmed) if unconfirmed else ("complete", "")


def save_status(p: Path) -> tuple[bool, str]:
    """Whether the save in ``p`` can be read as complete, and why not (see
    :func:`save_state`; an unconfirmed save counts as complete)."""
    state, why = save_state(p)
    return state != "incomplete", why if state == "incomplete" else ""


def _pick_step(p: Path, steps: list[tuple[int, Path]], notes: list[str]) -> tuple[int, Path]:
    """The newest step directory whose save completed (no tracker to say which)."""
    skipped: list[str] = []
    for n, d in reversed(steps):
        state, why = save_state(d)
        if state != "incomplete":
            notes.extend(f"{s}: an async save in progress or a failed one; skipped"
                         for s in skipped)
            notes.append(f"no {TRACKER}; using {d.name}, the newest completed save")
            if state == "unconfirmed":
                notes.append(f"{d.name}: {why}")
            return n, d
        skipped.append(f"{d.name} is incomplete ({why})")
    raise CorruptCheckpointError(f"no completed save under {p}: {'; '.join(skipped)}", path=p)


_DESCRIPTIONS = (
    (MANIFEST, "verl v2 manifest: the save completed; names what each directory holds"),
    (TRACKER, "tracker: the last completed save"),
    ("transformer_config.json", "megatron-core TransformerConfig as JSON"),
    ("data.pt", "dataloader state (not converted)"),
    ("optim", "distributed optimizer state per rank (not converted)"),
    ("rng_states", "RNG state per rank (not converted)"),
    ("optimizer_scheduler", "LR scheduler state (not converted)"),
    ("optimizer", "optimizer and LR scheduler (torch_dist, not converted)"),
    ("extra", "RNG state (torch_dist, not converted)"),
    ("hf_config_and_tokenizer", "HF config and tokenizer"),
    ("hf_config", "HF config and tokenizer (written by ckpt-ir)"),
    ("adapter_checkpoint", "verl LoRA adapter files per rank (extract-adapter reads them)"),
    ("run_config.yaml", "Megatron-Bridge run config"),
    ("ckpt_ir_layout.json", "ckpt-ir's record of the per-rank layout (TP, PP, EP)"),
    ("common.pt", "torch_dist common state (megatron-core <= 0.18)"),
)


def describe_entry(c: Path) -> str | None:
    """One line on what a file or directory of a checkpoint tree holds (None: not known)."""
    name = c.name
    if c.is_dir():
        if _STEP.match(name) or _ITER.match(name) or name == "release":
            state, why = save_state(c)
            return "a saved step" + {"complete": "", "unconfirmed": " (no manifest: "
                                     "completeness not confirmed)",
                                     "incomplete": f", INCOMPLETE: {why}"}[state]
        if name in ("actor", "critic"):
            return f"the {name}'s checkpoint"
        if name == "dist_ckpt" and not has_files(c):
            return "empty (left by verl's path helpers): not a checkpoint"
        for spec in REGISTRY:  # what a format directory holds, in the registry's words
            text = spec.describe(c) if spec.describe is not None else None
            if text is not None:
                return text
        if name == "huggingface" and (c / "config.json").is_file():
            return "HF config and tokenizer (no weights)"
        if name == "model":
            return "model weights (verl v2): " + ", ".join(
                f"{d.name}/" for d in sorted(c.iterdir()) if d.is_dir()) if any(
                d.is_dir() for d in c.iterdir()) else "model weights (verl v2), empty"
    for key, text in _DESCRIPTIONS:
        if name == key:
            return text
    if RANK_DIR.match(name):
        return "one model-parallel rank's files"
    return None


def _tree(given: Path, visited: list[Path]) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    seen: set[Path] = set()
    for d in visited:
        try:
            children = sorted(d.iterdir())
        except OSError:
            continue
        for c in children:
            if c in seen or c.name.startswith("."):
                continue
            seen.add(c)
            try:
                text = describe_entry(c)
            except OSError:
                text = "unreadable"
            if text is not None:
                rel = c.relative_to(given) if c.is_relative_to(given) else c
                out.append((f"{rel}/" if c.is_dir() else str(rel), text))
    # Parents before their children, siblings by name: reads as a tree.
    return tuple(sorted(out, key=lambda e: Path(e[0]).parts))


def resolve(src: str | Path) -> Resolved:
    """Resolve ``src`` to a format and the directory its reader opens."""
    visited: list[Path] = []
    resolved = _resolve(Path(src), visited)
    return dataclasses.replace(resolved,
                               tree=_tree(resolved.given, _with_inner(visited, resolved.path)))


def _with_inner(visited: list[Path], read: Path) -> list[Path]:
    """``visited`` plus the directories between the last one looked at and the one read
    (role/model/ on the way to role/model/huggingface/), so the tree describes them too."""
    out = list(visited)
    inner = read.parent
    while out and inner != out[-1] and out[-1] in inner.parents:
        out.append(inner)
        inner = inner.parent
    return out


Finder = Callable[[Path, Path, list[str], "int | None"], "Resolved | None"]
"""What one walk looks for in a directory: ``(directory, given, notes, step)`` -> a hit."""


def _walk(given: Path, visited: list[Path], notes: list[str], find: Finder, *,
          strict: bool) -> Resolved | None:
    """The one walk over run -> step -> role -> format directories, shared by models and
    adapters: ask ``find`` at each level, else follow the tracker, the newest step or the
    first role directory. ``strict`` (models): a tracker naming no directory is an error, and
    only a completed save is taken when there is no tracker; adapters take the newest step
    and stop where the tracker leads nowhere (their rules, kept as they were)."""
    p, step = given, None
    # run dir -> step dir -> role dir -> inner dir(s), at most (NeMo-RL's run / step_N /
    # policy / weights / model is the deepest)
    for _ in range(6):
        visited.append(p)
        hit = find(p, given, notes, step)
        if hit is not None:
            return hit
        if (p / TRACKER).is_file():
            value = _read_tracker(p)
            inner = None
            if value == "release":
                inner = p / "release"
            elif _is_step(value):
                n = int(value)
                for cand in (p / f"iter_{n:07d}", p / f"global_step_{n}"):
                    if cand.is_dir():
                        inner, step = cand, n
                        break
            if inner is None or not inner.is_dir():
                if not strict:
                    break
                raise CorruptCheckpointError(f"{TRACKER} says {value!r} but no matching "
                                             "iter_/global_step_ directory exists",
                                             path=p / TRACKER)
            notes.append(f"{TRACKER} points at {inner.name}")
            newer = [c.name for n, c in _steps(p) if step is not None and n > step]
            if newer and strict:
                notes.append(f"{', '.join(newer)} {'is' if len(newer) == 1 else 'are'} newer "
                             f"than the tracker's step {step}: an unfinished or failed save, "
                             "not used")
            p = inner
            continue
        steps = _steps(p)
        if steps:
            if strict:
                step, p = _pick_step(p, steps, notes)
            else:
                step, p = steps[-1]
                notes.append(f"no {TRACKER}; using the newest step directory {p.name}")
            continue
        roles = [r for r in ("actor", "critic") if (p / r).is_dir()]
        if roles:
            if len(roles) > 1 and strict:
                notes.append(f"{p.name} holds {', '.join(roles)}; reading {roles[0]} "
                             "(point at the role directory to choose)")
            p = p / roles[0]
            continue
        inner = next((p / d for d in _DCP_INNER if _leads_to_dcp(p / d)), None)
        if inner is not None:
            p = inner
            continue
        break
    return None


def _probe_model(p: Path, given: Path, notes: list[str], step: int | None) -> Resolved | None:
    """The format ``p`` itself holds, asking each registered probe in registry order; else a
    verl role directory's model."""
    for spec in REGISTRY:
        layout = spec.probe(p) if spec.probe is not None else None
        if layout is None:
            continue
        if not spec.supported:
            raise FormatError(f"{p} holds {spec.unsupported}", path=given)
        return Resolved(spec.id, p, given, layout, tuple(notes), step)
    return _role_dir(p, given, notes, step)


def _resolve(given: Path, visited: list[Path]) -> Resolved:
    if not given.exists():
        raise FormatError(f"{given} does not exist", path=given)
    if not given.is_dir():
        raise FormatError(f"{given} is a file; ckpt-ir expects a checkpoint directory",
                          path=given)
    notes: list[str] = []
    hit = _walk(given, visited, notes, _probe_model, strict=True)
    if hit is not None:
        return hit
    if (given / "config.json").is_file() and not any(given.glob("*.safetensors")):
        # A config alone describes every tensor's shape: enough to plan (--dry-run) at any
        # scale without weights, e.g. for sizing a 405B conversion before downloading it.
        return Resolved("hf", given, given, "config only (shapes, no weights)", tuple(notes))
    raise FormatError(f"cannot tell what checkpoint format {given} holds (no config.json with "
                      "weights, no metadata.json, no tracker file, no mp_rank_* dirs)",
                      path=given)


def _steps(p: Path) -> list[tuple[int, Path]]:
    steps = sorted(((int(m.group(1)), c) for c in p.iterdir()
                    if (m := _ITER.match(c.name) or _STEP.match(c.name)) and c.is_dir()),
                   key=lambda t: t[0])
    if steps:
        return steps
    return sorted(((int(m.group(1)), c) for c in p.iterdir()
                   if (m := _DCP_STEP.match(c.name)) and c.is_dir()), key=lambda t: t[0])


def _leads_to_dcp(d: Path, depth: int = 2) -> bool:
    """Whether ``d`` (one of :data:`_DCP_INNER`) holds DCP files or torch's sharded
    safetensors, or leads to them through at most ``depth`` more such directories
    (``policy/weights/model/``); names only."""
    if not d.is_dir():
        return False
    if (d / ".metadata").is_file() or any(d.glob("*.distcp")) \
            or any(d.glob("shard-*-model-*-of-*.safetensors")):
        return True
    return depth > 0 and any(_leads_to_dcp(d / n, depth - 1) for n in _DCP_INNER)


def detect(src: str | Path) -> str:
    """The format name of ``src`` (one of :data:`FORMAT_NAMES`)."""
    return resolve(src).format


def read_json_file(path: Path) -> dict:
    """Small JSON config files (metadata.json, transformer_config.json), typed errors."""
    text = read_text(path, path.name)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path.name} is not valid JSON: {e}", path=path) from e
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path.name} is not a JSON object", path=path)
    return data


# --------------------------------------------------------------------------------------------
# LoRA adapters
# --------------------------------------------------------------------------------------------

def _adapter_in(p: Path, given: Path, notes: list[str], step: int | None) -> Resolved | None:
    cfgs = config_candidates(p, with_parent=True)
    if p.name == "adapter" and (p.parent / "config.json").is_file():
        # Megatron-Bridge's save_hf_adapter export inside verl's huggingface/ (config and
        # tokenizer of the base model beside it).
        cfgs = (p.parent, *cfgs)
    # ``p`` itself, then where verl's role directories keep an adapter: per-rank files in
    # adapter_checkpoint/, torch_dist adapter tensors in (model/)dist_ckpt/, the HF PEFT
    # export in (model/)huggingface/adapter/. At each place the registry's adapter probes are
    # asked in registry order.
    for d in (p, p / ADAPTER_DIR, p / "model" / "dist_ckpt", p / "dist_ckpt",
              p / "huggingface" / "adapter", p / "model" / "huggingface" / "adapter"):
        for spec in REGISTRY:
            if spec.adapter_probe is not None and spec.adapter_probe(d):
                return _adapter_hit(spec, d, p, given, notes, step, cfgs)
    return None


def _adapter_hit(spec: FormatSpec, d: Path, p: Path, given: Path, notes: list[str],
                 step: int | None, cfgs: tuple[Path, ...]) -> Resolved:
    """The adapter ``spec``'s probe found in ``d`` (``p`` or a place inside it), with the
    layout ``inspect`` shows and, for torch_dist adapters, verl's HF PEFT export beside it."""
    rel = _rel(d, given)
    export = None
    if is_peft_dir(d):
        layout = "hf peft adapter" if d == p else f"verl HF PEFT export ({rel})"
    elif is_dist_dir(d):
        layout = "megatron-bridge iter" if (d / "run_config.yaml").is_file() else \
            f"torch_dist with LoRA adapters ({rel})" if rel else "torch_dist directory"
        export = _peft_export(p, d)
        if export is not None:
            layout = f"verl LoRA tree ({rel}, HF PEFT export {_rel(export, given)})"
    else:
        # The format's own words where its probe has them (verl FSDP LoRA model files).
        layout = (spec.probe(d) if spec.probe is not None else None) or \
            f"verl adapter files ({d.name}/)"
    return Resolved(spec.id, d, given, layout, tuple(notes), step, cfgs, peft_export=export)


def _peft_export(role: Path, dist: Path) -> Path | None:
    """The HF PEFT export verl writes beside a torch_dist adapter directory: the manifest's
    ``peft_adapter_path``, else ``huggingface/adapter`` next to ``dist_ckpt`` (v1 and v2)."""
    candidates: list[Path] = []
    manifest = _manifest(role) if (role / MANIFEST).is_file() else None
    contents = manifest.get("contents") if manifest is not None else None
    for entry in contents.values() if isinstance(contents, dict) else ():
        rel = entry.get("peft_adapter_path") if isinstance(entry, dict) else None
        if isinstance(rel, str):
            d = role / rel
            try:
                inside = role.resolve() in d.resolve().parents
            except (OSError, RuntimeError):
                inside = False
            if not inside:
                raise CorruptCheckpointError(f"{MANIFEST} names peft_adapter_path {rel!r}, "
                                             "outside the role directory", path=role / MANIFEST)
            candidates.append(d)
    candidates.append(dist.parent / "huggingface" / "adapter")
    return next((c for c in candidates if is_peft_dir(c)), None)


def resolve_adapter(src: str | Path) -> Resolved:
    """Resolve ``src`` to the LoRA adapter it holds (a run, step or role directory, or the
    adapter itself): an HF PEFT directory, verl's ``adapter_checkpoint/`` files, or a
    torch_dist directory with Megatron-Bridge adapter tensors (adapter-only or with the base)."""
    given = Path(src)
    if not given.is_dir():
        raise FormatError(f"{given} is not a directory", path=given)
    notes: list[str] = []
    visited: list[Path] = []
    hit = _walk(given, visited, notes, _adapter_in, strict=False)
    if hit is not None:
        return dataclasses.replace(hit, tree=_tree(given, _with_inner(visited, hit.path)))
    raise FormatError(f"{given} holds no LoRA adapter (no adapter_config.json, no "
                      f"{ADAPTER_DIR}/mp_rank_*_adapter.pt, no torch_dist adapter tensors)",
                      path=given)
