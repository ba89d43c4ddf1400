"""SIGTERM / SIGINT: the run finishes its step, commits a checkpoint, exits 75 and resumes bit for bit."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest

from clusterformer_jax import preemption
from tests import tiny_run

# one worker runs the tiny-run tests of this file, test_checkpoint_integrity and test_multihost: they share
# the session's reference runs (tests/conftest.py)
pytestmark = pytest.mark.xdist_group("tiny_run")


@pytest.fixture(scope="module")
def shared(tiny_run_shared):
    """(data dir, compilation cache dir) shared by every tiny run of the session (tests/conftest.py)."""
    return tiny_run_shared


@pytest.fixture(scope="module")
def reference(tiny_reference):
    """The session's uninterrupted 20-step run, one process with two CPU devices (tests/conftest.py)."""
    return tiny_reference


def test_exit_code_is_distinct():
    assert preemption.EXIT_PREEMPTED not in (0, 1, 2) and preemption.EXIT_PREEMPTED < 128


def test_guard_stops_after_a_signal_without_distributed():
    before = {signum: signal.getsignal(signum) for signum in preemption.SIGNALS}
    with preemption.PreemptionGuard(distributed=False) as guard:
        assert not guard.should_stop(1, lambda step: False) and not guard.stop_requested
        with preemption.PreemptionGuard() as inner:  # the trainer's, inside main's: the same guard
            assert inner is guard
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while guard.signal_name is None and time.time() < deadline:  # recorded by the watcher thread
            time.sleep(0.01)
        assert guard.signal_name == "SIGTERM" and guard.stop_requested
        assert guard.should_stop(2, lambda step: False)
    assert {signum: signal.getsignal(signum) for signum in preemption.SIGNALS} == before  # restored
    assert signal.set_wakeup_fd(-1) == -1  # and the wakeup fd


def test_guard_follows_the_preemption_service_under_distributed():
    """Under jax.distributed only the synchronised answer counts (every process stops at the same step)."""
    with preemption.PreemptionGuard(distributed=True) as guard:
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # left to JAX's notifier
        assert not guard.should_stop(3, lambda step: False)
        assert guard.should_stop(4, lambda step: step == 4)


def test_second_signal_exits_at_once(shared, tmp_path):
    proc = tiny_run.start(tiny_run.args(tmp_path, *shared), sleep=0.2)
    lines: list[str] = []
    tiny_run.wait_for(proc, f"step 3/{tiny_run.TOTAL_STEPS} ", lines)
    proc.send_signal(signal.SIGINT)
    tiny_run.wait_for(proc, "SIGINT: saving a checkpoint after this step", lines)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines) + out
    assert "second signal SIGTERM: exiting now without saving" in out
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_sigterm_at_a_random_step_then_restart_is_bitwise_identical(reference, shared, tmp_path):
    at_step = random.randint(2, tiny_run.TOTAL_STEPS - 5)
    two_devices = {"JAX_NUM_CPU_DEVICES": "2"}  # as the reference ran
    code, out = tiny_run.interrupt(tiny_run.start(tiny_run.args(tmp_path, *shared), sleep=0.1, **two_devices), at_step)
    assert code == preemption.EXIT_PREEMPTED, f"signal at step {at_step}:\n{out[-3000:]}"
    saved = tiny_run.steps(tmp_path)[-1]
    assert at_step <= saved < tiny_run.TOTAL_STEPS, (at_step, saved)
    assert f"preempted at step {saved}: checkpoint saved" in out
    assert not (tmp_path / "results.json").exists()
    code, out = tiny_run.run(tiny_run.args(tmp_path, *shared), **two_devices)
    assert code == 0, out[-3000:]
    assert f"Train state from workdir checkpoint (step {saved})" in out
    final = tiny_run.stored_state(tmp_path, tiny_run.TOTAL_STEPS)
    tiny_run.assert_states_equal(final, tiny_run.stored_state(reference, tiny_run.TOTAL_STEPS))


def _two_processes(workdir, shared, sleep: float = 0.0) -> list[subprocess.Popen]:
    return tiny_run.start_processes(tiny_run.args(workdir, *shared), 2, sleep)


@pytest.mark.slow
def test_two_processes_sigterm_one_then_restart_is_bitwise_identical(
    tiny_reference_two_processes, shared, tmp_path_factory
):
    """jax.distributed on 127.0.0.1: SIGTERM reaches only process 1, both stop at the same step and exit 75."""
    uninterrupted = tiny_reference_two_processes  # the session's uninterrupted 2-process run (tests/conftest.py)

    workdir = tmp_path_factory.mktemp("mp_interrupted")
    procs = _two_processes(workdir, shared, sleep=0.1)
    at_step = random.randint(2, tiny_run.TOTAL_STEPS - 8)
    lines: list[str] = []
    tiny_run.wait_for(procs[1], f"step {at_step}/{tiny_run.TOTAL_STEPS} ", lines)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [preemption.EXIT_PREEMPTED] * 2, outs[0][-3000:] + outs[1][-3000:]
    saved = tiny_run.steps(workdir)[-1]
    assert at_step <= saved < tiny_run.TOTAL_STEPS
    for out in outs:
        assert f"preempted at step {saved}" in out

    procs = _two_processes(workdir, shared)
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    final = tiny_run.stored_state(workdir, tiny_run.TOTAL_STEPS)
    tiny_run.assert_states_equal(final, tiny_run.stored_state(uninterrupted, tiny_run.TOTAL_STEPS))
