"""Errors the entry point reports as one line instead of a traceback. A leaf: imports nothing of the package."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid or inconsistent with the machine."""


class ModelConfigError(ConfigError):
    """A model field or input shape that cannot work (e.g. window counts that do not divide a stage)."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or parameter."""
