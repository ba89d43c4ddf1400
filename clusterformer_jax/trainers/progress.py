"""What the loop reports while it runs: input stalls (``StepClock``), divergence (``check_health``), the
compiled step's memory, and the text and files of the logs."""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from clusterformer_jax.errors import NonFiniteError
from clusterformer_jax.trainers.setup import Health


class StepClock:
    """Measures input stalls: time the device sat idle because the next batch was not there yet.

    Steps are dispatched asynchronously, so the time the loop blocks in ``next(train_iter)`` mostly
    overlaps the previous step's execution. A thread blocks on each dispatched step's output and records
    when it finished; the stall before step k+1 is the part of the wait for its batch after step k finished.
    """

    def __init__(self):
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._finished: tuple[int, float] = (-1, 0.0)  # (last finished step, when)
        self._thread = threading.Thread(target=self._watch, name="step-clock", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while (item := self._pending.get()) is not None:
            step, output = item
            try:
                jax.block_until_ready(output)
            except Exception as e:  # pylint: disable=broad-except
                logging.warning("input stall accounting stopped: %s", e)
                return
            with self._lock:
                self._finished = (step, time.time())

    def dispatched(self, step: int, output: Any) -> None:
        """``output`` must become ready when the step finishes and must not be donated to a later step."""
        self._pending.put((step, output))

    def stall(self, previous_step: int, wait_start: float, wait_end: float) -> float:
        """Idle device time within [wait_start, wait_end] while waiting for the batch after ``previous_step``."""
        with self._lock:
            step, finished = self._finished
        if step != previous_step:  # still running when the batch arrived (or not yet seen to finish)
            return 0.0
        return max(0.0, wait_end - max(finished, wait_start))

    def close(self) -> None:
        self._pending.put(None)
        self._thread.join()


def check_health(health: Health, last_good_step: int | None, config: ml_collections.ConfigDict) -> None:
    """Raises a one-line ``NonFiniteError`` (where it happened, the last good checkpoint, what to change)."""
    bad_step = int(jax.device_get(health.bad_step))
    if bad_step < 0:
        return
    value = float(jax.device_get(health.bad_loss))
    where = f"last good checkpoint: step {last_good_step}" if last_good_step is not None else "no checkpoint saved"
    clip = config.optim.grad_clip_norm
    hint = "lower optim.base_lr, " + (
        f"tighten optim.grad_clip_norm (now {clip})"
        if clip > 0
        else "enable gradient clipping (optim.grad_clip_norm=1.0)"
    )
    hint += " or lengthen the warmup"
    raise NonFiniteError(
        f"training diverged at step {bad_step}: non-finite loss, gradient norm or parameter norm "
        f"(loss={value:.6g}); stopped, {where}; hint: {hint}"
    )


def memory_report(compiled: Any) -> str:
    """The compiled program's argument, output, temporary and code sizes, where the backend reports them."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # Not every backend implements it.
        stats = None
    if stats is None:
        return "unavailable on this backend"
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    parts = [
        f'{f.replace("_size_in_bytes", "")}={getattr(stats, f) / 2**20:.1f}MiB' for f in fields if hasattr(stats, f)
    ]
    return ", ".join(parts)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def format_metrics(metrics: Mapping[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(metrics.items()))


def flatten_hparams(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as TensorBoard hyperparameters: dotted names, scalars kept, anything else as text."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def write_json(path: epath.Path, payload: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
