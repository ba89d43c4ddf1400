"""Graceful stop on SIGTERM / SIGINT: finish the step, save state and data position, exit ``EXIT_PREEMPTED``.

``EXIT_PREEMPTED`` (75, ``EX_TEMPFAIL`` of sysexits.h: "try again later") is the one exit code that means
"stopped by a signal, the checkpoint of the last step is committed; run the same command again to resume".
launch/local.sh, launch/multiprocess.sh, launch/slurm.sbatch (requeues the job) and launch/tpu_pod.sh
(restarts the command) document and act on it.

- One process (no ``jax.distributed``): a plain Python handler sets a flag; the loop stops after the
  step in flight.
- Many processes (``jax.distributed`` initialised): JAX's preemption service owns SIGTERM and agrees with
  every process on one step to stop at (Orbax's ``reached_preemption``); SIGINT is forwarded to it as
  SIGTERM. Every process therefore saves the same step.

A second signal (once the first was seen) exits at once with 128 + the signal number, saving nothing more.
A leaf: imports nothing of the package.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from absl import logging

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def distributed_running() -> bool:
    """True when this process runs under ``jax.distributed`` with its preemption service."""
    try:
        from jax._src import distributed  # pylint: disable=g-import-not-at-top

        return distributed.global_state.preemption_sync_manager is not None
    except Exception:  # pylint: disable=broad-except  # an internal layout that changed: assume one process
        return False


def _exit_now(signum: int, frame: Any) -> None:
    del frame
    os.write(2, f"second signal {signal.Signals(signum).name}: exiting now without saving\n".encode())
    os._exit(128 + signum)  # pylint: disable=protected-access


class PreemptionGuard:
    """Installs the handlers for one training run (``with PreemptionGuard() as guard``) and answers, after
    every step, whether to stop there (``guard.should_stop(step, reached_preemption)``)."""

    def __init__(self, distributed: bool | None = None):
        self.distributed = distributed_running() if distributed is None else distributed
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            logging.warning("Training outside the main thread: SIGTERM/SIGINT will not save a checkpoint")
            return self
        # Under jax.distributed, SIGTERM stays with JAX's preemption notifier (installed by initialize()).
        for signum in (signal.SIGINT,) if self.distributed else SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._first_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _first_signal(self, signum: int, frame: Any) -> None:
        del frame
        if self.signal_name is not None:
            _exit_now(signum, None)
        self.signal_name = signal.Signals(signum).name
        os.write(
            2, f"{self.signal_name}: saving a checkpoint after this step, then exiting {EXIT_PREEMPTED}\n".encode()
        )
        if self.distributed:  # tell JAX's preemption service, which picks the step every process stops at
            os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, step: int, reached_preemption: Callable[[int], bool]) -> bool:
        """Whether the run stops after ``step``; from then on any signal exits at once."""
        stop = reached_preemption(step)  # called on every step (a collective under jax.distributed)
        if not self.distributed:
            stop = stop or self.signal_name is not None
        if stop and threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous.setdefault(signum, signal.getsignal(signum))
                signal.signal(signum, _exit_now)
        return stop
