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


def one_line(error: BaseException, *, with_type: bool = False, max_chars: int | None = None) -> str:
    """The error's message as one line: its first non-empty line (the type name when there is none), cut to
    ``max_chars`` with '...', after 'TypeName: ' when ``with_type`` (for errors of libraries, whose message
    alone may not say what failed)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = lines[0]
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 3] + "..."
    return f"{type(error).__name__}: {text}" if with_type else text
