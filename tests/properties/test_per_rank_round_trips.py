"""Per-rank formats round-trip bit for bit: across layouts, and with every other format.

- layout A -> IR -> layout B -> layout A gives the same rank files (tensors compared on raw
  bits, keys in order, non-tensor entries equal) for ``verl-legacy`` and ``megatron-legacy``,
  over random dense configs (MHA/GQA/MQA, biases, qk-norm, tied/untied), dtypes, TP sizes and
  pipeline splits (VPP, uneven first/last stages);
- X -> Y -> X is identical for every ordered pair among ``hf``, ``mcore-dist``,
  ``verl-legacy`` and ``megatron-legacy``;
- ``ckpt_ir.open`` of a per-rank checkpoint reads the source's IR tensors exactly.

Every per-rank write pads the vocabulary to a multiple of 12, which every drawn TP divides.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from hypothesis import given, note
from hypothesis import strategies as st
from safetensors.torch import load_file

import ckpt_ir
from ckpt_ir.converters.storage.dcp_files import DcpReader
from ckpt_ir.safety.unpickler import load_torch
from tests.fixtures import write_hf
from tests.strategies import bits_equal, dense_configs, dtypes, layouts

PER_RANK = ("verl-legacy", "megatron-legacy")
FORMATS = ("hf", "mcore-dist", *PER_RANK)
PAD = 12  # divisible by every TP the strategies draw (1..4)


def _plain(obj: Any) -> Any:
    """A loaded rank file as comparable data: tensors -> (dtype, shape, raw bytes)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().contiguous()
        return ("tensor", str(t.dtype), tuple(t.shape), t.view(torch.uint8).numpy().tobytes())
    if isinstance(obj, dict):
        return [(k, _plain(v)) for k, v in obj.items()]  # order matters: state dict order
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, argparse.Namespace):
        return ("args", _plain(vars(obj)))
    return obj


def rank_files(root: Path) -> dict[str, Any]:
    """Every rank file under ``root`` (relative path -> its loaded content, comparable)."""
    out = {}
    for f in sorted(root.rglob("*.pt")):
        out[str(f.relative_to(root))] = _plain(load_torch(f))
    assert out, f"no rank files under {root}"
    return out


def contents(path: Path, fmt: str) -> dict[str, Any]:
    """What a checkpoint holds, comparable across two writes of the same format."""
    if fmt == "hf":
        out: dict[str, Any] = {}
        for f in sorted(path.glob("*.safetensors")):
            out.update({k: _plain(v) for k, v in load_file(f).items()})
        return out
    if fmt == "mcore-dist":
        r = DcpReader(path)
        try:
            return {fqn: _plain(r.read_region(fqn, (0,) * len(t.shape), t.shape))
                    for fqn, t in r.index.tensors.items()}
        finally:
            r.close()
    return rank_files(path)


def _write(src: Path, dst: Path, fmt: str, layout=None, spec: str = "te") -> None:
    kwargs: dict[str, Any] = {"mcore_spec": spec} if fmt != "hf" else {}
    if fmt in PER_RANK:
        kwargs["layout"] = layout
    if fmt != "hf":
        kwargs["pad_vocab_to_multiple"] = PAD
    ckpt_ir.convert(src, dst, to=fmt, **kwargs)


@given(data=st.data(), fmt=st.sampled_from(PER_RANK), dtype=dtypes(), seed=st.integers(0, 1000),
       spec=st.sampled_from(["te", "local"]))
def test_layout_a_to_b_to_a_is_bit_identical(data, fmt, dtype, seed, spec):
    config = data.draw(dense_configs(max_layers=6))
    a, b = data.draw(layouts(config)), data.draw(layouts(config))
    note(f"{fmt} {spec}: {a.describe()} -> {b.describe()} -> {a.describe()}")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_hf(d / "hf", config, dtype=dtype, seed=seed)
        _write(d / "hf", d / "a", fmt, a, spec)
        # reshard: the spec and the padded vocabulary come from the source
        ckpt_ir.convert(d / "a", d / "b", to=fmt, layout=b)
        ckpt_ir.convert(d / "b", d / "a2", to=fmt, layout=a)
        assert rank_files(d / "a2") == rank_files(d / "a")
        with ckpt_ir.open(d / "b") as ckpt:
            assert ckpt.format == fmt


@given(data=st.data(), pair=st.permutations(FORMATS).map(lambda p: tuple(p[:2])), dtype=dtypes(),
       seed=st.integers(0, 1000), spec=st.sampled_from(["te", "local"]))
def test_every_format_pair_round_trips(data, pair, dtype, seed, spec):
    x, y = pair
    config = data.draw(dense_configs(max_layers=4))
    lx, ly = data.draw(layouts(config)), data.draw(layouts(config))
    note(f"{x} ({lx.describe()}) -> {y} ({ly.describe()}) -> {x}, spec {spec}")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_hf(d / "hf", config, dtype=dtype, seed=seed)
        src = d / "hf"
        if x != "hf":
            _write(d / "hf", d / "x", x, lx, spec)
            src = d / "x"
        _write(src, d / "y", y, ly, spec)
        _write(d / "y", d / "x2", x, lx, spec)
        assert contents(d / "x2", x) == contents(src, x)


@given(data=st.data(), fmt=st.sampled_from(PER_RANK), seed=st.integers(0, 100))
def test_open_reads_the_source_ir_from_per_rank_files(data, fmt, seed):
    config = data.draw(dense_configs(max_layers=4))
    layout = data.draw(layouts(config))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        want = write_hf(d / "hf", config, dtype=torch.float32, seed=seed)
        _write(d / "hf", d / "out", fmt, layout)
        with ckpt_ir.open(d / "out") as ckpt:
            assert set(ckpt.tensors) == set(want)
            for name, t in want.items():
                assert bits_equal(ckpt.read(name), t), name
