"""The launch environment: tcmalloc preloaded when the system has it, a clear error for a bad path."""

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = "from clusterformer_jax import runtime; print(runtime.host_allocator())"


def _launch_python(env_update, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "CLUSTERFORMER_TCMALLOC")}
    env.update(env_update)
    return subprocess.run(
        ["bash", os.path.join(REPO, "launch", "python.sh"), *args], env=env, capture_output=True, text=True, timeout=600
    )


def _system_tcmalloc():
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    if not os.path.exists(ldconfig):
        return None
    listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout
    return next((line.split("=> ")[-1] for line in listing.splitlines() if "libtcmalloc_minimal.so.4 " in line), None)


def test_tcmalloc_off_runs_on_glibc():
    done = _launch_python({"CLUSTERFORMER_TCMALLOC": "0"}, "-c", PROBE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "glibc"


def test_bad_tcmalloc_path_is_one_clear_error():
    done = _launch_python({"CLUSTERFORMER_TCMALLOC": "/no/such/libtcmalloc.so"}, "-c", 'print("ran")')
    assert done.returncode == 1
    assert "ran" not in done.stdout
    assert done.stderr.strip().splitlines()[-1] == (
        "[launch] CLUSTERFORMER_TCMALLOC=/no/such/libtcmalloc.so is not a file; set it to a libtcmalloc .so or to 0"
    )


def test_system_tcmalloc_is_preloaded_by_default():
    library = _system_tcmalloc()
    if library is None:
        pytest.skip("no libtcmalloc_minimal.so.4 on this system (apt-get install libtcmalloc-minimal4)")
    default = _launch_python({}, "-c", PROBE)
    explicit = _launch_python({"CLUSTERFORMER_TCMALLOC": library}, "-c", PROBE)
    for done in (default, explicit):
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "tcmalloc"
