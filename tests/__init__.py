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
