"""Shared test helpers."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark(filename: str):
    """Imports benchmarks/FILENAME (benchmarks/ is scripts, not a package)."""
    path = os.path.join(REPO, "benchmarks", filename)
    spec = importlib.util.spec_from_file_location(filename.removesuffix(".py"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(filename: str, arg: str | None = None):
    """``get_config([arg])`` of configs/FILENAME."""
    path = os.path.join(REPO, "configs", filename)
    spec = importlib.util.spec_from_file_location(f"test_config_{filename.removesuffix('.py')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)
