"""The checkpoint manager's run root: nothing outside it is loaded, replaced or deleted.

A step or role directory that is a symlink (to another run's checkpoint) is not the run's own:
retention, a save of the same step and the clean-up of killed saves leave its target alone;
temporary names match one role exactly; a tracker that is not a plain step number is a typed
error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckpt_ir.errors import CheckpointError, CorruptCheckpointError
from ckpt_ir.manager import disk
from ckpt_ir.manager.disk import DiskLayout

VERL = DiskLayout("verl", "actor")
PLAIN = DiskLayout("plain")


def committed_unit(unit: Path, marker: str) -> Path:
    """A unit directory as a completed save leaves it: weights and a manifest."""
    (unit / "model" / "dist_ckpt").mkdir(parents=True)
    (unit / "model" / "dist_ckpt" / "__0_0.distcp").write_text(marker)
    (unit / disk.MANIFEST).write_text(json.dumps({"contents": {}}))
    return unit


def run_root(root: Path, steps: list[int], layout: DiskLayout = VERL) -> Path:
    for step in steps:
        committed_unit(layout.unit(layout.step_dir(root, step)), f"{root.name} {step}")
    disk.write_tracker(root, steps[-1])
    return root


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*"))
            if p.is_file()}


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


@pytest.fixture
def other(tmp_path: Path) -> Path:
    """Another run's checkpoint, which this run's root links to."""
    return run_root(tmp_path / "other", [1, 5])


def test_retention_never_deletes_through_a_symlinked_step(tmp_path: Path, other: Path) -> None:
    root = run_root(tmp_path / "run", [2, 3, 4])
    before = tree(other)
    (root / "global_step_1").symlink_to(other / "global_step_1")
    assert [s for s, _ in VERL.steps(root)] == [2, 3, 4]
    assert disk.committed_steps(root, VERL) == [2, 3, 4]
    assert disk.retain(root, VERL, keep_last=1) == [2, 3]
    assert tree(other) == before
    assert (root / "global_step_1").is_symlink()  # not the run's own: left as it is
    assert leftovers(root) == []


def test_retention_unlinks_a_symlinked_role_and_leaves_its_target(tmp_path: Path,
                                                                  other: Path) -> None:
    root = run_root(tmp_path / "run", [3, 4])
    before = tree(other)
    (root / "global_step_2").mkdir()
    (root / "global_step_2" / "actor").symlink_to(other / "global_step_1" / "actor")
    assert disk.committed_steps(root, VERL) == [3, 4]  # a linked role is no save of this run
    assert disk.retain(root, VERL, keep_last=1) == [2, 3]
    assert tree(other) == before
    assert not (root / "global_step_2").exists()
    assert leftovers(root) == []  # no .…ckpt-ir-deleting-* link left behind


@pytest.mark.parametrize("linked", ["step", "role"])
def test_save_never_replaces_another_runs_checkpoint(tmp_path: Path, other: Path,
                                                     linked: str) -> None:
    root = run_root(tmp_path / "run", [1])
    before = tree(other)
    if linked == "step":
        (root / "global_step_5").symlink_to(other / "global_step_5")
    else:
        (root / "global_step_5").mkdir()
        (root / "global_step_5" / "actor").symlink_to(other / "global_step_5" / "actor")
    with pytest.raises(CorruptCheckpointError, match="is a symlink"):
        disk.stage(root, VERL, 5)
    # publish refuses too, whoever staged the unit.
    staged = root / ".global_step_5.actor.ckpt-ir-tmp-0123abcd" / "actor"
    committed_unit(staged, "new")
    if linked == "step":
        with pytest.raises(CheckpointError, match="writes only inside its run root"):
            disk.publish(root, VERL, 5, staged)
    else:
        disk.publish(root, VERL, 5, staged)  # the link is replaced, never followed
        assert not (root / "global_step_5" / "actor").is_symlink()
        assert tree(root / "global_step_5")["actor/model/dist_ckpt/__0_0.distcp"] == "new"
    assert tree(other) == before


def test_tracker_naming_a_symlinked_step_is_refused(tmp_path: Path, other: Path) -> None:
    root = run_root(tmp_path / "run", [1])
    (root / "global_step_5").symlink_to(other / "global_step_5")
    disk.write_tracker(root, 5)
    with pytest.raises(CorruptCheckpointError, match=r"global_step_5 is a symlink \(to "):
        disk.latest_step(root, VERL)


def test_clean_up_matches_its_own_role_exactly(tmp_path: Path, other: Path) -> None:
    root = run_root(tmp_path / "run", [1])
    mine = root / ".global_step_2.actor.ckpt-ir-tmp-0123abcd"
    theirs = root / ".global_step_2.ref.actor.ckpt-ir-tmp-0123abcd"  # role "ref.actor"
    also_theirs = root / ".global_step_2.critic.ckpt-ir-deleting-0123abcd"
    for d in (mine, theirs, also_theirs):
        (d / "x").mkdir(parents=True)
    link = root / ".global_step_0.actor.ckpt-ir-deleting-feedbeef"
    link.symlink_to(other / "global_step_1")
    tracker_tmp = root / f".{disk.TRACKER}.ckpt-ir-tmp-0123abcd"
    tracker_tmp.write_text("2")
    before = tree(other)
    removed = disk.clean_stale(root, VERL)
    assert sorted(removed) == sorted([mine, link, tracker_tmp])
    assert theirs.is_dir() and also_theirs.is_dir()
    assert not mine.exists() and not link.is_symlink()
    assert tree(other) == before
    assert disk.clean_stale(root, DiskLayout("verl", "ref.actor")) == [theirs]


@pytest.mark.parametrize("text", ["²", "1" * 5000, "12 3", "-1", "0x10", "٣"])
def test_tracker_that_is_not_a_step_number_is_a_typed_error(tmp_path: Path, text: str) -> None:
    root = run_root(tmp_path / "run", [1])
    (root / disk.TRACKER).write_text(text)
    for read in (lambda: disk.read_tracker(root), lambda: disk.latest_step(root, VERL),
                 lambda: disk.committed_steps(root, VERL),
                 lambda: disk.retain(root, VERL, 1)):
        with pytest.raises(CorruptCheckpointError, match="not a step number"):
            read()


def test_plain_layout_retention_skips_symlinked_iterations(tmp_path: Path) -> None:
    other = run_root(tmp_path / "other", [1], PLAIN)
    root = run_root(tmp_path / "run", [2, 3], PLAIN)
    before = tree(other)
    (root / "iter_0000001").symlink_to(other / "iter_0000001")
    assert disk.retain(root, PLAIN, keep_last=1) == [2]
    assert tree(other) == before and leftovers(root) == []
