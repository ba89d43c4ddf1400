"""Orbax checkpoints holding the train state and the grain iterator position together.

A checkpoint directory (``<workdir>/checkpoints``) contains numbered steps, each with two items:
'state' (the sharded train state) and 'data' (every process's grain iterator state). Restoring both makes
a restarted run continue bit for bit.

Restoring the latest step tolerates damage: a step that cannot be read (a truncated or missing array file,
missing metadata, a missing data-iterator state) is logged in one line, renamed to ``<step>.corrupt-<n>``
(kept for inspection, never deleted, and outside Orbax's step names) and the next older step is tried.
A checkpoint saved on one mesh restores onto any other (the abstract state carries the target shardings).

A save that cannot be written (no space left, permission lost, quota) raises ``CheckpointWriteError``: one
line naming the step, the cause and the last committed step, which stays intact (Orbax writes each step into
``<step>.orbax-checkpoint-tmp*`` and renames it only once complete). Such partial directories are removed
when the next run opens the directory (``cleanup_tmp_directories``).
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from clusterformer_jax.errors import ConfigError, one_line

STATE = "state"
DATA = "data"
CORRUPT_SUFFIX = ".corrupt-"


class CheckpointError(ConfigError):
    """No step of a checkpoint directory could be restored (each unreadable one was moved aside)."""


class WorkdirWriteError(CheckpointError):
    """The workdir refused a write (no space left, permission lost, quota); committed checkpoints are intact."""


class CheckpointWriteError(WorkdirWriteError):
    """A checkpoint could not be written; the older committed steps are intact."""


# Errors of the code rather than of the files: never a reason to move a checkpoint aside.
_PROGRAMMING_ERRORS = (AttributeError, TypeError, NameError, ImportError, AssertionError)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


class Checkpointer:
    """Async, keep-last-N CheckpointManager over the items ('state', 'data')."""

    def __init__(
        self,
        directory: str,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1000,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = os.fspath(directory)
        if "://" not in self.directory:  # Orbax rejects relative paths; cloud paths (gs://...) stay as given
            self.directory = os.path.abspath(os.path.expanduser(self.directory))
        self.save_interval_steps = int(save_interval_steps)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep if max_to_keep and max_to_keep > 0 else None,
            save_interval_steps=1,  # The interval is applied by ``should_save``; saves are explicit.
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            # Partial "<step>.orbax-checkpoint-tmp*" directories of a run that died or failed mid-save go
            # when the next run opens the directory (it holds the workdir lock, so no save is in flight).
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))
        # Orbax removes them on a background thread that only its next save waits for; wait here, so that
        # a run or tool that opens the directory sees it clean (orbax 0.12 has no public call for this).
        getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        self._pending: int | None = None  # the step whose asynchronous save may still be running
        self._failed = False

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """True every ``save_interval_steps`` steps (never when the interval is <= 0)."""
        return self.save_interval_steps > 0 and step > 0 and step % self.save_interval_steps == 0

    def reached_preemption(self, step: int) -> bool:
        """True on every process once the cluster has signalled a preemption (synchronised by JAX)."""
        return self._manager.reached_preemption(step)

    def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False) -> bool:
        """Starts saving ``state`` (and the iterator position) at ``step``; returns whether a save started.

        The device-to-host copy finishes before this returns, so ``state`` may be donated right after.
        """
        self._finish_pending()
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        except _PROGRAMMING_ERRORS:
            raise
        except Exception as e:  # pylint: disable=broad-except  # the file system refused: one line, exit 1
            raise self._write_error(step, e) from None
        if saved:
            self._pending = step
            logging.info("Checkpoint of step %d started in %s", step, self.directory)
        return saved

    def _finish_pending(self) -> None:
        """Waits for the save in flight; its failure becomes ``CheckpointWriteError`` naming its step."""
        try:
            self._manager.wait_until_finished()
        except _PROGRAMMING_ERRORS:
            raise
        except Exception as e:  # pylint: disable=broad-except
            raise self._write_error(self._pending, e) from None
        self._pending = None

    def last_good_step(self) -> int | None:
        """The newest committed step (after the save in flight ends); None when there is none or it is unknown."""
        if not self._failed:  # (after a failure the finalize thread re-raises on every wait)
            try:
                self._finish_pending()
            except CheckpointWriteError:
                pass
        try:
            self._manager.reload()
            return self._manager.latest_step()
        except Exception:  # pylint: disable=broad-except  # the directory cannot even be read
            return None

    def _write_error(self, step: int | None, error: BaseException) -> CheckpointWriteError:
        self._failed = True
        self._pending = None
        good = self.last_good_step()
        last = f"the last good checkpoint is step {good}" if good is not None else "there is no good checkpoint"
        problem = one_line(error, with_type=True, max_chars=300)
        return CheckpointWriteError(
            f"saving checkpoint step {step} in {self.directory} failed ({problem}); {last} (a rerun "
            "resumes from it and removes the partial save): free space, fix permissions or quota there, then "
            "rerun the same command"
        )

    def has_item(self, step: int, item: str) -> bool:
        return epath.Path(self.directory, str(step), item).exists()

    def restore(self, abstract_state: Any, data_iterator: Any = None, step: int | None = None) -> Any:
        """Restores the state onto the shardings of ``abstract_state`` (ShapeDtypeStructs with sharding).

        The iterator is restored in place when given; a step without its iterator state is then unusable.
        With ``step=None`` the latest readable step is restored: unreadable newer steps are moved aside
        (``move_aside``) and ``CheckpointError`` says so when none is left.
        """
        if step is not None:
            return self._restore_step(step, abstract_state, data_iterator)
        problems = []
        while (latest := self.latest_step()) is not None:
            try:
                self._check_shapes(latest, abstract_state)
                return self._restore_step(latest, abstract_state, data_iterator)
            except (CheckpointError, *_PROGRAMMING_ERRORS):
                raise  # a readable checkpoint of another model, or a bug: nothing to move aside
            except Exception as e:  # pylint: disable=broad-except  # any read error: try the next older step
                problem = one_line(e, with_type=True, max_chars=300)
                moved = self.move_aside(latest)
                logging.error("Checkpoint step %d is unreadable (%s); moved to %s", latest, problem, moved)
                problems.append(f"step {latest}: {problem}")
        if problems:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory} ({'; '.join(problems)}); the unreadable steps were "
                f"renamed to <step>{CORRUPT_SUFFIX}<n> there: restore them or start a new workdir"
            )
        raise FileNotFoundError(f"no checkpoint in {self.directory}")

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        """Raises CheckpointError when step ``step``'s (readable) metadata lists other arrays than the state."""
        stored = sorted(map(str, jax.tree.leaves(self.item_shapes(step), is_leaf=lambda x: isinstance(x, tuple))))
        wanted = sorted(str(tuple(x.shape)) for x in jax.tree.leaves(abstract_state))
        if not stored:
            raise FileNotFoundError(f"{STATE}/_METADATA lists no arrays (missing or damaged)")
        if stored != wanted:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} holds another model or optimizer ({len(stored)} "
                f"arrays, this config has {len(wanted)} or other shapes); use a new workdir, or init_from= "
                "to start from its parameters"
            )

    def _restore_step(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            if not self.has_item(step, DATA):
                raise FileNotFoundError(f"the data-iterator state ({DATA}/) is missing")
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        logging.info("Restored step %d from %s", step, self.directory)
        return restored[STATE]

    def move_aside(self, step: int) -> str:
        """Renames step ``step``'s directory to ``<step>.corrupt-<n>`` (the first free n) and forgets the step.

        Under ``jax.distributed`` process 0 renames and every process waits for it.
        """
        source = epath.Path(self.directory, str(step))
        n = 1
        while epath.Path(self.directory, f"{step}{CORRUPT_SUFFIX}{n}").exists():
            n += 1
        target = epath.Path(self.directory, f"{step}{CORRUPT_SUFFIX}{n}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

            if jax.process_index() == 0:
                source.rename(target)
            multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
        else:
            source.rename(target)
        self._manager.reload()
        return os.fspath(target)

    def restore_subtree(self, abstract_subtree: dict[str, Any], step: int | None = None) -> dict[str, Any]:
        """Restores only the top-level state fields in ``abstract_subtree`` (e.g. {'params': ...})."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subtree)
        args = ocp.args.PyTreeRestore(item=abstract_subtree, restore_args=restore_args, partial_restore=True)
        return self._manager.restore(step, args=ocp.args.Composite(**{STATE: args}))[STATE]

    def item_shapes(self, step: int) -> Any:
        """The stored state's tree with each array replaced by its shape tuple."""
        metadata = ocp.PyTreeCheckpointer().metadata(os.path.join(self.directory, str(step), STATE))
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        return jax.tree.map(lambda m: tuple(m.shape), tree)

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is committed (``CheckpointWriteError`` if it failed)."""
        self._finish_pending()

    def close(self) -> None:
        """Waits for the save in flight and closes; after a reported write failure, closes quietly."""
        if self._failed:
            try:
                self._manager.close()
            except Exception:  # pylint: disable=broad-except  # already reported in one line
                pass
            return
        self._finish_pending()
        self._manager.close()


def locate(path: str) -> tuple[str, int | None]:
    """Splits a user-given checkpoint path into (manager directory, step).

    Accepts a run's workdir (uses its 'checkpoints'), a checkpoints directory (latest step) or one step's
    directory ('.../checkpoints/1200').
    """
    path = os.fspath(path).rstrip("/")
    p = epath.Path(path)
    if (p / STATE).exists() and p.name.isdigit():
        return os.fspath(p.parent), int(p.name)
    if (p / "checkpoints").exists():
        return os.fspath(p / "checkpoints"), None
    return path, None


def open_readonly(path: str) -> tuple[Checkpointer, int]:
    """A read-only Checkpointer on ``path`` (see ``locate``) and the step to restore."""
    directory, step = locate(path)
    if not epath.Path(directory).exists():
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
    ckpt = Checkpointer(directory, async_save=False, read_only=True, max_to_keep=None)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint found under {path!r}")
    return ckpt, step
