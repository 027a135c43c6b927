"""Phase 3 of a save, *write*, on every rank: its torch_dist chunks, its share of the HF
tensors (sent to, or assembled at, the owner of their file) and its sharded states."""

from __future__ import annotations

from typing import Any

import torch

from ckpt_ir.converters.base import WriteOptions
from ckpt_ir.converters.hf import HfWriter
from ckpt_ir.converters.mcore_dist import McoreDistWriter
from ckpt_ir.errors import InternalError
from ckpt_ir.ir import ModelConfig
from ckpt_ir.manager import sharded
from ckpt_ir.manager.job import SaveJob
from ckpt_ir.manager.live import RankCoords, shard_geometry
from ckpt_ir.manager.plan import ModelPlan, place, rows_of
from ckpt_ir.manager.staging import HostStream


class WritePhase:
    """The write phase of :class:`~ckpt_ir.manager.core.CheckpointManager` (a base class of it,
    so the phase reads the manager's settings as attributes)."""

    # Set by CheckpointManager.__init__.
    config: ModelConfig
    coords: RankCoords
    rank: int
    world_size: int
    model_format: str
    mcore_spec: str
    _dist: Any
    _group: Any

    def _write_rank(self, job: SaveJob) -> dict[str, Any]:
        parts: dict[str, Any] = {}
        plan = job.model_plan
        if "model" in job.contents and plan is not None and self.model_format == "torch_dist":
            parts["model"] = self._write_dist_model(job, plan)
        if "hf_model" in job.writers:
            self._write_hf(job, plan)
        for content, snap in job.snapshots.items():
            parts[content] = sharded.write_sharded_rank(job.dirs[content], snap, self.rank)
        return parts

    def _write_dist_model(self, job: SaveJob, plan: ModelPlan) -> list:
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

    def _write_hf(self, job: SaveJob, plan: ModelPlan | None) -> None:
        """Assemble each HF tensor at the owner of its file from the ranks' pieces (see the
        module docstring); one destination tensor is alive at a time."""
        if plan is None:
            raise InternalError("hf_model without a model plan")
        writer: HfWriter = job.writers["hf_model"]
        me = self.rank
        for item in job.hf_items:
            out = torch.empty(item.shape, dtype=item.dtype.torch) if item.owner == me else None
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
                        buf = torch.empty(piece.shape, dtype=item.dtype.torch)
                        self._dist.recv(buf, src=piece.rank, group=self._group)
                        place(out, buf, piece.segments, piece.cols)
                        del buf
            if out is not None:
                writer.write(item.name, out)
                del out
        writer.finish_rank()
