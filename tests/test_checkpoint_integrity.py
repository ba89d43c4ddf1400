"""An unreadable latest checkpoint is moved aside (never deleted) and the next older one restored."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterformer_jax import checkpointing
from tests import tiny_run


def _dataset():
    return grain.MapDataset.range(64).shuffle(seed=3).repeat().batch(4).to_iter_dataset()


def _state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {
        "params": {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32), "b": jnp.arange(32.0) + step},
        "step": jnp.asarray(step, jnp.int32),
    }


def _abstract(state: dict) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@pytest.fixture
def saved(tmp_path):
    """Steps 1, 2 and 3 of a toy state with the iterator position, and the batch that follows each."""
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=None, async_save=False)
    iterator, following = iter(_dataset()), {}
    for step in (1, 2, 3):
        next(iterator)
        ckpt.save(step, _state(step), iterator, force=True)
        following[step] = next(iter([_peek(iterator)]))
    ckpt.close()
    return tmp_path / "checkpoints", following


def _peek(iterator):
    copy = iter(_dataset())
    copy.set_state(iterator.get_state())
    return next(copy)


def _truncate_array_file(step_dir: Path) -> None:
    """Halves the largest array data file of each OCDBT data directory of the state (the merged one that
    reads go through, state/d, and the per-process one it was merged from)."""
    for data_dir in (step_dir / "state").rglob("d"):
        largest = max((p for p in data_dir.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)
        largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


def _remove_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").unlink()


def _remove_iterator_state(step_dir: Path) -> None:
    (step_dir / "data" / "process_0-of-1.json").unlink()


CORRUPTIONS = {
    "truncated_array_file": _truncate_array_file,
    "missing_metadata": _remove_metadata,
    "missing_iterator_state": _remove_iterator_state,
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_latest_step_falls_back_to_the_previous_one(saved, kind, caplog):
    directory, following = saved
    CORRUPTIONS[kind](directory / "3")
    ckpt = checkpointing.Checkpointer(str(directory), max_to_keep=None)
    iterator = iter(_dataset())
    with caplog.at_level(logging.ERROR):
        restored = ckpt.restore(_abstract(_state(0)), iterator)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(_state(2))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(next(iterator), following[2])  # the data position of step 2
    assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]
    assert (directory / "3.corrupt-1").is_dir()  # kept aside, with its files
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) == ["1", "2", "3.corrupt-1"]
    # ours only: tensorstore's failed read of the truncated file may also log from orbax's reader thread
    ours = [r for r in caplog.records if r.pathname.endswith(os.path.join("clusterformer_jax", "checkpointing.py"))]
    errors = [r.getMessage() for r in ours if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("Checkpoint step 3 is unreadable (") and "\n" not in errors[0]
    if kind == "missing_iterator_state":
        assert "data/process_0-of-1.json" in errors[0]
    # The next save numbers on from the restored step; the aside directory is left alone.
    ckpt.save(3, _state(3), iterator, force=True)
    ckpt.close()
    assert (directory / "3").is_dir() and (directory / "3.corrupt-1").is_dir()


def test_no_readable_step_is_one_clear_error(saved):
    directory, _ = saved
    for step, corrupt in zip(("1", "2", "3"), CORRUPTIONS.values()):
        corrupt(directory / step)
    ckpt = checkpointing.Checkpointer(str(directory), max_to_keep=None)
    with pytest.raises(checkpointing.CheckpointError) as error:
        ckpt.restore(_abstract(_state(0)), iter(_dataset()))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"no readable checkpoint in {directory} (step 3: ")
    assert "step 2: " in message and "step 1: " in message and "start a new workdir" in message
    assert sorted(p.name for p in directory.iterdir()) == ["1.corrupt-1", "2.corrupt-1", "3.corrupt-1"]
    ckpt.close()


def test_checkpoint_of_another_model_is_reported_and_kept(saved):
    directory, _ = saved
    other = {"params": {"w": jnp.zeros((64, 16)), "b": jnp.zeros((32,))}, "step": jnp.asarray(0, jnp.int32)}
    ckpt = checkpointing.Checkpointer(str(directory), max_to_keep=None)
    with pytest.raises(checkpointing.CheckpointError, match="holds another model or optimizer"):
        ckpt.restore(_abstract(other), iter(_dataset()))
    assert ckpt.all_steps() == [1, 2, 3]
    ckpt.close()


def test_opening_removes_a_partial_save_before_it_returns(saved):
    """Orbax deletes "<step>.orbax-checkpoint-tmp" directories on a background thread; the constructor waits
    for it, so a large partial save is gone at once and closing right away raises nothing."""
    directory, _ = saved
    partial = directory / "4.orbax-checkpoint-tmp"
    partial.mkdir()
    for i in range(3000):
        (partial / f"shard-{i}").touch()
    ckpt = checkpointing.Checkpointer(str(directory), max_to_keep=None)
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2", "3"]
    ckpt.close()


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_run")  # beside the other users of the session's reference run
def test_run_with_truncated_latest_checkpoint_falls_back_and_finishes(tiny_reference, tiny_run_shared, tmp_path):
    """A whole run: its step-20 checkpoint truncated, the rerun restores 10, trains to 20 and ends bitwise
    where the undamaged run ended (the session's reference run, tests/conftest.py: one process, two devices)."""
    reference, shared = tiny_reference, tiny_run_shared
    workdir = tmp_path / "damaged"
    shutil.copytree(reference / "checkpoints", workdir / "checkpoints")
    _truncate_array_file(workdir / "checkpoints" / "20")
    code, out = tiny_run.run(tiny_run.args(workdir, *shared), JAX_NUM_CPU_DEVICES="2")
    assert code == 0, out[-3000:]
    assert "Checkpoint step 20 is unreadable (" in out
    assert "Train state from workdir checkpoint (step 10)" in out
    assert (workdir / "checkpoints" / "20.corrupt-1").is_dir()
    final = tiny_run.stored_state(workdir, tiny_run.TOTAL_STEPS)
    tiny_run.assert_states_equal(final, tiny_run.stored_state(reference, tiny_run.TOTAL_STEPS))
