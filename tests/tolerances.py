"""Float tolerances derived from the magnitudes involved, not constants tuned on one machine.

Two fp32 computations of the same function that differ only in the order of their roundings
(a merged weight vs. base + adapter at run time, one BLAS blocking vs. another) differ by an
amount that scales with the magnitudes summed and with the number of terms, so a fixed ``1e-5``
passes on one machine and fails on the next (``1.03e-05`` on a fresh clone). The bounds here:

- :func:`merge_bound`: Higham's a-priori bound for ``W + s * (B @ A)`` evaluated in fp32,
  element by element: ``γ(r + 2) * (|W| + |s| * |B| @ |A|)``, ``γ(n) = n u / (1 - n u)``,
  ``u = 2**-24``.
  Two independent fp32 evaluations of the formula are each within it of the exact value, so they
  are within twice it of each other.
- :func:`assert_logits_close`: a whole forward pass has no useful a-priori bound, so it is measured
  on the very input: the reference model run in float64 is the exact value, and the reference's
  own fp32 run shows how far fp32 rounding moves these logits. A result computed differently in
  fp32 must be as close to the exact logits as fp32 arithmetic gets, within a small factor.
"""

from __future__ import annotations

import copy

import torch

__all__ = ["U32", "assert_logits_close", "assert_merged_close", "float64_logits", "gamma",
           "merge_bound"]

U32 = 2.0 ** -24
"""Unit roundoff of float32 (half an ulp of 1.0)."""

LOGIT_FACTOR = 8.0
"""How much further from the exact logits than the reference's own fp32 run a result may be: a
different association order (merged weights, stacked ranks, fused kernels) gives rounding of the
same size, not the same rounding (measured: up to 1.9x for a merged qwen2 with rsLoRA); a wrong
weight moves the logits by orders of magnitude more (> 0.1 here)."""


def gamma(n: int) -> float:
    """Higham's γ(n): the relative error bound of n successive fp32 roundings."""
    return n * U32 / (1 - n * U32)


def merge_bound(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """Element-wise bound on |fl32(W + s * (B @ A)) - (W + s * B @ A)| (rank r = A.shape[-2])."""
    r = a.shape[-2]
    w, b, a = w.double(), b.double(), a.double()
    return gamma(r + 2) * (w.abs() + abs(scaling) * (b.abs() @ a.abs()))


def assert_merged_close(got: torch.Tensor, want: torch.Tensor, w: torch.Tensor,
                        b: torch.Tensor, a: torch.Tensor, scaling: float, what: str) -> None:
    """``got`` and ``want`` are both fp32 merges of ``W + scaling * B @ A``: each is within
    :func:`merge_bound` of the exact value, so they are within twice it of each other."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got.double() - want.double()).abs()
    bound = 2 * merge_bound(w, b, a, scaling)
    worst = (diff - bound).argmax()
    assert bool((diff <= bound).all()), \
        f"{what}: |Δ| {diff.flatten()[worst].item():.3g} > bound " \
        f"{bound.flatten()[worst].item():.3g} at flat index {worst.item()}"


def assert_megatron_merge_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                               base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor],
                               scaling: float) -> None:
    """Two fp32 merges of Megatron-named weights (``got`` and ``want``, over ``base``) with the
    Megatron-Bridge adapter tensors ``lora``: adapted weights within :func:`assert_merged_close`,
    untouched ones bit-equal, and at least one weight adapted. Megatron's B carries each module's
    own scaling relative to ``scaling`` (alpha / rank), so ``scaling * |B| @ |A|`` is the size of
    the update."""
    adapted = 0
    for k in want:
        stem = k.removesuffix(".weight")
        b = lora.get(f"{stem}.adapter.linear_out.weight")
        if b is None:
            assert torch.equal(got[k], want[k]), k
            continue
        assert_merged_close(got[k], want[k], base[k], b, lora[f"{stem}.adapter.linear_in.weight"],
                            scaling, k)
        adapted += 1
    assert adapted


@torch.no_grad()
def float64_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits of a float64 copy of ``model`` (the model itself is left in its dtype)."""
    exact = copy.deepcopy(model).double()
    for module in exact.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_experts_implementation", None) not in (None, "eager"):
            # transformers' grouped_mm MoE kernel has no float64 version; the eager loop over
            # experts computes the same function.
            config._experts_implementation = "eager"
    return exact(input_ids=input_ids).logits


def assert_logits_close(got: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor,
                        what: str) -> float:
    """``got`` (fp32) is as close to the exact logits ``ref64`` as fp32 arithmetic allows.

    The allowance is :data:`LOGIT_FACTOR` times the distance of the reference's own fp32 run
    ``ref32`` from ``ref64``, and at least one rounding of the largest logit. Returns the
    distance of ``got`` from ``ref64``.
    """
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    exact = ref64.double()
    noise = (ref32.double() - exact).abs().max().item()
    floor = U32 * exact.abs().max().item()
    bound = LOGIT_FACTOR * max(noise, floor)
    diff = (got.double() - exact).abs().max().item()
    assert diff <= bound, f"{what}: max |Δlogits| {diff:.3g} from the float64 logits > " \
        f"{bound:.3g} ({LOGIT_FACTOR:g} x the fp32 reference's own {noise:.3g})"
    return diff
