"""Graceful stop on SIGTERM / SIGINT: finish the step, save state and data position, exit ``EXIT_PREEMPTED``.

``EXIT_PREEMPTED`` (75, ``EX_TEMPFAIL`` of sysexits.h: "try again later") is the one exit code that means
"stopped by a signal, the checkpoint of the last step is committed; run the same command again to resume".
launch/local.sh, launch/multiprocess.sh, launch/slurm.sbatch (requeues the job) and launch/tpu_pod.sh
(restarts the command) document and act on it.

- One process (no ``jax.distributed``): the first signal is recorded; the run stops at the next safe point:
  after the step in flight (saving it), or, while it is still preparing data or compiling, before its first
  step (nothing new to save).
- Many processes (``jax.distributed`` initialised): JAX's preemption service owns SIGTERM and agrees with
  every process on one step to stop at (Orbax's ``reached_preemption``); SIGINT is forwarded to it as
  SIGTERM. Every process therefore saves the same step.

A second signal (once the first was seen) exits at once with 128 + the signal number, saving nothing more,
even while the main thread is inside a long C++ call such as an XLA compile. CPython runs Python signal
handlers only in the main thread between bytecodes, so during such a call signals wait and two of them
coalesce into one; the guard therefore also registers a wakeup fd (``signal.set_wakeup_fd``) that the C-level
handler writes one byte per signal to, read by a watcher thread that counts the signals and calls
``os._exit`` on the second. A leaf: imports nothing of the package.
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
    """True when this process runs under ``jax.distributed`` (whose preemption service then owns SIGTERM)."""
    import jax  # pylint: disable=g-import-not-at-top

    return bool(jax.distributed.is_initialized())


def _exit_now(signum: int, frame: Any = None) -> None:
    del frame
    os.write(2, f"second signal {signal.Signals(signum).name}: exiting now without saving\n".encode())
    os._exit(128 + signum)  # pylint: disable=protected-access


def _wake_only(signum: int, frame: Any) -> None:
    """The Python-level handler: the watcher thread, woken through the wakeup fd, does the work."""
    del signum, frame


class PreemptionGuard:
    """Installs the handlers for one run (``with PreemptionGuard() as guard``) and answers, after every step,
    whether to stop there (``guard.should_stop(step, reached_preemption)``); ``guard.stop_requested`` says
    whether to stop before the first step. Entering an entered guard (main's, around preflight and training,
    then the trainer's) uses the one already installed."""

    _active: PreemptionGuard | None = None

    def __init__(self, distributed: bool | None = None):
        self.distributed = distributed_running() if distributed is None else distributed
        self.signal_name: str | None = None
        self.training = False  # set by the trainer once steps run: the first signal then saves one
        self._stopping = False
        self._previous: dict[int, Any] = {}
        self._previous_wakeup_fd = -1
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()
        self._outer: PreemptionGuard | None = None

    def __enter__(self) -> PreemptionGuard:
        if PreemptionGuard._active is not None:
            self._outer = PreemptionGuard._active
            return self._outer
        if threading.current_thread() is not threading.main_thread():
            logging.warning("Training outside the main thread: SIGTERM/SIGINT will not save a checkpoint")
            return self
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, name="preemption-signal-watcher", daemon=True)
        self._watcher.start()
        # Under jax.distributed, SIGTERM stays with JAX's preemption notifier (installed by initialize()).
        for signum in (signal.SIGINT,) if self.distributed else SIGNALS:
            self._install(signum)
        PreemptionGuard._active = self
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._outer is not None:
            self._outer = None
            return
        if PreemptionGuard._active is self:
            PreemptionGuard._active = None
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            os.close(self._pipe[1])  # the watcher reads end-of-file and returns
            if self._watcher is not None:
                self._watcher.join(timeout=5)
            os.close(self._pipe[0])
            self._pipe = self._watcher = None

    def _install(self, signum: int) -> None:
        self._previous.setdefault(signum, signal.getsignal(signum))
        signal.signal(signum, _wake_only)

    def _watch(self) -> None:
        handled = {int(s) for s in SIGNALS}
        while True:
            try:
                data = os.read(self._pipe[0], 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in handled and signum in {int(s) for s in self._previous}:
                    self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        with self._lock:
            if self.signal_name is not None or self._stopping:
                _exit_now(signum)
            self.signal_name = signal.Signals(signum).name
        what = "saving a checkpoint after this step" if self.training else "stopping before the first step"
        os.write(2, f"{self.signal_name}: {what}, then exiting {EXIT_PREEMPTED}\n".encode())
        if self.distributed:  # tell JAX's preemption service, which picks the step every process stops at
            os.kill(os.getpid(), signal.SIGTERM)

    @property
    def stop_requested(self) -> bool:
        """A signal arrived (one process): stop at the next safe point, before taking another step."""
        return self.signal_name is not None and not self.distributed

    def should_stop(self, step: int, reached_preemption: Callable[[int], bool]) -> bool:
        """Whether the run stops after ``step``; from then on any signal exits at once."""
        stop = reached_preemption(step)  # called on every step (a collective under jax.distributed)
        if not self.distributed:
            stop = stop or self.signal_name is not None
        if stop:
            self._stopping = True
            if self._pipe is not None:  # SIGTERM too (JAX's notifier under distributed): the next one exits
                for signum in SIGNALS:
                    if signum not in self._previous:
                        self._install(signum)
        return stop
