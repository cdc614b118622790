"""One writer per predictions file: an advisory lock on ``OUT.jsonl.lock`` held for the whole job.

The lock belongs to the job, not to a rank: the process that checks the run before any rank starts (Lightning's
launching process, or global rank 0 where SLURM or torchrun start every rank) takes it before any model loads and
holds it until the job ends; the ranks then append to the output as before (each line under ``flock``), data-parallel
groups included. A second job on the same output finds the lock taken and stops, naming the holder's host and pid.

``flock`` is released by the kernel when the holder dies, however it dies, so a killed job leaves no stale lock
(the file it leaves is taken over by the next run). On NFS, Linux maps ``flock`` onto NFS byte-range locks, which
hold across nodes. The file is removed when the lock is released; an acquirer that locked a file someone removed
meanwhile notices (the path no longer names its file) and tries again.

The lock file is named after the output's resolved path, so every name of one file (a symbolic link, a path through
a linked folder) takes the same lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from star_lightning.errors import ConfigurationError

LOCK_SUFFIX = ".lock"


def lock_path(output: str | os.PathLike[str]) -> Path:
    """``OUT.jsonl`` -> ``OUT.jsonl.lock``, beside the file the path resolves to (links followed)."""
    return Path(f"{os.path.realpath(output)}{LOCK_SUFFIX}")


class OutputLock:
    """``with OutputLock(output):`` holds the lock of ``output``; :meth:`acquire` raises naming the holder."""

    def __init__(self, output: str | os.PathLike[str]) -> None:
        self.output = Path(output)
        self.path = lock_path(output)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock now or raise a :class:`ConfigurationError`; also proves the output's folder is writable."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            files = [parent for parent in self.output.parents if parent.exists() and not parent.is_dir()]
            why = f"{files[0]} is a file, not a folder" if files else error.strerror
            raise ConfigurationError(
                f"cannot create the folder of --output {self.output} ({why}); choose a writable --output"
            ) from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise ConfigurationError(
                    f"cannot write beside --output {self.output} ({error.strerror}: {self.path}); choose a writable "
                    "--output"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = _read_holder(fd)
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise ConfigurationError(
                    f"{self.output} is being written by another star-lightning run ({holder}); wait for it to end, "
                    "or choose another --output"
                ) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file between our open and our lock: take the new one
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        text = (json.dumps(me) + "\n").encode()
        try:
            os.ftruncate(fd, 0)
            if os.pwrite(fd, text, 0) != len(text):
                raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as error:
            self._fd = fd
            self.release()  # no stray lock file
            raise ConfigurationError(
                f"cannot write beside --output {self.output} ({error.strerror}: {self.path}); free space there or "
                "choose another --output"
            ) from None
        self._fd = fd

    def release(self) -> None:
        """Remove the file while still holding the lock (a waiting acquirer then sees it gone), then unlock."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), path.stat())
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> str:
    """``host H, pid P, since T`` from the lock file, or a placeholder while the holder is still writing it."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        return f"host {holder['host']}, pid {holder['pid']}, since {holder['since']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "host and pid not yet written"
