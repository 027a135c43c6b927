"""What a directory holds, from names and a few bytes: the evidence format probes use.

Torch-free and unpickling nothing, so detection, ``inspect``'s tree and the CLI's argument
checks stay cheap. :mod:`ckpt_ir.formats` builds each format's probe from these;
:mod:`ckpt_ir.detect` walks run / step / role directories asking them. The HF-config lookup
every reader shares (:func:`find_config_dir`) lives here too: it is the same kind of look.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ckpt_ir.errors import CheckpointError
from ckpt_ir.safety.files import read_bytes

__all__ = ["ADAPTER_DIR", "dist_has_adapter", "dist_key_kinds", "find_config_dir",
           "has_mlm_rank_files", "has_rank_dirs", "has_verl_adapter_files",
           "is_dcp_sharded_safetensors_dir", "is_dist_dir", "is_fsdp_dtensor_dir", "is_hf_dir",
           "is_peft_dir", "is_plain_dcp_dir", "verl_fsdp_key_kinds", "verl_fsdp_layout",
           "verl_fsdp_world_sizes"]

RANK_DIR = re.compile(r"^mp_rank_\d{2}(_\d{3})?(_\d{3})?$")
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")
ADAPTER_DIR = "adapter_checkpoint"
_ADAPTER_FILE = re.compile(r"^mp_rank_\d{2}(_\d{3})?(_\d{3})?_adapter\.pt$")


def is_hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and any((p / n).is_file() for n in HF_WEIGHTS)


def is_peft_dir(p: Path) -> bool:
    return (p / "adapter_config.json").is_file()


# Megatron model keys start with one of these; a pickled `.metadata` holds each as a string,
# after a length or opcode byte. Inside a longer dotted name (optimizer.state.exp_avg.<key>)
# the same text is optimizer state, not a model key.
_KEY_STARTS = (b"embedding.", b"decoder.", b"output_layer.")
_KEY_TAIL = re.compile(rb"[\w.]*")
_WORD = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _dist_keys(raw: bytes) -> Iterator[bytes]:
    """The Megatron model and adapter key names in ``.metadata`` bytes (str.find, not a
    regular expression scan: a few ms for a large index)."""
    for start in _KEY_STARTS:
        i = raw.find(start)
        while i >= 0:
            end = _KEY_TAIL.match(raw, i).end()
            if not (i >= 2 and raw[i - 1] == 0x2E and raw[i - 2] in _WORD):
                yield raw[i:end]
            i = raw.find(start, end)


def _is_adapter_key(key: bytes) -> bool:
    return b".adapter.linear_" in key or b".adapter.adapter_" in key \
        or b".adapter.weight_magnitude" in key


def _metadata_bytes(p: Path) -> bytes | None:
    """The bytes of ``p/.metadata`` (the one peek at them; nothing unpickled), None when they
    cannot be read: the torch_dist reader then says why."""
    try:
        return read_bytes(p / ".metadata")
    except CheckpointError:
        return None


def dist_key_kinds(p: Path) -> tuple[bool, bool]:
    """``(has base model weights, has Megatron-Bridge LoRA adapter tensors)`` of a torch_dist
    directory, from the key names in its ``.metadata`` (bytes peeked, nothing unpickled)."""
    raw = _metadata_bytes(p)
    if raw is None:
        return True, False  # the reader then says what is wrong with it
    # Stop at the first model key unless adapter names may follow (then at one of each).
    maybe_adapter = b".adapter." in raw
    model = adapter = False
    for key in _dist_keys(raw):
        if _is_adapter_key(key):
            adapter = True
        else:
            model = True
        if model and (adapter or not maybe_adapter):
            break
    return model, adapter


def dist_has_adapter(p: Path) -> bool:
    """Whether a torch_dist dir holds Megatron-Bridge LoRA tensors (names peeked, not unpickled)."""
    return dist_key_kinds(p)[1]


_OPTIMIZER_STATES = (b"exp_avg", b"exp_avg_sq", b"fp32_param")


def _megatron_keys(p: Path) -> bool:
    """Whether ``p/.metadata`` names Megatron-Core parameters (or optimizer state of them):
    ``decoder.layers...``, ``optimizer.state.exp_avg.embedding...``. An unreadable file counts
    as Megatron's so the torch_dist reader reports what is wrong with it, as before."""
    raw = _metadata_bytes(p)
    if raw is None:
        return True
    if next(_dist_keys(raw), None) is not None:
        return True
    # An optimizer-only torch_dist directory names the parameters inside its state keys
    # (optimizer.state.exp_avg.decoder...); HF names under a module (model.decoder.layers of
    # OPT, T5) are not evidence.
    return any(b"%s.%s" % (state, start) in raw
               for state in _OPTIMIZER_STATES for start in _KEY_STARTS)


def is_dist_dir(p: Path) -> bool:
    """A Megatron-Core torch_dist directory, by evidence: its ``metadata.json`` (megatron-core
    writes it, with ``sharded_backend``, after every rank finished; plain torch DCP never
    does), or, while that is not written yet, Megatron parameter names in ``.metadata``.
    A ``.metadata`` file alone is any torch DCP checkpoint (:func:`is_plain_dcp_dir`)."""
    if not p.is_dir():
        return False
    if (p / "metadata.json").is_file():
        return True
    return (p / ".metadata").is_file() and _megatron_keys(p)


def is_plain_dcp_dir(p: Path) -> bool:
    """A plain PyTorch DCP checkpoint (``torch.distributed.checkpoint.save``: FSDP2,
    torchtitan): ``.metadata`` without ``metadata.json``, without Megatron parameter names and
    without Megatron-FSDP's ``model.module.`` keys. Model keys like
    ``model.layers.0.self_attn.q_proj.weight`` or ``layers.0.attention.wq`` are not
    Megatron-Core's, so no torch_dist table maps them."""
    return p.is_dir() and (p / ".metadata").is_file() \
        and not (p / "metadata.json").is_file() and not _megatron_keys(p) \
        and not is_fsdp_dtensor_dir(p)


# Megatron-FSDP's fsdp_dtensor checkpoints key the model as `model.module.<mcore name>` (and
# its optimizer state as `optimizer.state.module.`): DDP-style wrapping that no HF or
# torchtitan model state dict has.
_FSDP_DTENSOR_KEYS = (b"model.module.decoder.", b"model.module.embedding.",
                      b"optimizer.state.module.")


def is_fsdp_dtensor_dir(p: Path) -> bool:
    """A Megatron-FSDP ``fsdp_dtensor`` checkpoint: DCP files (``.metadata``) without
    ``metadata.json``, whose keys are Megatron-Core names under ``model.module.`` (bytes
    peeked, nothing unpickled)."""
    if not (p.is_dir() and (p / ".metadata").is_file()) or (p / "metadata.json").is_file():
        return False
    raw = _metadata_bytes(p)
    return raw is not None and any(k in raw for k in _FSDP_DTENSOR_KEYS)


_SHARDING_INFO = b"DCP_SHARDING_INFO"
_MAX_PEEK = 1 << 20


def is_dcp_sharded_safetensors_dir(p: Path) -> bool:
    """Safetensors files written by torch's ``HuggingFaceStorageWriter(save_distributed=
    True)``: the first ``*.safetensors`` file's header (at most 1 MiB peeked) carries
    ``DCP_SHARDING_INFO`` in its ``__metadata__``."""
    try:
        files = sorted(c for c in p.glob("*.safetensors") if c.is_file())
    except OSError:
        return False
    if not files:
        return False
    try:
        with open(files[0], "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            n = int.from_bytes(head, "little")
            return _SHARDING_INFO in f.read(min(n, _MAX_PEEK))
    except OSError:
        return False


def has_rank_dirs(p: Path) -> bool:
    """``mp_rank_TT[_PPP][_EEE]/`` directories in ``p`` (per-rank model files)."""
    try:
        return any(RANK_DIR.match(c.name) and c.is_dir() for c in p.iterdir())
    except OSError:
        return False


def has_mlm_rank_files(p: Path) -> bool:
    """Megatron-LM's ``mp_rank_*/model_optim_rng.pt`` (verl's per-rank files are ``model.pt``)."""
    try:
        return any((c / "model_optim_rng.pt").is_file() for c in p.iterdir())
    except OSError:
        return False


def has_verl_adapter_files(p: Path) -> bool:
    """verl's per-rank adapter files (``mp_rank_TT[_PPP][_EEE]_adapter.pt``) in ``p``."""
    try:
        return p.is_dir() and any(_ADAPTER_FILE.match(c.name) for c in p.iterdir())
    except OSError:
        return False


def find_config_dir(candidates: Iterable[Path]) -> Path | None:
    """The first of ``candidates`` that is a directory holding an HF ``config.json``.

    The one lookup behind every reader's config search (torch_dist, per-rank, verl adapter
    files): each passes its own candidates in its own order (``--hf-config`` first, then its
    own copy, then what detection found beside the checkpoint)."""
    for c in candidates:
        if c.is_dir() and (c / "config.json").is_file():
            return c
    return None


_VERL_FSDP_FILE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$", re.ASCII)


def verl_fsdp_world_sizes(p: Path) -> list[int]:
    """The world sizes named by verl / SkyRL FSDP model files
    (``model_world_size_{W}_rank_{r}.pt``) in ``p``; empty when there are none."""
    try:
        names = [c.name for c in p.iterdir()] if p.is_dir() else []
    except OSError:
        return []
    return sorted({int(m.group(1)) for n in names if (m := _VERL_FSDP_FILE.match(n))})


def verl_fsdp_layout(p: Path) -> str | None:
    """``inspect``'s line for a verl FSDP role directory: model files (and, when present,
    ``fsdp_config.json``'s FSDP version and world size); None when there are no model files."""
    sizes = verl_fsdp_world_sizes(p)
    if not sizes:
        return None
    text = f"verl FSDP per-rank files (world size {', '.join(map(str, sizes))}"
    config = p / "fsdp_config.json"
    if config.is_file():
        try:
            raw = read_bytes(config, "fsdp_config.json", limit=1 << 16)
            data = json.loads(raw)
            if isinstance(data, dict):
                if "FSDP_version" in data:
                    text += f", FSDP{data['FSDP_version']}"
                elif "fsdp_strategy" in data:
                    text += f", SkyRL {data['fsdp_strategy']}"
        except (CheckpointError, ValueError):
            text += ", unreadable fsdp_config.json"
    if (p / "lora_train_meta.json").is_file():
        text += ", LoRA"
    return text + ")"


def verl_fsdp_key_kinds(p: Path) -> tuple[bool, bool]:
    """``(model, adapter)``: whether a verl FSDP role directory's rank-0 model file holds base
    model weights and PEFT LoRA tensors, from the key names in its ``data.pkl`` (stored, not
    compressed: read as bytes, nothing unpickled). A LoRA save has ``.base_layer.`` and
    ``.lora_A.`` names; ``save_lora_only`` only the latter; a plain save neither."""
    sizes = verl_fsdp_world_sizes(p)
    if not sizes:
        return False, False
    path = p / f"model_world_size_{sizes[-1]}_rank_0.pt"
    try:
        with zipfile.ZipFile(path) as z:
            names = [i for i in z.infolist() if i.filename.endswith("/data.pkl")]
            if len(names) != 1 or names[0].file_size > 1 << 28:
                return True, False
            raw = z.read(names[0])
    except (OSError, zipfile.BadZipFile, ValueError):
        return True, False  # the model reader says what is wrong with it
    adapter = b".lora_A." in raw
    if not adapter:
        return True, False
    # Keys other than LoRA ones (the base model's) appear as "base_model.model.<name>" strings
    # that name no lora_ tensor.
    model = any(b"lora_" not in key and b".adapter_" not in key
                for key in re.findall(rb"base_model\.model\.[\w.]+", raw))
    return model, adapter
