"""The format registry is the one list of formats; probes decide by evidence (issue #13)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from ckpt_ir.converters.base import Reader, Writer
from ckpt_ir.detect import resolve
from ckpt_ir.errors import FormatError
from ckpt_ir.formats import (
    ADAPTER_FORMATS,
    FORMAT_NAMES,
    FORMATS,
    PER_RANK_FORMATS,
    REGISTRY,
    WRITABLE_FORMATS,
    adapter_reader_class,
    adapter_writer_class,
    reader_class,
    spec,
    writer_class,
)
from ckpt_ir.probes import find_config_dir, is_dist_dir, is_fsdp_dtensor_dir, is_plain_dcp_dir
from tests.fixtures import write_hf


def test_every_list_derives_from_the_registry() -> None:
    ids = [s.id for s in REGISTRY]
    assert len(ids) == len(set(ids))
    # The values the CLI and the messages have always shown, now computed from the specs.
    assert FORMAT_NAMES == ("hf", "hf-peft", "mcore-dist", "torch-dcp", "verl-legacy",
                            "megatron-legacy", "verl-fsdp", "megatron-fsdp")
    assert WRITABLE_FORMATS == ("hf", "mcore-dist", "torch-dcp", "verl-legacy",
                                "megatron-legacy", "verl-fsdp", "hf-peft")
    assert PER_RANK_FORMATS == ("verl-legacy", "megatron-legacy")
    assert ADAPTER_FORMATS == ("hf-peft", "mcore-dist", "verl-legacy", "verl-fsdp")
    assert FORMATS == ("hf", "mcore-dist", "torch-dcp", "verl-legacy", "megatron-legacy",
                       "verl-fsdp", "megatron-fsdp")
    assert set(FORMAT_NAMES) == {s.id for s in REGISTRY if s.supported}


def test_cli_choices_are_the_registry_lists() -> None:
    from ckpt_ir.cli import build_parser

    parser, _ = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    convert = {a.dest: a for a in sub["convert"]._actions}
    assert tuple(convert["to"].choices) == WRITABLE_FORMATS
    assert tuple(convert["source_format"].choices) == FORMAT_NAMES
    verify = {a.dest: a for a in sub["verify"]._actions}
    assert tuple(verify["via"].choices) == WRITABLE_FORMATS


def _methods(protocol: type) -> list[str]:
    return [m for m, v in vars(protocol).items() if callable(v) and not m.startswith("_")]


@pytest.mark.parametrize("name", FORMATS)
def test_model_classes_named_by_the_specs_exist(name: str) -> None:
    reader = reader_class(name)
    # The protocols carry data members, so issubclass() cannot check them: their methods.
    assert all(callable(getattr(reader, m, None)) for m in _methods(Reader))
    assert reader.__name__ == spec(name).reader
    if spec(name).writer is None:  # megatron-fsdp: read, not written
        assert name not in WRITABLE_FORMATS
        return
    writer = writer_class(name)
    assert all(callable(getattr(writer, m, None)) for m in _methods(Writer))
    assert writer.__name__ == spec(name).writer


@pytest.mark.parametrize("name", ADAPTER_FORMATS)
def test_adapter_classes_named_by_the_specs_exist(name: str) -> None:
    assert adapter_reader_class(name).__name__ == spec(name).adapter_reader
    if spec(name).adapter_writer is None:  # verl-fsdp: adapters are read, not written
        with pytest.raises(FormatError, match="cannot hold LoRA adapters"):
            adapter_writer_class(name)
    else:
        assert adapter_writer_class(name).__name__ == spec(name).adapter_writer


def test_the_registry_refuses_what_it_cannot_do() -> None:
    with pytest.raises(FormatError, match="holds a LoRA adapter, not a model"):
        reader_class("hf-peft")
    # Megatron-FSDP is read only: a reader, never a --to destination.
    assert reader_class("megatron-fsdp").__name__ == "MegatronFsdpReader"
    assert "megatron-fsdp" not in WRITABLE_FORMATS
    with pytest.raises(FormatError, match="megatron-fsdp"):
        writer_class("megatron-fsdp")
    with pytest.raises(FormatError, match="cannot hold LoRA adapters"):
        adapter_writer_class("megatron-legacy")
    with pytest.raises(FormatError, match=r"unknown format 'zarr'; expected one of hf, "):
        spec("zarr")


def _metadata(d: Path, *keys: str) -> Path:
    d.mkdir()
    (d / ".metadata").write_bytes(pickle.dumps(list(keys), protocol=4))
    return d


def test_torch_dist_and_plain_dcp_are_told_apart_by_evidence(tmp_path: Path) -> None:
    qkv = "decoder.layers.self_attention.linear_qkv.weight"
    # Megatron names without metadata.json: a torch_dist save not finished yet, still
    # torch_dist (the reader and save_state report it as incomplete).
    assert is_dist_dir(_metadata(tmp_path / "mcore", qkv, "embedding.word_embeddings.weight"))
    assert is_dist_dir(_metadata(tmp_path / "optim", "optimizer.state.exp_avg." + qkv))
    # HF names under FSDP2, torchtitan names, and OPT's model.decoder.* are not Megatron's.
    for name, keys in {"fsdp2": ("model.embed_tokens.weight", "lm_head.weight"),
                       "titan": ("tok_embeddings.weight", "layers.0.attention.wq.weight"),
                       "opt": ("model.decoder.layers.0.fc1.weight",)}.items():
        d = _metadata(tmp_path / name, *keys)
        assert is_plain_dcp_dir(d) and not is_dist_dir(d), name
    # metadata.json is megatron-core's own mark, whatever .metadata holds.
    (tmp_path / "fsdp2" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    assert is_dist_dir(tmp_path / "fsdp2") and not is_plain_dcp_dir(tmp_path / "fsdp2")
    assert resolve(tmp_path / "mcore").format == "mcore-dist"
    assert resolve(tmp_path / "titan").format == "torch-dcp"
    # Megatron-FSDP's fsdp_dtensor: DCP files, no metadata.json, model.module.<mcore> keys.
    fsdp = _metadata(tmp_path / "fsdp_dtensor", "model.module.decoder.layers.0.mlp."
                     "linear_fc1.weight", "model.module.embedding.word_embeddings.weight")
    assert is_fsdp_dtensor_dir(fsdp) and not is_plain_dcp_dir(fsdp) and not is_dist_dir(fsdp)
    assert resolve(fsdp).format == "megatron-fsdp"


def test_probe_order_keeps_an_adapter_with_base_weights_an_adapter(tmp_path: Path) -> None:
    d = tmp_path / "peft"
    write_hf(d)
    assert resolve(d).format == "hf"
    (d / "adapter_config.json").write_text("{}")
    assert resolve(d).format == "hf-peft"


def test_find_config_dir_takes_the_first_directory_with_a_config(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in "abc")
    a.mkdir()
    b.mkdir()
    c.mkdir()
    (b / "config.json").write_text("{}")
    (c / "config.json").write_text("{}")
    assert find_config_dir([tmp_path / "missing", a, c, b]) == c
    assert find_config_dir([a, b / "config.json"]) is None
