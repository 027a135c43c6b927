"""Plan-only conversions of very large configs: fast, no data, bounded per-unit memory."""

from __future__ import annotations

import json
import time

import pytest

import ckpt_ir
from tools.scale_plan import DEEPSEEK_V3, LLAMA3_405B

GIB = 2**30


def test_llama_405b_plans_in_seconds_without_weights(tmp_path):
    src = tmp_path / "llama-405b"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(LLAMA3_405B))
    t0 = time.perf_counter()
    report = ckpt_ir.convert(src, tmp_path / "out", to="mcore-dist", dry_run=True)
    assert time.perf_counter() - t0 < 20
    # Per layer: two norms, fused QKV, o_proj, fused fc1, fc2; plus embedding, final norm,
    # output layer.
    assert report.tensors_written == 126 * 6 + 3
    assert 750 * GIB < report.bytes_written < 760 * GIB
    # Memory is one unit (a layer's fc1 and its sources), not the model.
    assert report.peak_bytes_estimate < 7 * GIB
    assert not (tmp_path / "out").exists()


def test_deepseek_v3_671b_plans_in_seconds_without_weights(tmp_path):
    src = tmp_path / "dsv3"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    t0 = time.perf_counter()
    report = ckpt_ir.convert(src, tmp_path / "out", to="mcore-dist", dry_run=True)
    assert time.perf_counter() - t0 < 60  # seconds, not minutes, even on 2 busy cores
    assert report.architecture == "deepseek_v3"
    assert 1200 * GIB < report.bytes_written < 1300 * GIB
    # Streaming per (layer, expert): the largest unit is the embedding, not an expert stack.
    assert report.peak_bytes_estimate < 2 * GIB
    assert not (tmp_path / "out").exists()


def test_config_only_source_refuses_a_real_conversion(tmp_path):
    src = tmp_path / "cfg"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(LLAMA3_405B))
    with pytest.raises(ckpt_ir.FormatError, match="only --dry-run can plan it"):
        ckpt_ir.convert(src, tmp_path / "out", to="mcore-dist")
    assert not (tmp_path / "out").exists()
