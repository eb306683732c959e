"""How a run's files reach the disk: atomic writes that fail in one line, and one writer per run folder.

A write goes to ``name.tmp``, is fsynced and renamed over ``name``, so a crash, a full disk or Ctrl-C leaves
the previous file intact; a failed write removes its ``.tmp`` and raises :class:`StorageError` naming the
folder and its free space. :class:`RunFolderLock` holds an OS lock (``fcntl.flock``) on ``run.lock`` in the
run folder for the run's life: a second run on the same folder fails at once, naming the holder's pid, and
the kernel releases the lock when the holder exits, however it exits (kill -9 included).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

LOCK_NAME = "run.lock"


class StorageError(RuntimeError):
    """A run's file could not be written (full disk, read-only folder) or its folder is locked by another run."""


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1024 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"


def free_space(folder: Path) -> str:
    try:
        return human_bytes(shutil.disk_usage(folder).free) + " free"
    except OSError:
        return "free space unknown"


def write_failure(path: Path, error: OSError) -> StorageError:
    """The one line for a failed write of ``path``: the folder, the reason, the free space, what is kept."""
    reason = "disk full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else (error.strerror or str(error))
    kept = f"; the previous {path.name} is kept" if path.exists() else ""
    return StorageError(f"cannot write {path.name} in {path.parent}: {reason} ({free_space(path.parent)}){kept}")


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via ``path.tmp`` + fsync + rename; on any failure no ``.tmp`` is left."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except BaseException as error:     # Ctrl-C mid-write too: the .tmp goes, the old file stays
        try:
            os.unlink(temporary)
        except OSError:
            pass
        if isinstance(error, OSError):
            raise write_failure(path, error) from None
        raise


class RunFolderLock:
    """An exclusive ``fcntl.flock`` on ``folder/run.lock``, which holds the holder's pid."""

    def __init__(self, folder: str | os.PathLike):
        import fcntl

        self.folder = Path(folder)
        path = self.folder / LOCK_NAME
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise StorageError(f"cannot use run folder {self.folder}: {error.strerror or error}") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StorageError(f"cannot lock run folder {self.folder}: {error.strerror or error}") from None
            try:
                holder = path.read_text().strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise StorageError(f"run folder {self.folder} is in use by another run (pid {holder}); "
                               "one run at a time writes a run folder") from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        self._descriptor: int | None = descriptor
        for stale in self.folder.glob("*.tmp"):    # a half-written file of a writer killed with -9
            stale.unlink(missing_ok=True)

    def release(self) -> None:
        """Unlock; safe to call twice. (Exiting the process releases it too.)"""
        if self._descriptor is not None:
            os.close(self._descriptor)   # closing the only descriptor drops the flock
            self._descriptor = None
