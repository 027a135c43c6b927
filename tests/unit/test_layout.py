"""ParallelLayout: megatron-core's layer placement, its inverse, and up-front validation."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckpt_ir.errors import IncompatibleLayoutError
from ckpt_ir.ir import ModelConfig
from ckpt_ir.layout import ParallelLayout
from tests.fixtures import TINY_LLAMA
from tests.strategies import pipeline_splits


@st.composite
def placements(draw: st.DrawFn) -> tuple[int, ParallelLayout]:
    num_layers = draw(st.integers(1, 12))
    pp, vpp, first, last = draw(st.sampled_from(pipeline_splits(num_layers)))
    return num_layers, ParallelLayout(1, pp, vpp, first_stage_layers=first,
                                      last_stage_layers=last)


@given(placements())
def test_placement_partitions_the_layers_in_virtual_chunk_major_order(case):
    num_layers, layout = case
    placement = layout.placement(num_layers)
    order = [placement.chunks[p][v] for v in range(layout.vpp) for p in range(layout.pp)]
    assert [layer for chunk in order for layer in chunk] == list(range(num_layers))
    for p, row in enumerate(placement.chunks):
        assert len({len(chunk) for chunk in row}) == 1, "chunks of one stage differ in size"
        for v, chunk in enumerate(row):
            assert len(chunk) >= 1
            for local, layer in enumerate(chunk):
                assert placement.locate(layer) == (p, v, local)
                assert placement.global_layer(p, v, local) == layer


@given(placements())
def test_layout_is_recovered_from_the_chunk_sizes(case):
    num_layers, layout = case
    sizes = [[len(c) for c in row] for row in layout.placement(num_layers).chunks]
    found = ParallelLayout.from_chunk_sizes(sizes)
    assert found == layout.canonical(num_layers)
    assert found.placement(num_layers) == layout.placement(num_layers)


@pytest.fixture(scope="module")
def megatron_placement():
    """megatron-core 0.16.1's own functions (pure given pp_rank and vp_stage)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    def place(num_layers: int, layout: ParallelLayout, p: int, v: int) -> range:
        config = SimpleNamespace(
            num_layers=num_layers, pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
            num_layers_in_first_pipeline_stage=layout.first_stage_layers,
            num_layers_in_last_pipeline_stage=layout.last_stage_layers,
            pipeline_model_parallel_layout=None, account_for_embedding_in_pipeline_split=False,
            account_for_loss_in_pipeline_split=False)
        vp = v if layout.vpp > 1 else None
        offset = get_transformer_layer_offset(config, vp_stage=vp, pp_rank=p)
        return range(offset, offset + get_num_layers_to_build(config, vp_stage=vp, pp_rank=p))

    return place


@given(placements())
def test_placement_matches_megatron_core(megatron_placement, case):
    num_layers, layout = case
    layout = layout.canonical(num_layers)  # megatron-core divides by zero for PP=2 with both
    placement = layout.placement(num_layers)
    for p in range(layout.pp):
        for v in range(layout.vpp):
            assert placement.chunks[p][v] == megatron_placement(num_layers, layout, p, v), (p, v)


def test_interleaved_uneven_example():
    # 6 layers, PP=2, VPP=2, first stage 4: rank 0 holds [0, 1] and [3, 4], rank 1 [2] and [5].
    placement = ParallelLayout(pp=2, vpp=2, first_stage_layers=4).placement(6)
    assert placement.chunks == ((range(0, 2), range(3, 5)), (range(2, 3), range(5, 6)))


@pytest.mark.parametrize(("layout", "num_layers", "message"), [
    (dict(pp=4), 6, "PP×VPP = 4×1 does not divide the 6 layers (use --first-stage-layers / "
                    "--last-stage-layers for uneven stages)"),
    (dict(pp=2, vpp=2), 6, "PP×VPP = 2×2 does not divide the 6 layers"),
    (dict(pp=3, first_stage_layers=2), 5, "the 3 layers left after the uneven first/last stages "
                                          "do not split evenly over the 2 other pipeline stage(s)"),
    (dict(pp=2, first_stage_layers=4, last_stage_layers=4), 6,
     "first/last pipeline stages of 4+4 layers do not add up to the 6 layers over PP=2"),
    (dict(pp=2, vpp=2, first_stage_layers=3), 6,
     "pipeline stage 0 holds 3 layers, which VPP=2 does not divide"),
    (dict(pp=2, first_stage_layers=6), 6,
     "the 0 layers left after the uneven first/last stages do not split evenly"),
])
def test_pipeline_splits_that_megatron_refuses_are_refused(layout, num_layers, message):
    with pytest.raises(IncompatibleLayoutError, match=re.escape(message)):
        ParallelLayout(**layout).placement(num_layers)


@pytest.mark.parametrize(("fields", "message"), [
    (dict(tp=0), "tp must be a positive integer, not 0"),
    (dict(vpp=2), "VPP=2 needs PP > 1 (megatron-core interleaves chunks across pipeline "
                  "stages only)"),
    (dict(first_stage_layers=2), "uneven first/last pipeline stages need PP > 1"),
    (dict(pp=2, last_stage_layers=0), "last_stage_layers must be a positive integer, not 0"),
])
def test_malformed_layouts_are_refused(fields, message):
    with pytest.raises(IncompatibleLayoutError, match=re.escape(message)):
        ParallelLayout(**fields)


def test_tp_is_checked_against_heads_groups_ffn_and_vocab():
    cfg = ModelConfig.from_hf(TINY_LLAMA)  # 4 heads, 2 KV groups, ffn 40, vocab 97
    ParallelLayout(tp=2).check_model(cfg, 98)
    ParallelLayout(tp=4).check_model(cfg, 100)  # TP a multiple of the KV groups: allowed
    with pytest.raises(IncompatibleLayoutError) as e:
        ParallelLayout(tp=3).check_model(cfg)
    assert str(e.value) == (
        "TP=3 does not divide the 4 attention heads; TP=3 does not divide the 2 KV groups "
        "(megatron-core also accepts a TP that is a multiple of the groups); TP=3 does not "
        "divide the FFN size 40; TP=3 does not divide the vocabulary (97 rows); pad it with "
        "--pad-vocab-to-multiple (e.g. 384)")
    with pytest.raises(IncompatibleLayoutError, match="EP=2 needs a mixture-of-experts model"):
        ParallelLayout(ep=2).check_model(cfg)
    with pytest.raises(IncompatibleLayoutError, match="PP×VPP = 4×1 does not divide the 2"):
        ParallelLayout(pp=4).check_model(cfg)


def test_describe_and_canonical():
    layout = ParallelLayout(tp=2, pp=2, vpp=2, first_stage_layers=4, last_stage_layers=2)
    assert layout.describe() == "tp=2 pp=2 vpp=2 (first stage 4 layers, last stage 2 layers)"
    # PP=2 with both set is the same placement as the first stage alone.
    assert layout.canonical(6) == ParallelLayout(tp=2, pp=2, vpp=2, first_stage_layers=4)
    assert ParallelLayout(pp=2, first_stage_layers=2).canonical(4) == ParallelLayout(pp=2)


def test_chunk_sizes_megatron_cannot_produce_are_refused():
    with pytest.raises(IncompatibleLayoutError, match=re.escape(
            "layers per pipeline chunk [[2, 1], [1, 1]] do not follow megatron-core's placement")):
        ParallelLayout.from_chunk_sizes([[2, 1], [1, 1]])
    with pytest.raises(IncompatibleLayoutError, match="do not follow megatron-core's placement"):
        ParallelLayout.from_chunk_sizes([[1], [3], [1], [2]])
