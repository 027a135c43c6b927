"""Where a run's checkpoints live on disk, and the commit protocol that makes a save count.

Two layouts::

    verl (v2, verl #6014)                          plain
    <root>/                                        <root>/
      latest_checkpointed_iteration.txt              latest_checkpointed_iteration.txt
      global_step_<N>/<role>/                        iter_<N:07d>/
        ckpt_contents.json                             ckpt_contents.json
        model/dist_ckpt/      "model"  (torch_dist)    model/        "model" (torch_dist)
        model/huggingface/    "hf_model" (HF)          huggingface/  "hf_model" (HF)
        optimizer/dist_ckpt/  "optimizer"              optimizer/    "optimizer"
        extra/dist_ckpt/      "extra"                  extra/        "extra"

A save is staged in ``<root>/.<step dir>.<tag>.ckpt-ir-tmp-<id>/`` and counts only once, in this
order: (1) every rank's files are fsynced, (2) rank 0 writes the per-directory metadata
(torch_dist ``.metadata``/``metadata.json``, HF index/config), (3) rank 0 writes the manifest
``ckpt_contents.json`` (temp file, fsync, rename), (4) renames the staged directory into place,
(5) writes the tracker ``latest_checkpointed_iteration.txt`` (temp file, fsync, rename). The
tracker is the commit point: a step newer than the tracker, or without a manifest, is never
trusted. Retention runs after (5) and only ever removes steps older than the tracker's.

The manager touches nothing outside its run root: a step or role directory that is a symlink
is not one of its checkpoints (``steps()`` skips it, a tracker naming it is refused, a save of
that step refuses to write through it); a deletion never follows a link (a role symlink is
unlinked, its target left alone); its temporary names carry the step and the role exactly
(``.global_step_5.actor.ckpt-ir-tmp-…``), so one role's clean-up never matches another's
(``ref.actor``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_ir.detect import MANIFEST, TRACKER, parse_step
from ckpt_ir.durable import atomic_write, fsync_dir, fsync_tree
from ckpt_ir.errors import (
    CorruptCheckpointError,
    DestinationError,
    DestinationExistsError,
    FormatError,
)
from ckpt_ir.executor import remove_entry
from ckpt_ir.safety.files import read_text

__all__ = [
    "CONTENTS",
    "MANIFEST",
    "TRACKER",
    "DiskLayout",
    "atomic_write_text",
    "committed_steps",
    "latest_step",
    "read_manifest",
    "read_tracker",
]

log = logging.getLogger(__name__)

CONTENTS = ("model", "hf_model", "optimizer", "extra")
STAGING_MARKER = ".ckpt-ir-tmp-"
DELETING_MARKER = ".ckpt-ir-deleting-"
MANIFEST_SCHEMA_VERSION = 2  # verl's ckpt_contents.json schema

# verl's manifest formats (ckpt_contents.json "format" field).
FORMAT_DIST = "megatron_dist_checkpoint"
FORMAT_HF = "huggingface"


@dataclass(frozen=True, slots=True)
class DiskLayout:
    """``kind`` "verl" (v2) or "plain"; ``role`` names verl's role directory (actor, critic)."""

    kind: str = "verl"
    role: str = "actor"

    def __post_init__(self) -> None:
        if self.kind not in ("verl", "plain"):
            raise FormatError(f"disk layout must be 'verl' or 'plain', not {self.kind!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.role) or self.role.startswith("."):
            raise FormatError(f"role {self.role!r} is not a plain directory name")

    @property
    def _step_re(self) -> re.Pattern[str]:
        return re.compile(r"^global_step_(\d+)$" if self.kind == "verl" else r"^iter_(\d+)$",
                          re.ASCII)

    @property
    def tag(self) -> str:
        """Names this manager's temporary files at the run root apart from another role's."""
        return self.role if self.kind == "verl" else "run"

    def step_dir(self, root: Path, step: int) -> Path:
        return root / (f"global_step_{step}" if self.kind == "verl" else f"iter_{step:07d}")

    def unit(self, step_dir: Path) -> Path:
        """The directory one manager writes inside a step directory (verl: the role's)."""
        return step_dir / self.role if self.kind == "verl" else step_dir

    def content_path(self, content: str) -> str:
        """Where ``content`` goes, relative to the unit directory."""
        verl = {"model": "model/dist_ckpt", "hf_model": "model/huggingface",
                "optimizer": "optimizer/dist_ckpt", "extra": "extra/dist_ckpt"}
        plain = {"model": "model", "hf_model": "huggingface", "optimizer": "optimizer",
                 "extra": "extra"}
        return (verl if self.kind == "verl" else plain)[content]

    def steps(self, root: Path) -> list[tuple[int, Path]]:
        """Every step directory under ``root`` (complete or not), oldest first. Only real
        directories count: a symlink named like a step (to another run's checkpoint) is not
        this run's to load, replace or delete."""
        if not root.is_dir():
            return []
        out = []
        for c in root.iterdir():
            m = self._step_re.match(c.name)
            if not m:
                continue
            if not _real_dir(c):
                log.warning("ignoring %s: not a directory of this run (a symlink or a file)", c)
                continue
            out.append((int(m.group(1)), c))
        return sorted(out)

    def staging_re(self) -> re.Pattern[str]:
        """This manager's staging and deleting names at the run root, and nobody else's."""
        step = r"(?:global_step_\d+)" if self.kind == "verl" else r"(?:iter_\d+)"
        markers = "|".join(re.escape(m) for m in (STAGING_MARKER, DELETING_MARKER))
        return re.compile(rf"^\.{step}\.{re.escape(self.tag)}(?:{markers})[0-9a-f]+$")


def _real_dir(path: Path) -> bool:
    """A directory that is not a symlink."""
    return path.is_dir() and not path.is_symlink()


def _managed_unit(root: Path, layout: DiskLayout, step: int) -> Path:
    """The unit directory of ``step``, refusing one reached through a symlink."""
    step_dir = layout.step_dir(root, step)
    unit = layout.unit(step_dir)
    for p in (step_dir, unit):
        if p.is_symlink():
            raise CorruptCheckpointError(
                f"{p} is a symlink (to {p.resolve()}): the checkpoint manager uses only "
                f"directories inside its run root {root}", path=p)
    return unit


# --------------------------------------------------------------------------------------------
# Durable small files
# --------------------------------------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` so a reader sees the old content or the new, never a torn file; the
    temporary sibling carries :data:`STAGING_MARKER` so :func:`clean_stale` can tell it apart."""
    tmp = path.parent / f".{path.name}{STAGING_MARKER}{uuid.uuid4().hex[:8]}"
    atomic_write(path, text, tmp=tmp)


def read_tracker(root: Path) -> int | None:
    """The step the tracker names, None without a tracker.

    Raises:
        CorruptCheckpointError: the tracker holds something other than a step number.
    """
    path = root / TRACKER
    if not os.path.lexists(path):
        return None
    text = read_text(path, TRACKER, limit=1 << 16).strip()
    step = parse_step(text)
    if step is None:
        raise CorruptCheckpointError(f"{TRACKER} holds {text[:40]!r}, not a step number",
                                     path=path)
    return step


def read_manifest(unit: Path) -> dict[str, Any] | None:
    """A unit's ``ckpt_contents.json``, None if it has none (the save did not complete)."""
    path = unit / MANIFEST
    if not os.path.lexists(path):
        return None
    text = read_text(path, MANIFEST)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{MANIFEST} is not valid JSON: {e}", path=path) from e
    if not isinstance(data, dict) or not isinstance(data.get("contents"), dict):
        raise CorruptCheckpointError(f"{MANIFEST} has no 'contents' object", path=path)
    return data


def committed_steps(root: str | os.PathLike, layout: DiskLayout | None = None) -> list[int]:
    """Steps whose save completed and was committed, oldest first.

    A step counts when its unit directory has a manifest and the tracker names it or a later
    step (without a tracker: any step with a manifest).
    """
    layout = layout or DiskLayout()
    root = Path(root)
    tracker = read_tracker(root)
    out = []
    for step, d in layout.steps(root):
        if tracker is not None and step > tracker:
            continue
        unit = layout.unit(d)
        if not unit.is_symlink() and (unit / MANIFEST).is_file():
            out.append(step)
    return out


def latest_step(root: str | os.PathLike, layout: DiskLayout | None = None) -> int | None:
    """The step ``load("latest")`` resumes from: the tracker's, None if nothing was committed.

    Raises:
        CorruptCheckpointError: the tracker names a step whose save is not complete (its
            directory or manifest is missing).
    """
    layout = layout or DiskLayout()
    root = Path(root)
    tracker = read_tracker(root)
    if tracker is None:
        steps = committed_steps(root, layout)
        if steps:
            log.warning("%s has no %s; using step %d, the newest save with a %s", root,
                        TRACKER, steps[-1], MANIFEST)
        return steps[-1] if steps else None
    unit = _managed_unit(root, layout, tracker)
    if not (unit / MANIFEST).is_file():
        raise CorruptCheckpointError(f"{TRACKER} names step {tracker}, but {unit} has no "
                                     f"{MANIFEST}: that save is not complete", path=unit)
    return tracker


# --------------------------------------------------------------------------------------------
# Staging, commit, retention (rank 0 only)
# --------------------------------------------------------------------------------------------


def clean_stale(root: Path, layout: DiskLayout) -> list[Path]:
    """Remove what killed saves of this layout and role left behind: staging directories,
    half-deleted steps, temporary tracker files. A run root has one writer job at a time (and
    one manager per role), so none of them can be in use."""
    removed = []
    if not root.is_dir():
        return removed
    # Exact names: role "actor" must not match role "ref.actor"'s staging directory.
    mine = layout.staging_re()
    tracker_tmp = re.compile(rf"^\.{re.escape(TRACKER)}{re.escape(STAGING_MARKER)}[0-9a-f]+$")
    for p in root.iterdir():
        if not (mine.match(p.name) or tracker_tmp.match(p.name)):
            continue
        remove_entry(p)  # never follows a link
        removed.append(p)
        log.warning("removed %s left behind by an interrupted save", p)
    return removed


def stage(root: Path, layout: DiskLayout, step: int) -> Path:
    """A fresh staging directory for ``step``; returns the unit directory inside it.

    Raises:
        DestinationExistsError: ``step`` is already committed (saving it again would replace a
            checkpoint the tracker vouches for).
    """
    tracker = read_tracker(root)
    final = _managed_unit(root, layout, step)
    if tracker is not None and step <= tracker and (final / MANIFEST).is_file():
        raise DestinationExistsError(
            f"step {step} is already committed at {final} (the tracker is at step {tracker})",
            path=final)
    name = layout.step_dir(root, step).name
    staging = root / f".{name}.{layout.tag}{STAGING_MARKER}{uuid.uuid4().hex[:8]}"
    unit = layout.unit(staging)
    unit.mkdir(parents=True)
    return unit


def _trash(path: Path, root: Path, layout: DiskLayout, step_name: str) -> None:
    """Take ``path`` (a unit directory, or a symlink in its place) out of sight atomically (a
    rename into a hidden name at the run root, which :func:`clean_stale` finishes if we are
    killed mid-way), then delete it without following links. ``path``'s parent must be the
    run root or a real step directory in it: renaming through a symlinked parent would move
    another run's directory."""
    parent = path.parent
    if parent != root and (parent.parent != root or not _real_dir(parent)):
        raise DestinationError(f"refusing to delete {path}: it is not inside the run root "
                               f"{root} (a symlinked step directory?)", path=path)
    trash = root / f".{step_name}.{layout.tag}{DELETING_MARKER}{uuid.uuid4().hex[:8]}"
    os.replace(path, trash)
    fsync_dir(parent)
    fsync_dir(root)
    remove_entry(trash)


def write_manifest(unit: Path, manifest: Mapping[str, Any]) -> None:
    fsync_tree(unit)  # every directory entry of the data is durable before the manifest
    atomic_write_text(unit / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def publish(root: Path, layout: DiskLayout, step: int, staged_unit: Path) -> Path:
    """Rename the staged unit into place (its manifest already written); returns it.

    A unit already at the destination is uncommitted leftover of a killed save of the same step
    (:func:`stage` refused committed ones): it is moved aside first.
    """
    step_dir = layout.step_dir(root, step)
    staging = staged_unit if layout.kind == "plain" else staged_unit.parent
    if os.path.lexists(step_dir) and not _real_dir(step_dir):
        raise DestinationError(f"cannot save step {step}: {step_dir} is a symlink or a file, "
                               "and the checkpoint manager writes only inside its run root",
                               path=step_dir)
    final = layout.unit(step_dir)
    if os.path.lexists(final):
        _trash(final, root, layout, step_dir.name)
    if layout.kind == "plain" or not step_dir.exists():
        os.replace(staging, step_dir)
    else:
        # verl: other roles may already sit in this step directory.
        os.replace(staged_unit, final)
        shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(step_dir)
    fsync_dir(root)
    return final


def write_tracker(root: Path, step: int) -> None:
    # verl and Megatron-LM write the bare number, no newline.
    atomic_write_text(root / TRACKER, str(step))


def retain(root: Path, layout: DiskLayout, keep_last: int | None) -> list[int]:
    """After a commit: drop committed steps beyond the newest ``keep_last`` and incomplete
    leftovers older than the tracker's step. Never the tracker's step; never a newer one.
    Returns the steps removed."""
    tracker = read_tracker(root)
    if tracker is None:
        return []
    removed = []
    committed = [s for s in committed_steps(root, layout) if s <= tracker]
    keep = set(committed[-keep_last:]) if keep_last else set(committed)
    keep.add(tracker)
    for step, d in layout.steps(root):
        if step >= tracker or step in keep:
            continue
        unit = layout.unit(d)
        if os.path.lexists(unit):
            _trash(unit, root, layout, d.name)  # a role symlink: the link only
            removed.append(step)
        if layout.kind == "verl":
            with contextlib.suppress(OSError):
                d.rmdir()  # only if no other role is left in it
    return removed
