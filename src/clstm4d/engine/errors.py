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
