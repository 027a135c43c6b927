"""Assertions for your own test suite: gate CI on "the exported checkpoint is the trained one".

Example (pytest)::

    from ckpt_ir.testing import assert_checkpoints_equal, assert_roundtrip

    def test_export_matches_training_checkpoint():
        assert_checkpoints_equal("runs/exp1/iter_0001000", "export/hf")

    def test_checkpoint_survives_mcore_dist():
        assert_roundtrip("export/hf", via="mcore-dist", pad_vocab_to_multiple=128)

On a mismatch they raise :class:`AssertionError` whose message is the multi-line summary of
:meth:`ckpt_ir.VerifyReport.summary` (verdict, config differences, then each differing tensor
with its max abs / rel difference and first differing index). Unreadable inputs raise
:class:`ckpt_ir.CheckpointError` as everywhere else: a broken checkpoint is an error, not a
difference.
"""

from __future__ import annotations

import os
from typing import Any

from ckpt_ir.verify import RoundtripReport, VerifyReport, roundtrip, verify

__all__ = ["assert_checkpoints_equal", "assert_roundtrip"]


def assert_checkpoints_equal(a: str | os.PathLike[str], b: str | os.PathLike[str], *,
                             atol: float = 0.0, rtol: float = 0.0,
                             hf_config: str | os.PathLike[str] | None = None,
                             trust_pickles: bool = False, check_dtype: bool = True,
                             limit: int = 20) -> VerifyReport:
    """Assert that checkpoints ``a`` (reference) and ``b`` hold the same model.

    Bit-identical by default; see :func:`ckpt_ir.verify` for ``atol``/``rtol``, ``hf_config``,
    ``check_dtype``. ``limit`` caps the differing tensors listed in the message.

    Returns:
        The :class:`~ckpt_ir.VerifyReport`, for further checks.
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this frame
    report = verify(a, b, atol=atol, rtol=rtol, hf_config=hf_config,
                    trust_pickles=trust_pickles, check_dtype=check_dtype)
    if not report.equal:
        raise AssertionError("checkpoints differ: " + report.summary(limit=limit))
    return report


def assert_roundtrip(src: str | os.PathLike[str], *, via: str, atol: float = 0.0,
                     rtol: float = 0.0, workdir: str | os.PathLike[str] | None = None,
                     hf_config: str | os.PathLike[str] | None = None,
                     trust_pickles: bool = False, limit: int = 20,
                     **convert_options: Any) -> RoundtripReport:
    """Assert that ``src`` converted to ``via`` and back is ``src`` again (and so is the
    intermediate), exactly by default.

    ``convert_options`` go to the conversion into ``via`` (as for :func:`ckpt_ir.convert`);
    ``workdir`` (e.g. pytest's ``tmp_path``) holds the temporary conversions.
    """
    __tracebackhide__ = True
    report = roundtrip(src, via, atol=atol, rtol=rtol, workdir=workdir, hf_config=hf_config,
                       trust_pickles=trust_pickles, **convert_options)
    if not report.equal:
        raise AssertionError("round trip is not the identity: " + report.summary(limit=limit))
    return report
