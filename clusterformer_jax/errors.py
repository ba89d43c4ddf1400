"""Errors the entry point reports as one line instead of a traceback. A leaf: imports nothing of the package.

Every ``UsageError`` is the user's to fix (a config value, a path, a checkpoint, a dataset to prepare): its
message is one line naming the thing and the fix, and ``main`` exits with code 2 without touching the workdir.
The path, init_from and data errors are ``ConfigError``s too, so every ``except ConfigError`` site catches them.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Input the user must fix; the message says what and how, on one line."""


class ConfigError(UsageError):
    """A configuration value is invalid or inconsistent with the machine."""


class ModelConfigError(ConfigError):
    """A model field or input shape that cannot work (e.g. window counts that do not divide a stage)."""


class PathError(ConfigError):
    """A workdir, checkpoint or data path that is missing, of the wrong kind or not writable."""


class InitFromError(ConfigError):
    """An init_from or resume source that cannot be used for this run (unreadable, or of another model)."""


class DataError(ConfigError):
    """A dataset that is not prepared, or whose files cannot be read."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or parameter."""


def one_line(error: BaseException) -> str:
    """The error's message as one line (the first non-empty line; the type name when there is none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
