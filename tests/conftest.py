"""Test-wide setup, before JAX is imported anywhere: eight virtual CPU devices, and XLA's CPU compiler set to
compile fast (``tests.CPU_COMPILE_FLAGS``)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import CPU_COMPILE_FLAGS  # noqa: E402

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {CPU_COMPILE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("CF_TEST_XLA_CACHE"):  # launch/test.sh: one persistent XLA cache for the whole run
    # Every pytest worker and every training subprocess a test starts reads it (JAX takes config defaults from
    # the environment), so a program compiled once anywhere in the run (the tiny config's train step is
    # compiled by a dozen tests and their subprocesses) is read from disk after that.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["CF_TEST_XLA_CACHE"])
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


import pytest  # noqa: E402

# The costliest files first (by the CPU time of their compiles and training subprocesses, measured one file
# at a time): launch/test.sh schedules pytest-xdist work units (an xdist_group, or one test) in collection
# order (--no-loadscope-reorder), so the long units start first and the many short ones fill in behind them
# on whichever worker frees up; the two workers then finish within a short unit of each other.
COSTLIEST_FIRST = (  # CPU seconds of the file alone, December 2026; the big xdist units first
    "test_preemption.py",  # ~120 with the next two (group 'tiny_run'), more wall: signals and 2-process runs
    "test_checkpoint_integrity.py",
    "test_multihost.py",
    "test_dense_trainer.py",  # ~180, one unit
    "test_trainer.py",  # ~150, one unit
    "test_serving.py",  # ~65, one unit
    "test_visualize.py",  # ~60, one unit
    "test_workdir.py",  # ~45, one unit
    "test_remat.py",  # ~170 in units of one model
    "test_export.py",  # ~60 in single tests
    "test_aot.py",  # ~100 in single tests: a v5e-8 and an h100-8 compile
    "test_restore_mesh.py",  # ~25, one test
    "test_models.py",  # ~105 in single tests
    "test_groupmixformer.py",
    "test_decoder.py",
    "test_benchmarks.py",
    "test_semantic.py",
    "test_paca_vit.py",
)
# Files whose module fixtures compile (a model init, a workdir): one worker runs each (an xdist_group named
# after the file, unless its tests name a group of their own), so the fixture is built once.
ONE_WORKER = ("test_visualize.py", "test_serving.py", "test_workdir.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Groups the ``ONE_WORKER`` files and orders the tests by ``COSTLIEST_FIRST`` (a stable sort: the rest
    keep their order after)."""
    rank = {name: i for i, name in enumerate(COSTLIEST_FIRST)}
    for item in items:
        name = os.path.basename(str(item.fspath))
        if name in ONE_WORKER and not any(item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(name.removesuffix(".py")))
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))


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


# ----------------------------------------------------------------------------------------------------------
# Session fixtures shared by the test files (one per pytest-xdist worker). What they return is read-only:
# a test that changes a dataset or a workdir makes its own copy.


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> str:
    """The prepared scikit-learn digits (TFDS layout), prepared once per worker."""
    from clusterformer_jax.data import digits as digits_lib

    data_dir = str(tmp_path_factory.mktemp("shared_digits"))
    digits_lib.prepare_digits(data_dir)
    return data_dir


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> str:
    """The prepared small synthetic shapes (48 train / 16 validation images), prepared once per worker."""
    from clusterformer_jax.data import shapes as shapes_lib

    data_dir = str(tmp_path_factory.mktemp("shared_shapes"))
    shapes_lib.prepare_shapes(data_dir, "small")
    return data_dir


@pytest.fixture(scope="session")
def tiny_run_shared(tmp_path_factory, digits_dir):
    """(data dir, compilation cache dir) for every ``tests.tiny_run`` subprocess of the session: the prepared
    digits, and the run-wide XLA cache where launch/test.sh set one (else one for this worker)."""
    from pathlib import Path

    cache = os.environ.get("CF_TEST_XLA_CACHE") or str(tmp_path_factory.mktemp("tiny_run_xla_cache"))
    return Path(digits_dir), Path(cache)


@pytest.fixture(scope="session")
def tiny_reference(tiny_run_shared, tmp_path_factory):
    """One uninterrupted ``tests.tiny_run`` run (20 steps, checkpoints at 10 and 20) of one process with two CPU
    devices (a 2-way data mesh), shared by the preemption, checkpoint-integrity and multi-host tests: the run
    every interrupted, damaged or multi-process run must end bitwise equal to. Returns its workdir."""
    from tests import tiny_run

    workdir = tmp_path_factory.mktemp("tiny_reference")
    code, out = tiny_run.run(tiny_run.args(workdir, *tiny_run_shared), JAX_NUM_CPU_DEVICES="2")
    assert code == 0, out[-3000:]
    assert tiny_run.steps(workdir) == tiny_run.SAVED
    assert "imported tensorflow: False" in out  # the trainer writes its event files without it
    return workdir


@pytest.fixture(scope="session")
def tiny_reference_two_processes(tiny_run_shared, tmp_path_factory):
    """The same run as ``tiny_reference`` by two processes of one CPU device each (jax.distributed on
    127.0.0.1), uninterrupted. Returns its workdir."""
    from tests import tiny_run

    workdir = tmp_path_factory.mktemp("tiny_reference_two_processes")
    procs = tiny_run.start_processes(tiny_run.args(workdir, *tiny_run_shared), 2)
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert tiny_run.steps(workdir) == tiny_run.SAVED
    return workdir
