"""gpt-oss and qwen3_moe in per-rank formats with an expert TP size other than TP.

megatron-core 0.16.1 builds gpt-oss's biased experts only with expert TP 1, so at TP=2 the
per-rank files (verl-legacy, megatron-legacy) hold whole experts in every TP rank's file
(``ParallelLayout.etp``, defaulting to 1 for biased experts). Verified here:

- HF -> megatron-legacy / verl-legacy at TP=2 with PP=2 or EP=2 -> HF is bit exact with
  identical transformers logits; the layout record (and Megatron-LM's args) say ETP=1; both
  TP ranks' files hold the same whole experts;
- without the record, the reader infers ETP from an expert's ``linear_fc2`` width;
- megatron-core's GPTModel at TP=2, ETP=1 loads the TP=2 rank files (``strict=True``) and
  reproduces transformers' logits;
- a qwen3_moe reshard TP=2 ETP=2 -> ETP=1 -> ETP=2 gives the same rank files bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ckpt_ir
from ckpt_ir.errors import IncompatibleLayoutError
from converters.verl_legacy import VerlLegacyReader
from tests.clients import gpt_oss_models, hf_models
from tests.clients.mcore_harness import launch
from tests.fixtures import safetensors_bytes

PAD = 128  # the tiny gpt-oss vocabulary (301) is odd
EXPERT_FC1 = "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]], torch.Tensor]:
    root = tmp_path_factory.mktemp("gpt_oss_etp")
    hf = gpt_oss_models.make_gpt_oss(root / "hf", seed=5)
    ids = gpt_oss_models.input_ids()
    return hf, ids, hf_models.hf_logits(hf, ids)


def _rank_state(path: Path) -> dict[str, torch.Tensor]:
    """The first chunk's state dict of one rank file (verl: a list; Megatron-LM: a dict)."""
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, weights_only=True)
    return obj[0] if isinstance(obj, list) else obj["model"]


def _assert_hf_round_trip(hf: Path, back: Path, ids: list[list[int]],
                          ref: torch.Tensor) -> None:
    source, result = safetensors_bytes(hf), safetensors_bytes(back)
    assert sorted(result) == sorted(source)
    changed = [n for n in source if result[n] != source[n]]
    assert not changed, f"tensors differ after the round trip: {changed}"
    assert torch.equal(hf_models.hf_logits(back, ids), ref)


@pytest.mark.parametrize("fmt", ["megatron-legacy", "verl-legacy"])
@pytest.mark.parametrize("layout", [{"tp": 2, "pp": 2}, {"tp": 2, "ep": 2}],
                         ids=["tp2-pp2", "tp2-ep2"])
def test_gpt_oss_tp2_rank_files_hold_whole_experts_and_round_trip(
        gpt_oss, tmp_path: Path, fmt: str, layout: dict[str, int]) -> None:
    hf, ids, ref = gpt_oss
    out = tmp_path / fmt
    ckpt_ir.convert(hf, out, to=fmt, layout=layout, pad_vocab_to_multiple=PAD,
                    mcore_spec="local")
    (record,) = out.rglob("ckpt_ir_layout.json")
    assert json.loads(record.read_text())["etp"] == 1
    files = sorted(p for p in out.rglob("mp_rank_*/*.pt"))
    assert len(files) == 4
    by_dir = {f.parent.name: f for f in files}
    # TP ranks 0 and 1 of pipeline (or EP) rank 0.
    t0, t1 = (_rank_state(by_dir[f"mp_rank_0{t}_000"]) for t in (0, 1))
    # ETP=1: both TP ranks hold the whole expert ([gate; up] = 2 x 48 rows), the dense MLP-free
    # attention is cut in two.
    assert t0[EXPERT_FC1].shape == (96, 64) and torch.equal(t0[EXPERT_FC1], t1[EXPERT_FC1])
    assert t0["decoder.layers.0.self_attention.linear_proj.weight"].shape == (64, 48)
    if fmt == "megatron-legacy":
        import argparse

        with torch.serialization.safe_globals([argparse.Namespace]):
            args = torch.load(by_dir["mp_rank_00_000"], weights_only=True)["args"]
        assert (args.tensor_model_parallel_size, args.expert_tensor_parallel_size) == (2, 1)
    back = tmp_path / "hf"
    ckpt_ir.convert(out, back, to="hf")
    _assert_hf_round_trip(hf, back, ids, ref)


def test_expert_tp_is_inferred_from_expert_shapes_without_a_record(gpt_oss,
                                                                   tmp_path: Path) -> None:
    hf, ids, ref = gpt_oss
    out = tmp_path / "verl"
    ckpt_ir.convert(hf, out, to="verl-legacy", layout={"tp": 2, "pp": 2},
                    pad_vocab_to_multiple=PAD, mcore_spec="local")
    (record,) = out.rglob("ckpt_ir_layout.json")
    record.unlink()
    reader = VerlLegacyReader(out / "model", source_ep=1)
    try:
        assert (reader.layout.tp, reader.layout.expert_tp) == (2, 1)
        assert reader.describe()["layout"] == "tp=2 pp=2 etp=1"
    finally:
        reader.close()
    back = tmp_path / "hf"
    ckpt_ir.convert(out, back, to="hf", source_ep=1)
    _assert_hf_round_trip(hf, back, ids, ref)


def test_gpt_oss_expert_tp_2_is_refused(gpt_oss, tmp_path: Path) -> None:
    hf, _, _ = gpt_oss
    with pytest.raises(IncompatibleLayoutError, match="megatron-core supports only with expert "
                                                      "TP 1"):
        ckpt_ir.convert(hf, tmp_path / "out", to="verl-legacy", layout={"tp": 2, "etp": 2},
                        pad_vocab_to_multiple=PAD)
    assert not (tmp_path / "out").exists()


def test_megatron_core_tp2_etp1_loads_the_rank_files(gpt_oss, tmp_path: Path) -> None:
    hf, ids, ref = gpt_oss
    out = tmp_path / "megatron"
    layout = {"tp": 2}
    ckpt_ir.convert(hf, out, to="megatron-legacy", layout=layout, pad_vocab_to_multiple=PAD,
                    mcore_spec="local")
    logits = tmp_path / "logits.pt"
    launch("load-rank-files", {
        "hf_config": str(sorted(out.rglob("hf_config/config.json"))[0]), "input_ids": ids,
        "layout": {"tp": 2, "etp": 1}, "format": "megatron-legacy", "ckpt": str(out),
        "pad_vocab_to_multiple": PAD, "out": str(logits)}, world_size=2, timeout=400)
    got = torch.load(logits, weights_only=True)[..., :gpt_oss_models.VOCAB_SIZE]
    assert got.shape == ref.shape and ref.std() > 0.1
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-5, f"max abs logit diff {diff:.3g}"


def test_qwen3_moe_reshard_between_expert_tp_sizes_is_bit_exact(tmp_path: Path) -> None:
    hf = hf_models.make_hf_model("qwen3_moe", tmp_path, seed=3)
    etp2 = tmp_path / "etp2"
    ckpt_ir.convert(hf, etp2, to="verl-legacy", layout={"tp": 2}, pad_vocab_to_multiple=PAD)
    etp1 = tmp_path / "etp1"
    ckpt_ir.convert(etp2, etp1, to="verl-legacy", layout={"tp": 2, "etp": 1})
    again = tmp_path / "again"
    ckpt_ir.convert(etp1, again, to="verl-legacy", layout={"tp": 2, "etp": 2})
    first, one, last = ({p.relative_to(d): _rank_state(p) for p in d.rglob("mp_rank_*/*.pt")}
                        for d in (etp2, etp1, again))
    assert sorted(first) == sorted(last) == sorted(one)
    for rel, state in first.items():
        assert list(last[rel]) == list(state)
        assert all(torch.equal(last[rel][k], v) for k, v in state.items()), rel
    # TE spec: grouped experts, linear_fc2.weight{k} [H, F / ETP].
    rank0 = sorted(one)[0]
    expert = "decoder.layers.0.mlp.experts.linear_fc2.weight0"
    assert one[rank0][expert].shape[-1] == 2 * first[rank0][expert].shape[-1]
    back = tmp_path / "hf"
    ckpt_ir.convert(etp1, back, to="hf")
    source, result = safetensors_bytes(hf), safetensors_bytes(back)
    assert result == source
