"""``ckpt_ir.verify``: what it reports, across formats and layouts, and in how much memory.

The formats compared are the table ``LAYOUTS`` (how to make each from an HF checkpoint); a
format joins the flipped-bit property by adding a row.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import ckpt_ir
from ckpt_ir.converters.storage.dcp_files import DcpReader
from ckpt_ir.converters.storage.safetensors_file import read_header
from ckpt_ir.errors import CheckpointError, FormatError
from ckpt_ir.testing import assert_checkpoints_equal, assert_roundtrip
from ckpt_ir.verify import CHUNK_ELEMENTS, _compare, verify
from tests.fixtures import TINY_LLAMA, write_hf
from tests.hostile import bounded
from tests.strategies import bits_equal, tensors

# --------------------------------------------------------------------------------------------
# Layouts: how to make each checkpoint kind from an HF source


def _to(fmt: str, **options: Any) -> Callable[[Path, Path], None]:
    return lambda src, dst: ckpt_ir.convert(src, dst, to=fmt, **options) and None


LAYOUTS: dict[str, Callable[[Path, Path], None]] = {
    "hf-sharded": _to("hf", max_shard_size=20_000),
    "mcore-dist": _to("mcore-dist"),
    "mcore-dist-padded": _to("mcore-dist", pad_vocab_to_multiple=64),
    "verl-legacy-tp2": _to("verl-legacy", layout={"tp": 2}, pad_vocab_to_multiple=2),
    "megatron-legacy-tp2-pp2": _to("megatron-legacy", layout={"tp": 2, "pp": 2},
                                   pad_vocab_to_multiple=4),
}
# Layouts with vocabulary padding rows, which are not IR tensors (a flip there changes nothing).
PADDED = {"mcore-dist-padded", "verl-legacy-tp2", "megatron-legacy-tp2-pp2"}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verify")
    write_hf(root / "hf")
    out = {"hf": root / "hf"}
    for name, make in LAYOUTS.items():
        make(root / "hf", root / name)
        out[name] = root / name
    return out


def test_the_same_model_in_every_layout_verifies_equal(made: dict[str, Path]) -> None:
    names = list(made)
    for a, b in zip(names, names[1:] + names[:1], strict=True):
        report = verify(made[a], made[b])
        assert report.equal, report.summary()
        assert report.config == () and report.differences == ()
        assert len(report.tensors) == len(ckpt_ir.open(made["hf"]).tensors)
        assert report.summary().splitlines() == [
            f"{made[a]} ({report.format_a}) vs {made[b]} ({report.format_b}): EQUAL "
            f"({len(report.tensors)} tensors, 0 differing; bit-exact)"]
        json.dumps(report.to_dict())


# --------------------------------------------------------------------------------------------
# A single flipped bit, in any stored tensor of any format, is found and named


def _zip_data_ranges(data: bytes | memoryview, base: int) -> list[tuple[int, int]]:
    """Absolute byte ranges of the tensor storages (``*/data/<key>`` records) of the
    ``torch.save`` archive ``data`` found at ``base`` in its file."""
    ranges = []
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        for info in archive.infolist():
            if re.search(r"/data/\d+$", info.filename) and info.file_size:
                local = bytes(data[info.header_offset:info.header_offset + 30])
                start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") \
                    + int.from_bytes(local[28:30], "little")
                ranges.append((base + start, base + start + info.file_size))
    return ranges


def tensor_byte_ranges(ckpt: Path) -> list[tuple[Path, int, int]]:
    """Every byte range holding tensor data in the checkpoint ``ckpt``."""
    out = []
    for f in sorted(ckpt.glob("*.safetensors")):
        header = read_header(f)
        out += [(f, header.data_offset + e.start, header.data_offset + e.end)
                for e in header.entries.values() if e.nbytes]
    if (ckpt / ".metadata").is_file():
        with DcpReader(ckpt) as reader:
            chunks = {(c.file, c.offset, c.length) for t in reader.index.tensors.values()
                      for c in t.chunks}
        for file, offset, length in sorted(chunks):
            data = (ckpt / file).read_bytes()[offset:offset + length]
            out += [(ckpt / file, s, e) for s, e in _zip_data_ranges(data, offset)]
    for f in sorted(ckpt.rglob("*.pt")):
        if f.name != "common.pt":
            out += [(f, s, e) for s, e in _zip_data_ranges(f.read_bytes(), 0)]
    return out


def differing_tensors(a: Path, b: Path) -> set[str]:
    """The oracle: IR tensors whose bits differ, by reading both sides whole."""
    with ckpt_ir.open(a) as ca, ckpt_ir.open(b) as cb:
        return {n for n in ca.tensors if not bits_equal(ca.read(n), cb.read(n))}


@settings(max_examples=20, deadline=None)
@given(layout=st.sampled_from(["hf", *LAYOUTS]), data=st.data())
def test_a_single_flipped_bit_is_reported_as_its_tensor(made: dict[str, Path],
                                                        tmp_path_factory, layout: str,
                                                        data: st.DataObject) -> None:
    import shutil

    flipped = tmp_path_factory.mktemp("flip") / layout
    shutil.copytree(made[layout], flipped)
    file, start, end = data.draw(st.sampled_from(tensor_byte_ranges(flipped)), label="range")
    at = data.draw(st.integers(start, end - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    raw = bytearray(file.read_bytes())
    raw[at] ^= 1 << bit
    file.write_bytes(raw)
    oracle = differing_tensors(made["hf"], flipped)
    note(f"flipped bit {bit} of byte {at} of {file.name}: {oracle}")
    # Only vocabulary padding rows (not in the IR) can hide a flip.
    assert len(oracle) == 1 or (layout in PADDED and not oracle)
    for a, b in ((made["hf"], flipped), (flipped, made["mcore-dist"])):
        report = verify(a, b)
        assert {t.name for t in report.differences} == oracle
        for t in report.differences:
            assert t.status == "differs" and t.mismatched == 1
            assert t.first_index is not None and len(t.first_index) == len(t.shape_a)
            assert t.name in report.summary()
    shutil.rmtree(flipped)


# --------------------------------------------------------------------------------------------
# Values: exactness, tolerances, NaN, signed zero, dtype, config, missing tensors


def edited(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None],
           config: dict[str, Any] | None = None) -> Path:
    import shutil

    shutil.copytree(src, dst)
    state = load_file(src / "model.safetensors")
    edit(state)
    (dst / "model.safetensors").unlink()
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    return dst


NAME = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fp32") / "hf"
    write_hf(path, dtype=torch.float32)
    return path


def _set(name: str, index: tuple[int, ...], value: float | torch.Tensor):
    def edit(state: dict[str, torch.Tensor]) -> None:
        state[name] = state[name].clone()
        state[name][index] = value
    return edit


def test_tolerances_are_absolute_plus_relative_to_a(fp32: Path, tmp_path: Path) -> None:
    reference = load_file(fp32 / "model.safetensors")[NAME][3, 5].item()
    b = edited(fp32, tmp_path / "b", _set(NAME, (3, 5), reference + 1e-3))
    report = verify(fp32, b)
    t = report.tensor(NAME)
    assert not report.equal and [d.name for d in report.differences] == [NAME]
    assert t.mismatched == 1 and t.first_index == (3, 5)
    assert math.isclose(t.max_abs, 1e-3, rel_tol=1e-3)
    assert math.isclose(t.max_rel, 1e-3 / abs(reference), rel_tol=1e-3)
    assert f"{NAME}: 1 of 1280 elements differ (max abs 0.001" in report.summary()
    assert ", first at [3, 5]" in report.summary()
    assert verify(fp32, b, atol=2e-3).equal
    assert not verify(fp32, b, atol=5e-4).equal
    assert verify(fp32, b, rtol=2e-3 / abs(reference)).equal
    assert not verify(fp32, b, rtol=0.5e-3 / abs(reference)).equal


def test_nan_payloads_and_signed_zeros_differ_only_when_exact(fp32: Path,
                                                               tmp_path: Path) -> None:
    quiet, other = torch.tensor([0x7FC00000, 0x7FC00001], dtype=torch.int32).view(torch.float32)
    a = edited(fp32, tmp_path / "a", lambda s: (_set(NAME, (0, 0), quiet)(s),
                                                  _set(NAME, (0, 1), 0.0)(s)))
    b = edited(fp32, tmp_path / "b", lambda s: (_set(NAME, (0, 0), other)(s),
                                                  _set(NAME, (0, 1), -0.0)(s)))
    exact = verify(a, b).tensor(NAME)
    assert (exact.status, exact.mismatched, exact.max_abs, exact.first_index) == (
        "differs", 2, 0.0, (0, 0))
    assert verify(a, b, atol=1e-12).equal  # NaN matches NaN, -0.0 matches 0.0 by value


def test_nan_or_inf_against_a_number_never_passes_a_tolerance(fp32: Path,
                                                              tmp_path: Path) -> None:
    for i, value in enumerate([float("nan"), float("inf"), -float("inf")]):
        b = edited(fp32, tmp_path / f"b{i}", _set(NAME, (2, 2), value))
        t = verify(fp32, b, atol=1e30, rtol=1e30).tensor(NAME)
        assert (t.status, t.mismatched, t.max_abs) == ("differs", 1, math.inf)


def test_dtype_differences_are_reported_and_can_be_ignored(made: dict[str, Path],
                                                           tmp_path: Path) -> None:
    ckpt_ir.convert(made["hf"], tmp_path / "fp32", to="hf", dtype="fp32")
    report = verify(made["hf"], tmp_path / "fp32")
    assert not report.equal
    assert {t.status for t in report.tensors} == {"dtype"}
    assert all(t.mismatched == 0 and t.max_abs == 0.0 for t in report.tensors)
    assert "dtype bfloat16 in A, float32 in B" in report.summary()
    assert verify(made["hf"], tmp_path / "fp32", check_dtype=False).equal


def test_config_differences_missing_unexpected_and_shape_mismatches(
        made: dict[str, Path], tmp_path: Path) -> None:
    tied = dict(TINY_LLAMA, tie_word_embeddings=True, intermediate_size=48)
    write_hf(tmp_path / "other", tied)
    report = verify(made["hf"], tmp_path / "other")
    assert [(c.field, c.a, c.b) for c in report.config] == [
        ("intermediate_size", 40, 48), ("tie_word_embeddings", False, True)]
    status = {t.name: t.status for t in report.differences}
    assert status["lm_head.weight"] == "missing"
    assert status["model.layers.0.mlp.up_proj.weight"] == "shape"
    assert status["model.layers.1.self_attn.q_proj.weight"] == "differs"  # other weights
    text = report.summary()
    assert "  config intermediate_size: 40 in A, 48 in B" in text
    assert "lm_head.weight: missing from B (bfloat16 [97, 32])" in text
    assert "model.layers.0.mlp.up_proj.weight: shape [40, 32] in A, [48, 32] in B" in text
    reverse = verify(tmp_path / "other", made["hf"])
    assert reverse.tensor("lm_head.weight").status == "unexpected"
    assert "lm_head.weight: only in B (bfloat16 [97, 32])" in reverse.summary()


def test_summary_lists_a_limited_number_of_differences(made: dict[str, Path],
                                                       tmp_path: Path) -> None:
    write_hf(tmp_path / "other", seed=1)
    report = verify(made["hf"], tmp_path / "other")
    lines = report.summary(limit=3).splitlines()
    assert len(lines) == 5 and lines[0].endswith(
        f"DIFFERENT ({len(report.tensors)} tensors, {len(report.tensors)} differing; "
        "bit-exact)")
    assert lines[-1] == (f"  ... and {len(report.tensors) - 3} more differing tensor(s) "
                         "(--json lists all)")


def test_bad_inputs_are_checkpoint_errors(made: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="does not exist"):
        verify(made["hf"], tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="atol and rtol must be finite and >= 0"):
        verify(made["hf"], made["hf"], atol=-1)


def test_missing_config_comes_from_hf_config(made: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    shutil.copytree(made["mcore-dist"], tmp_path / "bare")
    shutil.rmtree(tmp_path / "bare" / "hf_config")
    with pytest.raises(CheckpointError, match="carries no model config"):
        verify(made["hf"], tmp_path / "bare")
    assert verify(made["hf"], tmp_path / "bare", hf_config=made["hf"]).equal


def test_hf_config_is_honoured_when_a_side_has_a_config_of_its_own(made: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    import json
    import shutil

    # A side whose own config is wrong (an epsilon rebuilt or copied wrongly): --hf-config is
    # the config of both sides, not a fallback for a missing one.
    shutil.copytree(made["mcore-dist"], tmp_path / "wrong")
    config = tmp_path / "wrong" / "hf_config" / "config.json"
    hf = json.loads(config.read_text())
    hf["rms_norm_eps"] = 1e-3
    config.write_text(json.dumps(hf))
    report = verify(made["hf"], tmp_path / "wrong")
    assert not report.equal and [d.field for d in report.config] == ["rms_norm_eps"]
    assert verify(made["hf"], tmp_path / "wrong", hf_config=made["hf"]).equal


# --------------------------------------------------------------------------------------------
# The blockwise comparison equals a whole-tensor one, in bounded memory


def whole_tensor_reference(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float
                           ) -> tuple[int, int | None]:
    """Mismatch count and first flat index, computed the direct way."""
    ia, ib = (x.contiguous().reshape(-1).view(torch.int32 if x.element_size() == 4
                                                else torch.int16) for x in (a, b))
    if atol == 0 and rtol == 0:
        bad = ia != ib
    else:
        fa, fb = a.reshape(-1).double(), b.reshape(-1).double()
        close = torch.isclose(fb, fa, rtol=rtol, atol=atol, equal_nan=True)
        bad = (ia != ib) & ~close
    where = bad.nonzero()
    return int(bad.sum()), int(where[0, 0]) if where.numel() else None


@given(data=st.data(), chunk=st.sampled_from([1, 5, 64, CHUNK_ELEMENTS]),
       tolerance=st.sampled_from([(0.0, 0.0), (1e-2, 0.0), (0.0, 0.1)]))
def test_blockwise_comparison_matches_the_whole_tensor_one(data: st.DataObject, chunk: int,
                                                          tolerance: tuple[float, float]
                                                          ) -> None:
    shape = data.draw(st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple),
                      label="shape")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    a = data.draw(tensors(shape, dtype), label="a")
    b = a.clone()
    if a.numel():
        for _ in range(data.draw(st.integers(0, 3))):
            i = data.draw(st.integers(0, a.numel() - 1))
            b.view(-1)[i] = data.draw(st.floats(width=32) | st.just(-0.0))
    if len(shape) > 1 and data.draw(st.booleans(), label="transpose"):
        a, b = a.transpose(0, -1), b.transpose(0, -1)  # non-contiguous views
    stats = _compare(a, b, atol=tolerance[0], rtol=tolerance[1], chunk=chunk)
    assert (stats.mismatched, stats.first) == whole_tensor_reference(a, b, *tolerance)


def test_huge_tensor_is_compared_without_float64_copies() -> None:
    a = torch.randn(1 << 24)  # 64 MiB of fp32; a float64 twin of a alone is 128 MiB
    b = a + 1e-3
    # Below one whole float64 twin, with room for glibc keeping freed per-block buffers
    # resident (VmHWM grew 50-80 MiB run to run for ~2 MiB blocks).
    with bounded(seconds=60, peak_bytes=120 * 2**20):
        stats = _compare(a, b, atol=1e-6, rtol=0.0)
    assert stats.mismatched > 0.99 * a.numel() and stats.first == 0
    assert 0.9e-3 < stats.max_abs < 1.1e-3


def test_float64_inputs_are_not_modified() -> None:
    a = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    b = torch.tensor([1.5, -2.0, 3.0], dtype=torch.float64)
    stats = _compare(a, b, atol=0.1, rtol=0.1)
    assert stats.mismatched == 1 and a.tolist() == [1.0, -2.0, 3.0]


def test_readers_drop_consumed_pages_after_every_tensor(made: dict[str, Path],
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    from ckpt_ir.converters.hf import HfReader
    from ckpt_ir.converters.mcore_dist import McoreDistReader

    calls = {"hf": 0, "mcore-dist": 0}
    for cls in (HfReader, McoreDistReader):
        original = cls.release

        def counted(self, original=original) -> None:
            calls[self.format] += 1
            original(self)

        monkeypatch.setattr(cls, "release", counted)
    report = verify(made["hf"], made["mcore-dist"])
    assert calls == {"hf": len(report.tensors), "mcore-dist": len(report.tensors)}


# --------------------------------------------------------------------------------------------
# The pytest helpers and the package surface


def test_assert_checkpoints_equal_passes_and_fails_readably(made: dict[str, Path],
                                                            tmp_path: Path) -> None:
    report = assert_checkpoints_equal(made["hf"], made["mcore-dist"])
    assert report.equal
    write_hf(tmp_path / "other", seed=3)
    with pytest.raises(AssertionError) as info:
        assert_checkpoints_equal(made["hf"], tmp_path / "other", limit=2)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("checkpoints differ: ") and "DIFFERENT" in lines[0]
    assert lines[1].startswith("  model.embed_tokens.weight: ")
    assert len(lines) == 4


def test_assert_roundtrip_through_mcore_dist(made: dict[str, Path], tmp_path: Path) -> None:
    report = assert_roundtrip(made["hf"], via="mcore-dist", workdir=tmp_path,
                              pad_vocab_to_multiple=64)
    assert report.equal and report.back_format == "hf"
    assert list(tmp_path.iterdir()) == []  # the temporary conversions are gone
    assert_roundtrip(made["mcore-dist"], via="hf", max_shard_size=30_000)


def test_public_functions_are_not_shadowed_by_their_modules() -> None:
    import ckpt_ir.detect  # binds the submodule on the package, normally
    import ckpt_ir.verify

    assert callable(ckpt_ir.verify) and ckpt_ir.verify is verify
    assert callable(ckpt_ir.detect) and ckpt_ir.VerifyReport.__name__ == "VerifyReport"
