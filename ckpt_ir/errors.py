"""The one exception hierarchy of ckpt-ir.

Every error a user can cause derives from :class:`CheckpointError` and renders as one line.
The CLI maps them to exit code 2; :class:`InternalError` (our bug) maps to exit code 1.
Structured fields (``path``, ``tensor``) let callers react without parsing messages.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "DestinationError",
    "DestinationExistsError",
    "FormatError",
    "IncompatibleLayoutError",
    "InternalError",
    "MissingConfigError",
    "PlanError",
    "UnsafeCheckpointError",
    "portable_error",
]


class CheckpointError(Exception):
    """Base of every input or user error; ``str()`` is one line."""

    def __init__(self, message: str, *, path: str | Path | None = None,
                 tensor: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)
        self.tensor = tensor

    def __str__(self) -> str:
        # Messages name the tensor themselves (quoted with repr where it came from an untrusted
        # file); only the path is appended, and only when the message does not carry it.
        text = self.message
        if self.path is not None and self.path not in text:
            text = f"{text} [{self.path}]"
        return text.replace("\n", " ")


class FormatError(CheckpointError):
    """The input is not a recognised format, or uses an unsupported architecture or variant."""


class CorruptCheckpointError(CheckpointError):
    """Truncated files, bad headers or offsets, missing shards, inconsistent metadata."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle references a global outside the allow-list; nothing was executed."""


class IncompatibleLayoutError(CheckpointError):
    """A parallel layout that cannot hold this model (e.g. TP does not divide KV groups)."""


class MissingConfigError(CheckpointError):
    """No model configuration could be found or derived for the checkpoint."""


class DestinationExistsError(CheckpointError):
    """The destination exists and ``overwrite`` was not requested."""


class DestinationError(CheckpointError):
    """The destination cannot be written (read-only, full, permission denied)."""


class PlanError(CheckpointError):
    """The conversion plan is invalid; carries every problem found, not just the first."""

    def __init__(self, problems: Sequence[str], *, path: str | Path | None = None) -> None:
        self.problems = list(problems)
        head = self.problems[0] if self.problems else "invalid plan"
        more = f" (and {len(self.problems) - 1} more problem(s))" if len(self.problems) > 1 else ""
        super().__init__(f"{head}{more}", path=path)


class InternalError(Exception):
    """A broken invariant inside ckpt-ir: a bug, never the user's input."""


def portable_error(e: BaseException) -> BaseException:
    """``e`` if it survives pickling (to travel between ranks), else an equivalent one-line
    error of the nearest public type."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        cls = CheckpointError if isinstance(e, CheckpointError) else InternalError
        return cls(f"{type(e).__name__}: {e}")
