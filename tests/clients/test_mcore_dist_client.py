"""ckpt-ir's ``mcore-dist`` output and input, proven with real megatron-core 0.16.1 (CPU, gloo).

- HF -> ``mcore-dist`` -> ``dist_checkpointing.load`` into a GPTModel built from
  :func:`ckpt_ir.megatron_config.megatron_args` at TP=1 and TP=2: the forward logits equal the
  transformers logits of the source model (fp32, max abs diff <= 1e-5).
- ``pad_vocab_to_multiple``: the padded checkpoint loads into a GPTModel with the padded vocab,
  and the first ``vocab_size`` logits equal HF's.
- megatron-core ``dist_checkpointing.save`` at TP=2 -> ``hf`` -> transformers ``from_pretrained``:
  the logits equal megatron's.
- HF -> ``mcore-dist`` -> HF reproduces every source tensor bit for bit.

megatron-core runs in subprocesses (one per rank, see ``mcore_harness``); one module fixture
prepares every checkpoint, then starts one TP=1 and one TP=2 launch that run all jobs, because
each megatron-core process start costs seconds. Each test then checks its own job, so a broken
architecture or variant fails only its tests, with the ranks' tracebacks.

Strictness: the ``local`` spec output loads under ``strict="raise_all"`` but for one key:
ckpt-ir also writes the ``common_state`` object that megatron-core >= 0.19 reads, which a 0.16.1
GPTModel does not request (plain ``raise_all`` fails with "Some keys found in the checkpoint are
missing in the provided sharded state dict. Missing keys (for all ranks): {'common_state'}").
So these loads use ``return_all`` and fail on any mismatch other than ``common_state``: every
key the model requests exists, nothing else is left over. The default output
(``mcore_spec="any"``) also carries the TE spec's ``core_attention._extra_state``, which a
local-spec model does not request; it is loaded under megatron-core's default strictness
(``assume_ok_unexpected``), as users do.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt_ir
from tests.clients import hf_models
from tests.clients.mcore_harness import HarnessError, job_result, launch
from tests.fixtures import Outcome, assert_same_hf, attempt

pytestmark = pytest.mark.clients

ATOL = 1e-5
VOCAB = hf_models.VOCAB_SIZE
PAD = 128

TP1_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
TP2_ARCHS = ("llama", "qwen2", "qwen3")
REVERSE_ARCHS = ("llama", "qwen3", "qwen2")  # GQA + untied, MQA + qk-norm, bias + tied

# Conversion variants: keyword arguments of ckpt_ir.convert(..., to="mcore-dist").
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "local": {"mcore_spec": "local"},
    "pad128": {"mcore_spec": "local", "pad_vocab_to_multiple": PAD},
}


@dataclass(frozen=True)
class LoadCase:
    """One megatron-core ``load-forward`` job."""

    tp: int
    arch: str
    variant: str
    strict: str
    model_pad: int | None = None  # the GPTModel's pad_vocab_to_multiple

    @property
    def allow_missing(self) -> list[str]:
        # Checkpoint keys a 0.16.1 GPTModel may leave unrequested under raise_all.
        return ["common_state"] if self.strict == "raise_all" else []

    @property
    def id(self) -> str:
        return f"tp{self.tp}-{self.arch}-{self.variant}"


STRICT_CASES = [
    *(LoadCase(1, a, "local", "raise_all") for a in TP1_ARCHS),
    # 301 rows cannot be split over 2 ranks: TP=2 needs a padded vocabulary.
    *(LoadCase(2, a, "pad128", "raise_all", model_pad=PAD) for a in TP2_ARCHS),
]
PAD_CASES = [LoadCase(1, a, "pad128", "raise_all", model_pad=PAD) for a in TP2_ARCHS]
DEFAULT_CASES = [
    *(LoadCase(1, a, "default", "assume_ok_unexpected") for a in TP1_ARCHS),
    # The unpadded checkpoint into a GPTModel padded to 302: megatron-core's embedding and
    # output layer accept a different global vocab (allow_shape_mismatch).
    *(LoadCase(2, a, "default", "assume_ok_unexpected", model_pad=2) for a in TP2_ARCHS),
]
LOAD_CASES = [*STRICT_CASES, *PAD_CASES, *DEFAULT_CASES]




@dataclass
class Suite:
    root: Path
    ids: list[list[int]]
    hf: dict[str, Path] = field(default_factory=dict)
    ref: dict[str, torch.Tensor] = field(default_factory=dict)
    dist: dict[tuple[str, str], Outcome] = field(default_factory=dict)
    launches: dict[int, Outcome] = field(default_factory=dict)

    def logits_path(self, key: str) -> Path:
        return self.root / "logits" / f"{key}.pt"

    def saved_dir(self, arch: str) -> Path:
        return self.root / "megatron" / arch

    def result(self, tp: int, key: str, *, needs: tuple[str, str] | None = None) -> torch.Tensor:
        if needs is not None:
            self.dist[needs].get(f"ckpt_ir.convert({needs[0]} -> mcore-dist, {needs[1]})")
        self.launches[tp].get(f"megatron-core launch at TP={tp}")
        try:
            return job_result(self.logits_path(key))
        except HarnessError as e:
            pytest.fail(str(e), pytrace=False)


def _convert_to_dist(suite: Suite, arch: str, variant: str) -> Path:
    dst = suite.root / "dist" / f"{arch}-{variant}"
    report = ckpt_ir.convert(suite.hf[arch], dst, to="mcore-dist", **VARIANTS[variant])
    assert report.dest_format == "mcore-dist"
    return dst


def _load_job(suite: Suite, case: LoadCase) -> dict[str, Any]:
    return {"command": "load-forward", "ckpt": str(suite.dist[case.arch, case.variant].value),
            "hf_config": str(suite.hf[case.arch] / "config.json"), "tp": case.tp,
            "pad_vocab_to_multiple": case.model_pad, "input_ids": suite.ids,
            "out": str(suite.logits_path(case.id)), "strict": case.strict,
            "allow_missing": case.allow_missing}


def _save_job(suite: Suite, arch: str) -> dict[str, Any]:
    return {"command": "save-random", "hf_config": str(suite.hf[arch] / "config.json"), "tp": 2,
            # Megatron-LM pads to a multiple of 128 * TP; the HF side must strip it again.
            "pad_vocab_to_multiple": PAD, "out_dir": str(suite.saved_dir(arch)),
            "logits_out": str(suite.logits_path(f"saved-{arch}")), "input_ids": suite.ids,
            "seed": 17}


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Suite:
    s = Suite(root=tmp_path_factory.mktemp("mcore_dist"), ids=hf_models.input_ids())
    for i, arch in enumerate(TP1_ARCHS):
        s.hf[arch] = hf_models.make_hf_model(arch, s.root / "hf", seed=i)
        s.ref[arch] = hf_models.hf_logits(s.hf[arch], s.ids)
    for case in LOAD_CASES:
        key = (case.arch, case.variant)
        if key not in s.dist:
            s.dist[key] = attempt(lambda a=case.arch, v=case.variant: _convert_to_dist(s, a, v))

    jobs: dict[int, list[dict[str, Any]]] = {1: [], 2: [_save_job(s, a) for a in REVERSE_ARCHS]}
    for case in dict.fromkeys(LOAD_CASES):
        if s.dist[case.arch, case.variant].error is None:
            jobs[case.tp].append(_load_job(s, case))
    # The two launches overlap: most of a rank's time is importing megatron-core.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {tp: pool.submit(attempt, lambda tp=tp: launch("batch", jobs[tp],
                                                                  world_size=tp))
                   for tp in jobs}
        s.launches = {tp: f.result() for tp, f in futures.items()}
    return s


def _assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    # Guard the tolerance's meaning: random weights are scaled so logits are O(1).
    assert expected.std() > 0.1, f"{what}: reference logits are nearly constant"
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs logit diff {diff:.3g} > {ATOL}"


@pytest.mark.parametrize("case", STRICT_CASES, ids=lambda c: c.id)
def test_mcore_dist_loads_strictly_and_matches_hf_logits(suite: Suite, case: LoadCase) -> None:
    logits = suite.result(case.tp, case.id, needs=(case.arch, case.variant))
    vocab = ckpt_ir.megatron_args(json.loads((suite.hf[case.arch] / "config.json").read_text()),
                                  pad_vocab_to_multiple=case.model_pad).gpt_model["vocab_size"]
    assert logits.shape[-1] == vocab
    _assert_logits_close(logits[..., :VOCAB], suite.ref[case.arch], case.id)


@pytest.mark.parametrize("case", PAD_CASES, ids=lambda c: c.id)
def test_padded_vocab_logits_match_hf(suite: Suite, case: LoadCase) -> None:
    logits = suite.result(case.tp, case.id, needs=(case.arch, case.variant))
    assert logits.shape[-1] == 384  # 301 padded to a multiple of 128
    _assert_logits_close(logits[..., :VOCAB], suite.ref[case.arch], case.id)


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=lambda c: c.id)
def test_default_output_loads_under_default_strictness(suite: Suite, case: LoadCase) -> None:
    logits = suite.result(case.tp, case.id, needs=(case.arch, case.variant))
    _assert_logits_close(logits[..., :VOCAB], suite.ref[case.arch], case.id)


@pytest.mark.parametrize("arch", REVERSE_ARCHS)
def test_megatron_saved_checkpoint_to_hf_matches_megatron_logits(
        suite: Suite, arch: str, tmp_path: Path) -> None:
    expected = suite.result(2, f"saved-{arch}")[..., :VOCAB]
    hf_out = tmp_path / "hf"
    report = ckpt_ir.convert(suite.saved_dir(arch), hf_out, to="hf", hf_config=suite.hf[arch])
    assert report.source_format == "mcore-dist"
    _assert_logits_close(hf_models.hf_logits(hf_out, suite.ids), expected, f"saved-{arch}")



ROUND_TRIPS = [(a, "default") for a in TP1_ARCHS] + [(a, "pad128") for a in TP2_ARCHS]


@pytest.mark.parametrize(("arch", "variant"), ROUND_TRIPS, ids=lambda v: v)
def test_hf_mcore_dist_hf_round_trip_is_bit_identical(
        suite: Suite, arch: str, variant: str, tmp_path: Path) -> None:
    dist = suite.dist[arch, variant].get(f"ckpt_ir.convert({arch} -> mcore-dist, {variant})")
    back = tmp_path / "hf"
    ckpt_ir.convert(dist, back, to="hf")  # the HF config travels inside the dist directory
    assert_same_hf(suite.hf[arch], back)
