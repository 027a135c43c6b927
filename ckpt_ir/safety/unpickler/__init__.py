"""Restricted unpickling: nothing in a checkpoint is ever executed.

Trust model
-----------
A pickle is a program: ``GLOBAL`` imports any name, ``REDUCE`` calls it. A checkpoint from a model
hub or a colleague's bucket is untrusted input, so ckpt-ir never hands one to :func:`pickle.load`
or ``torch.load(weights_only=False)``. Instead :class:`RestrictedUnpickler` runs the pickle
machine with every operation that can reach code gated:

* ``GLOBAL``/``STACK_GLOBAL``/``INST`` resolve names only through an allow-list of what the
  supported formats need: builtin containers and scalars, ``collections.OrderedDict`` and
  ``defaultdict``, torch tensor rebuilding (``torch._utils._rebuild_tensor_v2`` and friends),
  storage classes, ``torch.Size``, dtypes, layouts, ``torch.device``, ``argparse.Namespace``,
  numpy array reconstruction (Megatron-LM keeps numpy RNG state), ``io.BytesIO`` (Transformer
  Engine extra state), ``pathlib`` paths (rebuilt as pure paths; DCP's ``StorageMeta`` holds
  one) and the dataclasses of ``torch.distributed.checkpoint`` metadata (built as ckpt-ir's
  field-for-field mirrors, :mod:`ckpt_ir.dcp_types`, so DCP is never imported). Anything else
  raises :class:`~ckpt_ir.errors.UnsafeCheckpointError` naming the global.
* Globals of ``megatron.*`` and ``transformer_engine.*`` become inert :class:`StandIn` classes:
  Megatron is never imported, a "call" (``ModelType(1)``) or ``__setstate__`` only records its
  arguments. Two exceptions keep DCP metadata usable: ``MCoreMetadata``/``MCoreSavePlan`` (saved by
  megatron-core <= 0.15 as subclasses of DCP's ``Metadata``/``SavePlan``) come back as torch's
  real classes, with their extra attributes (``mcore_data``) kept in ``__dict__``.
* Metadata mode (``load_pickle(..., torch_free=True)``, every DCP ``.metadata``;
  ``load_torch_buffer(..., metadata_only=True)``, per-rank files for ``inspect``) reads a pickle
  as data without importing torch: ``torch.Size`` builds a tuple after the same checks,
  ``torch.<dtype>`` is ckpt-ir's :class:`~ckpt_ir.dtypes.DType` of that name, the strided
  layout a name, storages and tensors :mod:`~ckpt_ir.safety.unpickler.records` after the
  tensor rebuilder's own checks. A pickle naming any other torch global is loaded again in the
  default mode, so the mode admits nothing the default refuses.
* Being on the list does not make a name callable. ``REDUCE``/``NEWOBJ``/``INST``/``OBJ`` call
  only a safe re-implementation registered for that exact object, which checks argument types
  (``bytearray`` refuses an int size, numpy ``_reconstruct`` only builds empty arrays, tensors are
  rebuilt by our own bounds-checked code). ``BUILD`` sets state only on stand-ins (recorded),
  plain-data classes (``__dict__`` update, never ``setattr``) and a few C types whose
  ``__setstate__`` only parses data. ``APPEND``/``SETITEM``/``ADDITEMS`` work on real
  ``list``/``dict``/``set`` objects only, so an attribute named ``append`` cannot be invoked.
  Copyreg extension codes are refused.
* Callables that are not needed are refused even when harmless-looking: a Namespace holding
  ``torch.nn.functional.silu`` fails with the global named. Refusing is the safe default; an
  inert stand-in for arbitrary callables would make every new name silently "work".
* What a loaded object costs its consumers is bounded: dict keys and set elements are checked
  before they are hashed (CPython hashes nested tuples by C recursion: a 1,000,000-deep key was
  a segfault), and the finished graph is walked once, iteratively: at most
  :data:`MAX_NESTING` levels, no cycles, and no reference bomb (shared references that expand,
  as a tree, far beyond the pickle's size). ``BUILD`` state may not replace a method.
* Tensors must be backed by their own bytes: no view addresses an element twice (stride 0),
  and two tensors share bytes only as the same view (tied weights). Zip archives with a record
  name twice (torch reads the first, zipfile the last) or a directory beyond
  :data:`MAX_ZIP_DIRECTORY` bytes are refused.
* The pure-Python unpickler is used on purpose: the C one preallocates attacker-chosen lengths
  (an 8-byte header made CPython 3.11 allocate 2 GB) and cannot restrict ``BUILD``. Reads are
  bounded by the input, the memo is a dict, so memory stays proportional to the input.

Tensor data is never copied: ``torch.save`` archives are zip files whose records are stored
uncompressed, so each storage becomes ``torch.frombuffer`` over a private (copy-on-write) mmap of
the file. The mapping is read-only with respect to the file: in-place edits of a loaded tensor
touch private pages instead of crashing or corrupting the checkpoint. ``.distcp`` files of
``torch.distributed.checkpoint`` hold many archives back to back; :func:`load_torch` reads one at
``[offset, offset + length)``.

``trust=True`` (CLI ``--trust-pickles``) is the documented escape hatch for files you produced
yourself: it uses plain ``pickle``/``torch.load(weights_only=False)`` and logs a warning.
"""


from __future__ import annotations

# The restricted loader in five modules, in the order each builds on the last: stand-ins, the
# allow-list, the pickle machine, torch zip archives, the public API. Every name other code or
# the tests import stays importable from here.
from ckpt_ir.safety.unpickler.allow_list import MAX_NESTING
from ckpt_ir.safety.unpickler.api import (
    _WARNED,  # noqa: F401 (tests reset the warned-files set)
    load_pickle,
    load_torch,
    load_torch_buffer,
    load_torch_bytes,
    map_file,
)
from ckpt_ir.safety.unpickler.archive import MAX_ZIP_DIRECTORY
from ckpt_ir.safety.unpickler.machine import RestrictedUnpickler
from ckpt_ir.safety.unpickler.stand_ins import StandIn

__all__ = [
    "MAX_NESTING",
    "MAX_ZIP_DIRECTORY",
    "RestrictedUnpickler",
    "StandIn",
    "load_pickle",
    "load_torch",
    "load_torch_buffer",
    "load_torch_bytes",
    "map_file",
]
