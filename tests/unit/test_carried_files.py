"""Which tokenizer and generation files a conversion carries: regular files inside the tree."""

from __future__ import annotations

import os
from pathlib import Path

from ckpt_ir.converters.storage.hf_files import carried_source_files


def test_hub_cache_snapshot_links_into_its_blobs_are_carried(tmp_path: Path) -> None:
    """transformers' cache: snapshots/<rev>/tokenizer.json -> ../../blobs/<hash>. The blobs
    belong to the same model's cache entry, so they are inside the tree."""
    entry = tmp_path / "hub" / "models--org--tiny"
    (entry / "blobs").mkdir(parents=True)
    (entry / "blobs" / "abc123").write_text("{}")
    snapshot = entry / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").symlink_to("../../blobs/abc123")
    (snapshot / "vocab.json").symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text("{}")
    found = carried_source_files([snapshot])
    assert found.files == {"tokenizer.json": entry / "blobs" / "abc123"}
    assert found.skipped == {str(snapshot / "vocab.json"): "a symlink leading out of the "
                             f"checkpoint, to {tmp_path / 'elsewhere.json'}"}


def test_only_regular_files_inside_the_directory(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "tokenizer.json").symlink_to("/etc/passwd")
    os.mkfifo(d / "merges.txt")
    (d / "vocab.txt").symlink_to(d / "missing")
    (d / "generation_config.json").mkdir()
    (d / "tokenizer_config.json").write_text("{}")
    found = carried_source_files([d])
    assert found.files == {"tokenizer_config.json": d / "tokenizer_config.json"}
    assert found.skipped == {
        str(d / "tokenizer.json"): "a symlink leading out of the checkpoint, to /etc/passwd",
        str(d / "merges.txt"): "not a regular file",
        str(d / "vocab.txt"): "cannot be read (No such file or directory)",
        str(d / "generation_config.json"): "not a regular file"}


def test_a_later_directory_wins_and_the_skipped_path_is_still_reported(tmp_path: Path
                                                                       ) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "tokenizer.json").symlink_to("/etc/passwd")
    (second / "tokenizer.json").write_text("{}")
    found = carried_source_files([first, second])
    assert found.files == {"tokenizer.json": second / "tokenizer.json"}
    assert found.skipped == {str(first / "tokenizer.json"): "a symlink leading out of the "
                             "checkpoint, to /etc/passwd"}
