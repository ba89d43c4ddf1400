"""Checks a run's input before anything is written: ``check(config, workdir)`` raises a one-line
``UsageError`` for a workdir that cannot be used, a mesh or batch the machine cannot run, a dataset that is
not prepared, a model that cannot be built (e.g. window counts that do not divide a stage) and a
``resume`` / ``init_from`` source that is missing or of another model, and a workdir whose only checkpoints
are unreadable ones set aside by an earlier run (``restore.check_workdir_checkpoints``).

It builds what ``train_and_evaluate`` builds up to the model's abstract state (shapes only, nothing compiled)
and reads no checkpoint array, so a bad run stops in seconds with the workdir untouched.
"""

from __future__ import annotations

import os
import tempfile

import ml_collections

from clusterformer_jax import checkpointing
from clusterformer_jax import sharding
from clusterformer_jax.errors import DataError, PathError, UsageError, one_line
from clusterformer_jax.tasks import registry as task_registry
from clusterformer_jax.trainers import restore
from clusterformer_jax.trainers import setup as setup_lib
from clusterformer_jax.trainers import trainer


def check_workdir(workdir: str) -> None:
    """The workdir is a directory this process can write to, or can be created (nothing is created)."""
    path = os.path.abspath(os.path.expanduser(workdir))
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "" if probe == path else f" (its parent {probe} is a file)"
        raise PathError(f"workdir {workdir!r} is a file{where}; pass a directory (it is created if missing)")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        what = "" if probe == path else f" (its nearest existing parent {probe} is not)"
        raise PathError(
            f"workdir {workdir!r} is not writable{what}: {e.strerror or one_line(e)}; pass a directory you can "
            "write to"
        ) from None


def _has_checkpoint(workdir: str) -> bool:
    directory = checkpointing.checkpoint_dir(workdir)
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raises ``UsageError`` (one line, the thing and the fix) for input that cannot run; writes nothing
    outside the dataset's own data_dir (a dataset with a manual_dir is prepared there, as the run would)."""
    check_workdir(workdir)
    mesh = sharding.create_mesh(config.mesh)
    trainer._validate(config, mesh)  # pylint: disable=protected-access
    module = task_registry.input_module(config)
    try:
        dataset_info = module.get_dataset_info(config.input)
    except UsageError:
        raise
    except (ValueError, OSError, AssertionError) as e:
        raise DataError(f"dataset {config.input.dataset!r}: {one_line(e)}") from None
    total_steps, steps_per_epoch = trainer.resolve_run_lengths(config, int(dataset_info["num_train"]))
    setup = setup_lib.build(config, mesh, dataset_info, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    if not _has_checkpoint(workdir):
        restore.check_workdir_checkpoints(config, checkpointing.checkpoint_dir(workdir))
        restore.check_sources(config, setup.abstract_state)
