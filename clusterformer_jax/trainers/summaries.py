"""The run's TensorBoard summaries, written without TensorFlow.

``EventWriter`` writes what ``tf.summary`` would: one ``events.out.tfevents.*`` file of TFRecord-framed ``Event``
protos, scalars as rank-0 float32 tensors under TensorBoard's scalars plugin, the config as the hparams plugin's
session start. The protos and the record framing are TensorBoard's own (``tensorboard.plugins.*.summary_v2``,
``tensorboard.summary.writer.record_writer``), which need no TensorFlow: a training process never imports it
(4-5 s of every process start, and a second runtime next to jax's on an accelerator host).

``WorkdirWriter`` turns the writer's first failure into one line naming the last good checkpoint.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.summary.writer.record_writer import RecordWriter

from clusterformer_jax import checkpointing
from clusterformer_jax.errors import one_line


class EventWriter:
    """Scalars and hyperparameters into one new event file in ``logdir`` (a local path or any ``etils.epath``
    one, e.g. gs://), or nowhere when ``logdir`` is None (the processes other than the first). Writes are
    synchronous, so a full disk fails the call that hit it; the file is flushed at most every
    ``flush_seconds`` (an object store uploads on each flush) and by ``flush`` and ``close``."""

    def __init__(self, logdir: str | None, flush_seconds: float = 10.0):
        self.path: epath.Path | None = None
        self._file = None
        if logdir is None:
            return
        directory = epath.Path(logdir)
        directory.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.v2"
        self.path = directory / name
        self._file = self.path.open("wb")
        self._records = RecordWriter(self._file)
        self._flush_seconds, self._flushed_at = flush_seconds, time.monotonic()
        self._write(event_pb2.Event(file_version="brain.Event:2"))
        self.flush()

    def _write(self, event: event_pb2.Event) -> None:
        event.wall_time = time.time()
        self._records.write(event.SerializeToString())
        if time.monotonic() - self._flushed_at >= self._flush_seconds:
            self.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        event = event_pb2.Event(step=int(step))
        for tag, value in scalars.items():
            event.summary.value.extend(scalar_summary.scalar_pb(tag, np.asarray(value, np.float32)).value)
        self._write(event)

    def write_hparams(self, hparams: Mapping[str, bool | int | float | str]) -> None:
        if self._file is not None:
            self._write(event_pb2.Event(summary=hparams_summary.hparams_pb(dict(hparams))))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class WorkdirWriter:
    """The run's metric writer around ``EventWriter``. Its first failure to write the event file (no space
    left, permission lost) ends the run with one line (``checkpointing.WorkdirWriteError``: step, cause, last
    good checkpoint); after it every call does nothing."""

    def __init__(self, writer: EventWriter, workdir: str, ckpt: checkpointing.Checkpointer):
        self._writer, self._workdir, self._ckpt = writer, workdir, ckpt
        self._step: int | None = None
        self._failed = False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._writer, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._failed:
                if name == "close":
                    try:
                        method()
                    except Exception:  # pylint: disable=broad-except  # reported already
                        pass
                return None
            if args and isinstance(args[0], (int, np.integer)):
                self._step = int(args[0])
            try:
                return method(*args, **kwargs)
            except (AttributeError, TypeError, NameError):
                raise
            except Exception as e:  # pylint: disable=broad-except
                self._failed = True
                good = self._ckpt.last_good_step()
                last = f"the last good checkpoint is step {good}" if good is not None else "there is no checkpoint"
                cause = one_line(e.__cause__ or e)
                raise checkpointing.WorkdirWriteError(
                    f"writing the summaries (TensorBoard event file) in {self._workdir} failed after step "
                    f"{self._step} ({type(e.__cause__ or e).__name__}: {cause}); {last} (a rerun resumes from it): "
                    "free space, fix permissions or quota there, then rerun the same command"
                ) from None

        return call
