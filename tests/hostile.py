"""Hostile inputs for the public entry points: the tables every hardening test iterates.

* :data:`SEEDS` builds valid checkpoints, once per process (copy them before changing a byte).
* :data:`UNTRUSTED` lists every file ckpt-ir parses from a checkpoint, with the seed holding it
  and how to mutate it; ``tests/fuzz/test_public_entry_points_fuzz.py`` fuzzes each row through
  ``ckpt_ir.open`` and ``ckpt_ir.convert``.
* :data:`PICKLE_SITES` lists every place a pickle is read from; the malicious-pickle tests plant
  a payload in each.
* :data:`DAMAGE` lists ways a file gets cut short or lost in transit (CLI exit-2 tests).

A new format joins all of them by adding a seed and rows here (verl-legacy rank ``.pt`` files,
megatron-legacy ``model_optim_rng.pt``, hf-peft ``adapter_config.json``).
"""

from __future__ import annotations

import argparse
import atexit
import builtins
import contextlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import tempfile
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import ckpt_ir
from ckpt_ir.converters.storage.dcp_files import DcpDataFile, DcpReader, write_metadata
from tests.fixtures import TINY_LLAMA, random_state, write_hf

# --------------------------------------------------------------------------------------------
# Seeds: valid checkpoints of every layout the readers take


def megatron_lm_args(config: dict[str, Any] | None = None) -> argparse.Namespace:
    """The model arguments Megatron-LM pickles into ``common.pt`` (as ``args``)."""
    c = config or TINY_LLAMA
    return argparse.Namespace(
        num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
        ffn_hidden_size=c["intermediate_size"], num_attention_heads=c["num_attention_heads"],
        group_query_attention=True, num_query_groups=c["num_key_value_heads"],
        kv_channels=c["head_dim"], padded_vocab_size=c["vocab_size"], vocab_size=None,
        untie_embeddings_and_output_weights=not c["tie_word_embeddings"], add_qkv_bias=False,
        qk_layernorm=False, norm_epsilon=1e-6, rotary_base=10000, max_position_embeddings=64,
        normalization="RMSNorm", params_dtype=torch.bfloat16)


def _hf(d: Path) -> None:
    write_hf(d)


def _hf_sharded(d: Path) -> None:
    write_hf(d, shards=3)


def _hf_bin(d: Path) -> None:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(TINY_LLAMA))
    torch.save(random_state(TINY_LLAMA), d / "pytorch_model.bin")


def _hf_fp8(d: Path) -> None:
    """A block-FP8 release of the tiny llama (DeepSeek's layout: ``weight_scale_inv`` beside
    each quantized linear weight, ``quantization_config`` in config.json)."""
    from ckpt_ir.quantization import is_fp8_linear, parse_quantization, quantize_fp8

    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
          "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}
    quant = parse_quantization({"quantization_config": qc})
    assert quant is not None
    state: dict[str, torch.Tensor] = {}
    for name, t in random_state(TINY_LLAMA).items():
        if is_fp8_linear(name, tuple(t.shape), quant):
            state[name], state[name + "_scale_inv"] = quantize_fp8(t)
        else:
            state[name] = t
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({**TINY_LLAMA, "quantization_config": qc}))
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})


def _mcore_dist(d: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_hf(Path(tmp) / "hf")
        ckpt_ir.convert(Path(tmp) / "hf", d, to="mcore-dist")


def _megatron_lm(d: Path) -> None:
    """torch_dist as Megatron-LM <= 0.18 saves it: the config only in common.pt's args."""
    _mcore_dist(d)
    shutil.rmtree(d / "hf_config")
    torch.save({"args": megatron_lm_args(), "checkpoint_version": 3.0, "iteration": 7},
               d / "common.pt")


def rewrite_common_state(d: Path, common: Any) -> None:
    """Re-write the DCP files of ``d`` with ``common`` as the ``common_state`` object (where
    megatron-core >= 0.19 keeps what older versions put in common.pt)."""
    with tempfile.TemporaryDirectory(dir=d.parent) as tmp:
        new = Path(tmp)
        with DcpReader(d) as reader, DcpDataFile(new) as data_file:
            for fqn, t in reader.index.tensors.items():
                for chunk in t.chunks:
                    data_file.add_tensor(fqn, chunk.offsets,
                                         reader.read_region(fqn, chunk.offsets, chunk.sizes))
            for fqn in reader.index.blobs:
                data_file.add_object(fqn, [common] if fqn == "common_state/shard_0_1"
                                     else reader.read_object(fqn))
            shapes = {fqn: (t.shape, t.dtype.torch) for fqn, t in reader.index.tensors.items()}
        write_metadata(new, data_file.close(), shapes)
        for name in ("__0_0.distcp", ".metadata"):
            os.replace(new / name, d / name)


def _megatron_019(d: Path) -> None:
    """torch_dist as megatron-core >= 0.19 saves it: no common.pt, args in the DCP object."""
    _mcore_dist(d)
    shutil.rmtree(d / "hf_config")
    (d / "common.pt").unlink()
    rewrite_common_state(d, {"args": megatron_lm_args(), "iteration": 7})


def _verl_legacy(d: Path) -> None:
    """verl's legacy per-rank layout at TP=2: model/mp_rank_0{0,1}/model.pt."""
    with tempfile.TemporaryDirectory() as tmp:
        write_hf(Path(tmp) / "hf")
        ckpt_ir.convert(Path(tmp) / "hf", d, to="verl-legacy", layout={"tp": 2},
                        pad_vocab_to_multiple=2)


def _megatron_legacy(d: Path) -> None:
    """Megatron-LM's legacy per-rank layout at TP=2, PP=2, its config only in the args."""
    with tempfile.TemporaryDirectory() as tmp:
        write_hf(Path(tmp) / "hf")
        ckpt_ir.convert(Path(tmp) / "hf", d, to="megatron-legacy", layout={"tp": 2, "pp": 2},
                        pad_vocab_to_multiple=2)
    shutil.rmtree(d / "release" / "hf_config")


def _hf_peft(d: Path) -> None:
    from tests.unit.test_adapters import write_adapter

    write_adapter(d)


def _hf_peft_bin(d: Path) -> None:
    from safetensors.torch import load_file

    _hf_peft(d)
    weights = d / "adapter_model.safetensors"
    torch.save(load_file(weights), d / "adapter_model.bin")
    weights.unlink()


def _verl_adapter(d: Path) -> None:
    """verl's LoRA files at TP=2: adapter_checkpoint/mp_rank_0{0,1}_adapter.pt."""
    from ckpt_ir.adapter_api import convert_adapter

    with tempfile.TemporaryDirectory() as tmp:
        _hf_peft(Path(tmp) / "peft")
        convert_adapter(Path(tmp) / "peft", d, "verl-legacy", layout={"tp": 2})


def _verl_v2(d: Path) -> None:
    """A verl v2 role directory: the model under model/huggingface, named by the manifest
    ckpt_contents.json (which verl writes last)."""
    write_hf(d / "model" / "huggingface")
    (d / "ckpt_contents.json").write_text(json.dumps({
        "schema_version": 2, "framework": "megatron", "role": "actor", "global_step": 5,
        "contents": {"model": {"path": "model/huggingface", "format": "huggingface"}}}))


def _verl_dist_only(d: Path) -> None:
    """A verl 0.9.1 dist-only role directory (model/dist_ckpt, transformer_config.json, the
    manifest), its HF config removed: the config is rebuilt from transformer_config.json."""
    with tempfile.TemporaryDirectory() as tmp:
        write_hf(Path(tmp) / "hf")
        ckpt_ir.convert(Path(tmp) / "hf", d, to="mcore-dist", verl_tree=True)
    shutil.rmtree(d / "model" / "huggingface")
    shutil.rmtree(d / "model" / "dist_ckpt" / "hf_config", ignore_errors=True)
    # What megatron-core's TransformerConfig lacks and Megatron-LM's args carry: recorded
    # here so that the unmutated seed converts.
    path = d / "transformer_config.json"
    config = json.loads(path.read_text())
    hf = json.loads(json.dumps(TINY_LLAMA))
    config.update(rotary_base=hf.get("rope_theta", 10000.0),
                  max_position_embeddings=hf.get("max_position_embeddings", 256))
    path.write_text(json.dumps(config))


def _from_hf(to: str, **options: Any) -> Callable[[Path], None]:
    """A seed ckpt-ir writes itself from the tiny llama (its writers are tested against the
    frameworks' own loaders elsewhere)."""

    def build(d: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            write_hf(Path(tmp) / "hf")
            ckpt_ir.convert(Path(tmp) / "hf", d, to=to, **options)

    return build


def _megatron_fsdp(d: Path) -> None:
    """A Megatron-FSDP fsdp_dtensor directory (``model.module.`` keys, uneven row boxes),
    built as tests/clients/mfsdp_models.py builds it, with its config.json beside it."""
    from ckpt_ir.converters.mcore_dist import McoreDistReader
    from tests.clients.mfsdp_models import (
        from_mcore_natives,
        fsdp_dtensor_state_dict,
        save_fsdp_dtensor,
    )

    with tempfile.TemporaryDirectory() as tmp:
        write_hf(Path(tmp) / "hf")
        ckpt_ir.convert(Path(tmp) / "hf", Path(tmp) / "dist", to="mcore-dist", mcore_spec="te")
        reader = McoreDistReader(Path(tmp) / "dist")
        try:
            natives = {n: reader.read(n).clone() for n in reader.tensors()}
        finally:
            reader.close()
        save_fsdp_dtensor(fsdp_dtensor_state_dict(from_mcore_natives(natives)), d)
        shutil.copy(Path(tmp) / "hf" / "config.json", d / "config.json")


def _verl_fsdp1(d: Path) -> None:
    """FSDP1 without a device mesh at W=2: ShardedTensor rank files pickled as torch writes
    them (tests/clients/fsdp1_files.py), ``fsdp_config.json`` and ``huggingface/``."""
    from tests.clients.fsdp1_files import fsdp1_rank_states, save_rank_file
    from tests.fixtures import load_hf_tensors

    with tempfile.TemporaryDirectory() as tmp:
        write_hf(Path(tmp) / "hf")
        shutil.copytree(Path(tmp) / "hf", d / "huggingface",
                        ignore=shutil.ignore_patterns("*.safetensors"))
        states = fsdp1_rank_states(load_hf_tensors(Path(tmp) / "hf"), 2)
    (d / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 1, "world_size": 2}))
    for rank, state in enumerate(states):
        save_rank_file(state, d / f"model_world_size_2_rank_{rank}.pt")


SEEDS: dict[str, Callable[[Path], None]] = {
    "hf": _hf,
    "hf-sharded": _hf_sharded,
    "hf-bin": _hf_bin,
    "mcore-dist": _mcore_dist,
    "megatron-lm": _megatron_lm,
    "megatron-0.19": _megatron_019,
    "verl-legacy": _verl_legacy,
    "megatron-legacy": _megatron_legacy,
    "hf-peft": _hf_peft,
    "hf-peft-bin": _hf_peft_bin,
    "verl-adapter": _verl_adapter,
    "verl-v2": _verl_v2,
    "verl-dist-only": _verl_dist_only,
    "hf-fp8": _hf_fp8,
    "torch-dcp": _from_hf("torch-dcp"),
    "verl-fsdp": _from_hf("verl-fsdp", fsdp_world_size=2),
    "megatron-fsdp": _megatron_fsdp,
    "verl-fsdp1": _verl_fsdp1,
}
VERL_FSDP_RANK = "model_world_size_2_rank_1.pt"
VERL_ADAPTER = "adapter_checkpoint/mp_rank_01_adapter.pt"

VERL_RANK = "model/mp_rank_01/model.pt"
MEGATRON_RANK = "release/mp_rank_00_001/model_optim_rng.pt"

_SEED_ROOT: list[Path] = []


def seed(name: str) -> Path:
    """The valid checkpoint ``name`` (built on first use; do not modify: copy it)."""
    if not _SEED_ROOT:
        _SEED_ROOT.append(Path(tempfile.mkdtemp(prefix="ckpt_ir_seeds_")))
        atexit.register(shutil.rmtree, _SEED_ROOT[0], ignore_errors=True)
    path = _SEED_ROOT[0] / name
    if not path.exists():
        SEEDS[name](path)
    return path


def copy_seed(name: str, dest: Path) -> Path:
    shutil.copytree(seed(name), dest)
    return dest


@cache
def seed_bytes(name: str, file: str) -> bytes:
    return (seed(name) / file).read_bytes()


# --------------------------------------------------------------------------------------------
# The tables


@dataclass(frozen=True)
class Untrusted:
    """A file ckpt-ir parses: which seed holds it, how to mutate it, where to convert to."""

    id: str
    seed: str
    file: str
    to: str
    kind: str = "bytes"  # "bytes" (byte mutations), "json" (structured + bytes), "pickle"
    model: bool = True  # a model (ckpt_ir.open / verify read it), not a LoRA adapter


UNTRUSTED: tuple[Untrusted, ...] = (
    Untrusted("safetensors", "hf", "model.safetensors", "mcore-dist"),
    Untrusted("safetensors-index", "hf-sharded", "model.safetensors.index.json", "mcore-dist",
              "json"),
    Untrusted("config.json", "hf", "config.json", "mcore-dist", "json"),
    Untrusted("pytorch_model.bin", "hf-bin", "pytorch_model.bin", "mcore-dist"),
    Untrusted(".metadata", "mcore-dist", ".metadata", "hf", "pickle"),
    Untrusted("distcp", "mcore-dist", "__0_0.distcp", "hf"),
    Untrusted("metadata.json", "mcore-dist", "metadata.json", "hf", "json"),
    Untrusted("common.pt", "megatron-lm", "common.pt", "hf", "pickle"),
    Untrusted("common_state", "megatron-0.19", "__0_0.distcp", "hf"),
    Untrusted("verl-rank.pt", "verl-legacy", VERL_RANK, "hf", "pickle"),
    Untrusted("megatron-rank.pt", "megatron-legacy", MEGATRON_RANK, "hf", "pickle"),
    Untrusted("megatron-tracker", "megatron-legacy", "latest_checkpointed_iteration.txt", "hf"),
    Untrusted("ckpt_contents.json", "verl-v2", "ckpt_contents.json", "mcore-dist", "json"),
    Untrusted("transformer_config.json", "verl-dist-only", "transformer_config.json", "hf",
              "json"),
    Untrusted("adapter_config.json", "hf-peft", "adapter_config.json", "mcore-dist", "json",
              model=False),
    Untrusted("adapter_model.safetensors", "hf-peft", "adapter_model.safetensors", "mcore-dist",
              model=False),
    Untrusted("verl-adapter.pt", "verl-adapter", VERL_ADAPTER, "hf-peft", "pickle", model=False),
    # Block FP8: quantization_config's fields and the weight / scale pairs are untrusted too.
    Untrusted("fp8-config.json", "hf-fp8", "config.json", "mcore-dist", "json"),
    Untrusted("fp8-safetensors", "hf-fp8", "model.safetensors", "mcore-dist"),
    # The FSDP / DCP formats: their metadata pickles, data files, rank files and configs.
    Untrusted("dcp.metadata", "torch-dcp", ".metadata", "hf", "pickle"),
    Untrusted("dcp-distcp", "torch-dcp", "__0_0.distcp", "hf"),
    Untrusted("verl-fsdp-rank.pt", "verl-fsdp", VERL_FSDP_RANK, "hf", "pickle"),
    Untrusted("fsdp_config.json", "verl-fsdp", "fsdp_config.json", "hf", "json"),
    Untrusted("fsdp-dtensor.metadata", "megatron-fsdp", ".metadata", "hf", "pickle"),
    Untrusted("fsdp-dtensor-distcp", "megatron-fsdp", "__0_0.distcp", "hf"),
    # FSDP1 ShardedTensor rank files: byte mutations (torch.load, which the "pickle" kind's
    # structured edits start from, needs a process group of the saved size for these).
    Untrusted("verl-fsdp1-rank.pt", "verl-fsdp1", VERL_FSDP_RANK, "hf"),
)


@dataclass(frozen=True)
class PickleSite:
    """A place a pickle is read from: ``plant(checkpoint, payload)`` hides ``payload`` there."""

    id: str
    seed: str
    plant: Callable[[Path, Any], None]
    to: str
    model: bool = True  # a model (ckpt_ir.open / verify read it), not a LoRA adapter


def _plant_metadata(d: Path, payload: Any) -> None:
    metadata = pickle.loads((d / ".metadata").read_bytes())  # our own file: trusted
    metadata.planner_data = {"evil": payload}
    (d / ".metadata").write_bytes(pickle.dumps(metadata))


def _plant_common_pt(d: Path, payload: Any) -> None:
    torch.save({"args": megatron_lm_args(), "iteration": 7, "evil": payload}, d / "common.pt")


def _plant_bin(d: Path, payload: Any) -> None:
    state = random_state(TINY_LLAMA)
    torch.save({**state, "model.evil": payload}, d / "pytorch_model.bin")


def _plant_common_state(d: Path, payload: Any) -> None:
    rewrite_common_state(d, {"args": megatron_lm_args(), "evil": payload})


def _planter(file: str) -> Callable[[Path, Any], None]:
    """Adds ``evil: payload`` to the (first) dict inside the torch file ``file``."""

    def plant(d: Path, payload: Any) -> None:
        obj = torch.load(d / file, weights_only=False)  # our own file: trusted
        target = obj[0] if isinstance(obj, list) else obj
        target["evil"] = payload
        torch.save(obj, d / file)

    return plant


PICKLE_SITES: tuple[PickleSite, ...] = (
    PickleSite(".metadata", "mcore-dist", _plant_metadata, "hf"),
    PickleSite("common.pt", "megatron-lm", _plant_common_pt, "hf"),
    PickleSite("pytorch_model.bin", "hf-bin", _plant_bin, "mcore-dist"),
    PickleSite("distcp-object", "megatron-0.19", _plant_common_state, "hf"),
    PickleSite("verl-rank.pt", "verl-legacy", _planter(VERL_RANK), "hf"),
    PickleSite("dcp.metadata", "torch-dcp", _plant_metadata, "hf"),
    PickleSite("megatron-rank.pt", "megatron-legacy", _planter(MEGATRON_RANK), "mcore-dist"),
    PickleSite("adapter_model.bin", "hf-peft-bin", _planter("adapter_model.bin"), "mcore-dist",
               model=False),
    PickleSite("verl-adapter.pt", "verl-adapter", _planter(VERL_ADAPTER), "hf-peft",
               model=False),
)


class OpensFile:
    """Creates ``sentinel`` when unpickled by a plain unpickler."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (str(self.sentinel), "w"))


class RunsShell(OpensFile):
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.sentinel}",))


class RunsPython(OpensFile):
    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.exec, (f"open({str(self.sentinel)!r}, 'w').close()",))


PAYLOADS: dict[str, tuple[type[OpensFile], str]] = {
    "open": (OpensFile, f"{builtins.open.__module__}.open"),
    "system": (RunsShell, f"{os.system.__module__}.system"),
    "exec": (RunsPython, "builtins.exec"),
}


# --------------------------------------------------------------------------------------------
# Raw pickle shapes no pickler writes (a Python pickler would recurse on them): planted as
# opcodes in place of a marker string


MARKER = "ckpt-ir-hostile-marker"


def deep_tuple(depth: int) -> bytes:
    return b"K\x00" + pickle.TUPLE1 * depth


def _put(i: int) -> bytes:
    # Memo slots far above the ones the surrounding pickle uses.
    return pickle.LONG_BINPUT + (1_000_000 + i).to_bytes(4, "little")


def _get(i: int) -> bytes:
    return pickle.LONG_BINGET + (1_000_000 + i).to_bytes(4, "little")


def shared_lists(levels: int) -> bytes:
    """l0 = []; l(i+1) = [li, li]: 2**levels nodes as a tree, 18 bytes a level as a pickle."""
    ops = pickle.EMPTY_LIST + _put(0) + pickle.POP
    for i in range(levels):
        ops += (pickle.EMPTY_LIST + pickle.MARK + _get(i) + _get(i) + pickle.APPENDS
                + _put(i + 1) + pickle.POP)
    return ops + _get(levels)


def deep_list(depth: int) -> bytes:
    # [[[...]]]: each level an EMPTY_LIST appended to the one below it when the MARKs close.
    return (pickle.EMPTY_LIST + pickle.MARK) * depth + pickle.APPENDS * depth


def _keyed(ops: bytes) -> bytes:
    return pickle.EMPTY_DICT + ops + pickle.BININT1 + b"\x01" + pickle.SETITEM


SHAPES: dict[str, bytes] = {
    # 1 MB: a 1,000,000-deep tuple used as a dict key (CPython hashes it by C recursion).
    "deep-key": _keyed(deep_tuple(1_000_000)),
    "deep-list": deep_list(100_000),
    "shared-lists": shared_lists(60),
    "shared-key": _keyed(pickle.NONE + b"".join(
        _put(0) + pickle.POP + _get(0) + _get(0) + pickle.TUPLE2 for _ in range(60))),
}
"""Opcode sequences that each push one object, by what they do to a consumer."""

FUZZ_SHAPES: dict[str, bytes] = {
    # Just past the bounds, and far past them, at the sizes a fuzz example can afford.
    "deep-tuple": deep_tuple(201),
    "deep-list": deep_list(5000),
    "deep-key": _keyed(deep_tuple(20_000)),
    "deep-frozenset": pickle.MARK + deep_tuple(300) + pickle.FROZENSET,
    "deep-dict-key": pickle.MARK + deep_tuple(300) + pickle.NONE + pickle.DICT,
    "shared-lists": shared_lists(40),
    "shared-key": _keyed(pickle.NONE + b"".join(
        _put(0) + pickle.POP + _get(0) + _get(0) + pickle.TUPLE2 for _ in range(40))),
    "cycle": pickle.EMPTY_LIST + _put(0) + _get(0) + pickle.APPEND,
}
"""Smaller shapes for the fuzz suite, which plants them anywhere inside a pickle."""


def replace_marker(pickled: bytes, ops: bytes) -> bytes:
    """``pickled`` (protocol 2) with each :data:`MARKER` string replaced by ``ops``."""
    text = MARKER.encode()
    spelled = pickle.BINUNICODE + len(text).to_bytes(4, "little") + text
    assert spelled in pickled, "marker not pickled as a protocol-2 BINUNICODE"
    return pickled.replace(spelled, ops)


def replace_marker_in_file(data: bytes, ops: bytes) -> bytes:
    """:func:`replace_marker` in a plain pickle or in the ``data.pkl`` of a torch.save zip."""
    if not data.startswith(b"PK"):
        # A plain pickle (DCP .metadata), re-pickled with protocol 2 (no frames to resize).
        return replace_marker(pickle.dumps(pickle.loads(data), protocol=2), ops)
    with zipfile.ZipFile(io.BytesIO(data)) as src:
        records = [(info.filename, src.read(info)) for info in src.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name, content in records:
            dst.writestr(name, replace_marker(content, ops) if name.endswith("data.pkl")
                         else content)
    return out.getvalue()


def plant_opcodes(site: PickleSite, d: Path, ops: bytes) -> None:
    """Plant ``ops`` (one object's opcodes) where ``site`` hides a payload in checkpoint ``d``."""
    site.plant(d, MARKER)
    [path] = [p for p in d.rglob("*") if p.is_file() and MARKER.encode() in p.read_bytes()]
    path.write_bytes(replace_marker_in_file(path.read_bytes(), ops))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])


@dataclass(frozen=True)
class Damage:
    """A checkpoint damaged in transit: ``apply`` breaks it; ``file`` must be named in the
    error."""

    id: str
    seed: str
    file: str
    apply: Callable[[Path], None]
    to: str


DAMAGE: tuple[Damage, ...] = (
    Damage("truncated-shard", "hf-sharded", "model-00002-of-00003.safetensors", _truncate,
           "mcore-dist"),
    Damage("missing-shard", "hf-sharded", "model-00003-of-00003.safetensors", Path.unlink,
           "mcore-dist"),
    Damage("truncated-safetensors", "hf", "model.safetensors", _truncate, "mcore-dist"),
    Damage("truncated-bin", "hf-bin", "pytorch_model.bin", _truncate, "mcore-dist"),
    Damage("truncated-distcp", "mcore-dist", "__0_0.distcp", _truncate, "hf"),
    Damage("truncated-common.pt", "megatron-lm", "common.pt", _truncate, "hf"),
    Damage("truncated-verl-rank", "verl-legacy", VERL_RANK, _truncate, "hf"),
    Damage("truncated-megatron-rank", "megatron-legacy", MEGATRON_RANK, _truncate,
           "mcore-dist"),
    Damage("missing-megatron-rank", "megatron-legacy", str(Path(MEGATRON_RANK).parent),
           shutil.rmtree, "hf"),
)


# --------------------------------------------------------------------------------------------
# Running hostile input: bounded time and memory


class Hang(BaseException):
    """Raised by the alarm of :func:`bounded`; a BaseException so no ``except Exception`` in
    the code under test can swallow it."""


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


@contextlib.contextmanager
def bounded(seconds: float = 30.0, peak_bytes: int = 64 * 2**20) -> Iterator[None]:
    """Fail if the body runs longer than ``seconds`` or allocates more than ``peak_bytes``:
    Python objects (tracemalloc) and native memory touched by torch (peak RSS, reset first)."""

    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    rss = _rss_kib("VmRSS")
    tracemalloc.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        python_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    native_peak = (_rss_kib("VmHWM") - rss) * 1024
    assert python_peak < peak_bytes, f"peak Python allocation {python_peak} bytes"
    assert native_peak < peak_bytes, f"peak RSS grew by {native_peak} bytes"


def siblings(dest: Path) -> list[str]:
    """What a conversion to ``dest`` left in its parent directory (temp dirs included)."""
    if not dest.parent.exists():
        return []
    return sorted(p.name for p in dest.parent.iterdir() if p.name.lstrip(".").startswith(
        dest.name))
