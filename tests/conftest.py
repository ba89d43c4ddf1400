"""Test-wide setup, before JAX is imported anywhere: eight virtual CPU devices, and XLA's LLVM backend at
optimisation level 0. The suite is dominated by compiling small models; level 0 compiles them about 1.5x
faster and leaves the arithmetic as it is (XLA's HLO passes and buffer assignment do not depend on it)."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("CF_TEST_XLA_CACHE"):  # launch/test.sh: one persistent XLA cache for the whole run
    # Every pytest worker and every training subprocess a test starts reads it (JAX takes config defaults from
    # the environment), so a program compiled once anywhere in the run (the tiny config's train step is
    # compiled by a dozen tests and their subprocesses) is read from disk after that.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["CF_TEST_XLA_CACHE"])
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def persistent_compilation_cache(tmp_path_factory):
    """A fresh persistent XLA cache for one test module (``pytest.mark.usefixtures``): programs the module
    compiles more than once (the same step in a fixture and in a whole run) compile once."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if os.environ.get("CF_TEST_XLA_CACHE"):  # the run-wide cache is on already
        yield
        return
    previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
    compilation_cache.reset_cache()
