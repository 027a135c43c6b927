"""``torch.distributed.checkpoint`` (DCP) directories, read and written without torch's planner.

Why not ``dcp.load``/``dcp.save``: the saver needs the whole state dict in memory and the reader
unpickles ``.metadata`` with plain :mod:`pickle`. Here the writer streams (one chunk at a time,
appended to a ``.distcp`` file), the reader loads only the chunks a region needs, and every
pickle goes through :mod:`ckpt_ir.safety.unpickler`.

On disk (torch 2.x ``FileSystemWriter``, also what megatron-core's ``torch_dist`` writes)::

    .metadata        pickled Metadata(state_dict_metadata, storage_data, version, storage_meta)
                     state_dict_metadata: fqn -> TensorStorageMetadata(dtype, size, chunks)
                                                | BytesStorageMetadata()
                     storage_data: MetadataIndex(fqn, chunk offsets | None) -> _StorageInfo(
                                   relative_path, offset, length)
    __0_0.distcp     torch.save(chunk) | torch.save(obj) | ...   archives back to back

A tensor's chunks are hyper-rectangles (offsets, sizes) that tile its global shape exactly.
"""

from __future__ import annotations

# Four modules, each building on the ones before: records (what the index and the writer hold),
# regions (pure box arithmetic), reader, writer. Every name other code or the tests import stays
# importable from here.
from ckpt_ir.converters.storage.dcp_files.reader import DcpReader, read_index
from ckpt_ir.converters.storage.dcp_files.records import (
    METADATA_FILE,
    Box,
    DcpBlob,
    DcpChunk,
    DcpIndex,
    DcpRecord,
    DcpTensor,
)
from ckpt_ir.converters.storage.dcp_files.regions import (  # noqa: F401 (unit-tested directly)
    _coverage_problem,
    _tiles_exactly,
)
from ckpt_ir.converters.storage.dcp_files.writer import DcpDataFile, write_metadata

__all__ = [
    "METADATA_FILE",
    "Box",
    "DcpBlob",
    "DcpChunk",
    "DcpDataFile",
    "DcpIndex",
    "DcpReader",
    "DcpRecord",
    "DcpTensor",
    "read_index",
    "write_metadata",
]
