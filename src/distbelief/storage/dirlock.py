"""One run at a time per directory: a lock file in each checkpoint and run directory.

Two runs writing one checkpoint directory remove each other's checkpoints (each keeps only
its newest) and mix their progress notes; two runs in one run directory mix their metrics.
So a run holds ``<dir>/.distbelief.lock`` while it writes there: a POSIX record lock
(``fcntl.lockf``), which the kernel releases when the holder dies however it dies (a
SIGKILL too), with the holder's pid written inside for the message a second run gets.

A lock file whose lock nobody holds but which still names a pid was left by a run that was
killed: the next run takes it over, with a warning naming that pid. A run that ends
normally removes its lock file.

Record locks belong to a process, not to a file handle (a second ``lockf`` in the same
process always succeeds, and forked workers do not inherit them): the directories this
process holds are also kept in a set, so two runs in one process are told apart too.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from types import TracebackType

from ..errors import ConfigError

log = logging.getLogger("distbelief")

LOCK = ".distbelief.lock"
"""The lock file's name, in the directory it guards."""

_held: dict[str, int] = {}  # real path of a directory this process holds -> its lock's fd
_held_lock = threading.Lock()


class DirectoryLock:
    """The lock of one directory, for one run. ``acquire`` raises ``ConfigError`` starting
    with ``name`` (the parameter or flag that named the directory) when another run holds it,
    naming the directory and that run's pid."""

    def __init__(self, directory: str | os.PathLike, name: str) -> None:
        self.directory = Path(directory)
        self.name = name
        self.path = self.directory / LOCK
        self.taken_over: int | None = None  # pid of the killed run whose lock was taken over
        self._key: str | None = None

    def acquire(self) -> DirectoryLock:
        """Take the lock (the directory must exist); returns ``self``."""
        key = os.path.realpath(self.directory)
        with _held_lock:
            if key in _held:
                raise self._refusal(os.getpid())
            for _ in range(10):  # retried only if the file was replaced meanwhile
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                except OSError as exc:
                    raise ConfigError(
                        f"{self.name}: cannot write in {str(self.directory)!r}: "
                        f"{exc.strerror or exc}"
                    ) from None
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    os.close(fd)
                    if exc.errno in (errno.EACCES, errno.EAGAIN):
                        raise self._refusal(_holder(self.path)) from None
                    raise ConfigError(
                        f"{self.name}: cannot lock {self.directory}: {exc.strerror or exc}"
                    ) from None
                # The holder before us may have removed the file after we opened it: a lock
                # on a removed file guards nothing, so open the new one.
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            else:  # pragma: no cover - the file replaced ten times in a row
                raise ConfigError(f"{self.name}: cannot lock {self.directory}: it keeps changing")
            # Read through this fd: closing any other of this process's handles on the file
            # would release the record lock.
            left = _pid_in(os.pread(fd, 4096, 0))
            if left is not None and left != os.getpid():
                self.taken_over = left
                log.warning(
                    "%s: %s was locked by pid %d, which is no longer running (killed?): "
                    "taking its lock over",
                    self.name, self.directory, left,
                )  # fmt: skip
            record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            _held[key] = fd
            self._key = key
        return self

    def release(self) -> None:
        """Remove the lock file and let the lock go (a no-op if not held)."""
        with _held_lock:
            if self._key is None:
                return
            fd = _held.pop(self._key)
            self._key = None
            try:
                self.path.unlink()  # while still held: see the inode check in acquire
            except OSError:
                pass
            os.close(fd)  # closing the file releases the record lock

    @property
    def held(self) -> bool:
        """Whether this lock is held (by this process)."""
        return self._key is not None

    def _refusal(self, pid: int | None) -> ConfigError:
        who = f"pid {pid}" if pid is not None else "a run whose pid is not written yet"
        return ConfigError(
            f"{self.name}: {self.directory} is in use by another run ({who}); wait for it to "
            "end or choose another directory"
        )

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _holder(path: Path) -> int | None:
    """The pid a lock file held by another process names, if it names one."""
    try:
        return _pid_in(path.read_bytes())
    except OSError:
        return None


def _pid_in(text: bytes) -> int | None:
    try:
        return int(json.loads(text)["pid"])
    except (ValueError, KeyError, TypeError):
        return None
