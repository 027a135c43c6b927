"""verl-legacy and megatron-legacy: file contents, era A, ambiguity, corrupt inputs, memory."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import weakref
from collections import OrderedDict
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

import ckpt_ir
from ckpt_ir.converters import per_rank
from ckpt_ir.converters.per_rank import resolve_rank_suffix
from ckpt_ir.converters.storage import torch_zip
from ckpt_ir.errors import (
    CorruptCheckpointError,
    FormatError,
    IncompatibleLayoutError,
    MissingConfigError,
)
from ckpt_ir.ir import ModelConfig
from ckpt_ir.layout import ParallelLayout
from ckpt_ir.safety.unpickler import load_torch
from tests.fixtures import TINY_LLAMA, write_hf
from tests.strategies import bits_equal

# 96 rows: TP 2, 3 and 4 divide the vocabulary without padding.
LLAMA4 = dict(TINY_LLAMA, num_hidden_layers=4, vocab_size=96)
QWEN2_TIED = dict(LLAMA4, model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                  tie_word_embeddings=True, num_key_value_heads=4, head_dim=8)


def _hf(tmp_path: Path, config: dict = LLAMA4, **kwargs) -> tuple[Path, dict]:
    state = write_hf(tmp_path / "hf", config, extra_files={"tokenizer.json": '{"t": 1}'},
                     **kwargs)
    return tmp_path / "hf", state


def _all_hf(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ---- what the files hold --------------------------------------------------------------------


def test_verl_files_hold_era_b_state_dicts_per_chunk(tmp_path):
    src, state = _hf(tmp_path, QWEN2_TIED)
    ckpt_ir.convert(src, tmp_path / "v", to="verl-legacy", mcore_spec="local",
                    layout={"tp": 2, "pp": 2})
    root = tmp_path / "v" / "model"
    assert sorted(p.name for p in root.iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    first = torch.load(root / "mp_rank_01_000" / "model.pt", weights_only=True)
    last = torch.load(root / "mp_rank_01_001" / "model.pt", weights_only=True)
    assert isinstance(first, list) and len(first) == 1
    emb = state["model.embed_tokens.weight"]
    assert bits_equal(first[0]["embedding.word_embeddings.weight"], emb[48:])
    # Local layer numbering on the second stage, local-spec norm names.
    q = state["model.layers.2.self_attn.q_proj.weight"]
    assert bits_equal(last[0]["decoder.layers.0.input_layernorm.weight"],
                      state["model.layers.2.input_layernorm.weight"])
    # Rank 1 holds KV groups 2 and 3 (MHA: one query head each): [q2 k2 v2 q3 k3 v3].
    qkv = last[0]["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert bits_equal(qkv[:8], q[16:24])
    # Tied embeddings at PP > 1: the last stage keeps the embedding's shard as its output layer,
    # after the final norm, as megatron-core's state_dict() lists it.
    keys = list(last[0])
    assert keys[-3:] == ["decoder.final_layernorm.weight", "output_layer.weight",
                         "output_layer._extra_state"]
    assert bits_equal(last[0]["output_layer.weight"], emb[48:])
    extra = [k for k in keys if k.endswith("_extra_state")]
    assert len(extra) == 2 * 4 + 1  # local spec: 4 per layer, plus the output layer's
    assert all(last[0][k].dtype == torch.uint8 and last[0][k].numel() == 0 for k in extra)
    # verl's own tree: the HF config and tokenizer beside model/.
    assert json.loads((tmp_path / "v" / "hf_config_and_tokenizer" / "config.json").read_text()
                      ) == QWEN2_TIED
    assert (tmp_path / "v" / "hf_config_and_tokenizer" / "tokenizer.json").is_file()


def test_tied_embeddings_at_pp1_have_no_output_layer(tmp_path):
    src, _ = _hf(tmp_path, QWEN2_TIED)
    ckpt_ir.convert(src, tmp_path / "v", to="verl-legacy", layout={"tp": 2})
    sd = torch.load(tmp_path / "v" / "model" / "mp_rank_00" / "model.pt", weights_only=True)[0]
    assert "output_layer.weight" not in sd and "output_layer._extra_state" in sd
    assert "decoder.layers.0.self_attention.core_attention._extra_state" in sd  # TE spec
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in sd


def test_megatron_files_hold_args_and_one_model_per_chunk(tmp_path):
    src, _ = _hf(tmp_path, dtype=torch.float16)
    r = ckpt_ir.convert(src, tmp_path / "m", to="megatron-legacy",
                        layout={"tp": 2, "pp": 2, "vpp": 2})
    assert r.dest_layout == "tp=2 pp=2 vpp=2"
    assert (tmp_path / "m" / "latest_checkpointed_iteration.txt").read_text() == "release"
    with torch.serialization.safe_globals([argparse.Namespace]):
        saved = torch.load(tmp_path / "m" / "release" / "mp_rank_01_001" /
                           "model_optim_rng.pt", weights_only=True)
    assert sorted(saved) == ["args", "checkpoint_version", "iteration", "model0", "model1"]
    args = saved["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
            args.virtual_pipeline_model_parallel_size) == (2, 2, 2)
    assert args.params_dtype == torch.float16 and args.fp16 and not args.bf16
    assert args.transformer_impl == "transformer_engine" and args.padded_vocab_size == 96
    assert saved["checkpoint_version"] == 3.0
    # Pipeline rank 1 holds layers 1 (chunk 0) and 3 (chunk 1), numbered locally.
    assert next(k for k in saved["model1"] if "layers" in k).startswith("decoder.layers.0.")
    assert "decoder.final_layernorm.weight" in saved["model1"]
    assert "decoder.final_layernorm.weight" not in saved["model0"]
    assert (tmp_path / "m" / "release" / "hf_config" / "tokenizer.json").is_file()


def test_megatron_config_from_args_alone(tmp_path):
    src, state = _hf(tmp_path)
    ckpt_ir.convert(src, tmp_path / "m", to="megatron-legacy", layout={"pp": 2})
    shutil.rmtree(tmp_path / "m" / "release" / "hf_config")
    ckpt_ir.convert(tmp_path / "m", tmp_path / "back", to="hf")
    got = _all_hf(tmp_path / "back")
    assert all(bits_equal(got[k], v) for k, v in state.items())
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (cfg["model_type"], cfg["vocab_size"], cfg["head_dim"]) == ("llama", 96, 12)


def test_padding_is_kept_on_reshard_and_stripped_on_request(tmp_path):
    src, _ = _hf(tmp_path, dict(LLAMA4, vocab_size=97))
    ckpt_ir.convert(src, tmp_path / "a", to="verl-legacy", layout={"tp": 2},
                    pad_vocab_to_multiple=8)
    ckpt_ir.convert(tmp_path / "a", tmp_path / "b", to="verl-legacy", layout={"tp": 4})
    with ckpt_ir.open(tmp_path / "b") as ckpt:
        assert ckpt.tensors["model.embed_tokens.weight"].shape == (97, 32)
    sd = torch.load(tmp_path / "b" / "model" / "mp_rank_03" / "model.pt", weights_only=True)[0]
    assert sd["embedding.word_embeddings.weight"].shape == (26, 32)  # 104 rows over 4 ranks
    ckpt_ir.convert(tmp_path / "b", tmp_path / "c", to="verl-legacy", layout={"tp": 1},
                    pad_vocab_to_multiple=1)
    sd = torch.load(tmp_path / "c" / "model" / "mp_rank_00" / "model.pt", weights_only=True)[0]
    assert sd["embedding.word_embeddings.weight"].shape == (97, 32)


# ---- verl era A -------------------------------------------------------------------------------


def write_era_a(root: Path, hf_config: dict, state: dict[str, torch.Tensor], tp: int,
                pp: int) -> None:
    """verl's March 2025 per-rank files: verl-native names, per-rank [q_t; k_t; v_t]."""
    cfg = ModelConfig.from_hf(hf_config)
    placement = ParallelLayout(tp, pp).placement(cfg.num_layers)
    for t in range(tp):
        for p in range(pp):
            sd: OrderedDict[str, torch.Tensor] = OrderedDict()
            if p == 0:
                sd["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].chunk(tp)[t]
            for local, layer in enumerate(placement.chunks[p][0]):
                h, n = f"model.layers.{layer}.", f"model.layers.{local}."
                sd[n + "input_layernorm.weight"] = state[h + "input_layernorm.weight"]
                for kind in (("weight",) if not cfg.has_qkv_bias else ("weight", "bias")):
                    sd[n + f"self_attn.qkv_proj.{kind}"] = torch.cat([
                        state[h + f"self_attn.{x}_proj.{kind}"].chunk(tp)[t] for x in "qkv"])
                sd[n + "self_attn.o_proj.weight"] = \
                    state[h + "self_attn.o_proj.weight"].chunk(tp, dim=1)[t]
                sd[n + "post_attention_layernorm.weight"] = \
                    state[h + "post_attention_layernorm.weight"]
                sd[n + "mlp.gate_up_proj.weight"] = torch.cat(
                    [state[h + "mlp.gate_proj.weight"].chunk(tp)[t],
                     state[h + "mlp.up_proj.weight"].chunk(tp)[t]])
                sd[n + "mlp.down_proj.weight"] = \
                    state[h + "mlp.down_proj.weight"].chunk(tp, dim=1)[t]
            if p == pp - 1:
                sd["model.norm.weight"] = state["model.norm.weight"]
                head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
                sd["lm_head.weight"] = head.chunk(tp)[t]  # era A always had its own head
            name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            (root / "model" / name).mkdir(parents=True)
            torch.save([{k: v.clone() for k, v in sd.items()}], root / "model" / name / "model.pt")
    (root / "hf_config_and_tokenizer").mkdir(parents=True)
    (root / "hf_config_and_tokenizer" / "config.json").write_text(json.dumps(hf_config))


@pytest.mark.parametrize(("config", "tp", "pp"), [(LLAMA4, 2, 2), (QWEN2_TIED, 2, 1),
                                                  (QWEN2_TIED, 4, 2)],
                         ids=["llama-tp2-pp2", "qwen2-tied-tp2", "qwen2-tied-tp4-pp2"])
def test_era_a_files_read_into_the_source_weights(tmp_path, config, tp, pp):
    state = write_hf(tmp_path / "hf", config)
    write_era_a(tmp_path / "a", config, state, tp, pp)
    r = ckpt_ir.convert(tmp_path / "a", tmp_path / "out", to="hf")
    assert r.source_format == "verl-legacy"
    got = _all_hf(tmp_path / "out")
    assert got.keys() == state.keys()
    assert all(bits_equal(got[k], v) for k, v in state.items())
    # ... and reshards into era B, the era verl's loader reads.
    ckpt_ir.convert(tmp_path / "a", tmp_path / "b", to="verl-legacy", layout={"tp": 1, "pp": 1})
    sd = torch.load(tmp_path / "b" / "model" / "mp_rank_00" / "model.pt", weights_only=True)[0]
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in sd


def test_era_a_is_explained_by_inspect(tmp_path, capsys):
    from ckpt_ir.cli import main

    state = write_hf(tmp_path / "hf", LLAMA4)
    write_era_a(tmp_path / "a", LLAMA4, state, 2, 1)
    assert main(["inspect", str(tmp_path / "a"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["details"]["naming"] == "verl-native"
    assert info["details"]["notes"] == ["era A (verl-native model names, before verl #884)"]
    assert info["details"]["layout"] == "tp=2 pp=1"


def test_era_a_has_no_qwen3_rows(tmp_path):
    qwen3 = dict(LLAMA4, model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    state = write_hf(tmp_path / "hf", LLAMA4)
    write_era_a(tmp_path / "a", LLAMA4, state, 1, 1)
    (tmp_path / "a" / "hf_config_and_tokenizer" / "config.json").write_text(json.dumps(qwen3))
    with pytest.raises(FormatError, match="no 'verl-native' mapping for architecture 'qwen3'"):
        ckpt_ir.convert(tmp_path / "a", tmp_path / "out", to="hf")


# ---- the mp_rank_TT_NNN ambiguity -----------------------------------------------------------


def test_rank_suffix_is_resolved_from_option_args_or_model(tmp_path):
    kw = {"hint_pp": None, "hint_ep": None, "where": tmp_path}
    assert resolve_rank_suffix(is_moe=True, source_ep=4, **kw) == "ep"
    assert resolve_rank_suffix(is_moe=True, source_ep=1, **kw) == "pp"
    assert resolve_rank_suffix(is_moe=True, source_ep=None, hint_pp=1, hint_ep=8,
                               where=tmp_path) == "ep"
    assert resolve_rank_suffix(is_moe=True, source_ep=None, hint_pp=2, hint_ep=None,
                               where=tmp_path) == "pp"
    assert resolve_rank_suffix(is_moe=False, source_ep=None, **kw) == "pp"
    with pytest.raises(FormatError, match=re.escape(
            "rank directories named mp_rank_TT_NNN may number pipeline or expert ranks and "
            "nothing in the checkpoint says which; pass source_ep (--source-ep N)")):
        resolve_rank_suffix(is_moe=True, source_ep=None, **kw)


def test_source_ep_is_only_for_per_rank_sources(tmp_path):
    src, _ = _hf(tmp_path)
    with pytest.raises(FormatError, match="source_ep applies to per-rank formats, not hf"):
        ckpt_ir.convert(src, tmp_path / "o", to="mcore-dist", source_ep=2)


# ---- corrupt and foreign inputs ---------------------------------------------------------------


@pytest.fixture()
def verl(tmp_path) -> Path:
    src, _ = _hf(tmp_path)
    ckpt_ir.convert(src, tmp_path / "v", to="verl-legacy", layout={"tp": 2, "pp": 2})
    return tmp_path / "v"


def _rewrite(path: Path, edit) -> None:
    obj = load_torch(path)
    obj = edit([{k: v.clone() for k, v in c.items()} for c in obj])
    path.unlink()
    torch.save(obj, path)


def test_missing_rank_file_is_named(verl, tmp_path):
    shutil.rmtree(verl / "model" / "mp_rank_01_000")
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            "rank file mp_rank_01_000/model.pt is missing (directory names give TP=2, PP=2)")):
        ckpt_ir.convert(verl, tmp_path / "o", to="hf")
    (verl / "model" / "mp_rank_01_000").mkdir()
    with pytest.raises(CorruptCheckpointError, match=re.escape("mp_rank_01_000/ has no model.pt")):
        ckpt_ir.convert(verl, tmp_path / "o", to="hf")


def test_inconsistent_rank_files_are_corrupt(verl, tmp_path):
    f = verl / "model" / "mp_rank_01_001" / "model.pt"
    saved = f.read_bytes()
    _rewrite(f, lambda chunks: chunks + chunks)
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            "hold different numbers of virtual pipeline chunks ([1, 2])")):
        ckpt_ir.convert(verl, tmp_path / "o", to="hf")
    f.write_bytes(saved)

    def shrink(chunks):
        chunks[0]["decoder.layers.0.mlp.linear_fc2.weight"] = \
            chunks[0]["decoder.layers.0.mlp.linear_fc2.weight"][:, :5]
        return chunks
    _rewrite(f, shrink)
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            "TP ranks disagree on the shape or dtype of decoder.layers.0.mlp.linear_fc2.weight "
            "in mp_rank_00_001 chunk 0")):
        ckpt_ir.convert(verl, tmp_path / "o", to="hf")
    f.write_bytes(saved)

    def drop(chunks):
        del chunks[0]["decoder.layers.1.mlp.linear_fc2.weight"]
        return chunks
    _rewrite(f, drop)
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            "TP ranks 0 and 1 of pipeline rank 1 hold different keys in chunk 0")):
        ckpt_ir.convert(verl, tmp_path / "o", to="hf")
    f.write_bytes(saved)
    f.unlink()
    torch.save(["not a state dict"], f)
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            "does not hold a list of state dicts (one per virtual pipeline chunk)")):
        ckpt_ir.convert(verl, tmp_path / "o", to="hf")


def test_layer_counts_megatron_cannot_produce_are_corrupt(tmp_path):
    src, _ = _hf(tmp_path, dict(LLAMA4, num_hidden_layers=3))
    ckpt_ir.convert(src, tmp_path / "v", to="verl-legacy", layout={"pp": 3})
    # Move the middle stage's layer to the first stage: stages 2 / 0 / 1 layers.
    first = tmp_path / "v" / "model" / "mp_rank_00_000" / "model.pt"
    middle = tmp_path / "v" / "model" / "mp_rank_00_001" / "model.pt"
    moved = {k.replace("layers.0.", "layers.1."): v.clone()
             for k, v in load_torch(middle)[0].items()}
    _rewrite(first, lambda c: [{**c[0], **moved}])
    middle.unlink()
    torch.save([{}], middle)
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            "layers per pipeline chunk [[2], [0], [1]] do not follow megatron-core's placement")):
        ckpt_ir.convert(tmp_path / "v", tmp_path / "o", to="hf")


def test_legacy_megatron_lm_models_are_refused_clearly(tmp_path):
    (tmp_path / "m" / "mp_rank_00").mkdir(parents=True)
    torch.save({"args": argparse.Namespace(), "model": {
        "language_model.embedding.word_embeddings.weight": torch.zeros(4, 2)}},
        tmp_path / "m" / "mp_rank_00" / "model_optim_rng.pt")
    with pytest.raises(FormatError, match=re.escape(
            "holds a legacy (non-megatron-core) Megatron-LM model (language_model.* keys)")):
        ckpt_ir.convert(tmp_path / "m", tmp_path / "o", to="hf",
                        hf_config=Path(__file__).parent)


# ---- memory -----------------------------------------------------------------------------------


def test_writer_keeps_no_tensor_after_writing_it(tmp_path, monkeypatch):
    """Shards go to disk as they are cut: nothing written stays referenced by the writer."""
    live: list[weakref.ref] = []
    checked = []
    add_tensor = torch_zip.TorchZipWriter.add_tensor
    write = per_rank.PerRankWriter.write

    def spy_add(self, tensor):
        live.append(weakref.ref(tensor))
        return add_tensor(self, tensor)

    def spy_write(self, name, tensor):
        write(self, name, tensor)
        # Refcounting frees shards at once (no gc.collect(): a shard kept alive only by a
        # reference cycle would still be memory held). Only the caller's own tensor, passed
        # through unsplit, may still be alive.
        alive = [r() for r in live if r() is not None]
        assert all(t is tensor for t in alive), f"{name}: shards kept after write"
        live.clear()
        checked.append(name)

    monkeypatch.setattr(torch_zip.TorchZipWriter, "add_tensor", spy_add)
    monkeypatch.setattr(per_rank.PerRankWriter, "write", spy_write)
    src, _ = _hf(tmp_path, QWEN2_TIED)
    ckpt_ir.convert(src, tmp_path / "v", to="megatron-legacy", layout={"tp": 2, "pp": 2})
    assert len(checked) > 10


BIG = dict(LLAMA4, hidden_size=512, intermediate_size=2048, num_attention_heads=8,
           num_key_value_heads=8, head_dim=64, vocab_size=8192, num_hidden_layers=2)


@pytest.fixture()
def big_verl(tmp_path) -> tuple[Path, int]:
    write_hf(tmp_path / "hf", BIG, dtype=torch.float32)
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "v", to="verl-legacy")
    size = (tmp_path / "v" / "model" / "mp_rank_00" / "model.pt").stat().st_size
    assert size > 40e6
    return tmp_path / "v", size


def test_reader_release_drops_the_pages_it_read(big_verl):
    from ckpt_ir.converters.verl_legacy import VerlLegacyReader

    path, size = big_verl
    proc = psutil.Process()
    reader = VerlLegacyReader(path / "model")
    try:
        base = proc.memory_info().rss
        for name in reader.tensors():
            reader.read(name).sum()  # zero-copy views (TP=1): faults the file's pages in
        touched = proc.memory_info().rss - base
        reader.release()
        released = proc.memory_info().rss - base
    finally:
        reader.close()
    assert touched > 0.5 * size, "reading did not map the file in; the test measures nothing"
    assert released < 0.1 * size


def test_conversion_holds_one_unit_not_the_rank_file(big_verl, tmp_path, monkeypatch):
    path, size = big_verl
    proc = psutil.Process()
    samples: list[int] = []
    release = per_rank.PerRankReader.release

    def spy_release(self):
        release(self)
        samples.append(proc.memory_info().rss)

    monkeypatch.setattr(per_rank.PerRankReader, "release", spy_release)
    base = proc.memory_info().rss
    ckpt_ir.convert(path, tmp_path / "dist", to="mcore-dist")
    assert len(samples) > 5
    assert max(samples) - base < 0.3 * size


def test_moe_expert_tp_not_dividing_tp_is_refused_up_front(tmp_path):
    """MoE rank files hold experts cut by an expert TP dividing TP (TP rank t holds piece
    t % ETP; tests/properties/test_moe_per_rank_round_trips.py); another has no grid."""
    mixtral = dict(LLAMA4, model_type="mixtral", architectures=["MixtralForCausalLM"],
                   num_local_experts=4, num_experts_per_tok=2)
    write_hf(tmp_path / "hf", mixtral)
    for fmt in ("verl-legacy", "megatron-legacy"):
        with pytest.raises(IncompatibleLayoutError, match=re.escape(
                f"{fmt} holds experts cut by an expert TP size that divides TP; expert TP=4 "
                "with TP=2 is not supported (convert to mcore-dist for any expert layout)")):
            ckpt_ir.convert(tmp_path / "hf", tmp_path / fmt, to=fmt,
                            layout={"tp": 2, "ep": 2, "etp": 4})
        assert not (tmp_path / fmt).exists()


def test_several_processes_write_the_same_rank_files(tmp_path):
    """torchrun: each process writes whole pipeline stages; the files equal one process's."""
    from tests.properties.test_per_rank_round_trips import rank_files
    from tests.unit.test_distributed import torchrun

    src, _ = _hf(tmp_path)
    ckpt_ir.convert(src, tmp_path / "single", to="megatron-legacy", layout={"tp": 2, "pp": 2})
    r = torchrun("convert", str(src), str(tmp_path / "multi"), "--to", "megatron-legacy",
                 "--tp", "2", "--pp", "2", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "written by 2 processes" in r.stdout
    assert rank_files(tmp_path / "multi") == rank_files(tmp_path / "single")
    assert (tmp_path / "multi" / "latest_checkpointed_iteration.txt").read_text() == "release"


def test_megatron_lm_args_without_rope_or_positions_are_not_guessed(tmp_path):
    write_hf(tmp_path / "hf", LLAMA4)
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "m", to="megatron-legacy", layout={"tp": 2})
    shutil.rmtree(tmp_path / "m" / "release" / "hf_config")
    for f in (tmp_path / "m" / "release").glob("mp_rank_*/model_optim_rng.pt"):
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(f, weights_only=True)
        del state["args"].max_position_embeddings, state["args"].rotary_base
        torch.save(state, f)
    with pytest.raises(MissingConfigError, match=re.escape(
            "the Megatron-LM args do not record max_position_embeddings, rope_theta; pass "
            "--hf-config DIR (the model's config.json)")):
        ckpt_ir.open(tmp_path / "m")
    with ckpt_ir.open(tmp_path / "m", hf_config=tmp_path / "hf") as ckpt:
        assert ckpt.config.num_layers == LLAMA4["num_hidden_layers"]
