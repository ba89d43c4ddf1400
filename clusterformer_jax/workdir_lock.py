"""One run per work directory: ``with hold(workdir):`` around everything a run writes there.

Process 0 takes the lock before the run writes anything into the workdir and keeps it until the run ends.
The lock is the file ``<workdir>/.lock``: JSON with the holder's host, pid, start time and a heartbeat that a
daemon thread rewrites every ``HEARTBEAT_S`` seconds; the holder removes it when it ends.

- Local file system: the file is also locked with ``fcntl.flock``, which the kernel drops when the holder
  dies however it dies (kill -9 included). A second run on the workdir fails to get it and stops with one line
  naming the holder; a run that finds the file present but unlocked (its writer died) takes it over, saying so
  in one line.
- Object stores (``gs://...``) and network file systems whose flock is not shared between hosts: the file's
  contents decide. The lock is stale, and taken over with one line, when its holder ran on this host under a
  pid that no longer exists, or when its heartbeat is older than ``STALE_AFTER_S`` (10 minutes); otherwise
  the run stops. An object store has no atomic create here, so two runs that start within the same second
  could both pass the check; the loser finds the other's token when it reads the file back and stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from absl import logging
from etils import epath

from clusterformer_jax.errors import UsageError

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
_CONFIRM_S = 1.0  # object stores: how long to wait before reading the lock back


class WorkdirLockedError(UsageError):
    """Another live run holds the workdir."""


@dataclasses.dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float
    heartbeat: float
    token: str = ""

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            data = json.loads(text)
            return cls(str(data["host"]), int(data["pid"]), float(data["started"]), float(data["heartbeat"]),
                       str(data.get("token", "")))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            return None

    def dumps(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True) + "\n"

    def describe(self, now: float | None = None) -> str:
        age = max((time.time() if now is None else now) - self.heartbeat, 0.0)
        started = datetime.datetime.fromtimestamp(self.started).isoformat(sep=" ", timespec="seconds")
        return f"pid {self.pid} on {self.host} (started {started}, last heartbeat {age:.0f} s ago)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def stale_reason(holder: Holder, *, stale_after_s: float = STALE_AFTER_S, now: float | None = None) -> str | None:
    """Why ``holder``'s lock is stale (a dead pid on this host, an old heartbeat), or None while it is live."""
    if holder.host == socket.gethostname() and not _pid_alive(holder.pid):
        return "that process no longer runs"
    age = (time.time() if now is None else now) - holder.heartbeat
    if age > stale_after_s:
        return f"no heartbeat for {age / 60:.0f} min (stale after {stale_after_s / 60:.0f} min)"
    return None


class WorkdirLock:
    """The lock of one workdir (module docstring); ``acquire`` raises ``WorkdirLockedError`` (one line)."""

    def __init__(self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.workdir = os.fspath(workdir)
        self.local = "://" not in self.workdir
        self.path = epath.Path(self.workdir) / LOCK_FILE
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.took_over: tuple[Holder | None, str] | None = None  # (previous holder, why) when a stale one was taken
        self._fd: int | None = None
        self._flocked = False
        self._me: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _refuse(self, holder: Holder | None) -> WorkdirLockedError:
        who = holder.describe() if holder else "a process that has not written its details yet"
        return WorkdirLockedError(
            f"workdir {self.workdir} is in use by another run: {who}; wait for it to end or stop it, or pass "
            f"another --workdir (the lock {self.path} is taken over by itself once its holder is dead or "
            f"silent for {self.stale_after_s / 60:.0f} min)"
        )

    def _open_local(self) -> None:
        """Opens and flocks the lock file (retrying when a releasing holder unlinked it under us)."""
        import fcntl  # pylint: disable=g-import-not-at-top

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._flocked = True
            except BlockingIOError:
                holder = Holder.parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
                os.close(fd)
                raise self._refuse(holder) from None
            except OSError as e:  # flock unsupported here (some network file systems): the contents decide
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                self._flocked = False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return
            os.close(fd)

    def _read(self) -> Holder | None:
        if self._fd is not None:
            return Holder.parse(os.pread(self._fd, 1 << 16, 0).decode(errors="replace"))
        try:  # object stores raise their own not-found errors, and the file may go between the two calls
            return Holder.parse(self.path.read_text()) if self.path.exists() else None
        except Exception:  # pylint: disable=broad-except
            return None

    def _write(self, holder: Holder) -> None:
        if self._fd is not None:
            data = holder.dumps().encode()
            os.pwrite(self._fd, data, 0)  # in place, then cut: a reader never sees an empty file
            os.ftruncate(self._fd, len(data))
            os.fsync(self._fd)
        else:
            self.path.write_text(holder.dumps())

    def acquire(self) -> WorkdirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.local:
            self._open_local()
        previous = self._read()
        if previous is not None:
            if self._flocked and previous.host == socket.gethostname():
                why = "that process no longer holds it (it ended without releasing the lock)"
            else:  # no flock, or a holder on another host (flock may not span hosts): the heartbeat decides
                why = stale_reason(previous, stale_after_s=self.stale_after_s)
            if why is None:
                self._close_fd()
                raise self._refuse(previous)
            self.took_over = (previous, why)
            logging.warning("Taking over the lock of workdir %s from %s: %s", self.workdir, previous.describe(), why)
        now = time.time()
        self._me = Holder(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)
        self._write(self._me)
        if not self.local:
            time.sleep(_CONFIRM_S)
            current = self._read()
            if current is None or current.token != self._me.token:
                raise self._refuse(current)
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.local:
                    current = self._read()
                    if current is not None and current.token != self._me.token:
                        logging.error("The lock of workdir %s was taken by %s", self.workdir, current.describe())
                        return
                self._me = dataclasses.replace(self._me, heartbeat=time.time())
                self._write(self._me)
            except Exception as e:  # pylint: disable=broad-except  # e.g. a full disk: try again next beat
                logging.warning("Workdir lock heartbeat failed: %s", e)

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._me is not None:
            with contextlib.suppress(Exception):  # (an object store's errors are not OSErrors)
                current = self._read()
                if current is not None and current.token == self._me.token:
                    self.path.unlink()  # while still flocked, so no one takes it in between
            self._me = None
        self._close_fd()

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[WorkdirLock | None]:
    """Process 0 holds ``workdir``'s lock for the duration; every process raises ``WorkdirLockedError`` when
    process 0 could not take it."""
    import jax  # pylint: disable=g-import-not-at-top

    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir).acquire()
        except WorkdirLockedError as e:
            error = e
    if jax.process_count() > 1:
        import numpy as np  # pylint: disable=g-import-not-at-top
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

        ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = WorkdirLockedError(f"workdir {workdir} is in use by another run (process 0 says why)")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
