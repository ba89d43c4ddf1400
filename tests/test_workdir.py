"""One run per workdir (a lock with heartbeat; stale ones taken over), a checkpoint write failure in one line,
a workdir whose only checkpoints are set aside as unreadable refusing to start over, and signals that work
while the first step compiles."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from clusterformer_jax import checkpointing
from clusterformer_jax import preemption
from clusterformer_jax import workdir_lock
from clusterformer_jax.trainers import restore
from tests import tiny_run


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """(data dir, compilation cache dir) for every run of this module; the run-wide XLA cache when there is one."""
    root = tmp_path_factory.mktemp("workdir_runs")
    return root / "tfds", Path(os.environ.get("CF_TEST_XLA_CACHE") or root / "xla_cache")


def _error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error: ")]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _write_lock(workdir: Path, host: str, pid: int, heartbeat_age_s: float) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    holder = workdir_lock.Holder(host, pid, now - heartbeat_age_s - 5, now - heartbeat_age_s, "old")
    (workdir / workdir_lock.LOCK_FILE).write_text(holder.dumps())


def _holder(workdir: Path) -> workdir_lock.Holder:
    return workdir_lock.Holder.parse((workdir / workdir_lock.LOCK_FILE).read_text())


# --- the lock, in process ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("flock", [True, False], ids=["local", "heartbeat_only"])
def test_a_held_workdir_is_refused_in_one_line_and_free_again_after_release(tmp_path, flock, monkeypatch):
    monkeypatch.setattr(workdir_lock, "_CONFIRM_S", 0.0)
    first = workdir_lock.WorkdirLock(str(tmp_path))
    first.local = flock  # False: the object-store path (contents and heartbeat only)
    first.acquire()
    holder = _holder(tmp_path)
    assert (holder.host, holder.pid) == (socket.gethostname(), os.getpid())
    second = workdir_lock.WorkdirLock(str(tmp_path))
    second.local = flock
    with pytest.raises(workdir_lock.WorkdirLockedError) as error:
        second.acquire()
    message = str(error.value)
    assert "\n" not in message and f"pid {os.getpid()} on {socket.gethostname()}" in message
    assert "in use by another run" in message and "--workdir" in message
    first.release()
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
    with workdir_lock.WorkdirLock(str(tmp_path)) as third:
        assert _holder(tmp_path).token == third._me.token


@pytest.mark.parametrize(
    "host, age, why",
    [("this", 0.0, "no longer"), ("elsewhere", 2 * workdir_lock.STALE_AFTER_S, "no heartbeat for 20 min")],
    ids=["dead_pid_on_this_host", "silent_holder_on_another_host"],
)
@pytest.mark.parametrize("flock", [True, False], ids=["local", "heartbeat_only"])
def test_a_stale_lock_is_taken_over_with_one_line(tmp_path, host, age, why, flock, monkeypatch, caplog):
    monkeypatch.setattr(workdir_lock, "_CONFIRM_S", 0.0)
    host = socket.gethostname() if host == "this" else "another-host"
    pid = _dead_pid() if host == socket.gethostname() else 12345
    _write_lock(tmp_path, host, pid, age)
    lock = workdir_lock.WorkdirLock(str(tmp_path))
    lock.local = flock
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    try:
        assert lock.took_over[0].pid == pid and why in lock.took_over[1]
        assert _holder(tmp_path).pid == os.getpid()
        lines = [r.getMessage() for r in caplog.records if "Taking over the lock" in r.getMessage()]
        assert len(lines) == 1 and f"pid {pid} on {host}" in lines[0] and "\n" not in lines[0]
    finally:
        lock.release()


def test_a_live_holder_on_another_host_is_refused_although_flock_is_free(tmp_path):
    """flock may not span hosts on a network file system: a fresh heartbeat from elsewhere wins."""
    _write_lock(tmp_path, "another-host", 12345, 1.0)
    with pytest.raises(workdir_lock.WorkdirLockedError, match="pid 12345 on another-host"):
        workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    assert _holder(tmp_path).pid == 12345  # left as it was


def test_the_heartbeat_is_rewritten_while_held(tmp_path):
    with workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0.05):
        first = _holder(tmp_path).heartbeat
        deadline = time.time() + 5
        while _holder(tmp_path).heartbeat == first and time.time() < deadline:
            time.sleep(0.05)
        assert _holder(tmp_path).heartbeat > first


def test_set_aside_only_checkpoints_refuse_to_start_over(tmp_path, caplog):
    from ml_collections import ConfigDict

    directory = tmp_path / "checkpoints"
    (directory / "30.corrupt-1").mkdir(parents=True)
    (directory / "20.orbax-checkpoint-tmp").mkdir()
    with pytest.raises(checkpointing.CheckpointError) as error:
        restore.check_workdir_checkpoints(ConfigDict({"restart_from_scratch": False}), str(directory))
    message = str(error.value)
    assert "\n" not in message and "30.corrupt-1" in message and "--config.restart_from_scratch=True" in message
    with caplog.at_level(logging.WARNING):
        restore.check_workdir_checkpoints(ConfigDict({"restart_from_scratch": True}), str(directory))
    assert any("starting over" in r.getMessage() and "30.corrupt-1" in r.getMessage() for r in caplog.records)
    (directory / "10").mkdir()  # a committed step: the run resumes from it, nothing to refuse
    restore.check_workdir_checkpoints(ConfigDict({"restart_from_scratch": False}), str(directory))


def _toy_state(step: int) -> dict:
    import jax.numpy as jnp

    return {"w": jnp.full((4, 4), float(step)), "step": jnp.asarray(step, jnp.int32)}


def test_an_asynchronous_save_that_fails_is_one_error_naming_its_step(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=None)
    ckpt.save(10, _toy_state(10), force=True)
    ckpt.wait()
    ckpt.save(20, _toy_state(20), force=True)
    ckpt.wait()  # the real save of 20 is committed; now make the wait report a failure of it, as Orbax does
    ckpt._pending = 20

    def fail(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", fail)
    with pytest.raises(checkpointing.CheckpointWriteError) as error:
        ckpt.save(30, _toy_state(30), force=True)
    message = str(error.value)
    assert "\n" not in message and message.startswith("saving checkpoint step 20 in ")
    assert "No space left on device" in message and "the last good checkpoint is step 20" in message
    ckpt.close()  # quiet after the reported failure
    monkeypatch.undo()


def test_a_summary_writer_failure_is_one_error_and_then_quiet(tmp_path):
    from clusterformer_jax.trainers.summaries import WorkdirWriter

    class Full:
        def write_scalars(self, step, values):
            raise OSError(28, "No space left on device")

        closed = False

        def flush(self):
            raise AssertionError("not called after the failure")

        def close(self):
            self.closed = True  # still closed (its threads), quietly

    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=None, async_save=False)
    ckpt.save(10, _toy_state(10), force=True)
    full = Full()
    writer = WorkdirWriter(full, str(tmp_path), ckpt)
    with pytest.raises(checkpointing.WorkdirWriteError) as error:
        writer.write_scalars(12, {"loss": 1.0})
    message = str(error.value)
    assert "\n" not in message and "failed after step 12 (OSError: " in message
    assert "the last good checkpoint is step 10" in message
    writer.flush()
    writer.close()
    assert full.closed
    ckpt.close()


# --- whole runs -------------------------------------------------------------------------------------------------


def _snapshot(paths: list[Path]) -> dict[str, tuple[int, int, bytes]]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns, f.read_bytes()) for f in files}


# The train iterator waits before batch GATE_AT until the file GATE_FILE exists: the run holds the workdir,
# with step 10 committed, for as long as the test needs.
GATED_DATA = """
import os as _os
_create_slowed = pipeline.create_train_iterator

class _Gated:
    def __init__(self, inner):
        self._inner, self._count = inner, 0
    def __iter__(self):
        return self
    def __next__(self):
        self._count += 1
        if self._count == int(_os.environ["GATE_AT"]):
            print("waiting at the gate", flush=True)
            while not _os.path.exists(_os.environ["GATE_FILE"]):
                time.sleep(0.05)
        return next(self._inner)
    def __getattr__(self, name):
        return getattr(self._inner, name)

pipeline.create_train_iterator = lambda *a, **k: _Gated(_create_slowed(*a, **k))
"""


def _with(code: str) -> str:
    """``tiny_run.CHILD`` with ``code`` run just before the entry point."""
    anchor = "from clusterformer_jax import main"
    return tiny_run.CHILD.replace(anchor, code + anchor)


def test_two_runs_on_one_workdir_only_one_trains(shared, tmp_path):
    gate = tmp_path.parent / f"{tmp_path.name}.gate"
    first = tiny_run.start(tiny_run.args(tmp_path, *shared), child=_with(GATED_DATA), GATE_AT="13", GATE_FILE=str(gate))
    lines: list[str] = []
    try:
        tiny_run.wait_for(first, "waiting at the gate", lines)
        deadline = time.time() + 30
        while tiny_run.steps(tmp_path) != [10] and time.time() < deadline:
            time.sleep(0.05)
        watched = [tmp_path / "checkpoints", tmp_path / "config.json", tmp_path / "dataset_info.json"]
        before = _snapshot(watched)
        code, out = tiny_run.run(tiny_run.args(tmp_path, *shared))
        assert _snapshot(watched) == before  # the second run wrote nothing
    finally:
        gate.touch()
    assert code == 2, out[-3000:]
    errors = _error_lines(out)
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert f"in use by another run: pid {first.pid} on {socket.gethostname()}" in errors[0]
    assert "Compiling the train step" not in out
    rest, _ = first.communicate(timeout=240)
    assert first.returncode == 0, "".join(lines)[-2000:] + rest[-3000:]
    assert tiny_run.steps(tmp_path) == tiny_run.SAVED and (tmp_path / "results.json").exists()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()  # released at the end


def _main_in_process(argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of the entry point on ``argv`` in this process, as ``app.run`` calls it."""
    import contextlib
    import io
    import sys
    from unittest import mock

    from absl import flags

    from clusterformer_jax import main as main_lib

    def reset() -> None:
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)
        flags.FLAGS.unparse_flags()

    reset()
    err, code = io.StringIO(), 0
    with contextlib.redirect_stderr(err), mock.patch.object(sys, "argv", ["main"] + argv):
        try:
            main_lib.parse_flags(["main"] + argv)
            main_lib.main([])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    reset()
    return code, err.getvalue()


def test_only_set_aside_checkpoints_make_the_rerun_refuse(shared, tmp_path):
    """The rerun after 'no readable checkpoint' (the quickstart config, through main) stops in one line, exit 1,
    writing nothing; it would otherwise start from step 0 beside the set-aside step."""
    aside = tmp_path / "checkpoints" / "30.corrupt-1"
    (aside / "state").mkdir(parents=True)
    (aside / "state" / "_METADATA").write_text("{")
    argv = ["--config=configs/quickstart.py", f"--workdir={tmp_path}", f"--config.input.data_dir={shared[0]}"]
    code, err = _main_in_process([arg.replace("configs/", f"{tiny_run.REPO}/configs/") for arg in argv])
    assert code == 1, err[-3000:]
    errors = _error_lines(err)
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert "30.corrupt-1" in errors[0] and "--config.restart_from_scratch=True" in errors[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["30.corrupt-1", "_METADATA", "checkpoints", "state"]


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode == 0


def _fill(directory: Path) -> None:
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass


def test_a_full_disk_at_a_checkpoint_ends_the_run_in_one_line(shared, tmp_path):
    """checkpoints/ on a 4 MiB tmpfs (root), filled once step 10 is committed; without root the directory is
    made read-only instead. The step-20 save fails: one line, exit 1; step 10 stays restorable and the next
    start removes the partial step-20 directory."""
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    mounted = _mount_tmpfs(directory, "4m")
    if not mounted and os.geteuid() == 0:
        pytest.skip("root without mount(8) rights: neither a tmpfs nor a read-only directory can fail a save")
    try:
        proc = tiny_run.start(tiny_run.args(tmp_path, *shared), sleep=0.2)
        lines: list[str] = []
        tiny_run.wait_for(proc, f"step 11/{tiny_run.TOTAL_STEPS} ", lines)
        deadline = time.time() + 30
        while tiny_run.steps(tmp_path) != [10] and time.time() < deadline:  # committed (renamed from its tmp)
            time.sleep(0.05)
        _fill(directory) if mounted else directory.chmod(0o555)
        out, _ = proc.communicate(timeout=240)
        out = "".join(lines) + out
        assert proc.returncode == 1, out[-3000:]
        errors = _error_lines(out)
        assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
        assert errors[0].startswith(f"error: saving checkpoint step 20 in {directory} failed (")
        assert "the last good checkpoint is step 10" in errors[0]
        assert not (tmp_path / "results.json").exists()
        if mounted:
            (directory / "filler").unlink()
            assert [p.name for p in directory.glob("20.orbax-checkpoint-tmp*")]  # the partial save
        else:
            directory.chmod(0o755)
        ckpt = checkpointing.Checkpointer(str(directory))  # what the rerun does first
        ckpt.close()
        assert sorted(p.name for p in directory.iterdir()) == ["10"]
        assert len(json.dumps(str(tiny_run.stored_state(tmp_path, 10)))) > 100  # step 10 reads back
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(directory)])


# The train step's lowering and compilation start by blocking the main thread in C for STALL_S seconds with the
# GIL released, as a long XLA compile does: Python-level signal handlers cannot run until it returns. The line
# "stalled in C" is printed just before.
STALLED_COMPILE = """
import ctypes, os, time
from clusterformer_jax.trainers import trainer as _trainer

class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

def _stall_in_c(seconds):
    libc, mutex = ctypes.CDLL(None), ctypes.create_string_buffer(64)
    libc.pthread_mutex_lock(mutex)  # timedlock never returns early for a signal (no EINTR)
    print("stalled in C", flush=True)
    libc.pthread_mutex_timedlock(mutex, ctypes.byref(_Timespec(int(time.time() + seconds), 0)))

class _Stalled:
    def __init__(self, inner):
        self._inner = inner
    def lower(self, *args):
        _stall_in_c(float(os.environ["STALL_S"]))
        return self._inner.lower(*args)

_build = _trainer.build
def _stalled_build(*args, **kwargs):
    setup = _build(*args, **kwargs)
    setup.train_step = _Stalled(setup.train_step)
    return setup
_trainer.build = _stalled_build
"""


def _start_stalled(workdir: Path, shared, stall_s: float) -> subprocess.Popen:
    return tiny_run.start(tiny_run.args(workdir, *shared), child=_with(STALLED_COMPILE), STALL_S=str(stall_s))


def test_two_sigterms_during_the_first_compile_exit_at_once(shared, tmp_path):
    proc = _start_stalled(tmp_path, shared, stall_s=60)
    lines: list[str] = []
    tiny_run.wait_for(proc, "stalled in C", lines)
    proc.send_signal(signal.SIGTERM)
    tiny_run.wait_for(proc, "SIGTERM: stopping before the first step", lines, timeout=10)  # seen mid-compile
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    elapsed = time.time() - sent
    out = "".join(lines) + out
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert elapsed < 2.0, elapsed
    assert "second signal SIGTERM: exiting now without saving" in out
    assert "Compiled train step" not in out and tiny_run.steps(tmp_path) == []


def test_a_sigterm_during_the_first_compile_stops_before_any_step(shared, tmp_path):
    """Also: a lock left by a dead process on this host is taken over with one line."""
    _write_lock(tmp_path, socket.gethostname(), _dead_pid(), 0.0)
    proc = _start_stalled(tmp_path, shared, stall_s=2)
    lines: list[str] = []
    tiny_run.wait_for(proc, "stalled in C", lines)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    out = "".join(lines) + out
    assert proc.returncode == preemption.EXIT_PREEMPTED, out[-3000:]
    assert "stopped by SIGTERM before the first step of this run (at step 0): nothing new to save" in out
    assert f"step 1/{tiny_run.TOTAL_STEPS} " not in out and tiny_run.steps(tmp_path) == []
    assert len([line for line in out.splitlines() if "Taking over the lock of workdir" in line]) == 1
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
