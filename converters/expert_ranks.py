"""Routed experts in per-rank files: which expert-parallel rank holds an expert, under what name.

With EP ranks, a GPTModel's rank ``r`` holds experts ``r*E/ep .. (r+1)*E/ep - 1`` as local
experts ``0 .. E/ep - 1`` (``global = r * E/ep + local``), each cut by the expert TP size like a
dense MLP (fc1 ``[gate_t; up_t]``, fc2 by input columns). Two module layouts name them::

    sequential  (SequentialMLP, moe_grouped_gemm=False)
        decoder.layers.{l}.mlp.experts.local_experts.{k}.linear_fc1.weight
    grouped     (TEGroupedMLP, moe_grouped_gemm=True)
        decoder.layers.{l}.mlp.experts.linear_fc1.weight{k}

The ``mcore`` naming (and torch_dist) uses the global index:
``decoder.layers.{l}.mlp.experts.experts.{e}.linear_fc1.weight``. Facts: megatron-core 0.16.1
``SequentialMLP`` / ``TEGroupedMLP.sharded_state_dict``; Megatron-Bridge's qwen3_moe mappings
(/work/shared/reference/mcore-dist-and-bridge.md §2.8-2.9). Pure name arithmetic: no I/O.
"""

from __future__ import annotations

import re

from ckpt_ir.errors import IncompatibleLayoutError
from ckpt_ir.options import EXPERT_LAYOUTS

__all__ = ["EXPERT_LAYOUTS", "expert_rank", "global_expert_name", "local_expert_index",
           "local_expert_name", "local_extra_state_module"]

# EXPERT_LAYOUTS, the module layouts of the local experts (writer option ``mcore_experts``),
# is listed once, with the typed options (ckpt_ir.options); re-exported for its importers.

_GLOBAL = re.compile(r"\.experts\.experts\.(\d+)\.(\w+)\.(weight|bias)$")
_SEQUENTIAL = re.compile(r"\.experts\.local_experts\.(\d+)\.(\w+)\.(weight|bias)$")
_GROUPED = re.compile(r"\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")


def expert_rank(expert: int, num_experts: int, ep: int) -> tuple[int, int]:
    """Global expert -> (EP rank, local index)."""
    if num_experts % ep:
        raise IncompatibleLayoutError(f"EP={ep} does not divide the {num_experts} experts")
    per = num_experts // ep
    return expert // per, expert % per


def local_expert_name(native: str, num_experts: int, ep: int, layout: str
                      ) -> tuple[int, str]:
    """An ``mcore`` expert tensor name -> (EP rank, its name in that rank's state dict)."""
    m = _GLOBAL.search(native)
    if m is None:
        raise IncompatibleLayoutError(f"{native} is not a routed expert's tensor")
    rank, local = expert_rank(int(m.group(1)), num_experts, ep)
    head = native[:m.start()]
    if layout == "sequential":
        return rank, f"{head}.experts.local_experts.{local}.{m.group(2)}.{m.group(3)}"
    if layout == "grouped":
        return rank, f"{head}.experts.{m.group(2)}.{m.group(3)}{local}"
    raise IncompatibleLayoutError(f"expert layout must be one of {', '.join(EXPERT_LAYOUTS)}, "
                                  f"not {layout!r}")


def global_expert_name(name: str, ep_rank: int, num_experts: int, ep: int
                       ) -> tuple[str, str] | None:
    """A local expert tensor name of EP rank ``ep_rank`` -> (``mcore`` name, layout), or None
    when ``name`` is not a local expert's tensor."""
    per = num_experts // ep
    m = _SEQUENTIAL.search(name)
    if m is not None:
        local, module, param, layout = int(m.group(1)), m.group(2), m.group(3), "sequential"
    else:
        m = _GROUPED.search(name)
        if m is None:
            return None
        module, param, local, layout = m.group(1), m.group(2), int(m.group(3)), "grouped"
    if local >= per:
        raise IncompatibleLayoutError(
            f"{name}: local expert {local} does not exist with {num_experts} experts over "
            f"EP={ep} ({per} per rank)")
    expert = ep_rank * per + local
    return f"{name[:m.start()]}.experts.experts.{expert}.{module}.{param}", layout


def local_expert_index(name: str) -> int | None:
    """The local expert index of a rank file's expert tensor (either layout), or None."""
    m = _SEQUENTIAL.search(name)
    if m is not None:
        return int(m.group(1))
    m = _GROUPED.search(name)
    return int(m.group(3)) if m is not None else None


def local_extra_state_module(local_name: str) -> str | None:
    """The module whose ``_extra_state`` a local expert tensor implies (per expert for
    SequentialMLP, one per grouped linear for TEGroupedMLP), or None."""
    m = _SEQUENTIAL.search(local_name)
    if m is not None:
        return local_name[:m.end(2)]
    m = _GROUPED.search(local_name)
    if m is not None:
        return local_name[:m.end(1)]
    return None
