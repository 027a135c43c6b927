"""Typed writer options, declared capabilities and the orchestration's single decisions."""

from __future__ import annotations

import dataclasses

import pytest

import ckpt_ir
from ckpt_ir.capabilities import (
    FileSlabWriter,
    LayoutReader,
    LocatingReader,
    PartitionedWriter,
    SlabWriter,
)
from ckpt_ir.converters.base import WriteOptions as ReexportedWriteOptions
from ckpt_ir.converters.hf import HfWriter
from ckpt_ir.converters.hf_peft import HfPeftWriter
from ckpt_ir.converters.mcore_dist import McoreDistWriter
from ckpt_ir.converters.megatron_legacy import MegatronLegacyWriter
from ckpt_ir.converters.verl_adapter import VerlAdapterWriter
from ckpt_ir.errors import FormatError, InternalError
from ckpt_ir.layout import ParallelLayout
from ckpt_ir.options import VerlTree, WriteOptions
from ckpt_ir.orchestration import open_reader, plan_conversion, resolve_source, target_layout
from tests.fixtures import TINY_LLAMA, write_hf


def test_write_options_has_one_home():
    assert ReexportedWriteOptions is WriteOptions
    assert not hasattr(WriteOptions(), "extra")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("mcore_spec", "transformer-engine", "mcore_spec must be one of te, local, any, not "),
    ("hf_experts", "stacked", "hf_experts must be one of per-expert, fused, not "),
    ("mcore_experts", "batched", "mcore_experts must be one of sequential, grouped, not "),
])
def test_variant_options_are_checked_when_built(field, value, message):
    with pytest.raises(FormatError, match=message):
        WriteOptions(**{field: value})


def test_a_layout_that_is_not_a_parallel_layout_is_a_bug():
    with pytest.raises(InternalError, match="layout option is a dict"):
        WriteOptions(layout={"tp": 2})  # type: ignore[arg-type]
    assert WriteOptions().parallel_layout == ParallelLayout()


def test_an_adapter_writer_without_an_adapter_is_a_bug():
    with pytest.raises(InternalError, match=r"the hf-peft writer needs options\.adapter"):
        WriteOptions().require_adapter("hf-peft")




def test_writer_capabilities_are_declared():
    for cls in (HfWriter, McoreDistWriter):
        assert issubclass(cls, SlabWriter)
        assert issubclass(cls, PartitionedWriter)
        assert cls.accepts_file_slabs
    assert issubclass(MegatronLegacyWriter, PartitionedWriter)
    assert not issubclass(MegatronLegacyWriter, SlabWriter)
    for cls in (HfPeftWriter, VerlAdapterWriter):
        assert not issubclass(cls, PartitionedWriter)


@pytest.fixture(scope="module")
def hf_and_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    write_hf(root / "hf", TINY_LLAMA)
    ckpt_ir.convert(root / "hf", root / "ranks", to="megatron-legacy", layout={"tp": 2},
                    pad_vocab_to_multiple=128)
    return root / "hf", root / "ranks"


def test_bad_variant_is_refused_before_anything_is_written(hf_and_ranks, tmp_path):
    hf, _ = hf_and_ranks
    with pytest.raises(FormatError, match="mcore_spec must be one of"):
        ckpt_ir.convert(hf, tmp_path / "out", to="mcore-dist", mcore_spec="tee")
    assert not (tmp_path / "out").exists()


def test_reader_capabilities_are_declared(hf_and_ranks, tmp_path):
    hf, ranks = hf_and_ranks
    hf_reader, _ = open_reader(hf, None)
    rank_reader, _ = open_reader(ranks, None)
    try:
        assert isinstance(hf_reader, LocatingReader)
        assert not isinstance(hf_reader, LayoutReader)
        assert isinstance(rank_reader, LayoutReader)
        assert rank_reader.layout.tp == 2
        writer = HfWriter(tmp_path, hf_reader.config, WriteOptions())
        assert isinstance(writer, FileSlabWriter)
    finally:
        hf_reader.close()
        rank_reader.close()


def test_layout_fields_override_the_source_layout(hf_and_ranks):
    _, ranks = hf_and_ranks
    reader, _ = open_reader(ranks, None)
    try:
        assert target_layout(reader, "verl-legacy", {"pp": 2}) == ParallelLayout(tp=2, pp=2)
        assert target_layout(reader, "hf", None) is None
        with pytest.raises(FormatError, match="applies to per-rank formats"):
            target_layout(reader, "hf", {"tp": 2})
    finally:
        reader.close()


def test_the_plan_carries_the_params_the_writer_gets(hf_and_ranks):
    hf, _ = hf_and_ranks
    reader, _ = open_reader(hf, None)
    try:
        opts = WriteOptions(layout=ParallelLayout(tp=2), pad_vocab_to_multiple=64)
        plan, writer_cls = plan_conversion(reader, "megatron-legacy", opts)
        assert writer_cls is MegatronLegacyWriter
        assert plan.dest_params.padded_vocab_size == 128
        hf_plan, _ = plan_conversion(reader, "hf", WriteOptions(hf_experts="fused"))
        assert hf_plan.dest_params.hf_experts == "fused"
    finally:
        reader.close()


def test_the_source_is_resolved_once_as_model_or_adapter(hf_and_ranks, tmp_path):
    hf, ranks = hf_and_ranks
    model = resolve_source(ranks)
    assert not model.adapter and model.resolved.format == "megatron-legacy"
    ckpt_ir.convert(hf, tmp_path / "dist", to="mcore-dist",
                    verl_tree=False)  # a model-only torch_dist directory stays a model
    assert not resolve_source(tmp_path / "dist").adapter


def test_verl_tree_option_is_typed(hf_and_ranks, tmp_path):
    hf, _ = hf_and_ranks
    dst = tmp_path / "global_step_7" / "critic"
    ckpt_ir.convert(hf, dst, to="mcore-dist", verl_tree=True)
    manifest = (dst / "ckpt_contents.json").read_text()
    assert '"role": "critic"' in manifest and '"global_step": 7' in manifest
    assert dataclasses.asdict(VerlTree()) == {"role": "actor", "step": None}
