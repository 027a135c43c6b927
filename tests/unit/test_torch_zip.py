"""TorchZipWriter: streamed archives that torch.load and ckpt-ir's restricted loader read."""

from __future__ import annotations

import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_ir.converters.storage.torch_zip import ALIGNMENT, TorchZipWriter
from ckpt_ir.errors import DestinationExistsError, InternalError
from ckpt_ir.safety.unpickler import load_torch
from tests.strategies import bits_equal, tensors

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
          torch.int32, torch.int8, torch.uint8, torch.bool)


def _write(path: Path, obj_of, items: dict[str, torch.Tensor], **kwargs) -> None:
    w = TorchZipWriter(path, **kwargs)
    refs = OrderedDict((k, w.add_tensor(t)) for k, t in items.items())
    w.close(obj_of(refs))


def _data_offsets(path: Path) -> dict[str, int]:
    raw = path.read_bytes()
    out = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:
                                                         info.header_offset + 30])
            out[info.filename] = info.header_offset + 30 + name_len + extra_len
    return out


@settings(max_examples=30, deadline=None)
@given(data=st.data(), zip64=st.booleans())
def test_archives_load_in_torch_and_in_the_restricted_loader(tmp_path_factory, data, zip64):
    n = data.draw(st.integers(0, 5))
    items = OrderedDict()
    for i in range(n):
        shape = tuple(data.draw(st.lists(st.integers(0, 5), max_size=3)))
        dtype = data.draw(st.sampled_from(DTYPES))
        if dtype.is_floating_point:
            items[f"t{i}"] = data.draw(tensors(shape, dtype))
        else:
            items[f"t{i}"] = torch.randint(0, 2 if dtype == torch.bool else 100, shape).to(dtype)
    path = tmp_path_factory.mktemp("zip") / "model.pt"
    _write(path, lambda refs: [refs, {"step": 3, "name": "x"}], items, force_zip64=zip64)
    for loaded in (torch.load(path, weights_only=True),
                   torch.load(path, weights_only=True, mmap=True), load_torch(path)):
        assert list(loaded[0]) == list(items)
        assert all(bits_equal(loaded[0][k], t) for k, t in items.items())
        assert loaded[1] == {"step": 3, "name": "x"}
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every CRC matches
    for name, offset in _data_offsets(path).items():
        assert offset % ALIGNMENT == 0, name


def test_views_store_only_their_own_elements(tmp_path):
    base = torch.arange(1000, dtype=torch.float32).reshape(100, 10)
    _write(tmp_path / "v.pt", dict, {"row": base[7], "col": base[:, 3], "block": base[10:12]})
    got = load_torch(tmp_path / "v.pt")
    assert torch.equal(got["row"], base[7]) and torch.equal(got["col"], base[:, 3])
    assert got["block"].untyped_storage().nbytes() == 2 * 10 * 4
    assert (tmp_path / "v.pt").stat().st_size < 2000  # not the 4000-byte base


def test_several_archives_can_be_written_at_once(tmp_path):
    writers = [TorchZipWriter(tmp_path / f"r{i}.pt") for i in range(3)]
    refs = [[] for _ in writers]
    for step in range(4):
        for i, w in enumerate(writers):
            refs[i].append(w.add_tensor(torch.full((2,), float(10 * i + step))))
    for w, r in zip(writers, refs, strict=True):
        w.close(r)
    for i in range(3):
        got = torch.load(tmp_path / f"r{i}.pt", weights_only=True)
        assert [t[0].item() for t in got] == [10 * i + s for s in range(4)]


def test_archive_name_is_the_file_stem_like_torch_save(tmp_path):
    _write(tmp_path / "model_optim_rng.pt", dict, {"a": torch.ones(1)})
    with zipfile.ZipFile(tmp_path / "model_optim_rng.pt") as z:
        names = z.namelist()
    assert "model_optim_rng/data.pkl" in names and "model_optim_rng/version" in names


def test_misuse_is_refused(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(DestinationExistsError, match="already exists"):
        TorchZipWriter(tmp_path / "x.pt")
    w = TorchZipWriter(tmp_path / "y.pt")
    with pytest.raises(InternalError, match="TorchZipWriter objects hold TensorRefs"):
        w.close({"raw": torch.ones(1)})
    w.abort()
    w = TorchZipWriter(tmp_path / "z.pt")
    w.close([])
    with pytest.raises(InternalError, match="is closed"):
        w.add_tensor(torch.ones(1))
