"""The run directory's lock (docs/design.md, section 10): one process at a time trains into a run.

:class:`RunLock` is an advisory ``flock`` on ``<run>/.lock`` that names its holder's PID; the
kernel releases it when the holder exits or is killed.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path
from typing import Any

from gali_ext.errors import ConfigError
from gali_ext.recipes.files import (
    RunDirectoryWarning,
    open_no_follow,
    storage_errors,
)

__all__ = ["LOCK_NAME", "ORPHAN_WAIT_S", "RunLock"]


LOCK_NAME = ".lock"


def _alive(pid: int | None) -> bool:
    """Whether a process ``pid`` exists (True when it cannot be told)."""
    if not pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


ORPHAN_WAIT_S = 30.0
"""How long :class:`RunLock` waits for a lock whose holder has ended: processes it forked
(``DataLoader`` workers) share the lock and exit within seconds of their parent's death."""


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 32).decode().strip())
    return None


class RunLock:
    """An advisory lock on a run directory: one process at a time trains into it.

    ``with RunLock(out): ...`` takes ``fcntl.flock`` on ``<out>/.lock`` (creating ``out`` when
    needed) and writes the holder's PID into the file. A second process (a second resume, a
    second fresh run, a second ``--overwrite``) gets a :class:`~gali_ext.errors.ConfigError`
    naming that PID. The kernel drops the lock when its holder exits or is killed, so a crashed
    run never leaves a stale lock. Processes the holder forked (``DataLoader`` workers) share
    the lock until they exit: when the PID in the file has ended, a second process waits up to
    :data:`ORPHAN_WAIT_S` seconds for them instead of failing at once. On release the lock file
    is removed again when this lock created it, and so is ``out`` when this lock created it and
    nothing else is in it (a start that failed validation): a refused folder keeps no trace.

    Take it on the main process only (``accelerator.is_main_process``): every rank of a
    multi-process run shares the directory. Platforms without ``fcntl`` (Windows) get a
    :class:`RunDirectoryWarning` and no lock.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._created = False
        self._created_file = False

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`~gali_ext.errors.ConfigError` naming the holder."""
        if self._fd is not None:
            return self
        try:
            import fcntl
        except ImportError:
            warnings.warn(
                "no fcntl on this platform: the run directory is not locked",
                RunDirectoryWarning,
                stacklevel=2,
            )
            return self
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"{str(self.run_dir)!r} is a file, not a run directory")
        self._created = not self.run_dir.exists()
        self._created_file = not os.path.lexists(self.path)
        with storage_errors("the run lock", self.path):
            self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = self._lock(fcntl)
        except BaseException:
            if self._created:
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()
            raise
        self._fd = fd
        return self

    def _lock(self, fcntl: Any) -> int:
        deadline = time.monotonic() + ORPHAN_WAIT_S
        with storage_errors("the run lock", self.path):
            while True:
                fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT, "the run lock")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_pid(fd)
                    os.close(fd)
                    # A killed holder's forked children (DataLoader workers) keep the lock
                    # until they notice and exit: wait for them, not for a live holder.
                    if not _alive(holder) and time.monotonic() < deadline:
                        time.sleep(0.2)
                        continue
                    ended = "" if _alive(holder) else ", which has ended; processes it started"
                    ended += " still hold the lock" if ended else ""
                    raise ConfigError(
                        f"{str(self.run_dir)!r} is in use by another process (PID "
                        f"{holder if holder else 'unknown'}{ended}, lock {str(self.path)!r}): "
                        "wait for it to end or stop it; two processes must not train into one "
                        "run directory"
                    ) from None
                # A releasing holder may have removed the file between our open and flock:
                # the lock counts only on the file that is at the path now.
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except BaseException:
                os.close(fd)
                raise
        return fd

    def release(self) -> None:
        """Drop the lock; remove the lock file if this lock created it (and the directory, when
        this lock made it and it stayed empty)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            if self._created_file:
                # a process waiting on this file sees it gone and locks the next one (_lock)
                self.path.unlink()
                if self._created and not any(self.run_dir.iterdir()):
                    self.run_dir.rmdir()
        except OSError:
            pass  # the lock itself goes with the descriptor below
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
