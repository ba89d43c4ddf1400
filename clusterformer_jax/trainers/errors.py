"""Errors the entry point reports as one line instead of a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
  """A configuration value is invalid or inconsistent with the machine."""


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss, gradient or parameter."""
