"""One process at a time: an advisory lock on a file, which the kernel releases when its holder exits or is
killed, so a crash never leaves a run directory or a sampling job stuck.

``hold(path, what)`` takes the lock or raises ``InUseError`` at once, naming ``what`` and the holder's pid.
Where the platform has no ``fcntl`` (Windows), nothing is locked.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class InUseError(RuntimeError):
    """Another process holds the lock."""


@contextmanager
def hold(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` (created if needed) for the block; ``what`` names what it protects."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                raise InUseError(f"{what} is in use by another process{f' (pid {holder})' if holder else ''}: "
                                 "wait for it to finish, or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the file releases the lock
