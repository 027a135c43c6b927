"""DCP files: ours load in torch's DCP, torch's read back exactly, bad metadata is refused."""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from ckpt_ir.converters.storage.dcp_files import (
    DcpDataFile,
    DcpReader,
    DcpRecord,
    _coverage_problem,
    _tiles_exactly,
    read_index,
    write_metadata,
)
from ckpt_ir.errors import (
    CorruptCheckpointError,
    DestinationExistsError,
    FormatError,
    InternalError,
)

Box = tuple[tuple[int, ...], tuple[int, ...]]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int64,
          torch.uint8, torch.bool]


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    numel = 1
    for n in shape:
        numel *= n
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                            b.contiguous().reshape(-1).view(torch.uint8)))


def box_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(*box, strict=True))


def torch_load(directory: Path, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]],
               objects: list[str]) -> dict[str, Any]:
    """What torch's own DCP reader makes of a directory (full tensors, unpickled objects)."""
    state: dict[str, Any] = {fqn: torch.empty(shape, dtype=dtype)
                             for fqn, (shape, dtype) in tensors.items()}
    state.update(dict.fromkeys(objects))
    dcp.load(state, storage_reader=FileSystemReader(directory), no_dist=True,
             planner=DefaultLoadPlanner(flatten_state_dict=False,
                                        flatten_sharded_tensors=False))
    return state


# ---- strategies ------------------------------------------------------------------------------


@st.composite
def tilings(draw: st.DrawFn, max_dims: int = 3, max_size: int = 8,
            max_splits: int = 12) -> tuple[tuple[int, ...], list[Box]]:
    """A shape and an exact tiling of it, by recursive guillotine cuts (valid by construction,
    irregular in general: not every tiling is a grid)."""
    ndim = draw(st.integers(1, max_dims))
    shape = tuple(draw(st.integers(1, max_size)) for _ in range(ndim))
    boxes: list[Box] = [((0,) * ndim, shape)]
    for _ in range(draw(st.integers(0, max_splits))):
        i = draw(st.integers(0, len(boxes) - 1))
        offsets, sizes = boxes[i]
        splittable = [d for d in range(ndim) if sizes[d] > 1]
        if not splittable:
            continue
        d = draw(st.sampled_from(splittable))
        cut = draw(st.integers(1, sizes[d] - 1))
        first = (offsets, (*sizes[:d], cut, *sizes[d + 1:]))
        second = ((*offsets[:d], offsets[d] + cut, *offsets[d + 1:]),
                  (*sizes[:d], sizes[d] - cut, *sizes[d + 1:]))
        boxes[i:i + 1] = [first, second]
    return shape, boxes


@st.composite
def regions(draw: st.DrawFn, shape: tuple[int, ...]) -> Box:
    offsets, sizes = [], []
    for n in shape:
        start = draw(st.integers(0, n))
        offsets.append(start)
        sizes.append(draw(st.integers(0, n - start)))
    return tuple(offsets), tuple(sizes)


# ---- our writer, torch's reader --------------------------------------------------------------


def write_tiled(directory: Path, tensors: dict[str, torch.Tensor], tilings: dict[str, list[Box]],
                objects: dict[str, Any]) -> list[DcpRecord]:
    """Chunks alternate between two data files, objects go to the second."""
    files = [DcpDataFile(directory, "__0_0.distcp"), DcpDataFile(directory, "__1_0.distcp")]
    records = []
    for fqn, full in tensors.items():
        for i, box in enumerate(tilings[fqn]):
            records.append(files[i % 2].add_tensor(fqn, box[0], full[box_slices(box)]))
    for fqn, obj in objects.items():
        records.append(files[1].add_object(fqn, obj))
    for f in files:
        f.close()
    write_metadata(directory, records,
                   {fqn: (tuple(t.shape), t.dtype) for fqn, t in tensors.items()})
    return records


@settings(max_examples=25, deadline=None)
@given(tiling=tilings(), dtype=st.sampled_from(DTYPES), data=st.data())
def test_written_checkpoints_load_in_torch_dcp(tiling: tuple[tuple[int, ...], list[Box]],
                                               dtype: torch.dtype, data: st.DataObject) -> None:
    shape, boxes = tiling
    full = random_bits(shape, dtype, seed=len(boxes))
    objects = {"decoder.layers.mlp.linear_fc1._extra_state/shard_0_1": [None],
               "common_state/shard_0_1": [{"iteration": 3, "names": ("a", "b")}]}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_tiled(directory, {"w": full}, {"w": boxes}, objects)
        loaded = torch_load(directory, {"w": (shape, dtype)}, list(objects))
        assert bits_equal(loaded["w"], full)
        for fqn, obj in objects.items():
            assert loaded[fqn] == obj
        with DcpReader(directory) as reader:
            region = data.draw(regions(shape))
            assert bits_equal(reader.read_region("w", *region), full[box_slices(region)])
            assert reader.read_object("common_state/shard_0_1") == objects[
                "common_state/shard_0_1"]


def test_written_scalar_and_empty_tensors_load_in_torch_dcp(tmp_path: Path) -> None:
    tensors = {"scalar": torch.tensor(1.5, dtype=torch.bfloat16),
               "empty": torch.empty(0, 4), "row": torch.arange(5)}
    write_tiled(tmp_path, tensors, {k: [((0,) * t.dim(), tuple(t.shape))]
                                    for k, t in tensors.items()}, {})
    loaded = torch_load(tmp_path, {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}, [])
    for fqn, tensor in tensors.items():
        assert bits_equal(loaded[fqn], tensor)
    with DcpReader(tmp_path) as reader:
        assert bits_equal(reader.read_region("scalar", (), ()), tensors["scalar"])
        assert reader.read_region("empty", (0, 1), (0, 2)).shape == (0, 2)


def test_data_file_stores_only_the_bytes_of_a_view(tmp_path: Path) -> None:
    big = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
    with DcpDataFile(tmp_path) as data_file:
        record = data_file.add_tensor("w", (0, 0), big[:2, :3])  # strided view of 16 KiB
    assert record.sizes == (2, 3) and record.length < 4096
    write_metadata(tmp_path, [record], {"w": ((2, 3), torch.float32)})
    with DcpReader(tmp_path) as reader:
        assert torch.equal(reader.read_region("w", (0, 0), (2, 3)), big[:2, :3])


def test_data_file_refuses_to_overwrite_and_to_write_after_close(tmp_path: Path) -> None:
    data_file = DcpDataFile(tmp_path)
    data_file.close()
    with pytest.raises(DestinationExistsError):
        DcpDataFile(tmp_path)
    with pytest.raises(InternalError):
        data_file.add_object("x", 1)


@pytest.mark.parametrize(("boxes", "dtype", "message"), [
    ([((0, 0), (2, 4))], torch.float32,
     "tensor 'w' has a gap: its chunks cover 8 of 16 elements"),
    ([((0, 0), (3, 4)), ((2, 0), (2, 4))], torch.float32,
     "tensor 'w' has overlapping chunks at offsets (0, 0) and (2, 0)"),
    ([((0, 0), (4, 4))], torch.bfloat16,
     "tensor 'w': chunk at (0, 0) is torch.float32, expected torch.bfloat16"),
])
def test_write_metadata_refuses_its_own_bad_layouts(tmp_path: Path, boxes: list[Box],
                                                    dtype: torch.dtype, message: str) -> None:
    with DcpDataFile(tmp_path) as data_file:
        for offsets, sizes in boxes:
            data_file.add_tensor("w", offsets, torch.zeros(sizes))
    with pytest.raises(InternalError) as info:
        write_metadata(tmp_path, data_file.close(), {"w": ((4, 4), dtype)})
    assert str(info.value) == message
    assert not (tmp_path / ".metadata").exists()


# ---- torch's writer, our reader --------------------------------------------------------------

SHARDED_LAYOUTS: dict[str, tuple[tuple[int, ...], torch.dtype, list[Box]]] = {
    "irregular": ((6, 8), torch.float32, [((0, 0), (3, 8)), ((3, 0), (3, 5)), ((3, 5), (3, 3))]),
    # 40 chunks: more than a linear scan handles, so lookups go through the grid index.
    "many": ((40, 12), torch.bfloat16,
             [((r * 2, c * 6), (2, 6)) for r in range(20) for c in range(2)]),
    "stacked": ((2, 6, 4), torch.float8_e5m2,
                [((layer, half * 3, 0), (1, 3, 4)) for layer in range(2) for half in range(2)]),
}


@pytest.fixture(scope="module")
def torch_saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    """A directory written by torch's dcp.save: plain tensors (one chunk each) and
    ShardedTensors with several local shards (one rank, an in-process gloo group)."""
    from torch.distributed._shard.sharded_tensor import (
        Shard,
        ShardMetadata,
        init_from_local_shards,
    )

    directory = tmp_path_factory.mktemp("torch_dcp")
    full = {"plain_bf16": random_bits((5, 7), torch.bfloat16, 1),
            "plain_fp8": random_bits((9,), torch.float8_e4m3fn, 2),
            "plain_int": random_bits((3, 2, 2), torch.int32, 3)}
    for name, (shape, dtype, _) in SHARDED_LAYOUTS.items():
        full[name] = random_bits(shape, dtype, hash(name) % 1000)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        state: dict[str, Any] = {k: v for k, v in full.items() if k.startswith("plain")}
        for name, (shape, _, boxes) in SHARDED_LAYOUTS.items():
            shards = [Shard(full[name][box_slices(b)].clone(),
                            ShardMetadata(list(b[0]), list(b[1]), "rank:0/cpu")) for b in boxes]
            state[name] = init_from_local_shards(shards, *shape)
        state["extra"] = {"step": 9}
        dcp.save(state, storage_writer=FileSystemWriter(directory))
    finally:
        dist.destroy_process_group()
    yield directory, full


def test_torch_saved_index_matches_the_layouts(torch_saved: tuple[Path, dict]) -> None:
    directory, full = torch_saved
    index = read_index(directory)
    assert set(index.tensors) == set(full)
    for name, (shape, dtype, boxes) in SHARDED_LAYOUTS.items():
        tensor = index.tensors[name]
        assert (tensor.shape, tensor.dtype.torch) == (shape, dtype)
        assert sorted((c.offsets, c.sizes) for c in tensor.chunks) == sorted(boxes)
    with DcpReader(directory) as reader:
        assert reader.read_object("extra.step") == 9  # DCP flattens nested dicts


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_torch_saved_regions_read_back_exactly(torch_saved: tuple[Path, dict],
                                               data: st.DataObject) -> None:
    directory, full = torch_saved
    name = data.draw(st.sampled_from(sorted(full)))
    region = data.draw(regions(tuple(full[name].shape)))
    with DcpReader(directory) as reader:
        assert bits_equal(reader.read_region(name, *region), full[name][box_slices(region)])


def test_region_inside_one_chunk_is_a_zero_copy_view(torch_saved: tuple[Path, dict]) -> None:
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    directory, full = torch_saved
    with DcpReader(directory) as reader:
        view = reader.read_region("many", (4, 6), (2, 5))
        assert bits_equal(view, full["many"][4:6, 6:11])
        with open("/proc/self/maps") as maps:
            regions = [line.split() for line in maps]
        spans = [(*(int(x, 16) for x in r[0].split("-")), r[-1]) for r in regions]
        owner = next(name for low, high, name in spans if low <= view.data_ptr() < high)
        assert owner == str(directory / "__0_0.distcp")
        reader.release()  # drops resident pages; the view faults them back in from the file
        assert bits_equal(view, full["many"][4:6, 6:11])
        assert bits_equal(reader.read_region("many", (0, 0), (40, 12)), full["many"])


# ---- refusing bad metadata -------------------------------------------------------------------


@pytest.fixture
def valid_dir(tmp_path: Path) -> Path:
    """'w' (4, 4) float32 in two chunks of one and three rows, plus object 'o'."""
    full = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    with DcpDataFile(tmp_path) as data_file:
        records = [data_file.add_tensor("w", (0, 0), full[:1]),
                   data_file.add_tensor("w", (1, 0), full[1:]),
                   data_file.add_object("o", [None])]
    write_metadata(tmp_path, records, {"w": ((4, 4), torch.float32)})
    return tmp_path


def edit_metadata(directory: Path, edit: Callable[[Any], None]) -> None:
    path = directory / ".metadata"
    md = pickle.loads(path.read_bytes())  # our own test file: plain pickle is fine here
    edit(md)
    path.write_bytes(pickle.dumps(md))


def chunk(md: Any, i: int) -> Any:
    return md.state_dict_metadata["w"].chunks[i]


def record(md: Any, fqn: str, offsets: tuple[int, ...] | None) -> Any:
    return next(v for k, v in md.storage_data.items()
                if k.fqn == fqn and (None if k.offset is None else tuple(k.offset)) == offsets)


def set_attr(get: Callable[[Any], Any], name: str, value: Any) -> Callable[[Any], None]:
    return lambda md: setattr(get(md), name, value)


def drop_record(fqn: str, offsets: tuple[int, ...] | None) -> Callable[[Any], None]:
    def edit(md: Any) -> None:
        key = next(k for k in md.storage_data if k.fqn == fqn and (
            None if k.offset is None else tuple(k.offset)) == offsets)
        del md.storage_data[key]
    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (lambda md: md.state_dict_metadata["w"].chunks.pop(),
     "tensor 'w' has a gap: its chunks cover 4 of 16 elements"),
    (set_attr(lambda md: chunk(md, 1), "offsets", torch.Size([0, 0])),
     "tensor 'w' has overlapping chunks at offsets (0, 0) and (0, 0)"),
    (set_attr(lambda md: chunk(md, 1), "sizes", torch.Size([4, 4])),
     "tensor 'w' chunk at offsets (1, 0) with sizes (4, 4) lies outside its shape (4, 4)"),
    (set_attr(lambda md: chunk(md, 1), "sizes", torch.Size([3])),
     "tensor 'w' chunk at offsets (1, 0) with sizes (3,) does not have 2 dimensions"),
    (drop_record("w", (1, 0)),
     "tensor 'w' chunk at offsets (1, 0) has no storage record"),
    (drop_record("o", None),
     "object 'o' has no storage record"),
    (set_attr(lambda md: record(md, "w", (1, 0)), "length", 10**6),
     "storage record for 'w' chunk (1, 0) points to bytes [{offset}, {end}) of "
     "'__0_0.distcp', which has {size} bytes"),
    (set_attr(lambda md: record(md, "w", (0, 0)), "relative_path", "../evil.distcp"),
     "storage record for 'w' chunk (0, 0) uses path '../evil.distcp' that escapes the "
     "checkpoint directory"),
    (set_attr(lambda md: record(md, "o", None), "relative_path", "/etc/passwd"),
     "storage record for object 'o' uses path '/etc/passwd' that escapes the checkpoint "
     "directory"),
    (set_attr(lambda md: record(md, "w", (0, 0)), "relative_path", "__9_0.distcp"),
     "storage record for 'w' chunk (0, 0) points to missing file '__9_0.distcp'"),
], ids=["gap", "overlap", "outside", "rank", "no-record", "no-blob-record", "past-eof",
        "dotdot", "absolute", "missing-file"])
def test_bad_metadata_is_refused_with_a_pinned_message(valid_dir: Path,
                                                       edit: Callable[[Any], None],
                                                       message: str) -> None:
    md = pickle.loads((valid_dir / ".metadata").read_bytes())
    offset = record(md, "w", (1, 0)).offset
    size = (valid_dir / "__0_0.distcp").stat().st_size
    edit_metadata(valid_dir, edit)
    with pytest.raises(CorruptCheckpointError) as info:
        read_index(valid_dir)
    expected = message.format(offset=offset, end=offset + 10**6, size=size)
    assert info.value.message == expected
    assert info.value.tensor in ("w", "o")


def test_storage_transforms_are_a_format_error(valid_dir: Path) -> None:
    edit_metadata(valid_dir, set_attr(lambda md: record(md, "w", (0, 0)),
                                      "transform_descriptors", ["zstd"]))
    with pytest.raises(FormatError, match=r"uses DCP storage transforms \['zstd'\]"):
        read_index(valid_dir)


def test_metadata_that_is_not_dcp_metadata_is_corrupt(valid_dir: Path) -> None:
    (valid_dir / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    with pytest.raises(CorruptCheckpointError, match=r"holds a dict, not torch\.distributed"):
        read_index(valid_dir)
    (valid_dir / ".metadata").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"cannot open .*/\.metadata: No such"):
        read_index(valid_dir)


def test_chunk_whose_bytes_disagree_with_metadata_is_corrupt(valid_dir: Path) -> None:
    def point_second_chunk_at_the_first(md: Any) -> None:
        first, second = record(md, "w", (0, 0)), record(md, "w", (1, 0))
        second.offset, second.length = first.offset, first.length

    edit_metadata(valid_dir, point_second_chunk_at_the_first)
    with DcpReader(valid_dir) as reader, pytest.raises(CorruptCheckpointError) as info:
        reader.read_region("w", (0, 0), (4, 4))
    assert info.value.message == ("tensor 'w' chunk at offsets (1, 0) in '__0_0.distcp' holds "
                                  "torch.float32 (1, 4), expected torch.float32 (3, 4)")


# ---- coverage arithmetic ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(tilings(max_splits=20), st.data())
def test_coverage_accepts_exact_tilings_and_names_gaps_and_overlaps(
        tiling: tuple[tuple[int, ...], list[Box]], data: st.DataObject) -> None:
    shape, boxes = tiling
    assert _coverage_problem(shape, boxes) is None
    i = data.draw(st.integers(0, len(boxes) - 1))
    numel = 1
    for n in shape:
        numel *= n
    volume = 1
    for n in boxes[i][1]:
        volume *= n
    assert _coverage_problem(shape, boxes[:i] + boxes[i + 1:]) == (
        f"has a gap: its chunks cover {numel - volume} of {numel} elements")
    doubled = [*boxes, boxes[i]]
    assert _coverage_problem(shape, doubled) == (
        f"has overlapping chunks at offsets {boxes[i][0]} and {boxes[i][0]}")


def test_coverage_of_thousands_of_chunks_is_fast() -> None:
    grid = [((r * 4, c * 8), (4, 8)) for r in range(100) for c in range(100)]
    started = time.perf_counter()
    assert _coverage_problem((400, 800), grid) is None
    # An irregular tiling (distinct cuts everywhere) takes the sweep path.
    rng = torch.Generator().manual_seed(0)
    boxes: list[Box] = [((0, 0), (4096, 4096))]
    while len(boxes) < 3000:
        i = int(torch.randint(0, len(boxes), (1,), generator=rng))
        (y, x), (h, w) = boxes[i]
        if h < 2 and w < 2:
            continue
        if h >= w:
            cut = int(torch.randint(1, h, (1,), generator=rng))
            boxes[i:i + 1] = [((y, x), (cut, w)), ((y + cut, x), (h - cut, w))]
        else:
            cut = int(torch.randint(1, w, (1,), generator=rng))
            boxes[i:i + 1] = [((y, x), (h, cut)), ((y, x + cut), (h, w - cut))]
    assert _coverage_problem((4096, 4096), boxes) is None
    assert _coverage_problem((4096, 4096), [*boxes, ((5, 5), (1, 1))]).startswith(
        "has overlapping chunks")
    assert time.perf_counter() - started < 10  # quadratic would take minutes


def staircase(columns: int, rows: int) -> list[Box]:
    """Each column cut at its own height: no grid (columns x distinct heights cells), and every
    top box spans the sweep from row 0, so a pairwise sweep compares each box with ~all."""
    gen = torch.Generator().manual_seed(1)
    cuts = torch.randperm(rows - 1, generator=gen)[:columns] + 1
    boxes: list[Box] = []
    for c, h in enumerate(int(x) for x in cuts):
        boxes += [((0, c), (h, 1)), ((h, c), (rows - h, 1))]
    return boxes


def test_irregular_tilings_of_12000_chunks_are_checked_in_n_log_n() -> None:
    # The audit's shape: 12,000 chunks took 105 s of CPU with the pairwise sweep.
    shape = (8192, 6000)
    boxes = staircase(6000, 8192)
    started = time.process_time()
    assert _coverage_problem(shape, boxes) is None
    assert _coverage_problem(shape, boxes[1:]).startswith("has a gap: its chunks cover ")
    moved = [((1, 0), boxes[0][1]), *boxes[1:]]  # overlaps its neighbour, leaves row 0 empty
    assert _coverage_problem(shape, moved) == (
        f"has overlapping chunks (they cover {8192 * 6000} of {8192 * 6000} elements)")
    assert _coverage_problem(shape, [*boxes, ((5, 5), (1, 1))]).startswith(
        "has overlapping chunks")
    assert time.process_time() - started < 10


@settings(max_examples=100, deadline=None)
@given(tilings(max_splits=20), st.data())
def test_corner_parity_agrees_with_cell_counting(
        tiling: tuple[tuple[int, ...], list[Box]], data: st.DataObject) -> None:
    shape, boxes = tiling
    assert _tiles_exactly(shape, boxes)
    i = data.draw(st.integers(0, len(boxes) - 1))
    j = data.draw(st.integers(0, len(boxes) - 1))
    # Box i replaced by a copy of box j where that keeps the volume: overlap and gap at once.
    if i != j and boxes[i][1] == boxes[j][1]:
        assert not _tiles_exactly(shape, [*boxes[:i], boxes[j], *boxes[i + 1:]])
