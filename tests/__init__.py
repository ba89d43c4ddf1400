"""Shared test helpers."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA's CPU compiler for tests, in this process (tests/conftest.py) and in the runs tests start: the suite is
# dominated by compiling small models once, so compile fast and run a little slower: LLVM at optimisation level 0
# (11.4 -> 6.6 s for the nano's gradient) and the loop emitters instead of the fusion emitters (-> 3.1 s; it runs
# in 42 ms instead of 34; 2-core CPU, December 2026). The same IEEE float32 arithmetic (the emitters may order a
# reduction differently); every comparison in the suite is within one run's flags.
CPU_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


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
