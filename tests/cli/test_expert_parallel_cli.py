"""Expert parallelism without flags: ``mp_rank_TT_NNN`` numbers pipeline or expert ranks, and
every command works it out (ckpt-ir's layout record, else the experts the files hold);
``--source-ep`` stays an override that every command honours."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import ckpt_ir
from ckpt_ir.cli import main
from ckpt_ir.converters.per_rank import LAYOUT_RECORD, resolve_rank_suffix
from ckpt_ir.errors import FormatError
from tests.fixtures import write_hf

# 4 experts, every layer routed, untied (mixtral).
MIXTRAL = dict(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=32,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=50, intermediate_size=24, num_local_experts=4,
               num_experts_per_tok=2, rms_norm_eps=1e-6, max_position_embeddings=64)


@pytest.fixture
def hf(tmp_path) -> Path:
    write_hf(tmp_path / "hf", MIXTRAL)
    return tmp_path / "hf"


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_ep_output_needs_no_source_ep_in_any_command(hf, tmp_path, capsys):
    dst = tmp_path / "actor"
    code, _, err = _run(["convert", str(hf), str(dst), "--to", "verl-legacy", "--tp", "2",
                         "--ep", "2"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (dst / "model").iterdir()) == [
        LAYOUT_RECORD, "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    record = json.loads((dst / "model" / LAYOUT_RECORD).read_text())
    assert (record["tp"], record["pp"], record["ep"]) == (2, 1, 2)
    code, out, err = _run(["inspect", str(dst), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["details"]["layout"] == "tp=2 pp=1 ep=2"
    code, out, err = _run(["verify", str(hf), str(dst)], capsys)
    assert code == 0, out + err
    code, out, err = _run(["convert", str(dst), str(tmp_path / "back"), "--to", "hf"], capsys)
    assert code == 0, err
    code, out, err = _run(["verify", str(hf), str(tmp_path / "back")], capsys)
    assert code == 0, out + err


@pytest.mark.parametrize("via", [
    ["--via", "verl-legacy", "--tp", "2", "--ep", "2"],
    ["--via", "megatron-legacy", "--ep", "2", "--etp", "1"],
], ids=["verl-legacy", "megatron-legacy"])
def test_roundtrip_through_expert_parallel_files(hf, capsys, via):
    code, out, err = _run(["verify", "--roundtrip", str(hf), *via], capsys)
    assert code == 0, out + err


def test_files_without_a_record_tell_ep_from_pp_by_their_experts(hf, tmp_path, capsys):
    # verl's own EP files carry no record: mp_rank_00_001 is expert rank 1 because each file
    # holds 2 of the 4 experts of a layer.
    ckpt_ir.convert(hf, tmp_path / "ep", to="verl-legacy", layout={"ep": 2})
    (tmp_path / "ep" / "model" / LAYOUT_RECORD).unlink()
    with ckpt_ir.open(tmp_path / "ep") as ckpt, ckpt_ir.open(hf) as ref:
        assert ckpt.tensors.keys() == ref.tensors.keys()
    code, out, err = _run(["verify", str(hf), str(tmp_path / "ep")], capsys)
    assert code == 0, out + err
    # The same names at PP=2: every file holds all 4 experts of its layers.
    ckpt_ir.convert(hf, tmp_path / "pp", to="verl-legacy", layout={"pp": 2})
    (tmp_path / "pp" / "model" / LAYOUT_RECORD).unlink()
    assert sorted(p.name for p in (tmp_path / "pp" / "model").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001"]
    code, out, err = _run(["verify", str(hf), str(tmp_path / "pp")], capsys)
    assert code == 0, out + err


def test_source_ep_overrides_the_record_in_verify(hf, tmp_path, capsys):
    ckpt_ir.convert(hf, tmp_path / "ep", to="verl-legacy", layout={"ep": 2})
    # --source-ep 1 says the suffix is the pipeline rank: both files then claim layers 0-1 of
    # two pipeline stages, which the config's 2 layers refuse. The flag reached the reader.
    code, _, err = _run(["verify", str(hf), str(tmp_path / "ep"), "--source-ep", "1"], capsys)
    assert code == 2
    assert "the rank files hold 4 layers, the config says 2" in err
    code, out, err = _run(["verify", str(hf), str(tmp_path / "ep"), "--source-ep", "2"], capsys)
    assert code == 0, out + err


def test_rank_suffix_from_the_experts_a_file_holds(tmp_path):
    kw = {"is_moe": True, "source_ep": None, "hint_pp": None, "hint_ep": None,
          "where": tmp_path, "num_experts": 8, "count": 4}
    assert resolve_rank_suffix(local_experts=2, **kw) == "ep"
    assert resolve_rank_suffix(local_experts=8, **kw) == "pp"
    with pytest.raises(FormatError, match=re.escape(
            "the first rank file holds 3 experts of a layer, which neither all 8 experts "
            "(pipeline ranks) nor 8 / 4 (expert ranks) explains; pass source_ep")):
        resolve_rank_suffix(local_experts=3, **kw)
    assert resolve_rank_suffix(local_experts=2, **{**kw, "source_ep": 1}) == "pp"
