"""Errors a user can fix (bad file, bad option, wrong checkpoint), under one root.

Every error here derives from :class:`UserError`: the CLI turns it into one line on stderr and
exit code 2. The CLI catches nothing else but ``OSError`` (a full disk, a read-only folder),
so any other exception is a bug and keeps its traceback. The errors about values
(:class:`ConfigError`, :class:`DataError`, :class:`CheckpointError`) are also ``ValueError``,
so code that calls the library and catches ``ValueError`` keeps working.

This module imports nothing from the package: every layer may raise these.
"""

from __future__ import annotations

import os

__all__ = ["CheckpointError", "CheckpointFormatError", "ConfigError", "DataError",
           "NonFiniteError", "Preempted", "UserError"]


class UserError(Exception):
    """A problem with the user's input, configuration or files, stated in one line."""


class ConfigError(UserError, ValueError):
    """An unknown key, a wrong type or an invalid value in a configuration or an option."""


class DataError(UserError, ValueError):
    """A problem with input data, naming the case, the file and the problem.

    Args:
        problem: what is wrong, with what was expected and what arrived.
        path: the file (or folder) concerned, if any.
        case: the case name, if known.

    Attributes:
        problem, path, case: as given; ``str(error)`` joins them as ``case 'x': path: problem``.

    Examples:
        >>> str(DataError("3 frames, label has 4", path="img.nii.gz", case="p01"))
        "case 'p01': img.nii.gz: 3 frames, label has 4"
    """

    def __init__(self, problem: str, path: str | os.PathLike | None = None,
                 case: str | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        self.case = case
        super().__init__(self._message())

    def _message(self) -> str:
        parts = []
        if self.case is not None:
            parts.append(f"case {self.case!r}")
        if self.path is not None:
            parts.append(self.path)
        parts.append(self.problem)
        return ": ".join(parts)

    def with_case(self, case: str) -> DataError:
        """Return a copy of this error that names ``case``."""
        return DataError(self.problem, self.path, case)


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, incomplete, damaged or written for another model."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint written in a newer format than this version of clstm4d reads."""


class NonFiniteError(UserError):
    """Training stopped after too many consecutive steps with a non-finite loss or gradient."""


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after finishing a step and writing a checkpoint.

    Not an error: ``train --resume`` continues exactly. The CLI exits with code 75
    (``EX_TEMPFAIL``, "try again later") so that job scripts can requeue the run.

    Attributes:
        signal: the signal's name (``"SIGTERM"``), or None on a rank that was told by another.
        step: the last finished step. checkpoint: its checkpoint (None on ranks other than 0).
    """

    def __init__(self, signal: str | None, step: int, checkpoint=None):
        self.signal, self.step, self.checkpoint = signal, step, checkpoint
        by = signal or "a signal to another process of the run"
        where = f"; checkpoint {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"stopped by {by} after step {step}{where}; continue with --resume")
