"""``verl-fsdp`` rank files of FSDP1 without a device mesh: ``ShardedTensor``s read as data.

The files are pickled exactly as torch pickles them (``tests/clients/fsdp1_files.py``, built
from torch's own metadata classes without a process group; the real FSDP1 saves are in
``tests/clients/test_fsdp1_client.py``). Covered: the restricted unpickler's stand-ins and
their refusals (the one ``getattr``, exact state fields, planted payloads), reading at W=2 and
W=3 bit for bit with the dtype kept, hybrid sharding (first replica only), a PEFT LoRA save,
the streamed row blocks, tensors with fewer rows than ranks, two properties (random row cuts
against a tiling oracle; data.pkl byte mutations), and bad input
(shards that do not tile, a missing rank, a rank file of another rank, shards that disagree with
their metadata or with rank 0's, a shard placed past the world, an impossible process group, a
foreign global, ``--trust-pickles``): one line, exit 2, nothing written.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, note, settings
from hypothesis import strategies as st
from torch.distributed._shard.metadata import ShardMetadata

import ckpt_ir
from ckpt_ir.capabilities import LocatingReader, RowsReader
from ckpt_ir.cli import main
from ckpt_ir.converters.verl_fsdp import VerlFsdpReader
from ckpt_ir.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from ckpt_ir.safety.unpickler import load_pickle, load_torch
from ckpt_ir.safety.unpickler.sharded_tensor import (
    ChunkShardingSpec,
    EnumerableShardingSpec,
    ShardedTensorRecord,
)
from tests.clients.fsdp1_files import (
    chunk_metadata,
    fsdp1_rank_states,
    save_rank_file,
    sharded,
)
from tests.fixtures import TINY_LLAMA, load_hf_tensors, write_hf
from tests.hostile import PAYLOADS

EMBED = "model.embed_tokens.weight"


def _role(hf_dir: Path, out: Path, world: int, *, dtype: torch.dtype = torch.float32,
          config: bool = True) -> Path:
    """``hf_dir``'s weights as FSDP1 (no mesh) saves them at ``world`` ranks, as verl's
    manager lays them out (``huggingface/``, ``fsdp_config.json`` unless ``config`` is off:
    a plain ``torch.save`` of each rank's state dict)."""
    want = {k: v.to(dtype) for k, v in load_hf_tensors(hf_dir).items()}
    out.mkdir(parents=True)
    shutil.copytree(hf_dir, out / "huggingface", ignore=shutil.ignore_patterns("*.safetensors"))
    if config:
        (out / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 1,
                                                          "world_size": world}))
    for rank, state in enumerate(fsdp1_rank_states(want, world)):
        save_rank_file(state, out / f"model_world_size_{world}_rank_{rank}.pt")
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "llama"
    write_hf(path, dtype=torch.float32)
    return path


@pytest.fixture(scope="module")
def role(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _role(hf_dir, tmp_path_factory.mktemp("fsdp1") / "actor", 3)


# ---- the restricted unpickler: ShardedTensors as data, in torch's exact shape only ----


def test_sharded_tensor_file_loads_as_records(tmp_path):
    full = torch.randn(7, 3)
    vec = torch.randn(1)  # fewer rows than ranks: one shard, an EnumerableShardingSpec
    save_rank_file({"w": sharded(full, 3, 2), "v": sharded(vec, 3, 1), "b": torch.ones(2)},
                   tmp_path / "m.pt")
    obj = load_torch(tmp_path / "m.pt")
    w, v = obj["w"], obj["v"]
    assert isinstance(w, ShardedTensorRecord) and w.shape == (7, 3)
    assert w.dtype == torch.float32 and type(w.sharding_spec) is ChunkShardingSpec
    assert [(m.shard_offsets, m.shard_sizes, m.placement._rank)
            for m in w.metadata.shards_metadata] == [([0, 0], [3, 3], 0), ([3, 0], [3, 3], 1),
                                                     ([6, 0], [1, 3], 2)]
    (local,) = w.local_shards
    assert type(local.tensor) is torch.Tensor and torch.equal(local.tensor, full[6:7])
    group = w.process_group
    assert (group.global_rank, group.global_world_size) == (2, 3)
    assert v.local_shards == [] and type(v.sharding_spec) is EnumerableShardingSpec
    assert type(obj["b"]) is torch.Tensor
    # Nothing of torch.distributed was built: every object is ckpt-ir's plain data.
    assert not any(type(x).__module__.startswith("torch.distributed")
                   for x in (w, w.metadata, group, local, local.metadata, w.sharding_spec))


class _Getattr:
    def __init__(self, *args: object) -> None:
        self.args = args

    def __reduce__(self):
        return (getattr, self.args)


@pytest.mark.parametrize("args", [(torch.Size, "__init__"), (ShardMetadata, "__init__")],
                         ids=["size", "shard-metadata"])
def test_getattr_is_admitted_only_for_process_group_state(args):
    with pytest.raises(UnsafeCheckpointError, match=r"refusing getattr\(.*only getattr\("
                                                    r"ShardedTensor, 'ProcessGroupState'\)"):
        load_pickle(pickle.dumps(_Getattr(*args), protocol=2))


def _rank_file_with(tmp_path: Path, old: bytes, new: bytes) -> Path:
    """A ShardedTensor rank file whose data.pkl has ``old`` replaced by ``new`` (same
    length, so the pickle's framing holds)."""
    assert len(old) == len(new)
    path = tmp_path / "patched.pt"
    save_rank_file({"w": sharded(torch.randn(4, 2), 2, 0)}, tmp_path / "src.pt")
    with zipfile.ZipFile(tmp_path / "src.pt") as zin, \
            zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            zout.writestr(item, data)
    return path


@pytest.mark.parametrize(("old", "new", "error", "message"), [
    # A class outside the admitted family, in the ShardedTensor's own module.
    (b"chunk_sharding_spec\nChunkShardingSpec", b"chunk_sharding_spec\nChunkSh4rdingSpec",
     UnsafeCheckpointError, r"global 'torch\.distributed\._shard\.sharding_spec\."
                            r"chunk_sharding_spec\.ChunkSh4rdingSpec'.*not on the allow-list"),
    # getattr of ShardedTensor for anything but ProcessGroupState.
    (b"ProcessGroupState", b"ProcessGroupStatf", UnsafeCheckpointError,
     r"refusing getattr\(.*'ProcessGroupStatf'\)"),
    # A field torch does not write (state must hold exactly torch's fields).
    (b"shard_sizes", b"shard_sizez", CorruptCheckpointError,
     r"ShardMetadata state must hold exactly"),
    (b"global_rank", b"global_rang", CorruptCheckpointError,
     r"ShardedTensor\.ProcessGroupState state must hold exactly"),
])
def test_sharded_tensor_pickles_off_torch_s_shape_are_refused(tmp_path, old, new, error,
                                                              message):
    with pytest.raises(error, match=message):
        load_torch(_rank_file_with(tmp_path, old, new))


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_a_payload_inside_a_sharded_tensor_is_refused_and_never_runs(tmp_path, payload):
    """A global planted in a ShardedTensor's own state (in place of ``init_rrefs``, and as a
    local shard's metadata placement) is refused by name; nothing runs."""
    cls, name = PAYLOADS[payload]
    sentinel = tmp_path / "SENTINEL"
    for where in ("init_rrefs", "placement"):
        st = sharded(torch.randn(4, 2), 2, 0)
        if where == "init_rrefs":
            st.init_rrefs = cls(sentinel)
        else:
            st.metadata.shards_metadata[0].placement = cls(sentinel)
        save_rank_file({"w": st}, tmp_path / f"{where}.pt")
        with pytest.raises(UnsafeCheckpointError, match=f"refusing to unpickle global '{name}'"):
            load_torch(tmp_path / f"{where}.pt")
    assert not sentinel.exists()


class _Rebuild:
    """``_rebuild_from_type_v2(_rebuild_wrapper_subclass, ShardedTensor, args, state)`` with
    the given arguments and state."""

    def __init__(self, args: tuple, state: object) -> None:
        self.args, self.state = args, state

    def __reduce__(self):
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        return (torch._tensor._rebuild_from_type_v2,
                (torch._utils._rebuild_wrapper_subclass, ShardedTensor, self.args, self.state))


def test_sharded_tensor_state_must_be_torch_s_five_tuple():
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    args = (ShardedTensor, torch.float32, (2,), (1,), 0, torch.strided, torch.device("cpu"),
            False)
    with pytest.raises(CorruptCheckpointError, match="not the 5-tuple torch pickles"):
        load_pickle(pickle.dumps(_Rebuild(args, ({},)), protocol=2))
    with pytest.raises(CorruptCheckpointError, match="must be \\(local shards"):
        load_pickle(pickle.dumps(_Rebuild(args, ([], {}, {}, {}, False)), protocol=2))
    with pytest.raises(CorruptCheckpointError, match="invalid ShardedTensor wrapper"):
        load_pickle(pickle.dumps(_Rebuild(args[:7], ()), protocol=2))


# ---- reading ----


@pytest.mark.parametrize(("world", "dtype", "config"), [
    (2, torch.float32, False), (3, torch.float32, True), (3, torch.bfloat16, True)],
    ids=["w2-plain-torch-save", "w3-fp32", "w3-bf16"])
def test_fsdp1_files_convert_to_hf_bit_exact(hf_dir, tmp_path, world, dtype, config):
    role = _role(hf_dir, tmp_path / "actor", world, dtype=dtype, config=config)
    report = ckpt_ir.convert(role, tmp_path / "hf", "hf")
    want, got = load_hf_tensors(hf_dir), load_hf_tensors(tmp_path / "hf")
    assert sorted(got) == sorted(want)
    assert all(got[k].dtype == dtype and torch.equal(got[k], want[k].to(dtype)) for k in want)
    assert report.dropped == {}
    reader = VerlFsdpReader(role)
    try:
        info = reader.describe()
    finally:
        reader.close()
    assert info["mesh"] == f"{world} (ShardedTensor, no device mesh)"
    assert info["fsdp"] == ("FSDP1" if config else "unknown (no fsdp_config.json)")
    assert info["rank_files_read"] == list(range(world))


def test_hybrid_sharding_reads_the_first_replica_only(hf_dir, tmp_path):
    """FSDP1 ``HYBRID_SHARD`` at W=4 in groups of 2: ranks 2-3 hold a replica of ranks 0-1
    (their shards placed on global ranks 2 and 3); only ranks 0 and 1 are read."""
    want = load_hf_tensors(hf_dir)
    role = tmp_path / "actor"
    shutil.copytree(hf_dir, role / "huggingface", ignore=shutil.ignore_patterns("*.safetensors"))
    for rank, state in enumerate(fsdp1_rank_states(want, 4, group=2)):
        save_rank_file(state, role / f"model_world_size_4_rank_{rank}.pt")
    reader = VerlFsdpReader(role)
    try:
        assert reader.describe()["rank_files_read"] == [0, 1]
    finally:
        reader.close()
    for rank in (2, 3):  # the replicas' files are not needed
        (role / f"model_world_size_4_rank_{rank}.pt").write_bytes(b"")
    ckpt_ir.convert(role, tmp_path / "hf", "hf")
    got = load_hf_tensors(tmp_path / "hf")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_row_blocks_are_the_shards_located_in_their_rank_files(role, hf_dir):
    want = load_hf_tensors(hf_dir)
    reader = VerlFsdpReader(role)
    try:
        assert isinstance(reader, RowsReader) and isinstance(reader, LocatingReader)
        rows = reader.read_rows(EMBED)
        vocab = TINY_LLAMA["vocab_size"]
        assert rows is not None and [r.shape[0] for r in rows] == [
            len(c) for c in torch.arange(vocab).chunk(3)]
        assert torch.equal(torch.cat(rows), want[EMBED])
        for rank, block in enumerate(rows):
            path, offset = reader.locate(block)
            assert path.name == f"model_world_size_3_rank_{rank}.pt"
            with open(path, "rb") as f:
                f.seek(offset)
                assert f.read(block.numel() * block.element_size()) == block.numpy().tobytes()
    finally:
        reader.close()


def test_tensors_with_fewer_rows_than_ranks_read_from_the_ranks_holding_them(tmp_path):
    """FSDP1 gives a 2-row tensor at W=3 two shards (rank 2 holds none) and a 1-row one an
    EnumerableShardingSpec: the ranks without a shard are not needed."""
    role = tmp_path / "actor"
    role.mkdir()
    full = {"a.weight": torch.randn(2, 4), "b.weight": torch.randn(1), "c.weight":
            torch.randn(5, 2)}
    (role / "huggingface").mkdir()
    (role / "huggingface" / "config.json").write_text(json.dumps(TINY_LLAMA))
    for rank, state in enumerate(fsdp1_rank_states(full, 3)):
        save_rank_file(state, role / f"model_world_size_3_rank_{rank}.pt")
    reader = VerlFsdpReader(role)  # read, not converted: the llama config names none of them
    try:
        assert {k: [p.rank for p in reader._pieces[k][1]] for k in full} == {
            "a.weight": [0, 1], "b.weight": [0], "c.weight": [0, 1, 2]}
        assert all(torch.equal(reader.read(k), v) for k, v in full.items())
    finally:
        reader.close()


# ---- bad input: one line, exit 2, nothing written ----


def _cli(*args: str) -> subprocess.CompletedProcess:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _rewrite(role: Path, rank: int, edit) -> None:
    """Rank ``rank``'s file with ``edit(full, state, rank)`` applied to its state dict (rebuilt
    from the files' own weights, through ckpt-ir's reader)."""
    reader = VerlFsdpReader(role)
    try:
        full = {k: reader.read(k).clone() for k in reader.tensors()}
    finally:
        reader.close()
    state = fsdp1_rank_states(full, 3)[rank]
    edit(full, state, rank)
    (role / f"model_world_size_3_rank_{rank}.pt").unlink()
    save_rank_file(state, role / f"model_world_size_3_rank_{rank}.pt")


def _shifted(full, state, rank):
    # The embedding's second shard starts one row early: it overlaps the first, and a row is
    # lost.
    meta = chunk_metadata(full[EMBED], 3)
    meta.shards_metadata[1].shard_offsets[0] -= 1
    state[EMBED] = sharded(full[EMBED], 3, rank, meta)


def _short(full, state, rank):
    # Rank 1 saved a 2-row shard under metadata that still says the torch.chunk sizes.
    state[EMBED].local_shards[0].tensor = full[EMBED][:2].clone()


def _other_cut(full, state, rank):
    # This rank's metadata cuts the embedding in two: the files disagree with rank 0's.
    state[EMBED] = sharded(full[EMBED], 3, rank, chunk_metadata(full[EMBED], 2))


def _stray_rank(full, state, rank):
    meta = chunk_metadata(full[EMBED], 3)
    meta.shards_metadata[2].placement = ShardMetadata([0], [1], "rank:5/cpu").placement
    state[EMBED] = sharded(full[EMBED], 3, rank, meta)


def _bad_group(full, state, rank):
    # Saved by local rank 2 of a process group of 2 ranks.
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    state[EMBED].group = ShardedTensor.ProcessGroupState(2, rank, 2, 3)


def _cases(role: Path, tmp_path: Path):
    def copy(name: str) -> Path:
        bad = tmp_path / name / "actor"
        shutil.copytree(role, bad)
        return bad

    bad = copy("missing")
    (bad / "model_world_size_3_rank_1.pt").unlink()
    yield bad, "model_world_size_3_rank_1.pt is missing"
    bad = copy("other-rank")
    shutil.copy(bad / "model_world_size_3_rank_0.pt", bad / "model_world_size_3_rank_1.pt")
    yield bad, "saved by rank 0 of a world of 3, not rank 1 of 3"
    bad = copy("tile")
    _rewrite(bad, 0, _shifted)  # rank 0's metadata: its own shard is untouched
    yield bad, f"the shards of {EMBED} do not tile its shape"
    bad = copy("short")
    _rewrite(bad, 1, _short)
    yield bad, f"holds a (2, 32) torch.float32 shard of {EMBED} whose metadata says (33, 32)"
    bad = copy("disagree")
    _rewrite(bad, 1, _other_cut)
    yield bad, f"describe the shards of {EMBED} differently"
    bad = copy("stray")
    _rewrite(bad, 0, _stray_rank)
    yield bad, f"ShardedTensor {EMBED} places a shard on rank 5 of a world of 3 ranks"
    bad = copy("group")
    _rewrite(bad, 0, _bad_group)
    yield bad, "saved by rank 2 of a process group of 2 in a world of 3"
    bad = copy("foreign")
    (bad / "model_world_size_3_rank_2.pt").write_bytes(_rank_file_with(
        tmp_path, b"chunk_sharding_spec\nChunkShardingSpec",
        b"chunk_sharding_spec\nChunkSh4rdingSpec").read_bytes())
    yield bad, "ChunkSh4rdingSpec' in "


def test_bad_input_is_one_line_exit_2_and_nothing_written(role, tmp_path):
    assert TINY_LLAMA["vocab_size"] == 97  # 33/33/31 rows at W=3: the messages above
    for bad, message in _cases(role, tmp_path):
        dst = tmp_path / f"out-{bad.parent.name}"
        run = _cli("convert", str(bad), str(dst), "--to", "hf", "--no-progress")
        assert run.returncode == 2, (bad, run.stderr)
        lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and message in lines[0], (message, run.stderr)
        assert not dst.exists()
        assert list(dst.parent.glob(f".{dst.name}*")) == []


def test_trust_pickles_is_a_one_line_refusal(role, tmp_path):
    """torch's own unpickler raises on a ShardedTensor outside a process group of the saved
    rank and size: ``--trust-pickles`` says so and points at the restricted path."""
    dst = tmp_path / "out"
    run = _cli("convert", str(role), str(dst), "--to", "hf", "--trust-pickles",
               "--no-progress")
    assert run.returncode == 2, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "holds FSDP1 ShardedTensors" in lines[0]
    assert "run without --trust-pickles" in lines[0]
    assert not dst.exists()


# ---- properties: the metadata decides, and only an exact tiling is read ----


@st.composite
def _row_cuts(draw: st.DrawFn) -> tuple[int, int, list[tuple[int, int, int]]]:
    """``(rows, world, [(start, size, rank)])``: row blocks of a ``rows`` x 3 tensor on
    ranks of ``world``, valid by construction (cut points in order, empty blocks allowed),
    then perhaps perturbed (a block moved, shrunk, grown or repeated on another rank)."""
    rows = draw(st.integers(1, 12), label="rows")
    world = draw(st.integers(1, 4), label="world")
    cuts = sorted(draw(st.lists(st.integers(0, rows), min_size=world - 1,
                                max_size=world - 1), label="cuts"))
    bounds = [0, *cuts, rows]
    blocks = [(bounds[r], bounds[r + 1] - bounds[r], r) for r in range(world)]
    kind = draw(st.sampled_from(["exact", "move", "resize", "repeat"]), label="kind")
    i = draw(st.integers(0, world - 1), label="block")
    start, size, rank = blocks[i]
    if kind == "move":
        start = draw(st.integers(0, rows - size), label="start")
    elif kind == "resize":
        size = draw(st.integers(0, rows - start), label="size")
    elif kind == "repeat":
        rank = draw(st.integers(0, world - 1), label="rank")
        blocks.append((start, size, rank))
    blocks[i] = (start, size, blocks[i][2])
    return rows, world, blocks


def _tiles(rows: int, blocks: list[tuple[int, int, int]]) -> bool:
    covered = [0] * rows
    for start, size, _ in blocks:
        for row in range(start, start + size):
            covered[row] += 1
    return all(c == 1 for c in covered)


@settings(deadline=None)
@given(cut=_row_cuts())
def test_a_sharded_tensor_reads_exactly_when_its_shards_tile_it(cut):
    """The reader agrees with a row-count oracle: an exact tiling reads back bit for bit,
    anything else is refused as shards that do not tile, before any bytes are read."""
    rows, world, blocks = cut
    note(f"rows={rows} world={world} blocks={blocks}")
    full = torch.randn(rows, 3)
    meta = chunk_metadata(full, 1)
    meta.shards_metadata = [ShardMetadata([s, 0], [n, 3], f"rank:{r}/cpu")
                            for s, n, r in blocks]
    with tempfile.TemporaryDirectory() as tmp:
        role = Path(tmp)
        (role / "huggingface").mkdir()
        (role / "huggingface" / "config.json").write_text(json.dumps(
            {**TINY_LLAMA, "num_hidden_layers": 1}))
        for rank in range(world):
            save_rank_file({"w": sharded(full, world, rank, meta)},
                           role / f"model_world_size_{world}_rank_{rank}.pt")
        event("tiles" if _tiles(rows, blocks) else "does not tile")
        if _tiles(rows, blocks):
            reader = VerlFsdpReader(role)
            try:
                assert torch.equal(reader.read("w"), full)
            finally:
                reader.close()
        else:
            with pytest.raises(CorruptCheckpointError, match="the shards of w do not tile"):
                VerlFsdpReader(role).close()


def _pickle_mutations(data: bytes) -> st.SearchStrategy[bytes]:
    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(out) - 1))
            kind = draw(st.sampled_from(["flip", "set", "delete", "insert"]))
            if kind == "flip":
                out[at] ^= 1 << draw(st.integers(0, 7))
            elif kind == "set":
                out[at] = draw(st.integers(0, 255))
            elif kind == "delete":
                del out[at:at + draw(st.integers(1, 8))]
            else:
                out[at:at] = draw(st.binary(min_size=1, max_size=8))
            if not out:
                out = bytearray(b".")
        return bytes(out)

    return mutate()


@pytest.fixture(scope="module")
def small_role(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two ranks of two small ShardedTensors and a buffer: a data.pkl of ~3 KB."""
    role = tmp_path_factory.mktemp("small") / "actor"
    (role / "huggingface").mkdir(parents=True)
    (role / "huggingface" / "config.json").write_text(json.dumps(
        {**TINY_LLAMA, "num_hidden_layers": 1}))
    full = {"w": torch.randn(5, 3), "v": torch.randn(1), "b": torch.ones(2)}
    for rank, state in enumerate(fsdp1_rank_states(full, 2, buffers=("b",))):
        save_rank_file(state, role / f"model_world_size_2_rank_{rank}.pt")
    return role


@settings(deadline=None)
@given(data=st.data())
def test_mutated_sharded_tensor_pickles_raise_checkpoint_errors_only(small_role, data):
    """Bytes of rank 1's ``data.pkl`` flipped, set, deleted or inserted: reading the role is
    refused with a one-line CheckpointError or reads the tensors; nothing else escapes."""
    name = "model_world_size_2_rank_1.pt"
    with zipfile.ZipFile(small_role / name) as z:
        records = [(i, z.read(i)) for i in z.infolist()]
    (pkl,) = [d for i, d in records if i.filename.endswith("/data.pkl")]
    mutated = data.draw(_pickle_mutations(pkl), label="data.pkl")
    with tempfile.TemporaryDirectory() as tmp:
        role = Path(tmp) / "actor"
        shutil.copytree(small_role, role)
        (role / name).unlink()
        with zipfile.ZipFile(role / name, "w", zipfile.ZIP_STORED) as z:
            for item, body in records:
                z.writestr(item, mutated if item.filename.endswith("/data.pkl") else body)
        try:
            reader = VerlFsdpReader(role)
            try:
                for tensor in reader.tensors():
                    reader.read(tensor)
            finally:
                reader.close()
            event("read")
        except CheckpointError as e:
            event(f"refused: {type(e).__name__}")
            note(f"refused: {e}")
            assert "\n" not in str(e)


def test_a_peft_lora_save_reads_its_base_weights_and_adapter(hf_dir, tmp_path):
    """A PEFT LoRA model saved by FSDP1 without a mesh (keys ``base_model.model.…``, targeted
    linears split into ``base_layer`` / ``lora_A.default`` / ``lora_B.default``), W=3: the
    model reader takes the base weights, the adapter reader the LoRA tensors, bit for bit."""
    want = load_hf_tensors(hf_dir)
    gen = torch.Generator().manual_seed(5)
    state, adapter = {}, {}
    for name, tensor in want.items():
        module = name.removesuffix(".weight")
        if module.endswith((".q_proj", ".v_proj")):
            a = torch.randn(4, tensor.shape[1], generator=gen)
            b = torch.randn(tensor.shape[0], 4, generator=gen)
            state[f"base_model.model.{module}.base_layer.weight"] = tensor
            state[f"base_model.model.{module}.lora_A.default.weight"] = a
            state[f"base_model.model.{module}.lora_B.default.weight"] = b
            adapter[f"base_model.model.{module}.lora_A.weight"] = a
            adapter[f"base_model.model.{module}.lora_B.weight"] = b
        else:
            state[f"base_model.model.{name}"] = tensor
    role = tmp_path / "actor"
    shutil.copytree(hf_dir, role / "huggingface", ignore=shutil.ignore_patterns("*.safetensors"))
    (role / "lora_train_meta.json").write_text(json.dumps({"r": 4, "lora_alpha": 8,
                                                           "task_type": "CAUSAL_LM"}))
    for rank, rank_state in enumerate(fsdp1_rank_states(state, 3)):
        save_rank_file(rank_state, role / f"model_world_size_3_rank_{rank}.pt")
    ckpt_ir.convert(role, tmp_path / "hf", "hf")
    got = load_hf_tensors(tmp_path / "hf")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    ckpt_ir.extract_adapter(role, tmp_path / "peft")
    got = load_hf_tensors(tmp_path / "peft")
    assert sorted(got) == sorted(adapter) and all(torch.equal(got[k], adapter[k])
                                                  for k in adapter)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
