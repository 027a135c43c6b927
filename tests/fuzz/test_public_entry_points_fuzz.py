"""Every untrusted file, mutated, through the public entry points ``ckpt_ir.open`` (and reading
every tensor), ``ckpt_ir.convert`` and ``ckpt_ir.verify``.

Whatever the bytes: success or a ``CheckpointError``, never another exception; no example runs
past a time bound (an alarm, not only Hypothesis' deadline, so a real hang fails too) or
allocates more than 64 MiB (Python objects and touched native memory); a refused conversion
leaves nothing beside its destination; a successful one verifies against its source; the
source's bytes never change. The files come from the table in ``tests/hostile.py``: a format
joins by adding rows there.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import ckpt_ir
from ckpt_ir.commands import inspect as inspect_command
from ckpt_ir.errors import CheckpointError
from tests.fixtures import tree_bytes
from tests.hostile import (
    FUZZ_SHAPES,
    MARKER,
    UNTRUSTED,
    Untrusted,
    bounded,
    copy_seed,
    replace_marker_in_file,
    seed,
    seed_bytes,
    siblings,
)

FUZZ = settings(suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large])

# --------------------------------------------------------------------------------------------
# Mutations


def _positions(size: int) -> st.SearchStrategy[int]:
    # Headers, pickles and zip central directories sit at the ends of files: favour them.
    return st.one_of(st.integers(0, min(size, 4096)), st.integers(max(0, size - 1024), size),
                     st.integers(0, size))


@st.composite
def byte_mutations(draw: st.DrawFn, content: bytes) -> bytes:
    data = bytearray(content)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "int"]))
        at = draw(_positions(len(data)))
        if kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif not data:
            continue
        at = min(at, len(data) - 1)
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.integers(0, 255))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "int":
            # A little-endian length or offset field overwritten with an extreme value.
            value = draw(st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]))
            data[at:at + 8] = value.to_bytes(8, "little")
    return bytes(data)


HOSTILE_LEAVES = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True),
    st.sampled_from([-1, 0, 1, 2, 3, 7, 2**31, 2**63, 2**64, 10**12, 10**40]),
    st.text(max_size=8),
    st.sampled_from(["../../etc/passwd", "/etc/passwd", "", "__0_0.distcp", ".metadata",
                     "model-00001-of-00003.safetensors", "llama", "F32", "silu", "RMSNorm"]),
    st.lists(st.sampled_from([-1, 0, 1, 2, 10**12, 2**63]), max_size=4),
)
HOSTILE_KEYS = st.sampled_from([None, 0, 7, -1, 1.5, (1, 2), b"model", True, ""])
JSON_LEAVES = st.recursive(
    HOSTILE_LEAVES, lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
def _stride_tricks() -> st.SearchStrategy[Any]:
    """Tensors whose declared size is not backed by distinct bytes: stride-0 and
    self-overlapping views, and views of one storage that overlap without being the same."""
    def base() -> torch.Tensor:
        return torch.arange(16, dtype=torch.float32)

    return st.sampled_from([
        lambda: base()[:1].expand(2**16, 2**12),  # 16 bytes declaring 1 GiB
        lambda: base().as_strided((8, 8), (1, 1)),
        lambda: base().as_strided((4, 4), (4, 0)),
        lambda: (lambda b: {"a": b[0:8], "b": b[4:12]})(base()),
        lambda: (lambda b: [b, b[3:5]])(base()),
        lambda: (lambda b: (b[0:8].view(2, 4), b[0:8].view(4, 2)))(base()),
    ]).map(lambda make: make())


PICKLE_LEAVES = st.one_of(
    HOSTILE_LEAVES,
    st.sampled_from([torch.float64, torch.uint8, torch.bool, torch.float32]),
    st.lists(st.sampled_from([0, 1, 2, 3, 4, 10**12]), max_size=4).map(tuple),
    st.lists(st.sampled_from([0, 1, 2, 4, 97, 2**40]), max_size=4).map(torch.Size),
    st.builds(lambda shape: torch.zeros(shape), st.lists(st.integers(0, 3), max_size=3)),
    _stride_tricks(),
)


def _children(obj: Any) -> list[tuple[Any, Any]]:
    """(key, value) pairs of a container or plain object, to walk into and replace."""
    if isinstance(obj, dict):
        return list(obj.items())
    if isinstance(obj, list):
        return list(enumerate(obj))
    if isinstance(obj, (str, bytes, int, float, tuple, torch.Tensor, torch.dtype, type)):
        return []
    state = getattr(obj, "__dict__", None)
    return list(state.items()) if isinstance(state, dict) else []


def _set(obj: Any, key: Any, value: Any, *, delete: bool) -> None:
    if isinstance(obj, (dict, list)):
        if delete:
            del obj[key]
        else:
            obj[key] = value
    elif delete:
        object.__delattr__(obj, key)
    else:
        object.__setattr__(obj, key, value)  # frozen dataclasses too


@st.composite
def structured_edits(draw: st.DrawFn, root: Any, leaves: st.SearchStrategy[Any],
                     keys: st.SearchStrategy[Any] | None = None) -> Any:
    """``root`` (deep-copied) with 1-3 values somewhere inside replaced or deleted, or (with
    ``keys``) a dict key replaced."""
    root = copy.deepcopy(root)
    for _ in range(draw(st.integers(1, 3))):
        parent, key = None, None
        node = root
        while True:
            children = _children(node)
            if not children or (parent is not None and draw(st.integers(0, 4)) == 0):
                break
            parent, (key, node) = node, draw(st.sampled_from(children))
        if parent is None:
            continue
        note(f"edit {type(parent).__name__}[{key!r}]")
        if keys is not None and isinstance(parent, dict) and draw(st.integers(0, 5)) == 0:
            # A key that is not a string (state dicts, args and manifests are read by name).
            new_key = draw(keys)
            parent[new_key] = parent.pop(key)
            continue
        _set(parent, key, draw(leaves), delete=draw(st.integers(0, 5)) == 0)
    return root


def _json(target: Untrusted) -> st.SearchStrategy[bytes]:
    content = seed_bytes(target.seed, target.file)
    structured = structured_edits(json.loads(content), JSON_LEAVES).map(
        lambda obj: json.dumps(obj).encode())
    return st.one_of(structured, byte_mutations(content))


def _load_trusted(file: str, content: bytes) -> Any:
    # Our own seed files: plain unpickling is fine here, and only here.
    if file.endswith(".pt"):
        return torch.load(io.BytesIO(content), weights_only=False)
    return pickle.loads(content)


def _dump(file: str, obj: Any) -> bytes | None:
    """The edited object pickled again; None when the edit made it unpicklable (a
    TensorProperties whose memory_format is not one, say)."""
    try:
        if file.endswith(".pt"):
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            return buffer.getvalue()
        return pickle.dumps(obj)
    except (pickle.PicklingError, RuntimeError, TypeError, AttributeError):
        return None


def _pickle(target: Untrusted) -> st.SearchStrategy[bytes]:
    content = seed_bytes(target.seed, target.file)
    root = _load_trusted(target.file, content)
    structured = structured_edits(root, PICKLE_LEAVES, HOSTILE_KEYS).map(
        lambda obj: _dump(target.file, obj)).filter(lambda data: data is not None)
    return st.one_of(structured, byte_mutations(content))


def mutations(target: Untrusted) -> st.SearchStrategy[bytes]:
    if target.kind == "json":
        return _json(target)
    if target.kind == "pickle":
        return _pickle(target)
    return byte_mutations(seed_bytes(target.seed, target.file))


# --------------------------------------------------------------------------------------------
# The property


def exercise(path: Path, to: str, out: Path, *, model: bool = True) -> None:
    """What users do with a checkpoint: inspect it, convert it, then verify the result
    against it (which opens it and reads every tensor); or, when the conversion is refused,
    open it and read every tensor (which must be refused the same way). Adapters are only
    converted (inspect, open and verify take models)."""
    before = tree_bytes(path)
    with bounded():
        if model:
            # `inspect` reads metadata only (DCP .metadata and rank pickles as records, no
            # tensors): a path of its own through the unpickler, refused the same way.
            try:
                inspect_command.run(argparse.Namespace(src=str(path), hf_config=None,
                                                       trust_pickles=False, source_ep=None,
                                                       lora_alpha=None))
            except CheckpointError as e:
                note(f"inspect refused: {e}")
                assert "\n" not in str(e), "the CLI prints errors as one line"
        try:
            ckpt_ir.convert(path, out, to=to)
        except CheckpointError as e:
            note(f"convert refused: {e}")
            assert "\n" not in str(e), "the CLI prints errors as one line"
            assert siblings(out) == [], "a refused conversion left files behind"
            try:
                if model:
                    with ckpt_ir.open(path) as ckpt:
                        for name in ckpt.tensors:
                            ckpt.read(name)
            except CheckpointError as e:
                note(f"open refused: {e}")
        else:
            if model:
                report = ckpt_ir.verify(path, out)
                assert report.equal, report.summary()
    assert tree_bytes(path) == before, "the source changed"


def fuzz_one(target: Untrusted, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = copy_seed(target.seed, Path(tmp) / "ckpt")
        (path / target.file).write_bytes(content)
        exercise(path, target.to, Path(tmp) / "out", model=target.model)


@pytest.fixture(scope="module", autouse=True)
def warm_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # These tensors are tiny: torch's intra-op threads only add synchronisation, which costs
    # milliseconds per op on a loaded machine (xdist runs two workers on two cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # Lazy imports and first-use caches (allow-list, numpy rules, yaml) are not the input's
    # doing: pay them once, outside the memory bound.
    tmp = tmp_path_factory.mktemp("warm")
    for target in UNTRUSTED:
        out = tmp / f"{target.id}-out"
        ckpt_ir.convert(seed(target.seed), out, to=target.to)
        if target.model:
            ckpt_ir.verify(seed(target.seed), out)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("target", UNTRUSTED, ids=lambda t: t.id)
def test_seeds_are_valid_before_mutation(target: Untrusted, tmp_path: Path) -> None:
    exercise(seed(target.seed), target.to, tmp_path / "out", model=target.model)
    assert (tmp_path / "out").is_dir()


@pytest.mark.parametrize("target", UNTRUSTED, ids=lambda t: t.id)
@FUZZ
@given(data=st.data())
def test_mutated_files_raise_checkpoint_errors_only(target: Untrusted,
                                                    data: st.DataObject) -> None:
    fuzz_one(target, data.draw(mutations(target), label="content"))


# Every file that is a pickle (plain, or a torch.save zip): the audit's shapes planted anywhere
# inside it as raw opcodes, which no pickler writes.
PICKLED = [t for t in UNTRUSTED if t.kind == "pickle" or t.file.endswith(".bin")]


@st.composite
def planted_shapes(draw: st.DrawFn, target: Untrusted) -> bytes:
    content = seed_bytes(target.seed, target.file)
    root = (torch.load(io.BytesIO(content), weights_only=False) if content.startswith(b"PK")
            else pickle.loads(content))  # our own seed file: trusted
    edited = draw(structured_edits(root, st.just(MARKER)))
    shape = draw(st.sampled_from(sorted(FUZZ_SHAPES)))
    note(f"shape {shape}")
    try:
        if content.startswith(b"PK"):
            buffer = io.BytesIO()
            torch.save(edited, buffer)
            pickled = buffer.getvalue()
        else:
            pickled = pickle.dumps(edited, protocol=2)
    except (pickle.PicklingError, RuntimeError, TypeError, AttributeError):
        # The marker where pickling checks a type (a TensorProperties' memory_format).
        assume(False)
    assume(MARKER.encode() in pickled)  # not when every edit was a deletion
    return replace_marker_in_file(pickled, FUZZ_SHAPES[shape])


@pytest.mark.parametrize("target", PICKLED, ids=lambda t: t.id)
@settings(FUZZ, max_examples=20)
@given(data=st.data())
def test_hostile_shapes_inside_pickles_raise_checkpoint_errors_only(
        target: Untrusted, data: st.DataObject) -> None:
    # Deep nesting (a segfault when hashed), shared references (a hang when printed), cycles.
    fuzz_one(target, data.draw(planted_shapes(target), label="content"))


# JSON that json.loads itself chokes on in ways other than JSONDecodeError: a plain ValueError
# past Python's 4300-digit integer limit, RecursionError when deeply nested; and numbers that
# parse to values int() refuses.
PATHOLOGICAL_JSON = {
    "5000-digit integer": '{"weight_map": {}, "vocab_size": ' + "9" * 5000 + "}",
    "nested 100000 deep": "[" * 100_000 + "]" * 100_000,
    "NaN": '{"weight_map": {}, "num_hidden_layers": NaN}',
    "1e400": '{"weight_map": {}, "hidden_size": 1e400}',
}


@pytest.mark.parametrize("text", PATHOLOGICAL_JSON.values(), ids=list(PATHOLOGICAL_JSON))
@pytest.mark.parametrize("target", [t for t in UNTRUSTED
                                    if t.id in ("safetensors-index", "config.json")],
                         ids=lambda t: t.id)
def test_pathological_json_is_refused(target: Untrusted, text: str, tmp_path: Path) -> None:
    path = copy_seed(target.seed, tmp_path / "ckpt")
    (path / target.file).write_text(text)
    with pytest.raises(CheckpointError):
        ckpt_ir.convert(path, tmp_path / "out", to=target.to)


@pytest.mark.parametrize("fields", [
    {"num_hidden_layers": 10**9},
    {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": 10**9,
     "num_experts_per_tok": 2},
], ids=["layers", "experts"])
@pytest.mark.parametrize("weights", [True, False], ids=["with-weights", "config-only"])
def test_absurd_counts_in_a_config_are_refused_at_once(fields: dict[str, Any], weights: bool,
                                                       tmp_path: Path) -> None:
    """Schemas and plans have entries per layer and expert: a config claiming 10**9 of them is
    refused before anything is built for each (a config-only directory plans with --dry-run)."""
    path = copy_seed("hf", tmp_path / "ckpt")
    if not weights:
        (path / "model.safetensors").unlink()
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **fields}))
    with bounded(seconds=10), pytest.raises(CheckpointError, match="beyond any real model"):
        ckpt_ir.convert(path, tmp_path / "out", to="mcore-dist", dry_run=not weights)
