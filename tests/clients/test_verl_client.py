"""verl 0.9.1 trees built by real megatron-core 0.16.1 GPTModels (TP=2, two gloo ranks).

verl's layout (/work/shared/reference/verl-formats.md §2.2, §2.4, §3.2): a dist-only save puts
the model in ``<role>/model/dist_ckpt`` and ``transformer_config.json`` beside it, with no HF
config; the critic is the same GPTModel with its output layer replaced by
``LinearForLastLayer(H, 1)``; the legacy era saved each rank's ``state_dict()`` as
``model/mp_rank_TT/model.pt``. The models are built and saved that way in
``tests/clients/verl_jobs.py``.

* A dist-only save of a tied model (qwen2, as small Qwen2.5) is refused with one line asking for
  ``--hf-config`` (its ``transformer_config.json`` has no rotary base and no sequence length);
  with it, the HF weights give the megatron model's logits; likewise for an untied llama.
* The critic, from ``model/dist_ckpt`` and from legacy per-rank files, converts to an HF
  ``Qwen2ForTokenClassification`` (``score.weight [1, H]``, ``num_labels: 1``) whose values
  from ``AutoModelForTokenClassification`` equal the megatron critic's; back from HF to
  ``mcore-dist`` and ``verl-legacy`` (TP=2) it loads into the megatron critic
  (``dist_checkpointing.load``, ``load_state_dict(strict=True)``) and gives the same values
  bit for bit. ``megatron-legacy`` round-trips the critic bit for bit.

Tolerance HF vs megatron: fp32, max abs difference <= 1e-5.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import ckpt_ir
from ckpt_ir.errors import MissingConfigError
from ckpt_ir.verify import roundtrip
from tests.clients import hf_models
from tests.clients.mcore_harness import job_result, launch

pytestmark = pytest.mark.clients

ATOL = 1e-5
TP = 2
VOCAB = 302  # verl never pads the vocabulary: TP must divide it
IDS = hf_models.input_ids(VOCAB)


def _config_dir(tmp: Path, arch: str) -> Path:
    d = tmp / f"{arch}-config"
    hf_models.hf_config(arch, vocab_size=VOCAB).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def verl_run(tmp_path_factory) -> dict[str, Path]:
    """A verl run saved by megatron-core: step 5 with an actor (tied qwen2, dist-only) and a
    critic (qwen2 base, value head), plus the critic's legacy per-rank files."""
    tmp = tmp_path_factory.mktemp("verl")
    qwen2 = _config_dir(tmp, "qwen2")
    llama = _config_dir(tmp, "llama")
    run = tmp / "run"
    step = run / "global_step_5"
    common = {"hf_config": str(qwen2 / "config.json"), "tp": TP, "input_ids": IDS}
    jobs = [
        {"command": "verl-save", **common, "seed": 3, "critic": False,
         "role": str(step / "actor"), "logits_out": str(tmp / "actor-logits.pt")},
        {"command": "verl-save", **common, "hf_config": str(llama / "config.json"), "seed": 5,
         "critic": False, "role": str(tmp / "run-llama" / "global_step_2" / "actor"),
         "logits_out": str(tmp / "llama-logits.pt")},
        {"command": "verl-save", **common, "seed": 4, "critic": True,
         "role": str(step / "critic"), "legacy": str(tmp / "legacy-critic"),
         "logits_out": str(tmp / "critic-values.pt")},
    ]
    launch("batch", jobs, world_size=TP)
    (run / "latest_checkpointed_iteration.txt").write_text("5")
    legacy = tmp / "legacy-critic"
    shutil.copytree(qwen2, legacy / "hf_config_and_tokenizer")  # verl #1562: base config
    return {"tmp": tmp, "qwen2": qwen2, "llama": llama, "run": run, "step": step,
            "legacy": legacy, "llama_run": tmp / "run-llama",
            "llama_logits": tmp / "llama-logits.pt",
            "actor_logits": tmp / "actor-logits.pt", "critic_values": tmp / "critic-values.pt"}


def _hf_logits(path: Path, ids) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def _hf_values(path: Path, ids) -> torch.Tensor:
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(path, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen2ForTokenClassification"
    assert model.num_labels == 1 and model.score.bias is None
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def test_dist_only_tied_save_asks_for_the_config_then_matches_megatron(verl_run):
    actor = verl_run["step"] / "actor"
    assert not (actor / "model" / "huggingface").exists()  # verl writes no HF config here
    with pytest.raises(MissingConfigError) as e:
        ckpt_ir.open(verl_run["run"])
    assert str(e.value) == (
        "transformer_config.json does not record max_position_embeddings, rope_theta; pass "
        f"--hf-config DIR (the model's config.json) [{actor / 'transformer_config.json'}]")
    out = verl_run["tmp"] / "actor-hf"
    ckpt_ir.convert(verl_run["run"], out, to="hf", hf_config=verl_run["qwen2"])
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["rope_theta"] == 1e6  # the user's, not a default
    want = job_result(verl_run["actor_logits"])
    got = _hf_logits(out, IDS)
    assert (got - want).abs().max().item() <= ATOL
    # verify honours --hf-config on both sides: the two are the same model.
    report = ckpt_ir.verify(out, verl_run["run"], hf_config=verl_run["qwen2"])
    assert report.equal, report.summary()


def test_dist_only_untied_save_keeps_its_output_layer(verl_run):
    out = verl_run["tmp"] / "llama-hf"
    # No tracker and no manifest (verl writes both; a copied role directory may lack them).
    ckpt_ir.convert(verl_run["llama_run"] / "global_step_2" / "actor", out, to="hf",
                    hf_config=verl_run["llama"])
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    got = _hf_logits(out, IDS)
    assert (got - job_result(verl_run["llama_logits"])).abs().max().item() <= ATOL


@pytest.fixture(scope="module")
def critic_outputs(verl_run) -> dict[str, Path]:
    """The critic converted by ckpt-ir: to HF from its dist_ckpt and from its legacy files,
    and from that HF model back to mcore-dist, verl-legacy (TP=2) and megatron-legacy."""
    tmp = verl_run["tmp"]
    out = {"hf": tmp / "critic-hf", "hf-legacy": tmp / "critic-hf-from-legacy",
           "dist": tmp / "critic-verl" / "global_step_1" / "critic",
           "verl-legacy": tmp / "critic-verl-legacy"}
    ckpt_ir.convert(verl_run["step"] / "critic", out["hf"], to="hf",
                    hf_config=verl_run["qwen2"])
    ckpt_ir.convert(verl_run["legacy"], out["hf-legacy"], to="hf")
    # A verl 0.9.1 role directory: megatron-core loads its model/dist_ckpt as verl does.
    ckpt_ir.convert(out["hf"], out["dist"], to="mcore-dist", verl_tree=True)
    # The local layer spec: TE cannot run on these CPU machines.
    ckpt_ir.convert(out["hf"], out["verl-legacy"], to="verl-legacy", layout={"tp": TP},
                    mcore_spec="local")
    return out


def test_critic_converts_to_hf_token_classification(verl_run, critic_outputs):
    want = job_result(verl_run["critic_values"])
    assert want.shape == (1, hf_models.SEQ_LEN, 1)
    for key in ("hf", "hf-legacy"):
        config = json.loads((critic_outputs[key] / "config.json").read_text())
        assert config["architectures"] == ["Qwen2ForTokenClassification"]
        assert config["id2label"] == {"0": "LABEL_0"}
        assert config["token_classification_bias"] is False
        got = _hf_values(critic_outputs[key], IDS)
        assert (got - want).abs().max().item() <= ATOL, key
    # Both sources hold the same weights, bit for bit.
    report = ckpt_ir.verify(critic_outputs["hf"], critic_outputs["hf-legacy"])
    assert report.equal, report.summary()
    with ckpt_ir.open(critic_outputs["hf"]) as ckpt:
        assert ckpt.config.is_value_model
        assert ckpt.tensors["score.weight"].shape == (1, 64)
        assert "lm_head.weight" not in ckpt.tensors


def test_critic_from_hf_loads_into_the_megatron_critic(verl_run, critic_outputs):
    tmp = verl_run["tmp"]
    common = {"hf_config": str(verl_run["qwen2"] / "config.json"), "tp": TP, "critic": True,
              "input_ids": IDS}
    jobs = [{"command": "verl-load", **common,
             "ckpt": str(critic_outputs["dist"] / "model" / "dist_ckpt"),
             "format": "mcore-dist", "out": str(tmp / "critic-dist-values.pt")},
            {"command": "verl-load", **common, "ckpt": str(critic_outputs["verl-legacy"]),
             "format": "verl-legacy", "out": str(tmp / "critic-legacy-values.pt")}]
    launch("batch", jobs, world_size=TP)
    want = job_result(verl_run["critic_values"])
    for name in ("critic-dist-values.pt", "critic-legacy-values.pt"):
        assert torch.equal(job_result(tmp / name), want), name


def test_critic_round_trips_through_every_per_rank_format(critic_outputs):
    for via, layout in (("verl-legacy", {"tp": 2}), ("megatron-legacy", {"tp": 2, "pp": 2})):
        report = roundtrip(critic_outputs["hf"], via, layout=layout)
        assert report.equal, report.summary()
    report = roundtrip(critic_outputs["dist"], "hf")
    assert report.equal, report.summary()
