"""What the per-rank formats (``verl-legacy``, ``megatron-legacy``) share: one file per rank.

Both store, per model-parallel rank, the plain ``state_dict()`` of each virtual-pipeline chunk of a
Megatron GPTModel: TP-sharded tensors, chunk-local layer indices, one directory per rank::

    mp_rank_{tp:02d}                   PP = 1, EP = 1
    mp_rank_{tp:02d}_{pp:03d}          PP > 1
    mp_rank_{tp:02d}[_{pp:03d}]_{ep:03d}   EP > 1 (appended)

They differ in the file name, in what else the file holds (Megatron-LM adds ``args``,
optimizer and RNG state) and in the tree around the rank directories; the format modules
(:mod:`~ckpt_ir.converters.verl_legacy`, :mod:`~ckpt_ir.converters.megatron_legacy`) supply those
through the hooks of :class:`PerRankReader` and :class:`PerRankWriter`.

Readers expose *full* native tensors with *global* layer indices (the ``mcore`` naming, or
``verl-native`` for verl's era A): ``read`` joins the TP shards of one tensor by the table row's
partition (:func:`ckpt_ir.layout.unshard`). Rank files are memory-mapped and loaded through the
restricted unpickler; only the pages of the shards being joined are touched, and
:meth:`PerRankReader.release` drops them after each unit of work.

Writers receive full native tensors one at a time (layer-major) and append each rank's shard to
that rank's file at once (:class:`~ckpt_ir.converters.storage.torch_zip.TorchZipWriter`), so at
most one tensor and its shards are in memory; a file is finished (its pickle and zip directory
written) as soon as its last tensor has arrived.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import reprlib
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ckpt_ir import dtypes
from ckpt_ir.architectures import lookup
from ckpt_ir.converters.base import SourceFiles, WriteOptions
from ckpt_ir.converters.expert_ranks import (
    global_expert_name,
    local_expert_index,
    local_expert_name,
    local_extra_state_module,
)
from ckpt_ir.converters.storage.hf_files import carried_source_files, load_hf_config
from ckpt_ir.converters.storage.torch_zip import TensorRef, TorchZipWriter
from ckpt_ir.detect import read_json_file
from ckpt_ir.dtypes import DType
from ckpt_ir.errors import (
    CheckpointError,
    CorruptCheckpointError,
    FormatError,
    IncompatibleLayoutError,
    InternalError,
    MissingConfigError,
)
from ckpt_ir.ir import ModelConfig, TensorSpec
from ckpt_ir.layout import (
    ParallelLayout,
    Partition,
    Placement,
    shard,
    unshard,
    unshard_shape,
)
from ckpt_ir.megatron_config import padded_vocab_size
from ckpt_ir.probes import find_config_dir
from ckpt_ir.safety.unpickler import load_torch, load_torch_buffer, map_file
from ckpt_ir.safety.unpickler.records import TensorRecord
from ckpt_ir.tables import PIPELINE_TAIL, Binding, NativeParams, Table, build_table

if TYPE_CHECKING:
    import torch

__all__ = [
    "EXTRA_STATE_MODULES",
    "LAYOUT_RECORD",
    "PerRankReader",
    "PerRankWriter",
    "RankKey",
    "list_entries",
    "load_rank_file",
    "parse_rank_dir",
    "rank_dir_name",
    "refuse_unsupported",
    "resolve_rank_suffix",
]

log = logging.getLogger(__name__)

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
# Tied-embedding copies a reader drops: the mcore last stage's output layer, verl era A's head.
_TIED_COPIES = (OUTPUT_LAYER, "lm_head.weight")

# Where each naming numbers its layers: "<prefix><layer>.<rest>".
LAYER_PREFIX: Mapping[str, str] = {"mcore": "decoder.layers.", "verl-native": "model.layers."}

# `_extra_state` entries of a GPTModel's state_dict(), by layer spec (measured on megatron-core
# 0.16.1 for the local spec; TE modules per verl-formats.md §3.2). Every layer has the
# per-layer ones; the chunk holding the output layer also has `output_layer._extra_state`
# (a tensor_parallel.ColumnParallelLinear in both specs, present even when embeddings are tied).
EXTRA_STATE_MODULES: Mapping[str, tuple[str, ...]] = {
    "local": ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1",
              "mlp.linear_fc2"),
    "te": ("self_attention.core_attention", "self_attention.linear_proj",
           "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2"),
}
_NORM_KEYS = {"self_attention.linear_qkv.layer_norm_weight": "te",
              "input_layernorm.weight": "local"}
_MLA_NORM_KEYS = {"self_attention.linear_kv_up_proj.layer_norm_weight": "te",
                  "self_attention.kv_layernorm.weight": "local"}

_RANK_DIR = re.compile(r"^mp_rank_(\d{2,})(?:_(\d{3,}))?(?:_(\d{3,}))?$")


# --------------------------------------------------------------------------------------------
# Rank directory names
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class RankKey:
    """One model-parallel rank: its tensor, pipeline and expert parallel ranks."""

    tp: int
    pp: int = 0
    ep: int = 0


def rank_dir_name(key: RankKey, layout: ParallelLayout) -> str:
    """``mp_rank_TT[_PPP][_EEE]``: PP appears when PP > 1, EP is appended when EP > 1."""
    name = f"mp_rank_{key.tp:02d}"
    if layout.pp > 1:
        name += f"_{key.pp:03d}"
    if layout.ep > 1:
        name += f"_{key.ep:03d}"
    return name


def parse_rank_dir(name: str, pattern: re.Pattern[str] = _RANK_DIR) -> tuple[int, ...] | None:
    """The numbers of an ``mp_rank_*`` directory name (or of a name ``pattern`` matches,
    one group a number), or None for other names."""
    m = pattern.match(name)
    if m is None:
        return None
    return tuple(int(g) for g in m.groups() if g is not None)


def list_entries(path: Path) -> list[Path]:
    """The entries of a directory of rank files or rank directories, sorted by name.

    Raises:
        CorruptCheckpointError: the directory cannot be listed.
    """
    try:
        return sorted(path.iterdir())
    except OSError as e:
        raise CorruptCheckpointError(f"cannot list {path}: {e}", path=path) from e


def load_rank_file(path: Path, *, trust: bool, metadata_only: bool = False
                   ) -> tuple[Any, mmap.mmap | None]:
    """One rank's ``torch.save`` file through the restricted unpickler, with the private
    mapping its tensors view (the caller keeps it open as long as the tensors); with
    ``trust``, through ``torch.load`` and no mapping. ``metadata_only``: tensors as
    :class:`~ckpt_ir.safety.unpickler.records.TensorRecord` s, without torch (``inspect``)."""
    if trust:
        return load_torch(path, trust=True), None
    buffer = map_file(path)
    return load_torch_buffer(buffer, path=str(path), metadata_only=metadata_only), buffer


def _is_tensor(value: Any) -> bool:
    """A tensor, or a tensor record of a metadata-only load (only a process that imported
    torch can hold a tensor)."""
    if isinstance(value, TensorRecord):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _as_tensor(value: Any) -> torch.Tensor:
    """A tensor record as the tensor a default load gives (a view of the mapped file)."""
    import torch

    if not isinstance(value, TensorRecord):
        return value
    storage = value.storage
    flat = torch.frombuffer(memoryview(storage.buffer), dtype=torch.uint8, count=storage.nbytes,
                            offset=storage.start) if storage.nbytes else \
        torch.empty(0, dtype=torch.uint8)
    return flat.view(value.dtype.torch).as_strided(value.shape, value.strides, value.offset)


def resolve_rank_suffix(*, is_moe: bool, source_ep: int | None,
                        hint_pp: int | None, hint_ep: int | None, where: Path,
                        num_experts: int = 0, local_experts: int | None = None,
                        count: int = 1) -> str:
    """Whether the second number of ``mp_rank_TT_NNN`` is the pipeline or the expert rank.

    With PP = 1 and EP > 1 the name is ``mp_rank_TT_EEE``, indistinguishable from
    ``mp_rank_TT_PPP``. Decided by, in order: an explicit ``source_ep``; parallel sizes saved
    with the checkpoint (ckpt-ir's layout record, Megatron-LM args); the model (a dense model
    has no expert ranks); what the files hold: a file of one of ``count`` expert ranks holds
    ``num_experts / count`` local experts of a layer, a pipeline stage's file all
    ``num_experts`` (``local_experts``, counted in the first rank file).
    """
    if source_ep is not None:
        return "ep" if source_ep > 1 else "pp"
    if hint_ep is not None and hint_ep > 1 and (hint_pp or 1) == 1:
        return "ep"
    if hint_pp is not None and hint_pp > 1:
        return "pp"
    if not is_moe:
        return "pp"
    if local_experts is not None and local_experts > 0:
        if local_experts == num_experts:
            return "pp"
        if count > 1 and local_experts * count == num_experts:
            return "ep"
        raise FormatError(
            f"{where}: the first rank file holds {local_experts} experts of a layer, which "
            f"neither all {num_experts} experts (pipeline ranks) nor {num_experts} / {count} "
            "(expert ranks) explains; pass source_ep (--source-ep N)", path=where)
    raise FormatError(
        f"{where}: rank directories named mp_rank_TT_NNN may number pipeline or expert ranks "
        "and nothing in the checkpoint says which; pass source_ep (--source-ep N)", path=where)


LAYOUT_RECORD = "ckpt_ir_layout.json"
"""ckpt-ir's record of the parallel layout, written beside the ``mp_rank_*`` directories of
MoE models (whose ``mp_rank_TT_NNN`` names may number pipeline or expert ranks), so reading
them back needs no ``--source-ep``. verl and Megatron-LM do not read it."""


def read_layout_record(root: Path) -> tuple[int | None, int | None]:
    """(PP, EP) from the layout record in ``root``; (None, None) without one."""
    path = root / LAYOUT_RECORD
    if not path.is_file():
        return None, None
    data = read_json_file(path)
    sizes = [data.get(k) for k in ("pp", "ep")]
    if not all(type(v) is int and v >= 1 for v in sizes):
        raise CorruptCheckpointError(f"{LAYOUT_RECORD} needs positive integers pp and ep, has "
                                     f"{sizes}", path=path)
    return sizes[0], sizes[1]


def read_layout_record_etp(root: Path) -> int | None:
    """The expert TP size in the layout record in ``root`` (None: no record, or one written
    before ckpt-ir recorded it)."""
    path = root / LAYOUT_RECORD
    if not path.is_file():
        return None
    etp = read_json_file(path).get("etp")
    if etp is not None and (type(etp) is not int or etp < 1):
        raise CorruptCheckpointError(f"{LAYOUT_RECORD} needs a positive integer etp, has "
                                     f"{etp!r}", path=path)
    return etp


def count_local_experts(chunks: Sequence[Mapping[str, Any]]) -> int | None:
    """Local experts of the first MoE layer in one rank file's chunks (None: no expert)."""
    for chunk in chunks:
        per_layer: dict[int, set[int]] = {}
        for key in chunk:
            found = local_expert_index(key)
            split = _split_layer(key.removeprefix("language_model."), "decoder.layers.")
            if found is not None and split is not None:
                per_layer.setdefault(split[0], set()).add(found)
        if per_layer:
            return len(per_layer[min(per_layer)])
    return None


def refuse_unsupported(fmt: str, config: ModelConfig, where: Path | None = None,
                       layout: ParallelLayout | None = None) -> None:
    """Refuse what these formats cannot hold as one file per (TP, PP, EP) rank.

    The files form a TP x PP x EP grid; routed experts in the file of TP rank ``t`` are expert
    TP piece ``t % ETP`` (megatron-core's rank ``t`` has expert TP rank ``t % ETP`` when ETP
    divides TP), so ETP=1 with TP=2 puts whole experts in both TP ranks' files. An ETP that
    does not divide TP has no such grid.
    """
    if layout is not None and config.is_moe and layout.tp % layout.expert_tp:
        raise IncompatibleLayoutError(
            f"{fmt} holds experts cut by an expert TP size that divides TP; expert "
            f"TP={layout.etp} with TP={layout.tp} is not supported (convert to mcore-dist for "
            "any expert layout)")


def _linear_module(name: str) -> str | None:
    """The megatron-core linear module a state-dict tensor belongs to (its ``_extra_state``
    owner), or None: ``linear_*`` / ``eh_proj`` weights and biases, and local experts."""
    module = local_extra_state_module(name)
    if module is not None:
        return module
    module, _, param = name.rpartition(".")
    leaf = module.rpartition(".")[2]
    if param in ("weight", "bias") and (leaf.startswith("linear_") or leaf == "eh_proj"):
        return module
    return None


def lm_prefix(config: ModelConfig) -> str:
    """The language model's module prefix in Megatron names: a VL model's
    (``language_model.``, its record's ``mcore_prefix``), "" for a GPTModel."""
    record = lookup(config.architecture)
    return record.mcore_prefix if record is not None else ""


def layer_prefix(naming: str, config: ModelConfig) -> str:
    """Where ``naming`` numbers the decoder layers of ``config``'s model."""
    return (lm_prefix(config) if naming == "mcore" else "") + LAYER_PREFIX[naming]


def _split_layer(name: str, prefix: str) -> tuple[int, str] | None:
    if not name.startswith(prefix):
        return None
    head, sep, rest = name[len(prefix):].partition(".")
    # ASCII digits only: "²".isdigit() is True but int("²") raises ValueError.
    if not sep or not (head.isascii() and head.isdigit()):
        return None
    return int(head), rest


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Source:
    """Where the shards of one global native tensor live."""

    pp: int
    chunk: int
    local: str
    partition: Partition
    blocks: tuple[int, ...] | None
    ep: int = 0  # the expert-parallel rank whose files hold it (routed experts)
    pieces: int = 1  # TP ranks 0..pieces-1 hold its pieces (TP, or ETP for routed experts)


class PerRankReader:
    """Reads a directory of ``mp_rank_*/<FILE_NAME>`` files as full native tensors.

    Subclasses set ``format`` and ``FILE_NAME`` and implement :meth:`_chunks` (the per-chunk
    state dicts of one loaded file); the other hooks have defaults.
    """

    format: ClassVar[str]
    naming: str = "mcore"
    per_rank: ClassVar[bool] = True
    FILE_NAME: ClassVar[str]

    def __init__(self, path: str | os.PathLike, *, hf_config: str | os.PathLike | None = None,
                 trust_pickles: bool = False, config_candidates: Sequence[Path] = (),
                 source_ep: int | None = None, metadata_only: bool = False) -> None:
        self.path = Path(path)
        self._trust = trust_pickles
        # inspect: tensors as records (no torch); read() refuses.
        self._metadata_only = metadata_only
        self._maps: dict[RankKey, mmap.mmap] = {}
        self._touched: set[RankKey] = set()
        self._dropped: dict[str, str] = {}
        self._notes: list[str] = []
        # Module layout of routed experts ("sequential" / "grouped"), seen while indexing.
        self.expert_layout: str | None = None
        files = self._rank_files()
        # The first rank file tells the era, the norm style and (Megatron-LM) the saved args.
        first_numbers = min(files)
        loaded = {first_numbers: self._load(files[first_numbers])}
        first = loaded[first_numbers][0]
        self._inspect_keys(self._checked_chunks(first, files[first_numbers]),
                           files[first_numbers])
        self._config_source, hf = self._find_config(hf_config, config_candidates, first)
        self.config = ModelConfig.from_hf(hf)
        refuse_unsupported(self.format, self.config, self.path)
        suffix = "pp"
        if any(len(n) == 2 for n in files):
            hint_pp, hint_ep = read_layout_record(self.path)
            if hint_pp is None:
                hint_pp, hint_ep = self._parallel_hints(first)
            suffix = resolve_rank_suffix(
                is_moe=self.config.is_moe, source_ep=source_ep, hint_pp=hint_pp,
                hint_ep=hint_ep, where=self.path, num_experts=self.config.num_experts,
                local_experts=count_local_experts(self._checked_chunks(
                    first, files[first_numbers])) if self.config.is_moe else None,
                count=1 + max(n[1] for n in files))
        keys = {self._rank_key(n, suffix): n for n in files}
        tp, pp, ep = (1 + max(getattr(k, f) for k in keys) for f in ("tp", "pp", "ep"))
        grid = ParallelLayout(tp, pp, ep=ep)
        for t in range(tp):
            for p in range(pp):
                for e in range(ep):
                    if RankKey(t, p, e) not in keys:
                        name = rank_dir_name(RankKey(t, p, e), grid)
                        raise CorruptCheckpointError(
                            f"rank file {name}/{self.FILE_NAME} is missing (directory names "
                            f"give TP={tp}, PP={pp}{f', EP={ep}' if ep > 1 else ''})",
                            path=self.path / name)
        self._files = {key: files[n] for key, n in keys.items()}
        self._state: dict[RankKey, list[Mapping[str, Any]]] = {}
        for key, numbers in sorted(keys.items()):
            obj, buffer = loaded.pop(numbers, None) or self._load(files[numbers])
            if buffer is not None:
                self._maps[key] = buffer
            self._state[key] = self._checked_chunks(obj, files[numbers])
        self._detect_value_head(pp)
        self._build_index(tp, pp, ep, self._expert_tp(first, tp, pp))

    def _detect_value_head(self, pp: int) -> None:
        """A one-row output layer is verl's critic value head (``LinearForLastLayer(H, 1)``,
        whole on every TP rank), whatever the saved HF config says: read the model as the
        token-classification model it is."""
        if self.config.is_value_model:
            return
        head = lm_prefix(self.config) + OUTPUT_LAYER if self.naming == "mcore" \
            else "lm_head.weight"
        for chunk in self._state[RankKey(0, pp - 1, 0)]:
            value = chunk.get(head)
            if _is_tensor(value) and value.dim() == 2 and value.shape[0] == 1 \
                    and self.config.vocab_size > 1:
                self.config = self.config.as_value_model(1)
                self._notes.append(f"{head} has one row: a value head (verl critic), read as "
                                   "score.weight of a token-classification model")
                return

    def _checked_chunks(self, obj: Any, path: Path) -> list[Mapping[str, Any]]:
        chunks = self._chunks(obj, path)
        for chunk in chunks:
            for bad in (k for k in chunk if not isinstance(k, str)):  # None is a key too
                raise CorruptCheckpointError(
                    f"{path} holds a state dict with a non-string key {reprlib.repr(bad)}",
                    path=path)
        return chunks

    # -- hooks for subclasses -----------------------------------------------------------------

    def _chunks(self, obj: Any, path: Path) -> list[Mapping[str, Any]]:
        """The state dict of every virtual-pipeline chunk in one loaded rank file."""
        raise NotImplementedError

    def _own_config_dirs(self) -> list[Path]:
        """Directories (beside the rank dirs) that may hold the HF config.json."""
        return []

    def _config_from_files(self, first: Any) -> tuple[str, dict[str, Any]] | None:
        """An HF config derived from what the rank files carry (Megatron-LM args)."""
        return None

    def _parallel_hints(self, first: Any) -> tuple[int | None, int | None]:
        """Saved pipeline / expert parallel sizes, when the files record them."""
        return None, None

    def _expert_tp_hint(self, first: Any) -> int | None:
        """The saved expert TP size, when the files record it."""
        return None

    def _expert_tp(self, first: Any, tp: int, pp: int) -> int:
        """The expert TP size the routed experts are cut by: ckpt-ir's layout record, else
        what the files record (Megatron-LM args), else the width of an expert's ``linear_fc2``
        weight ([H, F / ETP]) in TP rank 0's file."""
        if not self.config.is_moe or tp == 1:
            return tp
        etp = read_layout_record_etp(self.path)
        if etp is None:
            etp = self._expert_tp_hint(first)
        if etp is None:
            etp = self._expert_tp_from_shapes(tp, pp)
        if etp < 1 or tp % etp:
            raise CorruptCheckpointError(
                f"{self.path}: expert TP={etp} does not divide TP={tp} (the rank files hold "
                "experts cut by an expert TP size that divides TP)", path=self.path)
        return etp

    def _expert_tp_from_shapes(self, tp: int, pp: int) -> int:
        size = self.config.moe_intermediate_size
        for p in range(pp):
            for chunk in self._state[RankKey(0, p, 0)]:
                for key, value in chunk.items():
                    if local_expert_index(key) is None or ".linear_fc2.weight" not in key \
                            or not _is_tensor(value) or value.dim() != 2:
                        continue
                    width = value.shape[-1]
                    if not 0 < width <= size or size % width or tp % (size // width):
                        raise CorruptCheckpointError(
                            f"{key} is {width} columns wide, which no expert TP size dividing "
                            f"TP={tp} cuts the expert FFN size {size} into", path=self.path,
                            tensor=key)
                    return size // width
        return tp

    # -- scanning -------------------------------------------------------------------------------

    def _rank_files(self) -> dict[tuple[int, ...], Path]:
        files: dict[tuple[int, ...], Path] = {}
        for d in list_entries(self.path):
            numbers = parse_rank_dir(d.name)
            if numbers is None or not d.is_dir():
                continue
            f = d / self.FILE_NAME
            if not f.is_file():
                raise CorruptCheckpointError(f"{d.name}/ has no {self.FILE_NAME}", path=f)
            files[numbers] = f
        if not files:
            raise FormatError(f"no mp_rank_*/{self.FILE_NAME} files in {self.path}",
                              path=self.path)
        if len({len(n) for n in files}) > 1:
            raise CorruptCheckpointError(
                f"rank directories in {self.path} mix naming schemes "
                f"({', '.join(sorted({d.parent.name for d in files.values()})[:4])})",
                path=self.path)
        return files

    @staticmethod
    def _rank_key(numbers: tuple[int, ...], suffix: str) -> RankKey:
        if len(numbers) == 1:
            return RankKey(numbers[0])
        if len(numbers) == 3:
            return RankKey(*numbers)
        return RankKey(numbers[0], numbers[1], 0) if suffix == "pp" \
            else RankKey(numbers[0], 0, numbers[1])

    def _load(self, path: Path) -> tuple[Any, mmap.mmap | None]:
        """The unpickled file and the private mapping its tensors view (None when trusted)."""
        return load_rank_file(path, trust=self._trust, metadata_only=self._metadata_only)

    def _inspect_keys(self, chunks: list[Mapping[str, Any]], path: Path) -> None:
        """Naming (era) and norm style from the keys of the first rank file."""
        keys = [k for c in chunks for k in c]
        if not keys:
            raise CorruptCheckpointError(f"{path} holds no model tensors", path=path)
        # A megatron-core VL model (Megatron-Bridge's Qwen-VL) also keeps its language model
        # under language_model., with megatron-core's decoder.layers in every rank file; the
        # legacy Megatron-LM model has language_model.encoder.
        if any(k.startswith(("language_model.", "module.language_model.")) for k in keys) \
                and not any(k.startswith("language_model.decoder.") for k in keys):
            raise FormatError(f"{path} holds a legacy (non-megatron-core) Megatron-LM model "
                              "(language_model.* keys); only megatron-core GPTModel checkpoints "
                              "are supported", path=path)
        if any(k.startswith("model.") for k in keys):
            self.naming = "verl-native"
        self.norm_style = "te"
        # MLA layers have input_layernorm under both specs: their latent norms tell the spec.
        for k in keys:
            for suffix, style in _MLA_NORM_KEYS.items():
                if k.endswith(suffix):
                    self.norm_style = style
                    return
        for k in keys:
            for suffix, style in _NORM_KEYS.items():
                if k.endswith(suffix):
                    self.norm_style = style
                    return
        # Layers without an input norm (OLMo 2's post-norm layers) name no norm that tells the
        # spec; TE's attention has an _extra_state of its own that the local spec's lacks.
        extra = {k.rsplit(".", 2)[-2] for k in keys if k.endswith("._extra_state")}
        if "linear_qkv" in extra and "core_attention" not in extra:
            self.norm_style = "local"

    def _find_config(self, explicit: str | os.PathLike | None, candidates: Sequence[Path],
                     first: Any) -> tuple[str, dict[str, Any]]:
        if explicit is not None:
            return str(explicit), load_hf_config(Path(explicit))
        found = find_config_dir([*self._own_config_dirs(), *candidates])
        if found is not None:
            return str(found), load_hf_config(found)
        derived = self._config_from_files(first)
        if derived is not None:
            return derived
        raise MissingConfigError(
            f"{self.path} carries no model config (no config.json beside the rank files); "
            "pass --hf-config DIR", path=self.path)

    def _build_index(self, tp: int, pp: int, ep: int, etp: int) -> None:
        chunk_counts = {len(chunks) for chunks in self._state.values()}
        if len(chunk_counts) != 1:
            raise CorruptCheckpointError(
                f"rank files in {self.path} hold different numbers of virtual pipeline chunks "
                f"({sorted(chunk_counts)})", path=self.path)
        vpp = chunk_counts.pop()
        prefix = layer_prefix(self.naming, self.config)
        # Layers per chunk, from TP rank 0; every other TP rank must agree.
        sizes: list[list[int]] = []
        for p in range(pp):
            row = []
            for v in range(vpp):
                layers = {s[0] for k in self._state[RankKey(0, p, 0)][v]
                          if (s := _split_layer(k, prefix))}
                if layers != set(range(len(layers))):
                    raise CorruptCheckpointError(
                        f"{self._files[RankKey(0, p, 0)].parent.name} chunk {v} has layers "
                        f"{sorted(layers)}; expected local indices 0..n-1",
                        path=self._files[RankKey(0, p, 0)])
                row.append(len(layers))
            sizes.append(row)
        try:
            self.layout = ParallelLayout.from_chunk_sizes(sizes, tp=tp, ep=ep,
                                                          etp=None if etp == tp else etp)
        except IncompatibleLayoutError as e:
            raise CorruptCheckpointError(f"{self.path}: {e}", path=self.path) from e
        placement = self.layout.placement(sum(map(sum, sizes)))
        if placement.num_layers != self.config.num_layers:
            raise CorruptCheckpointError(
                f"the rank files hold {placement.num_layers} layers, the config says "
                f"{self.config.num_layers}", path=self.path)
        self._placement = placement
        # Partitions do not depend on the padded vocab, which is known only after this scan.
        provisional = build_table(self.naming, self.config,
                                  NativeParams(norm_style=self.norm_style))
        schema = self.config.schema()
        self._sources: dict[str, _Source] = {}
        self._specs: dict[str, TensorSpec] = {}
        for p in range(pp):
            for v in range(vpp):
                first_keys = set(self._state[RankKey(0, p, 0)][v])
                for t in range(1, tp):
                    other = set(self._state[RankKey(t, p, 0)][v])
                    if other != first_keys:
                        odd = sorted(other ^ first_keys)[:3]
                        raise CorruptCheckpointError(
                            f"TP ranks 0 and {t} of pipeline rank {p} hold different keys in "
                            f"chunk {v} (e.g. {odd})", path=self._files[RankKey(t, p, 0)])
                for e in range(ep):
                    keys = self._state[RankKey(0, p, e)][v]
                    if e and set(keys) != first_keys:
                        odd = sorted(set(keys) ^ first_keys)[:3]
                        raise CorruptCheckpointError(
                            f"EP ranks 0 and {e} of pipeline rank {p} hold different keys in "
                            f"chunk {v} (e.g. {odd})", path=self._files[RankKey(0, p, e)])
                    for key in keys:
                        self._index_key(key, p, v, tp, placement, provisional, schema, e, ep)
        emb = self._specs.get(lm_prefix(self.config) + EMBEDDING if self.naming == "mcore" else
                              "model.embed_tokens.weight")
        self.params = NativeParams(padded_vocab_size=emb.shape[0] if emb is not None else None,
                                   norm_style=self.norm_style)

    def _index_key(self, key: str, p: int, v: int, tp: int, placement: Placement, table: Table,
                   schema: Mapping[str, tuple[int, ...]], e: int = 0, ep: int = 1) -> None:
        prefix = layer_prefix(self.naming, self.config)
        split = _split_layer(key, prefix)
        name = key if split is None else \
            f"{prefix}{placement.global_layer(p, v, split[0])}.{split[1]}"
        expert = global_expert_name(name, e, self.config.num_experts, ep) \
            if self.config.is_moe and "_extra_state" not in key else None
        if expert is None and e:
            return  # EP ranks repeat every tensor but their experts; rank 0's copy is read
        if expert is not None:
            name, self.expert_layout = expert
        value = self._state[RankKey(0, p, e)][v][key]
        where = f"{self._files[RankKey(0, p, e)].parent.name} chunk {v}"
        if key.endswith("_extra_state"):
            self._dropped[name] = "extra state (TE FP8 metadata), not a weight"
            return
        if not _is_tensor(value):
            self._dropped[name] = f"non-tensor entry ({type(value).__name__})"
            return
        if name.removeprefix(lm_prefix(self.config)) in _TIED_COPIES and \
                self.config.shares_output_with_embedding:
            self._dropped[name] = ("tied to the input embedding: the last pipeline stage's copy "
                                   "of it")
            return
        if name in self._sources:
            raise CorruptCheckpointError(f"{name} appears in two pipeline chunks (again in "
                                         f"{where})", path=self.path, tensor=name)
        binding: Binding | None = table.by_native.get(name)
        partition = binding.partition if binding is not None else Partition.REPLICATED
        blocks = None
        if binding is not None and partition is Partition.BLOCKS:
            blocks = binding.transform.tp_blocks(
                {r: schema[binding.ir[r]] for r in binding.transform.roles})
        shapes, held = set(), set()
        for t in range(tp):
            shard_value = self._state[RankKey(t, p, e)][v].get(key)
            if not _is_tensor(shard_value):
                raise CorruptCheckpointError(
                    f"{key} of {where} is missing from TP rank {t}'s file",
                    path=self._files[RankKey(t, p, e)], tensor=key)
            shapes.add(tuple(shard_value.shape))
            # By name: a DType (a record) and a torch.dtype (a tensor: a rank file whose pickle
            # needed torch) print the same.
            held.add(str(shard_value.dtype))
        if len(shapes) != 1 or len(held) != 1:
            raise CorruptCheckpointError(
                f"TP ranks disagree on the shape or dtype of {key} in {where}: "
                f"{sorted(shapes)} {sorted(held)}", path=self.path, tensor=key)
        # Routed experts are cut by the expert TP size; TP ranks t and t + ETP hold one piece.
        pieces = self.layout.expert_tp if expert is not None else tp
        shape = unshard_shape(shapes.pop(), partition, pieces)
        if pieces < tp and partition is not Partition.REPLICATED:
            import torch  # a value comparison: records become views of the mapped files

            for t in range(pieces, tp):
                if not torch.equal(_as_tensor(self._state[RankKey(t, p, e)][v][key]),
                                   _as_tensor(self._state[RankKey(t % pieces, p, e)][v][key])):
                    raise CorruptCheckpointError(
                        f"{key} of {where} differs between TP ranks {t % pieces} and {t}, "
                        f"which hold the same expert TP piece (expert TP={pieces})",
                        path=self._files[RankKey(t, p, e)], tensor=key)
        self._sources[name] = _Source(p, v, key, partition, blocks, e, pieces)
        held_name = held.pop()
        dtype = dtypes.lookup(held_name.removeprefix("torch."))
        if dtype is None:  # dtypes.from_torch's refusal
            raise FormatError(f"dtype {held_name} is not supported")
        self._specs[name] = TensorSpec(name, shape, dtype)

    # -- Reader protocol ----------------------------------------------------------------------

    def tensors(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def dropped(self) -> Mapping[str, str]:
        return self._dropped

    def read(self, name: str) -> torch.Tensor:
        if self._metadata_only:
            raise InternalError(f"{self.path} was opened for its metadata only")
        source = self._sources.get(name)
        if source is None:
            raise FormatError(f"tensor {name!r} is not in {self.path}", tensor=name)
        keys = [RankKey(t, source.pp, source.ep) for t in range(source.pieces)]
        self._touched.update(keys)
        pieces = [self._state[k][source.chunk][source.local] for k in keys]
        return unshard(pieces, source.partition, blocks=source.blocks)

    def source_files(self) -> SourceFiles:
        src = Path(self._config_source)
        return carried_source_files([src]) if src.is_dir() else SourceFiles()

    def describe(self) -> dict[str, Any]:
        return {
            "layout": self.layout.describe(),
            "rank_files": len(self._files),
            "virtual_chunks": self.layout.vpp,
            "layers_per_chunk": [[len(r) for r in row] for row in self._placement.chunks],
            "naming": self.naming,
            "norm_style": self.norm_style,
            "padded_vocab_size": self.params.padded_vocab_size,
            "config_from": self._config_source,
            **({"notes": list(self._notes)} if self._notes else {}),
        }

    def release(self) -> None:
        for key in self._touched:
            buffer = self._maps.get(key)
            if buffer is not None:
                buffer.madvise(mmap.MADV_DONTNEED)
        self._touched.clear()

    def close(self) -> None:
        maps, self._maps = self._maps, {}
        self._state = {}
        for buffer in maps.values():
            try:
                buffer.close()
            except BufferError:
                pass  # a returned tensor still uses it; unmapped when that tensor dies


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _RankFile:
    """A rank file being written: its chunks' keys in state-dict order, refs as they come."""

    path: Path
    order: list[list[str]]
    refs: list[dict[str, TensorRef]]
    pending: int
    writer: TorchZipWriter | None = None


def expert_layout_option(options: WriteOptions, spec: str) -> str:
    """``sequential`` (SequentialMLP: ``local_experts.{k}.linear_fc1.weight``) or ``grouped``
    (TEGroupedMLP: ``linear_fc1.weight{k}``). Default: grouped for the TE spec (megatron-core's
    choice with ``moe_grouped_gemm``), sequential for the local spec (its only MoE module)."""
    return options.mcore_experts or ("grouped" if spec == "te" else "sequential")


def spec_option(options: WriteOptions) -> str:
    """``te`` or ``local``: the layer spec whose norm names and ``_extra_state`` keys to write.

    ``any`` (the CLI default) keeps the source's spec when it has one (TE otherwise).
    """
    spec: str = options.mcore_spec
    if spec == "any":
        source = options.source_params
        spec = source.norm_style if source is not None else "te"
        # torch_dist written by a local-spec model keeps the local spec.
        spec = {"local-dist": "local"}.get(spec, spec)
    return spec


class PerRankWriter:
    """Writes one ``<rank dir>/<FILE_NAME>`` per model-parallel rank, streaming.

    Subclasses set ``format`` and ``FILE_NAME`` and implement :meth:`_rank_root` (where the
    rank directories go), :meth:`_file_object` (what one file pickles, given its chunks) and
    :meth:`_finish_tree` (config, tokenizer, tracker).
    """

    format: ClassVar[str]
    naming: ClassVar[str] = "mcore"
    per_rank: ClassVar[bool] = True
    FILE_NAME: ClassVar[str]

    def __init__(self, directory: Path, config: ModelConfig, options: WriteOptions,
                 params: NativeParams | None = None) -> None:
        self.directory = Path(directory)
        self.config = config
        self.options = options
        self.layout = options.parallel_layout.for_model(config)
        self.spec = spec_option(options)
        self.expert_layout = expert_layout_option(options, self.spec)
        # The params the plan was built with (params_for runs once per conversion).
        self.params = params if params is not None else self.params_for(config, options)
        self.placement = self.layout.placement(config.num_layers)
        self._table = build_table(self.naming, config, self.params)
        self._schema = config.schema()
        self._files: dict[RankKey, _RankFile] = {}
        self._targets: dict[str, list[tuple[RankKey, int, str]]] = {}
        self._tied_targets: list[tuple[RankKey, int, str]] = []
        self._dtype: DType | None = None

    @classmethod
    def params_for(cls, config: ModelConfig, options: WriteOptions) -> NativeParams:
        """Norm names of the chosen spec; vocab padded on request, else kept as the source
        had it (when this layout's TP divides it), else unpadded. Validates the layout."""
        layout = options.parallel_layout.for_model(config)
        refuse_unsupported(cls.format, config, layout=layout)
        source = options.source_params
        if options.pad_vocab_to_multiple:
            padded = padded_vocab_size(config.vocab_size, options.pad_vocab_to_multiple)
        elif (source is not None and source.padded_vocab_size
              and source.padded_vocab_size >= config.vocab_size
              and source.padded_vocab_size % layout.tp == 0):
            padded = source.padded_vocab_size
        else:
            padded = config.vocab_size
        layout.check_model(config, padded)
        return NativeParams(padded_vocab_size=padded, norm_style=spec_option(options))

    # -- hooks --------------------------------------------------------------------------------

    def _rank_root(self) -> Path:
        """The directory that holds the ``mp_rank_*`` directories."""
        raise NotImplementedError

    def _file_object(self, key: RankKey, chunks: list[OrderedDict[str, Any]]) -> Any:
        """What one rank file pickles, given its per-chunk state dicts."""
        raise NotImplementedError

    def _finish_tree(self, source: Any) -> None:
        """Config, tokenizer and tracker files; called after every rank file is complete."""
        raise NotImplementedError

    # -- placement ------------------------------------------------------------------------------

    def _place(self, binding: Binding) -> tuple[int, int, str]:
        """(pipeline rank, chunk, local name) of one global native tensor."""
        prefix = layer_prefix(self.naming, self.config)
        if binding.layer is not None:
            p, v, local = self.placement.locate(binding.layer)
            split = _split_layer(binding.native, prefix)
            if split is None:
                raise InternalError(f"layer tensor {binding.native} is not named {prefix}N.*")
            return p, v, f"{prefix}{local}.{split[1]}"
        if binding.native.startswith(PIPELINE_TAIL):
            return self.layout.pp - 1, self.layout.vpp - 1, binding.native
        return 0, 0, binding.native

    def _rank_keys(self, p: int, ep_rank: int | None = None) -> list[RankKey]:
        """The rank files of pipeline stage ``p``: every TP rank of every EP rank (each EP rank
        repeats the dense tensors), or of EP rank ``ep_rank`` only (its experts)."""
        eps = range(self.layout.ep) if ep_rank is None else (ep_rank,)
        return [RankKey(t, p, e) for e in eps for t in range(self.layout.tp)]

    def begin(self, specs: Sequence[TensorSpec]) -> None:
        vpp = self.layout.vpp
        root = self._rank_root()
        for p in range(self.layout.pp):
            for key in self._rank_keys(p):
                path = root / rank_dir_name(key, self.layout) / self.FILE_NAME
                self._files[key] = _RankFile(path, [[] for _ in range(vpp)],
                                             [{} for _ in range(vpp)], 0)
        tied_copy = self.config.shares_output_with_embedding and self.layout.pp > 1
        for spec in specs:
            binding = self._table.by_native.get(spec.name)
            if binding is None:
                raise InternalError(f"{self.format} writer was told about {spec.name}, which "
                                    "the mcore table does not have")
            p, v, local = self._place(binding)
            ep_rank = None
            if binding.expert is not None:
                ep_rank, local = local_expert_name(local, self.config.num_experts,
                                                   self.layout.ep, self.expert_layout)
            self._targets[spec.name] = self._add_targets(p, v, local, ep_rank=ep_rank)
            if tied_copy and spec.name == lm_prefix(self.config) + EMBEDDING:
                # megatron-core keeps a synchronized copy of a tied embedding as the last
                # stage's output layer when PP > 1; its state dict has it, so strict loads
                # need it. Written when the embedding arrives, listed last in its chunk.
                self._tied_targets = self._add_targets(self.layout.pp - 1, vpp - 1,
                                                       lm_prefix(self.config) + OUTPUT_LAYER,
                                                       listed=False)
                self._targets[spec.name] += self._tied_targets
        for key, v, local in self._tied_targets:
            self._files[key].order[v].append(local)
        self._add_extra_state_keys()

    def _add_targets(self, p: int, v: int, local: str, *, listed: bool = True,
                     ep_rank: int | None = None) -> list[tuple[RankKey, int, str]]:
        targets = []
        for key in self._rank_keys(p, ep_rank):
            f = self._files[key]
            if listed:
                f.order[v].append(local)
            f.pending += 1
            targets.append((key, v, local))
        return targets

    def _add_extra_state_keys(self) -> None:
        """`_extra_state` after each layer's tensors, and the output layer's at the end of the
        chunk that holds the output layer (the last stage's last chunk)."""
        if self.config.is_moe or self.config.has_mla:
            self._add_module_extra_state_keys()
            return
        prefix = layer_prefix(self.naming, self.config)
        modules = EXTRA_STATE_MODULES[self.spec]
        last = (self.layout.pp - 1, self.layout.vpp - 1)
        for key, f in self._files.items():
            for v, order in enumerate(f.order):
                out: list[str] = []
                ends: dict[int, int] = {}
                for name in order:
                    split = _split_layer(name, prefix)
                    if split is not None:
                        ends[split[0]] = len(out) + 1
                    out.append(name)
                for layer in sorted(ends, reverse=True):
                    at = ends[layer]
                    out[at:at] = [f"{prefix}{layer}.{m}._extra_state" for m in modules]
                if (key.pp, v) == last and not self.config.is_value_model:
                    # verl's value head (LinearForLastLayer) is a torch Linear: no extra state.
                    out.append(lm_prefix(self.config) + "output_layer._extra_state")
                f.order[v] = out

    def _add_module_extra_state_keys(self) -> None:
        """MoE and MLA layers differ in their linear modules (routed and shared experts, MLA's
        four projections, MTP's eh_proj): each linear module's ``_extra_state`` follows its
        weight, as in the state dicts megatron-core 0.16.1 returns (the TE spec adds each
        attention's ``core_attention``)."""
        last = (self.layout.pp - 1, self.layout.vpp - 1)
        for key, f in self._files.items():
            for v, order in enumerate(f.order):
                out: list[str] = []
                seen: set[str] = set()
                for name in order:
                    out.append(name)
                    module = _linear_module(name)
                    if module is None or module in seen:
                        continue
                    seen.add(module)
                    out.append(f"{module}._extra_state")
                    if self.spec == "te" and module.endswith(".self_attention.linear_proj"):
                        out.append(module[: -len("linear_proj")] + "core_attention._extra_state")
                if (key.pp, v) == last and not self.config.is_value_model:
                    # verl's value head (LinearForLastLayer) is a torch Linear: no extra state.
                    out.append(lm_prefix(self.config) + "output_layer._extra_state")
                f.order[v] = out

    # -- writing ------------------------------------------------------------------------------

    def write(self, name: str, tensor: torch.Tensor) -> None:
        targets = self._targets.get(name)
        if targets is None:
            raise InternalError(f"{self.format} writer was not told about {name}")
        self._dtype = self._dtype or dtypes.of(tensor)
        binding = self._table.by_native[name]
        blocks = None
        if binding.partition is Partition.BLOCKS:
            blocks = binding.transform.tp_blocks(
                {r: self._schema[binding.ir[r]] for r in binding.transform.roles})
        # Routed experts are cut by the expert TP size; TP rank t holds piece t % ETP.
        cut = self.layout.expert_tp if binding.expert is not None else self.layout.tp
        pieces = shard(tensor, binding.partition, cut, blocks=blocks)
        for key, v, local in targets:
            f = self._files[key]
            if f.writer is None:
                f.path.parent.mkdir(parents=True, exist_ok=True)
                f.writer = TorchZipWriter(f.path)
            f.refs[v][local] = f.writer.add_tensor(pieces[key.tp % cut])
            f.pending -= 1
            if f.pending == 0:
                self._close_file(key, f)

    def _close_file(self, key: RankKey, f: _RankFile) -> None:
        import torch

        if f.writer is None:
            raise InternalError(f"{f.path} was never opened")
        chunks: list[OrderedDict[str, Any]] = []
        for v, order in enumerate(f.order):
            state: OrderedDict[str, Any] = OrderedDict()
            for local in order:
                ref = f.refs[v].get(local)
                if ref is None:
                    if not local.endswith("_extra_state"):
                        raise InternalError(f"{f.path}: {local} was never written")
                    # What TE's get_extra_state() returns without FP8, and what verl saved.
                    ref = f.writer.add_tensor(torch.empty(0, dtype=torch.uint8))
                state[local] = ref
            chunks.append(state)
        f.writer.close(self._file_object(key, chunks))
        f.writer = None
        f.refs = []

    def finish(self, source: Any) -> None:
        unfinished = [str(f.path) for f in self._files.values() if f.pending]
        if unfinished:
            raise InternalError(f"{self.format} writer finished with incomplete rank files: "
                                f"{unfinished[:3]}")
        self._write_layout_record()
        self._finish_tree(source)

    def _write_layout_record(self) -> None:
        """:data:`LAYOUT_RECORD` beside the rank directories of an MoE model."""
        if not self.config.is_moe:
            return  # a dense model's mp_rank_TT_NNN is always TP, PP
        layout = self.layout
        record = {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "ep": layout.ep,
                  "etp": layout.expert_tp, "expert_layout": self.expert_layout}
        root = self._rank_root()
        root.mkdir(parents=True, exist_ok=True)
        with open(root / LAYOUT_RECORD, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")

    # -- several processes (ckpt_ir.distributed, DistributedWriter) ---------------------------

    def file_of(self, name: str) -> str | None:
        """The group of files ``name`` lands in: one pipeline stage's rank files (a tensor goes
        to every TP rank of its stage), so one process writes a whole stage. The last stage joins
        the first when it holds a tied embedding's copy (written with the embedding)."""
        targets = self._targets.get(name)
        if not targets:
            raise InternalError(f"{self.format} writer was not told about {name}")
        stage = targets[0][0].pp
        if self._tied_targets and stage == self.layout.pp - 1:
            stage = 0
        return f"pipeline stage {stage}"

    def finish_rank(self) -> None:
        """Every rank file this process started is complete (files close as they fill)."""
        open_files = sorted(str(f.path) for f in self._files.values() if f.writer is not None)
        if open_files:
            raise InternalError(f"{self.format} writer finished with incomplete rank files "
                                f"{open_files[:3]}")

    def finish_all(self, source: Any, parts: Sequence[Any]) -> None:
        """After every process finished its stages: the config, tokenizer and tracker."""
        self._write_layout_record()
        self._finish_tree(source)

    def abort(self) -> None:
        for f in self._files.values():
            if f.writer is not None:
                try:
                    f.writer.abort()
                except (OSError, CheckpointError):
                    pass
                f.writer = None
