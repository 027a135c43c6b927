"""ckpt_ir.readahead: the byte ranges readers report, and the window the advice keeps.

The ranges are checked against where the readers' own tensors really are (``locate`` of the
tensor read), for an hf and an mcore-dist checkpoint, a block-FP8 one (weight + scale) and a
stacked per-layer DCP key; the window with a Readahead whose system call is recorded instead
of made, so the order of advice and progress is exact.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import ckpt_ir
from ckpt_ir.capabilities import RangeReader
from ckpt_ir.options import WriteOptions
from ckpt_ir.orchestration import open_reader, plan_conversion
from ckpt_ir.readahead import Readahead, _merged, unit_ranges
from tests.fixtures import write_hf
from tools.make_synthetic_fp8 import write_fp8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("readahead")
    write_hf(root / "hf")
    ckpt_ir.convert(root / "hf", root / "dist", to="mcore-dist")
    write_fp8(root / "fp8", {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                             "hidden_size": 256, "intermediate_size": 384,
                             "num_attention_heads": 4, "num_key_value_heads": 2,
                             "num_hidden_layers": 2, "vocab_size": 320,
                             "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
                             "tie_word_embeddings": False, "torch_dtype": "bfloat16"})
    return {"hf": root / "hf", "mcore-dist": root / "dist", "fp8": root / "fp8"}


@pytest.mark.parametrize("kind", ["hf", "mcore-dist"])
def test_every_tensor_lies_inside_the_ranges_its_reader_reports(checkpoints, kind):
    reader, _ = open_reader(checkpoints[kind], None)
    try:
        assert isinstance(reader, RangeReader)
        for name in reader.tensors():
            ranges = reader.byte_ranges(name)
            assert ranges, name
            t = reader.read(name)
            where = reader.locate(t)
            assert where is not None, name  # a zero-copy view of the file
            path, offset = where
            nbytes = t.numel() * t.element_size()
            assert any(p == path and start <= offset and offset + nbytes <= start + length
                       for p, start, length in ranges), (name, where, ranges)
            if kind == "hf":  # exactly the tensor's bytes
                assert ranges == ((path, offset, nbytes),)
            reader.release()
    finally:
        reader.close()


def test_a_dequantized_weight_reports_its_fp8_bytes_and_its_scale(checkpoints):
    reader, _ = open_reader(checkpoints["fp8"], None)
    try:
        name = "model.layers.0.mlp.down_proj.weight"
        ranges = reader.byte_ranges(name)
        shape = reader.tensors()[name].shape
        scale_grid = (-(-shape[0] // 128)) * (-(-shape[1] // 128))
        assert sorted(n for _, _, n in ranges) == sorted([shape[0] * shape[1], scale_grid * 4])
        assert reader.byte_ranges("no.such.tensor") == ()
    finally:
        reader.close()


def test_a_layer_of_a_stacked_dcp_key_reports_only_its_chunk(checkpoints):
    reader, _ = open_reader(checkpoints["mcore-dist"], None)
    try:
        layer0 = reader.byte_ranges("decoder.layers.0.mlp.linear_fc2.weight")
        layer1 = reader.byte_ranges("decoder.layers.1.mlp.linear_fc2.weight")
        assert len(layer0) == len(layer1) == 1 and layer0 != layer1
    finally:
        reader.close()


def test_ranges_are_merged_where_they_touch():
    a, b = Path("/a"), Path("/b")
    assert _merged([(a, 10, 5), (b, 0, 4), (a, 0, 10), (a, 20, 1), (a, 12, 2)]) == (
        (a, 0, 15), (a, 20, 1), (b, 0, 4))


class _Recorded(Readahead):
    """The advice is recorded (the offsets, in order) instead of given."""

    def __init__(self, units, window):
        super().__init__(units, window)
        self.advised: list[int] = []
        self.seen = threading.Condition()

    def _advise(self, fd: int, start: int, length: int) -> None:
        with self.seen:
            self.advised.append(start)
            self.seen.notify_all()

    def wait_for(self, n: int) -> list[int]:
        with self.seen:
            assert self.seen.wait_for(lambda: len(self.advised) >= n, timeout=10)
            return list(self.advised)


def test_advice_stays_within_the_window_ahead_of_the_executor(tmp_path):
    f = tmp_path / "data"
    f.write_bytes(bytes(100))
    # Five units of 10 bytes at offsets 0, 10, ...; a window of 25 bytes.
    units = [((f, 10 * i, 10),) for i in range(5)]
    ahead = _Recorded(units, window=25).start()
    try:
        assert ahead.wait_for(2) == [0, 10]  # units 0 and 1 fit; unit 2 would make 30
        ahead.unit_done()                    # unit 0 done: 1 + 2 = 20 bytes ahead
        assert ahead.wait_for(3) == [0, 10, 20]
        with ahead._cond:                    # three units finish with the thread held off:
            for _ in range(3):               # the executor is on unit 4
                ahead.unit_done()
        assert ahead.wait_for(4) == [0, 10, 20, 40]  # unit 3 is behind it: skipped
    finally:
        ahead.close()
    assert ahead._thread is None


def test_a_unit_larger_than_the_window_is_advised_when_it_is_next(tmp_path):
    f = tmp_path / "data"
    f.write_bytes(bytes(100))
    ahead = _Recorded([((f, 0, 60),), ((f, 60, 40),)], window=10).start()
    try:
        assert ahead.wait_for(1) == [0]      # the executor's current unit, whatever its size
        ahead.unit_done()
        assert ahead.wait_for(2) == [0, 60]
    finally:
        ahead.close()


def test_a_missing_file_ends_the_advice_not_the_conversion(tmp_path):
    ahead = Readahead([((tmp_path / "gone", 0, 10),)]).start()
    ahead.unit_done()
    ahead.close()  # the thread stopped on its OSError; nothing raised here


def test_unit_ranges_follow_the_plan_order(checkpoints):
    reader, _ = open_reader(checkpoints["hf"], None)
    try:
        plan, _ = plan_conversion(reader, "mcore-dist", WriteOptions())
        ranges = unit_ranges(reader, plan.units)
        assert len(ranges) == len(plan.units)
        for unit, got in zip(plan.units, ranges, strict=True):
            assert sum(n for _, _, n in got) == unit.bytes_read
    finally:
        reader.close()
