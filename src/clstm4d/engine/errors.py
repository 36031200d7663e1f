"""Errors a user can fix (bad file, bad option, wrong checkpoint).

The CLI turns every :class:`UserError` into one line on stderr and a non-zero exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, configuration or files, stated in one line."""


class ConfigError(UserError, ValueError):
    """An unknown key, a wrong type or an invalid value in a configuration."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, incomplete or written for another model."""


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
