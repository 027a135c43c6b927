"""Compare two checkpoints tensor by tensor through the IR (``ckpt-ir verify``).

Both sides are opened with :func:`ckpt_ir.open`, so any two formats and parallel layouts compare
alike: fused QKV, stacked layers, padded vocabularies and TP shards are undone by the readers
before a byte is compared. :func:`verify` checks

1. config compatibility: the model-defining fields of :class:`~ckpt_ir.ir.ModelConfig` (and the
   RMSNorm epsilon and RoPE base when both configs state them);
2. the IR tensor sets: *missing* (in A, not in B) and *unexpected* (in B, not in A);
3. per tensor: shape, dtype, and the values. With ``atol == rtol == 0`` (the default) values
   must be **bit-identical**: ``-0.0`` differs from ``0.0`` and NaN payloads count. Otherwise an
   element of B passes when its bits equal A's, when both are NaN, or when
   ``|a - b| <= atol + rtol * |a|`` (A is the reference, as ``numpy.isclose(b, a)``).

Memory stays at one tensor pair plus a bounded scratch: pairs are read one at a time, the
readers drop consumed mapped pages after each pair, and values are compared in blocks of at most
``CHUNK_ELEMENTS`` elements, so a huge tensor never gets a float64 twin.

Example::

    report = ckpt_ir.verify("hf-model", "out-dist")
    assert report.equal, report.summary()
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from ckpt_ir.errors import CheckpointError, FormatError
from ckpt_ir.ir import Checkpoint, ModelConfig, Shape, dtype_name

__all__ = [
    "CHUNK_ELEMENTS",
    "ConfigDiff",
    "RoundtripReport",
    "TensorDiff",
    "VerifyReport",
    "render",
    "roundtrip",
    "verify",
]

CHUNK_ELEMENTS = 1 << 18
"""Largest block of elements compared at once (2 MiB as float64; a few such temporaries)."""

# ModelConfig's fields (all but the verbatim HF dict) are what the weights compute with; any
# difference is reported. Derived, so that new architectures' fields (experts, MLA) count too.
MODEL_FIELDS = tuple(f.name for f in fields(ModelConfig) if f.name != "hf")

# Status of a tensor in a report; only EQUAL counts as a match.
EQUAL, DIFFERS, SHAPE, DTYPE, MISSING, UNEXPECTED = (
    "equal", "differs", "shape", "dtype", "missing", "unexpected")

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """One model-defining config field whose values differ between A and B."""

    field: str
    a: Any
    b: Any


@dataclass(frozen=True, slots=True)
class TensorDiff:
    """How one IR tensor of A compares with the same-named tensor of B.

    ``mismatched`` counts elements outside tolerance (bitwise-different ones when exact);
    ``max_abs`` / ``max_rel`` are the largest ``|a - b|`` and ``|a - b| / |a|`` over all
    elements (``inf`` where exactly one side is NaN, or ``a == 0 != b`` for the relative one);
    ``first_index`` is the first mismatched element. Value fields are None when no values were
    compared (missing, unexpected, or different shapes).
    """

    name: str
    status: str
    shape_a: Shape | None = None
    shape_b: Shape | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    mismatched: int = 0
    max_abs: float | None = None
    max_rel: float | None = None
    first_index: tuple[int, ...] | None = None

    @property
    def ok(self) -> bool:
        return self.status == EQUAL

    @property
    def numel(self) -> int:
        shape = self.shape_a if self.shape_a is not None else self.shape_b
        return math.prod(shape) if shape is not None else 0


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify`; ``equal`` is the verdict, ``summary()`` the readable one."""

    a: str
    b: str
    format_a: str
    format_b: str
    atol: float
    rtol: float
    check_dtype: bool
    config: tuple[ConfigDiff, ...]
    tensors: tuple[TensorDiff, ...]
    bytes_compared: int
    seconds: float

    @property
    def equal(self) -> bool:
        return not self.config and all(t.ok for t in self.tensors)

    @property
    def differences(self) -> tuple[TensorDiff, ...]:
        """Every tensor that is not equal (value, shape, dtype, missing, unexpected)."""
        return tuple(t for t in self.tensors if not t.ok)

    def tensor(self, name: str) -> TensorDiff:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: what ``ckpt-ir verify --json`` prints."""
        return {
            "kind": "verify",
            "equal": self.equal,
            "a": self.a, "b": self.b, "format_a": self.format_a, "format_b": self.format_b,
            "atol": self.atol, "rtol": self.rtol, "check_dtype": self.check_dtype,
            "config": [{"field": c.field, "a": c.a, "b": c.b} for c in self.config],
            "compared": len(self.tensors),
            "differing": len(self.differences),
            "bytes_compared": self.bytes_compared,
            "seconds": self.seconds,
            "tensors": [_tensor_dict(t) for t in self.tensors],
        }

    def summary(self, limit: int = 20) -> str:
        """A readable multi-line account: the verdict, then at most ``limit`` differences."""
        return render(self.to_dict(), limit=limit)


@dataclass(frozen=True)
class RoundtripReport:
    """:func:`roundtrip`: SRC against its conversion (``there``) and the way back (``back``)."""

    source: str
    via: str
    back_format: str
    there: VerifyReport
    back: VerifyReport

    @property
    def equal(self) -> bool:
        return self.there.equal and self.back.equal

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "roundtrip", "equal": self.equal, "source": self.source,
                "via": self.via, "back_format": self.back_format,
                "there": self.there.to_dict(), "back": self.back.to_dict()}

    def summary(self, limit: int = 20) -> str:
        return render(self.to_dict(), limit=limit)


@dataclass
class _Stats:
    mismatched: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    first: int | None = None  # flat index of the first mismatched element
    valued: bool = True  # False for complex tensors: bits only, no value differences


# --------------------------------------------------------------------------------------------
# Comparing


def verify(a: str | os.PathLike[str], b: str | os.PathLike[str], *, atol: float = 0.0,
           rtol: float = 0.0, hf_config: str | os.PathLike[str] | None = None,
           trust_pickles: bool = False, check_dtype: bool = True,
           lora_alpha: float | None = None, source_ep: int | None = None) -> VerifyReport:
    """Compare checkpoints ``a`` (the reference) and ``b`` through the IR, tensor by tensor.

    Args:
        a, b: checkpoint directories of any format and layout :func:`ckpt_ir.open` reads.
        atol, rtol: tolerances; both 0 (the default) demands bit-identical tensors.
        hf_config: an HF config directory; it is the config of both sides (a side's own
            config, or one rebuilt from Megatron arguments, is not used when it is given).
        source_ep: the expert-parallel size of a per-rank side whose ``mp_rank_TT_NNN``
            names are ambiguous (overrides what its files and layout record say); ignored for
            sides of other formats.
        trust_pickles: DANGEROUS, see :doc:`docs/safety.md`: unpickle without the allow-list.
        check_dtype: when False, a dtype difference alone is not a mismatch (values still are
            compared, in float64).
        lora_alpha: the alpha of an adapter side whose checkpoint does not record it.

    Two LoRA adapters (any adapter formats: hf-peft, Megatron-Bridge torch_dist, verl's files
    or LoRA tree) are compared through the adapter IR: the base model configs, each common
    module's scaling (alpha / r), and the A/B tensors under their PEFT names. An adapter
    against a model is refused.

    Returns:
        A :class:`VerifyReport`; ``report.equal`` is the verdict.

    Raises:
        CheckpointError: either side cannot be opened or read (corrupt, unsafe, no config).
    """
    return _verify(a, b, atol=atol, rtol=rtol, hf_config=hf_config, trust_pickles=trust_pickles,
                   check_dtype=check_dtype, lora_alpha=lora_alpha,
                   source_ep=(source_ep, source_ep))


def _verify(a: str | os.PathLike[str], b: str | os.PathLike[str], *, atol: float, rtol: float,
            hf_config: str | os.PathLike[str] | None, trust_pickles: bool, check_dtype: bool,
            source_ep: tuple[int | None, int | None],
            lora_alpha: float | None = None) -> VerifyReport:
    """:func:`verify` with a ``source_ep`` per side."""
    if not (math.isfinite(atol) and math.isfinite(rtol)) or atol < 0 or rtol < 0:
        raise CheckpointError(f"atol and rtol must be finite and >= 0, not {atol}, {rtol}")
    started = time.perf_counter()
    adapters = _both_adapters(a, b)
    if adapters:
        from ckpt_ir.adapter_api import open_adapter

        def open_side(path: str | os.PathLike[str], ep: int | None) -> Checkpoint:
            return open_adapter(path, hf_config=hf_config, lora_alpha=lora_alpha,
                                trust_pickles=trust_pickles)
    else:
        def open_side(path: str | os.PathLike[str], ep: int | None) -> Checkpoint:
            return _open(path, hf_config, trust_pickles, ep)
    with open_side(a, source_ep[0]) as ca, open_side(b, source_ep[1]) as cb:
        release = (_release_hook(ca), _release_hook(cb))
        config = _config_diffs(ca.config, cb.config)
        if adapters:
            # Adapters cover the decoder layers only; a reader that found no MTP weights in a
            # torch_dist adapter drops the MTP layers from its config, which is no difference.
            config = [c for c in config if c.field != "num_mtp_layers"]
            config += _adapter_diffs(ca.adapter, cb.adapter)
        diffs: list[TensorDiff] = []
        compared = 0
        for name, spec in ca.tensors.items():
            other = cb.tensors.get(name)
            if other is None:
                diffs.append(TensorDiff(name, MISSING, shape_a=spec.shape,
                                        dtype_a=dtype_name(spec.dtype)))
                continue
            diff = TensorDiff(name, EQUAL, spec.shape, other.shape, dtype_name(spec.dtype),
                              dtype_name(other.dtype))
            if spec.shape != other.shape:
                diffs.append(replace(diff, status=SHAPE))
                continue
            ta, tb = ca.read(name), cb.read(name)
            stats = _compare(ta, tb, atol=atol, rtol=rtol)
            compared += ta.nbytes + tb.nbytes
            del ta, tb
            for r in release:
                r()
            status = EQUAL if stats.mismatched == 0 else DIFFERS
            if check_dtype and spec.dtype != other.dtype:
                status = DTYPE
            diffs.append(replace(
                diff, status=status, mismatched=stats.mismatched,
                max_abs=stats.max_abs if stats.valued else None,
                max_rel=stats.max_rel if stats.valued else None,
                first_index=None if stats.first is None else _unravel(stats.first, spec.shape)))
        for name, spec in cb.tensors.items():
            if name not in ca.tensors:
                diffs.append(TensorDiff(name, UNEXPECTED, shape_b=spec.shape,
                                        dtype_b=dtype_name(spec.dtype)))
        return VerifyReport(a=str(a), b=str(b), format_a=ca.format, format_b=cb.format,
                            atol=float(atol), rtol=float(rtol), check_dtype=check_dtype,
                            config=tuple(config), tensors=tuple(diffs),
                            bytes_compared=compared, seconds=time.perf_counter() - started)


def roundtrip(src: str | os.PathLike[str], via: str, *, atol: float = 0.0, rtol: float = 0.0,
              workdir: str | os.PathLike[str] | None = None,
              hf_config: str | os.PathLike[str] | None = None, trust_pickles: bool = False,
              **convert_options: Any) -> RoundtripReport:
    """Convert ``src`` to format ``via`` and back to its own format in a temporary directory,
    then verify both results against ``src``.

    ``convert_options`` go to the conversion into ``via`` (``pad_vocab_to_multiple``,
    ``max_shard_size``, layout options of the per-rank formats, ...); the way back uses the
    defaults. ``workdir`` holds the temporary directory (default: the system's); it is removed
    afterwards.

    Raises:
        CheckpointError: ``src`` cannot be read, or a conversion is refused.
    """
    import ckpt_ir
    from ckpt_ir.formats import PER_RANK_FORMATS

    back_format = ckpt_ir.detect(src)
    # --source-ep describes SRC only; what ckpt-ir wrote carries its own layout record.
    source_ep = convert_options.pop("source_ep", None)
    if back_format not in PER_RANK_FORMATS:
        source_ep = None
    sides = (source_ep, None)
    with tempfile.TemporaryDirectory(prefix="ckpt-ir-roundtrip-",
                                     dir=None if workdir is None else os.fspath(workdir)) as tmp:
        there_dir, back_dir = Path(tmp) / via, Path(tmp) / "back"
        ckpt_ir.convert(src, there_dir, to=via, hf_config=hf_config,
                        trust_pickles=trust_pickles, source_ep=source_ep, **convert_options)
        ckpt_ir.convert(there_dir, back_dir, to=back_format)
        there = _verify(src, there_dir, atol=atol, rtol=rtol, hf_config=hf_config,
                        trust_pickles=trust_pickles, check_dtype=True, source_ep=sides)
        back = _verify(src, back_dir, atol=atol, rtol=rtol, hf_config=hf_config,
                       trust_pickles=trust_pickles, check_dtype=True, source_ep=sides)
    return RoundtripReport(str(src), via, back_format, there, back)


def _open(path: str | os.PathLike[str], hf_config: str | os.PathLike[str] | None,
          trust: bool, source_ep: int | None = None) -> Checkpoint:
    import ckpt_ir
    from ckpt_ir.detect import resolve
    from ckpt_ir.formats import PER_RANK_FORMATS

    # The user's --hf-config is always the config (as in convert and inspect): a side's own
    # config may be wrong or rebuilt from incomplete Megatron arguments.
    if source_ep is not None and resolve(path).format not in PER_RANK_FORMATS:
        source_ep = None  # the other side of `verify A B`: only per-rank names are ambiguous
    return ckpt_ir.open(path, hf_config=hf_config, trust_pickles=trust, source_ep=source_ep)


def _both_adapters(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether A and B are both LoRA adapters (then compared as adapters). An adapter against
    a base + adapter torch_dist checkpoint compares the adapters; against a model without one it
    is a usage error."""
    from ckpt_ir.adapter_api import adapter_source
    from ckpt_ir.detect import dist_key_kinds, resolve

    sides = [adapter_source(p) is not None for p in (a, b)]
    if sides[0] != sides[1]:
        adapter, model = (a, b) if sides[0] else (b, a)
        resolved = resolve(model)
        if resolved.format == "mcore-dist" and dist_key_kinds(resolved.path)[1]:
            return True
        raise FormatError(f"{adapter} holds a LoRA adapter and {model} a model; verify compares "
                          "two models or two adapters (merge-adapter makes a model of an "
                          "adapter)")
    return sides[0]


def _adapter_diffs(a: Any, b: Any) -> list[ConfigDiff]:
    """Differences in what two adapters compute beyond their tensors: the scaling of each
    module both adapt (grouped by value pair, so one changed alpha is one line)."""
    groups: dict[tuple[float, float], list[str]] = {}
    theirs = set(b.modules())
    for module in a.modules():
        if module in theirs:
            sa, sb = a.scaling(module), b.scaling(module)
            if sa != sb:
                groups.setdefault((sa, sb), []).append(module)
    out = []
    for (sa, sb), modules in groups.items():
        what = f"of {modules[0]}" if len(modules) == 1 else \
            f"({len(modules)} modules, e.g. {modules[0]})"
        out.append(ConfigDiff(f"LoRA scaling {what}", sa, sb))
    return out


def _release_hook(ckpt: Checkpoint) -> Callable[[], None]:
    """The reader's ``release`` (drop mapped pages already consumed) behind a Checkpoint."""
    release = getattr(ckpt, "release", None)
    return release if callable(release) else _nothing


def _nothing() -> None:
    return None


def _config_diffs(a: ModelConfig, b: ModelConfig) -> list[ConfigDiff]:
    diffs = [ConfigDiff(f, getattr(a, f), getattr(b, f)) for f in MODEL_FIELDS
             if getattr(a, f) != getattr(b, f)]
    # Numerics that change the forward pass but live only in the HF dict: compared when both
    # configs state them, since a config rebuilt from Megatron arguments may leave them out.
    for name, get in (("rms_norm_eps", _eps), ("rope_theta", _rope_theta)):
        x, y = get(a.hf), get(b.hf)
        if x is not None and y is not None and x != y:
            diffs.append(ConfigDiff(name, x, y))
    return diffs


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _eps(hf: Mapping[str, Any]) -> float | None:
    return _number(hf.get("rms_norm_eps"))


def _rope_theta(hf: Mapping[str, Any]) -> float | None:
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_theta" in params:
        return _number(params["rope_theta"])
    return _number(hf.get("rope_theta"))


def _blocks(shape: Shape, limit: int) -> Iterator[tuple[int | slice, ...]]:
    """Index tuples that cut a tensor of ``shape`` into blocks of at most ``limit`` elements,
    in row-major order (so a running count of elements is the flat index)."""
    if math.prod(shape) <= limit or not shape:
        yield ()
        return
    row = math.prod(shape[1:])
    if row <= limit:
        step = limit // row
        for start in range(0, shape[0], step):
            yield (slice(start, min(start + step, shape[0])),)
        return
    for i in range(shape[0]):
        for sub in _blocks(shape[1:], limit):
            yield (i, *sub)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """``x`` (1-D, contiguous) as integers of its width, for a bitwise comparison."""
    width = _BITS.get(x.element_size())
    if width is not None:
        return x.view(width)
    return x.view(torch.uint8).view(-1, x.element_size())


def _compare(a: torch.Tensor, b: torch.Tensor, *, atol: float, rtol: float,
             chunk: int = CHUNK_ELEMENTS) -> _Stats:
    """Element-wise comparison of two tensors of one shape, ``chunk`` elements at a time."""
    stats = _Stats(valued=not (a.dtype.is_complex or b.dtype.is_complex))
    exact = atol == 0 and rtol == 0
    same_dtype = a.dtype == b.dtype
    offset = 0
    for index in _blocks(tuple(a.shape), chunk):
        xa, xb = a[index].reshape(-1), b[index].reshape(-1)
        n = xa.numel()
        where = differ = None
        if same_dtype:
            ia, ib = _bits(xa), _bits(xb)
            if torch.equal(ia, ib):  # the common case: one pass, nothing allocated
                offset += n
                continue
            differ = ia != ib
            if differ.dim() > 1:
                differ = differ.any(dim=1)
            # Only differing elements need values: gather them when they are few.
            if int(differ.count_nonzero()) <= n // 2:
                where = differ.nonzero().reshape(-1)
                xa, xb, differ = xa[where], xb[where], None
        bad, abs_diff, rel_diff = _judge(xa, xb, atol=atol, rtol=rtol, differ=differ,
                                         bitwise=exact and same_dtype, valued=stats.valued)
        count = int(bad.count_nonzero())
        if count and stats.first is None:
            first = int(bad.nonzero()[0, 0])
            stats.first = offset + (int(where[first]) if where is not None else first)
        stats.mismatched += count
        if abs_diff is not None and abs_diff.numel():
            stats.max_abs = max(stats.max_abs, float(abs_diff.max()))
            stats.max_rel = max(stats.max_rel, float(rel_diff.max()))
        offset += n
    return stats


def _judge(xa: torch.Tensor, xb: torch.Tensor, *, atol: float, rtol: float,
           differ: torch.Tensor | None, bitwise: bool, valued: bool
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Which elements are out of tolerance, and the absolute and relative differences
    (float64, NaN-aware). ``differ`` marks the elements whose bits differ (None: all)."""
    everywhere = torch.ones(xa.shape, dtype=torch.bool) if differ is None else differ
    if not valued:
        return everywhere, None, None
    # A copy even when already float64: fa is modified in place below, xa may be a view of
    # the checkpoint's mapping.
    fa, fb = xa.to(torch.float64, copy=True), xb.to(torch.float64)
    nan_a, nan_b = fa.isnan(), fb.isnan()
    abs_diff = fa.sub(fb).abs_()
    # Equal values (inf == inf included) differ by 0; NaN against a number by inf; NaN against
    # NaN by 0 (payloads are a bitwise matter).
    abs_diff.masked_fill_(fa == fb, 0.0)
    abs_diff.masked_fill_(nan_a & nan_b, 0.0)
    abs_diff.masked_fill_(nan_a ^ nan_b, math.inf)
    del fb, nan_a, nan_b
    scale = fa.abs_()
    rel_diff = abs_diff / scale  # x / 0 is inf already
    rel_diff.masked_fill_(rel_diff.isnan(), math.inf)  # inf / inf and x / NaN
    rel_diff.masked_fill_(abs_diff == 0, 0.0)
    if bitwise:
        bad = everywhere
    elif atol == 0 and rtol == 0:
        bad = abs_diff != 0
    else:
        # An infinite difference (inf against a number, NaN against a number) never passes,
        # not even a relative tolerance against an infinite reference.
        bad = (abs_diff > scale.mul_(rtol).add_(atol)) | abs_diff.isinf()
    return bad, abs_diff, rel_diff


def _unravel(flat: int, shape: Shape) -> tuple[int, ...]:
    index = []
    for n in reversed(shape):
        flat, i = divmod(flat, n)
        index.append(i)
    return tuple(reversed(index))


# --------------------------------------------------------------------------------------------
# Rendering


def _tensor_dict(t: TensorDiff) -> dict[str, Any]:
    return {"name": t.name, "status": t.status, "shape_a": t.shape_a, "shape_b": t.shape_b,
            "dtype_a": t.dtype_a, "dtype_b": t.dtype_b, "numel": t.numel,
            "mismatched": t.mismatched, "max_abs": t.max_abs, "max_rel": t.max_rel,
            "first_index": t.first_index}


def _g(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.6g}"


def _shape(s: Any) -> str:
    return "[" + ", ".join(str(d) for d in s) + "]" if s is not None else "?"


def _describe_tensor(t: Mapping[str, Any]) -> str:
    status = t["status"]
    if status == MISSING:
        return f"{t['name']}: missing from B ({t['dtype_a']} {_shape(t['shape_a'])})"
    if status == UNEXPECTED:
        return f"{t['name']}: only in B ({t['dtype_b']} {_shape(t['shape_b'])})"
    if status == SHAPE:
        return f"{t['name']}: shape {_shape(t['shape_a'])} in A, {_shape(t['shape_b'])} in B"
    parts = []
    if status == DTYPE or t["dtype_a"] != t["dtype_b"]:
        parts.append(f"dtype {t['dtype_a']} in A, {t['dtype_b']} in B")
    if t["mismatched"]:
        text = f"{t['mismatched']} of {t['numel']} elements differ"
        if t["max_abs"] is not None:
            text += f" (max abs {_g(t['max_abs'])}, max rel {_g(t['max_rel'])})"
        if t["first_index"] is not None:
            text += f", first at {_shape(t['first_index'])}"
        parts.append(text)
    return f"{t['name']}: {'; '.join(parts)}"


def render(result: Mapping[str, Any], *, limit: int = 20) -> str:
    """Human-readable text of a ``to_dict()`` of :class:`VerifyReport` or
    :class:`RoundtripReport` (the CLI renders its JSON result with this)."""
    if result.get("kind") == "roundtrip":
        verdict = "IDENTICAL" if result["equal"] else "NOT IDENTICAL"
        head = (f"round trip {result['source']} -> {result['via']} -> {result['back_format']}: "
                f"{verdict}")
        parts = [head]
        for key, label in (("there", f"after {result['via']}"), ("back", "after the way back")):
            body = render(result[key], limit=limit).splitlines()
            parts.append(f"  {label}: " + body[0])
            parts.extend("  " + line for line in body[1:])
        return "\n".join(parts)
    mode = ("bit-exact" if result["atol"] == 0 and result["rtol"] == 0
            else f"atol={result['atol']:g}, rtol={result['rtol']:g}")
    verdict = "EQUAL" if result["equal"] else "DIFFERENT"
    lines = [f"{result['a']} ({result['format_a']}) vs {result['b']} ({result['format_b']}): "
             f"{verdict} ({result['compared']} tensors, {result['differing']} differing; "
             f"{mode})"]
    for c in result["config"]:
        lines.append(f"  config {c['field']}: {c['a']!r} in A, {c['b']!r} in B")
    shown = 0
    hidden = 0
    for t in result["tensors"]:
        if t["status"] == EQUAL:
            continue
        if shown < limit:
            lines.append("  " + _describe_tensor(t))
            shown += 1
        else:
            hidden += 1
    if hidden:
        lines.append(f"  ... and {hidden} more differing tensor(s) (--json lists all)")
    return "\n".join(lines)
