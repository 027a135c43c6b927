"""ckpt-ir's mirrors of torch DCP's metadata classes pickle exactly as torch's own."""

from __future__ import annotations

import pickle
import subprocess
import sys

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributed.checkpoint import filesystem as torch_fs
from torch.distributed.checkpoint import metadata as torch_md

from ckpt_ir import dcp_types
from ckpt_ir.safety.unpickler import load_pickle
from tests.fixtures import TINY_LLAMA, write_hf

_DTYPES = (torch.bfloat16, torch.float32, torch.float16, torch.int64, torch.float8_e4m3fn,
           torch.uint8)


@st.composite
def _metadata_spec(draw):
    """A DCP metadata, as plain values both class families can be built from."""
    tensors = []
    for i in range(draw(st.integers(0, 4))):
        shape = tuple(draw(st.lists(st.integers(1, 9), min_size=0, max_size=3)))
        rows = draw(st.integers(1, 3)) if shape else 1
        chunks = []
        for r in range(rows):
            offsets = (r, *([0] * (len(shape) - 1))) if shape else ()
            chunks.append((offsets, (1, *shape[1:]) if shape else ()))
        files = [(f"__{draw(st.integers(0, 3))}_0.distcp", draw(st.integers(0, 2**40)),
                  draw(st.integers(0, 2**33))) for _ in chunks]
        tensors.append((f"t{i}.weight", draw(st.sampled_from(_DTYPES)), shape, chunks, files))
    objects = [(f"o{i}", ("__0_0.distcp", draw(st.integers(0, 999)), draw(st.integers(1, 99))))
               for i in range(draw(st.integers(0, 2)))]
    save_id = draw(st.none() | st.text(max_size=8))
    return tensors, objects, save_id, draw(st.sampled_from([None, "1.0.0"]))


def _build(spec, md, storage_info):
    tensors, objects, save_id, version = spec
    entries, storage = {}, {}
    for fqn, dtype, shape, chunks, files in tensors:
        entries[fqn] = md.TensorStorageMetadata(
            properties=md.TensorProperties(dtype=dtype), size=torch.Size(shape),
            chunks=[md.ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s))
                    for o, s in chunks])
        for i, ((offsets, _), where) in enumerate(zip(chunks, files, strict=True)):
            storage[md.MetadataIndex(fqn, offsets, i)] = storage_info(*where)
    for fqn, where in objects:
        entries[fqn] = md.BytesStorageMetadata()
        storage[md.MetadataIndex(fqn)] = storage_info(*where)
    return md.Metadata(state_dict_metadata=entries, planner_data=None, storage_data=storage,
                       storage_meta=md.StorageMeta(save_id=save_id), version=version)


@given(_metadata_spec())
def test_mirrors_pickle_byte_for_byte_like_torch(spec):
    ours = _build(spec, dcp_types, dcp_types.StorageInfo)
    theirs = _build(spec, torch_md, torch_fs._StorageInfo)
    data = dcp_types.dumps_metadata(ours)
    assert data == pickle.dumps(theirs, protocol=4)
    # torch's classes come back from our bytes, and ours from torch's bytes (both readers).
    assert pickle.loads(data) == theirs
    assert load_pickle(pickle.dumps(theirs, protocol=4)) == ours
    assert load_pickle(data, trust=True) == ours


def test_reading_and_writing_mcore_dist_never_imports_torch_dcp(tmp_path):
    # Importing torch.distributed.checkpoint costs ~0.7 s of every CLI run; the mirrors exist
    # so that nothing on the mcore-dist paths needs it.
    write_hf(tmp_path / "hf", TINY_LLAMA)
    code = f"""
import sys
import ckpt_ir
ckpt_ir.convert({str(tmp_path / 'hf')!r}, {str(tmp_path / 'dist')!r}, to="mcore-dist")
ckpt_ir.convert({str(tmp_path / 'dist')!r}, {str(tmp_path / 'back')!r}, to="hf")
ckpt = ckpt_ir.open({str(tmp_path / 'dist')!r})
ckpt.close()
print(sorted(m for m in sys.modules if m.startswith("torch.distributed.checkpoint")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout
