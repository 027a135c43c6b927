"""``CheckpointManager``: saves and loads from inside a running torch.distributed job.

One instance per rank, created collectively (it opens a gloo process group of its own, so that
a background save never interleaves with the training job's collectives). A save runs in four
phases; the first two are collective and cheap, the last two do the I/O, inline or in a
background thread (``async_=True``):

1. *stage*: rank 0 cleans leftovers of killed saves, refuses to overwrite a committed step and
   creates ``<root>/.<step>.ckpt-ir-tmp-<id>/``;
2. *plan*: every rank describes its parameters (names, local shapes, dtypes: a few KB); all
   ranks then derive the same plan: which rank writes which torch_dist chunk, which rank owns
   which HF safetensors file, and where every piece of every HF tensor comes from. Any problem
   is raised on every rank, before a byte is written. With ``async_`` this rank's share of the
   weights (and its sharded state) is copied to CPU here, so training may go on;
3. *write*: torch_dist ``model``: each rank appends its own TP shards as chunks, nothing moves
   between ranks. ``hf_model``: for each HF tensor, in one global order, the ranks holding its
   pieces send them to the owner of its file, which assembles just that tensor and writes it
   (one destination tensor in memory at a time). ``optimizer``/``extra``: each rank appends its
   main-replica chunks. Every file is fsynced;
4. *commit* (rank 0, after every rank reported success): per-directory metadata, manifest,
   rename into place, tracker, retention (:mod:`ckpt_ir.manager.disk`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import pickle
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckpt_ir.converters.base import SourceFiles, WriteOptions
from ckpt_ir.converters.hf import HfWriter
from ckpt_ir.converters.mcore_dist import McoreDistWriter
from ckpt_ir.converters.storage.hf_files import carried_files, load_hf_config
from ckpt_ir.errors import (
    CheckpointError,
    CorruptCheckpointError,
    DestinationError,
    FormatError,
    IncompatibleLayoutError,
    InternalError,
    MissingConfigError,
)
from ckpt_ir.ir import ModelConfig, TensorSpec
from ckpt_ir.layout import ParallelLayout
from ckpt_ir.manager import disk, sharded
from ckpt_ir.manager.fill import fill_from_dist, fill_from_hf
from ckpt_ir.manager.live import (
    LocalParam,
    RankCoords,
    check_supported,
    live_table,
    local_params,
    megatron_coords,
    shard_geometry,
)
from ckpt_ir.manager.plan import (
    Entry,
    HfItem,
    Inventory,
    ModelPlan,
    build_model_plan,
    hf_items,
    place,
    rows_of,
)
from ckpt_ir.manager.staging import HostArena, HostStream

__all__ = ["CheckpointManager", "Loaded"]

log = logging.getLogger(__name__)

_MODEL_FORMATS = ("torch_dist", "hf")


@dataclass(frozen=True)
class Loaded:
    """What :meth:`CheckpointManager.load` read.

    ``model`` is the loaded state dict when the model was passed as a sharded state dict
    (``None`` when model chunks were filled in place); ``optimizer`` / ``extra`` likewise for
    their sharded state dicts, shaped as megatron-core's ``dist_checkpointing.load`` returns
    them.
    """

    step: int
    path: Path
    manifest: Mapping[str, Any]
    model: Any = None
    optimizer: Any = None
    extra: Any = None


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling (to travel between ranks), else an equivalent one-line
    error of the nearest public type."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        cls = CheckpointError if isinstance(e, CheckpointError) else InternalError
        return cls(f"{type(e).__name__}: {e}")


def _typed(e: Exception, what: str, path: Path) -> Exception:
    """OS errors (disk full, permissions) as the public :class:`DestinationError`."""
    if isinstance(e, OSError):
        err = DestinationError(f"{what}: {e.strerror or e}", path=path)
        err.__cause__ = e
        return err
    return e


TRANSFORMER_CONFIG = "transformer_config.json"


def _as_chunks(model: Any) -> list[Any] | None:
    """Model chunks (a module or a list of them), or None for a sharded state dict."""
    if model is None or isinstance(model, Mapping):
        return None
    if isinstance(model, (list, tuple)):
        return list(model)
    return [model]


class _Source:
    """What HF/torch_dist writers ask a reader for: the files a model directory carries."""

    def __init__(self, tokenizer: Path | None) -> None:
        self._files = carried_files([tokenizer]) if tokenizer is not None else {}

    def source_files(self) -> SourceFiles:
        return SourceFiles(self._files)


# --------------------------------------------------------------------------------------------
# The save job
# --------------------------------------------------------------------------------------------


@dataclass
class _Job:
    step: int
    contents: tuple[str, ...]
    unit: Path                          # staged unit directory
    dirs: dict[str, Path]               # content -> directory inside the unit
    model_plan: ModelPlan | None = None
    hf_items: list[HfItem] = field(default_factory=list)
    hf_specs: list[TensorSpec] = field(default_factory=list)
    dist_specs: list[TensorSpec] = field(default_factory=list)
    dist_names: dict[str, str] = field(default_factory=dict)  # live native -> torch_dist native
    snapshots: dict[str, sharded.ShardedSnapshot] = field(default_factory=dict)
    writers: dict[str, Any] = field(default_factory=dict)
    copy_data: bool = False             # async: this rank's tensors are private CPU copies
    started: float = 0.0
    # Top-level keys of the optimizer / extra states (verl's manifest names lr_scheduler and
    # rng_state entries), and verl's transformer_config.json content (rank 0, verl layout).
    state_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    transformer_config: dict[str, Any] | None = None


class CheckpointManager:
    """Saves and loads checkpoints of a Megatron-Core job, one instance per rank.

    Args:
        root: the run directory (shared by all ranks): steps and the tracker live here.
        hf_config: the model's HF ``config.json`` (a dict, the file, or its directory): names
            and shapes every tensor, and becomes the HF output's config.
        layout: the job's parallel layout (TP, PP, VPP); default TP = PP = 1.
        coords: this rank's (tp, pp, dp) ranks; default from the global rank under
            megatron-core's default order ``tp-cp-ep-dp-pp``. Pass them from
            ``parallel_state`` when the job orders ranks otherwise.
        disk_layout: ``"verl"`` (verl's v2 tree, default) or ``"plain"`` (``iter_N/``).
        role: verl's role directory (``actor``, ``critic``).
        keep_last: keep the newest N committed steps (None: keep all).
        tokenizer: a directory whose tokenizer / generation files go into the HF output.
        model_format: how ``model`` is stored: ``"torch_dist"`` (default; reshardable, what
            megatron-core loads) or ``"hf"`` (then ``model`` and ``hf_model`` are one tree).
        max_shard_size: the HF output's safetensors shard cap in bytes.
        mcore_spec: the torch_dist ``_extra_state`` objects to write for ``model``
            (``"local"``, ``"te"`` or ``"any"``, see :mod:`ckpt_ir.converters.mcore_dist`).
        timeout: of the manager's process group (a rank that dies mid-save fails the others
            after this long).

    Creating the manager is collective when ``torch.distributed`` is initialised; without it
    the manager works in one process (world size 1).
    """

    def __init__(self, root: str | Path, *, hf_config: Mapping[str, Any] | str | Path,
                 layout: ParallelLayout | None = None, coords: RankCoords | None = None,
                 disk_layout: str = "verl", role: str = "actor", keep_last: int | None = None,
                 tokenizer: str | Path | None = None, model_format: str = "torch_dist",
                 max_shard_size: int = 5 * 1000**3, mcore_spec: str = "any",
                 timeout: datetime.timedelta = datetime.timedelta(minutes=30)) -> None:
        self.root = Path(root).absolute()
        self.layout = layout or ParallelLayout()
        self.disk = disk.DiskLayout(disk_layout, role)
        if keep_last is not None and (type(keep_last) is not int or keep_last < 1):
            raise FormatError(f"keep_last must be a positive integer or None, not {keep_last!r}")
        if model_format not in _MODEL_FORMATS:
            raise FormatError(f"model_format must be one of {_MODEL_FORMATS}, not "
                              f"{model_format!r}")
        self.keep_last = keep_last
        self.model_format = model_format
        self.max_shard_size = int(max_shard_size)
        self.mcore_spec = mcore_spec
        self.config = self._read_config(hf_config)
        check_supported(self.config, self.layout)
        self.tokenizer = Path(tokenizer) if tokenizer is not None else None
        self._source = _Source(self.tokenizer)
        self._dist: Any = None
        self._group: Any = None
        self.rank, self.world_size = 0, 1
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            self._dist = dist
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            if self.world_size > 1:
                # A group of our own: a background save's messages never interleave with the
                # job's collectives, and gloo moves CPU tensors whatever the job's backend.
                self._group = dist.new_group(backend="gloo", timeout=timeout)
        self.coords = coords or megatron_coords(self.rank, self.world_size, self.layout)
        if not (0 <= self.coords.tp < self.layout.tp and 0 <= self.coords.pp < self.layout.pp
                and self.coords.dp >= 0):
            raise IncompatibleLayoutError(f"rank coordinates {self.coords} are outside the "
                                          f"layout {self.layout.describe()}")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending_step: int | None = None
        self._arena: HostArena | None = None  # async saves' pinned host copy, kept
        if self.rank == 0:
            disk.clean_stale(self.root, self.disk)

    @staticmethod
    def _read_config(hf_config: Mapping[str, Any] | str | Path) -> ModelConfig:
        if isinstance(hf_config, Mapping):
            return ModelConfig.from_hf(dict(hf_config))
        path = Path(hf_config)
        if path.is_file():
            path = path.parent
        if not path.is_dir():
            raise MissingConfigError(f"no HF config at {hf_config}", path=path)
        return ModelConfig.from_hf(load_hf_config(path))

    # -- collectives over the manager's group (identity in one process) ------------------------

    def _bcast(self, obj: Any) -> Any:
        if self._group is None:
            return obj
        box = [obj]
        self._dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def _all_gather(self, obj: Any) -> list[Any]:
        if self._group is None:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self._group)
        return out

    def _agree(self, fn: Any) -> Any:
        """Run ``fn`` on every rank; if it fails anywhere, raise the first failure everywhere
        (so no rank is left waiting in a collective the others skipped)."""
        try:
            outcome: tuple[str, Any] = ("ok", fn())
        except Exception as e:
            outcome = ("error", _portable(e))
        outcomes = self._all_gather(("ok", None) if outcome[0] == "ok" else outcome)
        for kind, err in outcomes:
            if kind == "error":
                raise err
        return outcome[1]

    # -- public API ------------------------------------------------------------------------------

    @property
    def pending(self) -> int | None:
        """The step an unfinished background save is writing, or None."""
        return self._pending_step if self._thread is not None else None

    def wait(self) -> None:
        """Block until the background save (if any) is committed; raise its error if it
        failed (on every rank alike)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self._pending_step = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Finish the pending save and unpin the async saves' host buffer; call before
        destroying the process group."""
        self.wait()
        if self._arena is not None:
            self._arena.release()
            self._arena = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wait()

    def latest_step(self) -> int | None:
        """The newest committed step (the tracker's), None before the first commit."""
        return disk.latest_step(self.root, self.disk)

    def committed_steps(self) -> list[int]:
        return disk.committed_steps(self.root, self.disk)

    def save(self, step: int, model: Any = None, *, contents: Sequence[str] | None = None,
             optimizer: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
             async_: bool = False) -> None:
        """Save ``step``; collective (every rank calls it with its own shards).

        Args:
            model: this rank's model chunks (a ``torch.nn.Module`` or the list of virtual
                pipeline chunks), or megatron-core's ``model.sharded_state_dict()`` (then only
                ``model`` can be saved from it, passed through to torch_dist).
            contents: any of ``model``, ``hf_model``, ``optimizer``, ``extra``; default
                ``model`` plus ``optimizer`` / ``extra`` when those are given.
            optimizer: the optimizer's sharded state dict (``optimizer.sharded_state_dict(
                model_sharded_state_dict)``), written as megatron-core writes it.
            extra: RNG / scheduler / data-loader state: a sharded state dict or plain values
                (those go to the common state).
            async_: return once this rank's share is copied to CPU; the write and the commit
                run in a background thread. :meth:`wait` (or the next save) joins it.

        Raises:
            DestinationExistsError: ``step`` is already committed.
            PlanError: the model chunks do not match the config and layout (every problem).
            FormatError: unknown contents, or a content without its state.
        """
        self.wait()
        if type(step) is not int or step < 0:
            raise FormatError(f"step must be a non-negative integer, not {step!r}")
        wanted = self._save_contents(contents, model, optimizer, extra)
        started = time.perf_counter()

        def stage() -> tuple[str, dict[str, str]]:
            if self.rank != 0:
                return "", {}
            try:
                disk.clean_stale(self.root, self.disk)
                unit = disk.stage(self.root, self.disk, step)
                dirs = {c: str(unit / self._content_path(c)) for c in wanted}
                for d in dirs.values():
                    Path(d).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise _typed(e, f"cannot stage step {step} under {self.root}",
                             self.root) from e
            return str(unit), dirs

        unit_s, dirs_s = self._bcast(self._agree(stage))
        job = _Job(step, wanted, Path(unit_s), {c: Path(d) for c, d in dirs_s.items()},
                   copy_data=async_, started=started,
                   state_keys={c: tuple(str(k) for k in state) for c, state in
                               (("optimizer", optimizer), ("extra", extra))
                               if isinstance(state, Mapping)})
        if self.rank == 0 and self.disk.kind == "verl" and "extra" in wanted:
            job.transformer_config = self._transformer_config(model)
        try:
            self._agree(lambda: self._prepare_local(job, model, optimizer, extra))
            if {"model", "hf_model"} & set(wanted) and _as_chunks(model) is not None:
                self._plan_model(job, model)
        except BaseException:
            if self.rank == 0:
                shutil.rmtree(self._staging_root(job.unit), ignore_errors=True)
            raise
        if async_:
            self._pending_step = step
            self._thread = threading.Thread(target=self._run_in_background, args=(job,),
                                            name=f"ckpt-ir-save-{step}", daemon=True)
            self._thread.start()
        else:
            self._run(job)

    def load(self, source: str | int | Path = "latest", model: Any = None, *,
             contents: Sequence[str] | None = None, optimizer: Mapping[str, Any] | None = None,
             extra: Mapping[str, Any] | None = None,
             trust_pickles: bool = False) -> Loaded | None:
        """Load a committed checkpoint into this rank, at this job's layout; not collective.

        Args:
            source: ``"latest"`` (the tracker's step), a step number, or a directory (a run
                root, a step or role directory).
            model: model chunks to fill in place (from ``model``: torch_dist or HF, or from
                ``hf_model``), or a sharded state dict to read from the torch_dist ``model``.
            contents: ``model`` or ``hf_model`` (the model's source), ``optimizer``,
                ``extra``; default: ``model`` if a model is given, plus those given.
            optimizer / extra: the sharded state dicts to read (at this job's layout).
            trust_pickles: unpickle stored objects (RNG state, common state) without the
                allow-list; only for checkpoints you wrote.

        Returns:
            What was read, or None when ``source="latest"`` and nothing is committed yet.

        Raises:
            CorruptCheckpointError: the save is incomplete (no manifest) or lacks a content.
        """
        self.wait()
        wanted = self._load_contents(contents, model, optimizer, extra)
        found = self._resolve(source)
        if found is None:
            return None
        unit, step = found
        manifest = disk.read_manifest(unit)
        if manifest is None:
            raise CorruptCheckpointError(f"{unit} has no {disk.MANIFEST}: the save did not "
                                         "complete", path=unit)
        out: dict[str, Any] = {}
        for content in wanted:
            entry = manifest["contents"].get(content)
            if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
                raise CorruptCheckpointError(f"step {step} has no {content!r} (saved: "
                                             f"{sorted(manifest['contents'])})", path=unit)
            where = (unit / entry["path"]).resolve()
            if unit.resolve() not in where.parents:
                raise CorruptCheckpointError(f"{disk.MANIFEST} names {entry['path']!r}, "
                                             "outside the checkpoint", path=unit)
            fmt = entry.get("format")
            if content in ("model", "hf_model"):
                chunks = _as_chunks(model)
                if chunks is None:
                    if fmt != disk.FORMAT_DIST:
                        raise FormatError(f"step {step} stores {content} as {fmt}; a sharded "
                                          "state dict loads from torch_dist only")
                    out["model"] = sharded.load_sharded(where, model,
                                                        trust_pickles=trust_pickles)
                elif fmt == disk.FORMAT_DIST:
                    fill_from_dist(chunks, where, config=self.config, layout=self.layout,
                                   coords=self.coords, trust=trust_pickles)
                elif fmt == disk.FORMAT_HF:
                    fill_from_hf(chunks, where, config=self.config, layout=self.layout,
                                 coords=self.coords)
                else:
                    raise CorruptCheckpointError(f"{content} has unknown format {fmt!r}",
                                                 path=unit)
            else:
                state = optimizer if content == "optimizer" else extra
                out[content] = sharded.load_sharded(where, state or {},
                                                    trust_pickles=trust_pickles)
        return Loaded(step, unit, manifest, out.get("model"), out.get("optimizer"),
                      out.get("extra"))

    # -- contents ------------------------------------------------------------------------------

    def _content_path(self, content: str) -> str:
        if content == "model" and self.model_format == "hf":
            # verl's bridge mode: the model *is* the HF tree; hf_model then shares it.
            return self.disk.content_path("hf_model")
        return self.disk.content_path(content)

    def _save_contents(self, contents: Sequence[str] | None, model: Any, optimizer: Any,
                       extra: Any) -> tuple[str, ...]:
        if contents is None:
            wanted = {"model"} if model is not None else set()
            wanted |= {"optimizer"} if optimizer is not None else set()
            wanted |= {"extra"} if extra is not None else set()
        else:
            if isinstance(contents, str):
                raise FormatError("contents must be a collection of names, not a string")
            wanted = set(contents)
        unknown = wanted - set(disk.CONTENTS)
        if unknown:
            raise FormatError(f"unknown contents {sorted(unknown)}; expected some of "
                              f"{list(disk.CONTENTS)}")
        if not wanted:
            raise FormatError("nothing to save (contents is empty)")
        for content, state in (("optimizer", optimizer), ("extra", extra)):
            if content in wanted and state is None:
                raise FormatError(f"contents has {content!r} but no {content} state was given")
        if wanted & {"model", "hf_model"} and model is None:
            raise FormatError("contents has 'model'/'hf_model' but no model was given")
        if "hf_model" in wanted and _as_chunks(model) is None:
            raise FormatError("hf_model is written from the model chunks (torch.nn.Module), "
                              "not from a sharded state dict")
        if self.model_format == "hf" and "model" in wanted and _as_chunks(model) is None:
            raise FormatError("model_format='hf' needs the model chunks, not a sharded state "
                              "dict")
        return tuple(c for c in disk.CONTENTS if c in wanted)

    def _load_contents(self, contents: Sequence[str] | None, model: Any, optimizer: Any,
                       extra: Any) -> tuple[str, ...]:
        if contents is None:
            wanted = {"model"} if model is not None else set()
            wanted |= {"optimizer"} if optimizer is not None else set()
            wanted |= {"extra"} if extra is not None else set()
        else:
            if isinstance(contents, str):
                raise FormatError("contents must be a collection of names, not a string")
            wanted = set(contents)
        unknown = wanted - set(disk.CONTENTS)
        if unknown:
            raise FormatError(f"unknown contents {sorted(unknown)}")
        if {"model", "hf_model"} <= wanted:
            raise FormatError("load the weights from 'model' or from 'hf_model', not both")
        if wanted & {"model", "hf_model"} and model is None:
            raise FormatError("loading 'model'/'hf_model' needs the model chunks or a sharded "
                              "state dict to fill")
        return tuple(c for c in disk.CONTENTS if c in wanted)

    def _resolve(self, source: str | int | Path) -> tuple[Path, int] | None:
        if isinstance(source, bool):
            raise FormatError(f"not a checkpoint source: {source!r}")
        if source == "latest":
            step = disk.latest_step(self.root, self.disk)
            return None if step is None else (self.disk.unit(self.disk.step_dir(self.root,
                                                                                step)), step)
        if isinstance(source, int):
            if source not in disk.committed_steps(self.root, self.disk):
                raise CorruptCheckpointError(f"step {source} is not a committed checkpoint of "
                                             f"{self.root}", path=self.root)
            return self.disk.unit(self.disk.step_dir(self.root, source)), source
        path = Path(source)
        for unit in (path, self.disk.unit(path)):
            manifest = disk.read_manifest(unit) if unit.is_dir() else None
            if manifest is not None:
                step = manifest.get("global_step")
                return unit, step if isinstance(step, int) else -1
        if (path / disk.TRACKER).is_file() or self.disk.steps(path):
            step = disk.latest_step(path, self.disk)
            if step is None:
                return None
            return self.disk.unit(self.disk.step_dir(path, step)), step
        raise CorruptCheckpointError(f"{path} holds no complete checkpoint (no "
                                     f"{disk.MANIFEST})", path=path)

    @staticmethod
    def _staging_root(unit: Path) -> Path:
        return unit if disk.STAGING_MARKER in unit.name else unit.parent

    # -- save: plan ----------------------------------------------------------------------------

    def _prepare_local(self, job: _Job, model: Any, optimizer: Any, extra: Any) -> None:
        """Snapshot the sharded state dicts (this rank's main replicas)."""
        states = {"model": model if _as_chunks(model) is None else None,
                  "optimizer": optimizer, "extra": extra}
        for content, state in states.items():
            if content in job.contents and state is not None:
                job.snapshots[content] = sharded.snapshot(state, copy_data=job.copy_data,
                                                          what=content)

    def _plan_model(self, job: _Job, model: Any) -> None:
        chunks = _as_chunks(model)
        if chunks is None:
            return

        def describe() -> tuple[Inventory, list[LocalParam]]:
            params, style = local_params(chunks, self.layout, self.coords,
                                         self.config.num_layers)
            has_norms = any(p.native.startswith("decoder.layers.") for p in params)
            entries = tuple(Entry(p.native, tuple(p.tensor.shape), str(p.tensor.dtype))
                            for p in params)
            return Inventory(self.coords, style if has_norms else None, entries), params

        inventory, params = self._agree(describe)
        inventories = self._all_gather(inventory)
        plan = build_model_plan(self.config, self.layout, inventories)
        mine = [p for p in params if plan.sources.get((p.native, self.coords.tp)) == self.rank]
        tensors = [p.tensor.detach() for p in mine]
        if job.copy_data and any(t.is_cuda for t in tensors):
            # Pinned, non-blocking, one synchronisation: save(async_=True) returns after
            # the bus time (see staging.py).
            if self._arena is None:
                self._arena = HostArena()
            tensors = self._arena.copy(tensors)
        elif job.copy_data:
            tensors = [t.to("cpu", copy=True) for t in tensors]
        plan.mine.update((p.native, t) for p, t in zip(mine, tensors, strict=True))
        job.model_plan = plan
        writes_hf = "hf_model" in job.contents or (
            "model" in job.contents and self.model_format == "hf")
        if writes_hf:
            schema = self.config.schema()
            specs = [TensorSpec(n, shape, plan.dtypes[plan.table.by_ir[n][0].native])
                     for n, shape in schema.items()]
            hf_dir = job.dirs.get("hf_model") or job.dirs["model"]
            writer = HfWriter(hf_dir, self.config, WriteOptions(
                max_shard_bytes=self.max_shard_size, rank=self.rank,
                world_size=self.world_size))
            writer.begin(specs)
            job.hf_specs = specs
            job.hf_items = hf_items(plan, self.config, writer, specs, self.world_size)
            job.writers["hf_model"] = writer
        if "model" in job.contents and self.model_format == "torch_dist":
            dist_table = live_table(self.config, padded_vocab_size=plan.padded_vocab,
                                    norm_style="te")
            schema = self.config.schema()
            job.dist_names = {b.native: dist_table.by_ir[next(iter(b.ir.values()))][0].native
                              for b in plan.table.bindings}
            job.dist_specs = [
                TensorSpec(b.native, tuple(b.transform.shapes(
                    {r: schema[n] for r, n in b.ir.items()})),
                    plan.dtypes[plan.table.by_ir[next(iter(b.ir.values()))][0].native])
                for b in dist_table.bindings]

    # -- save: write and commit ----------------------------------------------------------------

    def _run_in_background(self, job: _Job) -> None:
        try:
            self._run(job)
        except BaseException as e:  # re-raised by wait() on this rank
            self._error = e

    def _run(self, job: _Job) -> None:
        try:
            outcome: tuple[str, Any] = ("ok", self._write_rank(job))
        except Exception as e:
            log.error("rank %d: writing step %d failed: %s", self.rank, job.step, e)
            for w in job.writers.values():
                with contextlib.suppress(Exception):
                    w.abort()
            outcome = ("error", _portable(_typed(e, f"rank {self.rank} cannot write step "
                                                    f"{job.step}", job.unit)))
        outcomes = self._gather(outcome)
        status: BaseException | None = None
        if self.rank == 0:
            if outcomes is None:
                raise InternalError("rank 0 gathered no outcomes")
            failed = [o[1] for o in outcomes if o[0] == "error"]
            if failed:
                status = failed[0]
            else:
                try:
                    self._commit(job, [o[1] for o in outcomes])
                except Exception as e:
                    status = _portable(_typed(e, f"cannot commit step {job.step}", self.root))
            if status is not None:
                shutil.rmtree(self._staging_root(job.unit), ignore_errors=True)
        status = self._bcast(status)
        if status is not None:
            raise status
        log.info("step %d committed in %.2fs", job.step, time.perf_counter() - job.started)

    def _gather(self, obj: Any) -> list[Any] | None:
        if self._group is None:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        self._dist.gather_object(obj, out, dst=0, group=self._group)
        return out

    def _write_rank(self, job: _Job) -> dict[str, Any]:
        parts: dict[str, Any] = {}
        plan = job.model_plan
        if "model" in job.contents and plan is not None and self.model_format == "torch_dist":
            parts["model"] = self._write_dist_model(job, plan)
        if "hf_model" in job.writers:
            self._write_hf(job, plan)
        for content, snap in job.snapshots.items():
            parts[content] = sharded.write_sharded_rank(job.dirs[content], snap, self.rank)
        return parts

    def _write_dist_model(self, job: _Job, plan: ModelPlan) -> list:
        writer = McoreDistWriter(job.dirs["model"], self.config, WriteOptions(
            rank=self.rank, world_size=self.world_size, mcore_spec=self.mcore_spec))
        job.writers["model"] = writer
        writer.begin(job.dist_specs)
        boxes: list[tuple[str, list[int], torch.Tensor]] = []
        for native, tensor in plan.mine.items():
            binding = plan.table.by_native[native]
            shape = plan.shapes[native]
            g = shard_geometry(binding.partition, shape, plan.tp, self.coords.tp, name=native)
            at = 0
            for run in g.rows:
                piece = tensor.narrow(0, at, len(run)) if tensor.dim() else tensor
                offsets = [run.start] + [0] * (len(shape) - 1)
                if g.cols is not None:
                    offsets[-1] = g.cols.start
                boxes.append((job.dist_names[native], offsets, piece))
                at += len(run)
        # GPU tensors cross to the host in pinned pieces while earlier ones are written.
        stream = HostStream([piece for _, _, piece in boxes])
        try:
            for i, (name, offsets, piece) in enumerate(boxes):
                writer.write_chunk_slabs(name, offsets, tuple(piece.shape), piece.dtype,
                                         stream.pieces(i))
        finally:
            stream.close()
        return writer.finish_rank()

    def _write_hf(self, job: _Job, plan: ModelPlan | None) -> None:
        """Assemble each HF tensor at the owner of its file from the ranks' pieces (see the
        module docstring); one destination tensor is alive at a time."""
        if plan is None:
            raise InternalError("hf_model without a model plan")
        writer: HfWriter = job.writers["hf_model"]
        me = self.rank
        for item in job.hf_items:
            out = torch.empty(item.shape, dtype=item.dtype) if item.owner == me else None
            for piece in item.pieces:
                if piece.rank == me:
                    rows = rows_of(plan.mine[piece.native], piece.segments)
                    if out is not None:
                        place(out, rows, piece.segments, piece.cols)
                    else:
                        self._dist.send(rows.to("cpu").contiguous(), dst=item.owner,
                                        group=self._group)
                elif out is not None:
                    direct = len(piece.segments) == 1 and piece.cols is None
                    if direct:
                        # Straight into the destination rows: no staging buffer.
                        seg = piece.segments[0]
                        self._dist.recv(out.narrow(0, seg.part, seg.length), src=piece.rank,
                                        group=self._group)
                    else:
                        buf = torch.empty(piece.shape, dtype=item.dtype)
                        self._dist.recv(buf, src=piece.rank, group=self._group)
                        place(out, buf, piece.segments, piece.cols)
                        del buf
            if out is not None:
                writer.write(item.name, out)
                del out
        writer.finish_rank()

    def _commit(self, job: _Job, parts: Sequence[Mapping[str, Any]]) -> None:
        """Rank 0, once every rank's files are durable: metadata, manifest, rename, tracker,
        retention, in that order."""
        if "model" in job.writers:
            job.writers["model"].finish_all(self._source, [p["model"] for p in parts])
        if "hf_model" in job.writers:
            job.writers["hf_model"].finish_all(self._source, [None] * len(parts))
        for content, snap in job.snapshots.items():
            if content == "model":
                self._write_hf_config(job.dirs[content])
            sharded.finish_sharded(job.dirs[content], [p[content] for p in parts], snap.common)
        if self.disk.kind == "verl":
            self._write_verl_files(job)
        disk.write_manifest(job.unit, self._manifest(job))
        disk.publish(self.root, self.disk, job.step, job.unit)
        disk.write_tracker(self.root, job.step)
        removed = disk.retain(self.root, self.disk, self.keep_last)
        if removed:
            log.info("retention (keep_last=%s) removed steps %s", self.keep_last, removed)

    def _transformer_config(self, model: Any) -> dict[str, Any]:
        """verl's ``transformer_config.json``: the live model's megatron-core
        ``TransformerConfig`` as JSON values (callables, process groups and other objects
        dropped, dtypes and enums as strings, as verl writes it); for a model given as a
        sharded state dict, the fields ckpt-ir derives from the HF config and the layout."""
        from ckpt_ir.megatron_config import json_safe_fields, transformer_config_json

        chunks = _as_chunks(model)
        config = getattr(chunks[0], "config", None) if chunks else None
        if config is not None and dataclasses.is_dataclass(config):
            return json_safe_fields({f.name: getattr(config, f.name)
                                     for f in dataclasses.fields(config)})
        layout = self.layout
        return transformer_config_json(
            self.config, tp=layout.tp, pp=layout.pp, vpp=layout.vpp, ep=layout.ep,
            etp=layout.etp, first_stage_layers=layout.first_stage_layers,
            last_stage_layers=layout.last_stage_layers)

    def _write_verl_files(self, job: _Job) -> None:
        """What verl 0.9.1 writes beside the weights (verl layout, rank 0, before the
        manifest): the HF config and tokenizer in ``model/huggingface/`` (verl's model merger
        reads the config there, also for a torch_dist-only save), and
        ``transformer_config.json`` when ``extra`` is saved."""
        if {"model", "hf_model"} & set(job.contents):
            hf_dir = job.unit / self.disk.content_path("hf_model")
            if not (hf_dir / "config.json").is_file():
                hf_dir.mkdir(parents=True, exist_ok=True)
                disk.atomic_write_text(hf_dir / "config.json",
                                       json.dumps(self.config.to_hf_dict(), indent=2) + "\n")
                for name, path in self._source.source_files().files.items():
                    shutil.copyfile(path, hf_dir / name)
        if job.transformer_config is not None:
            disk.atomic_write_text(job.unit / TRANSFORMER_CONFIG,
                                   json.dumps(job.transformer_config, indent=2) + "\n")

    def _write_hf_config(self, directory: Path) -> None:
        """The HF config beside a passed-through torch_dist model, where ckpt-ir's own
        torch_dist writer puts it, so ``ckpt_ir.convert`` can read the model without help."""
        from ckpt_ir.converters.mcore_dist import HF_CONFIG_DIR

        out = directory / HF_CONFIG_DIR
        out.mkdir(exist_ok=True)
        disk.atomic_write_text(out / "config.json",
                               json.dumps(self.config.to_hf_dict(), indent=2) + "\n")
        for name, path in self._source.source_files().files.items():
            shutil.copyfile(path, out / name)

    def _verl_entries(self, job: _Job, contents: dict[str, Any]) -> None:
        """The entries verl 0.9.1's manifest adds beside the saved contents
        (``MegatronCheckpointManager._build_checkpoint_manifest``): where the LR scheduler
        and the RNG state sit, the transformer config, the HF config and tokenizer."""
        if "model" in contents and contents["model"]["format"] == disk.FORMAT_DIST:
            contents["model"]["backend"] = "dist_checkpointing"
        optimizer = self._content_path("optimizer")
        if "optimizer" in job.contents and "lr_scheduler" in job.state_keys.get("optimizer", ()):
            contents["lr_scheduler"] = {"path": optimizer, "format": disk.FORMAT_DIST,
                                        "key": "lr_scheduler"}
        if "extra" in job.contents and "rng_state" in job.state_keys.get("extra", ()):
            contents["rng_state"] = {"path": self._content_path("extra"),
                                     "format": disk.FORMAT_DIST, "key": "rng_state"}
        if job.transformer_config is not None:
            contents["transformer_config"] = {"path": TRANSFORMER_CONFIG, "format": "json"}
        if {"model", "hf_model"} & set(job.contents):
            hf = self.disk.content_path("hf_model")
            contents["hf_config"] = {"path": hf, "format": disk.FORMAT_HF,
                                     "note": "config.json, tokenizer, and optional "
                                             "generation_config.json"}
            if self.tokenizer is not None:
                contents["tokenizer"] = {"path": hf, "format": disk.FORMAT_HF}

    def _manifest(self, job: _Job) -> dict[str, Any]:
        """verl's ``ckpt_contents.json`` (schema 2), plus what ckpt-ir needs to load it."""
        contents: dict[str, Any] = {}
        directories: dict[str, str] = {}
        for c in job.contents:
            path = self._content_path(c)
            is_hf = c == "hf_model" or (c == "model" and self.model_format == "hf")
            contents[c] = {"path": path,
                           "format": disk.FORMAT_HF if is_hf else disk.FORMAT_DIST,
                           "backend": "ckpt-ir"}
            directories[path] = {
                "model": "model weights", "hf_model": "HF weights, config and tokenizer",
                "optimizer": "optimizer state (torch_dist)",
                "extra": "RNG / scheduler / other state (torch_dist)"}[c]
        if self.model_format == "hf" and {"model", "hf_model"} <= set(job.contents):
            contents["hf_model"]["note"] = "same directory as model: written once"
        if self.disk.kind == "verl":
            self._verl_entries(job, contents)
        from ckpt_ir import __version__

        hf = self.config.hf
        archs = hf.get("architectures") or [self.config.architecture]
        return {
            "schema_version": disk.MANIFEST_SCHEMA_VERSION,
            "framework": "megatron",
            "role": self.disk.role,
            "arch": archs[0] if isinstance(archs, list) and archs else self.config.architecture,
            "global_step": job.step,
            "world_size": self.world_size,
            "backend": {"has_bridge": False,
                        "use_dist_checkpointing": self.model_format == "torch_dist",
                        "peft": False},
            "save_contents": list(job.contents),
            "contents": contents,
            "directories": directories,
            "saved_any_dist_ckpt": any(v["format"] == disk.FORMAT_DIST
                                       for v in contents.values()),
            "writer": {"name": "ckpt-ir", "version": __version__,
                       "layout": self.layout.describe(), "mcore_spec": self.mcore_spec},
        }
