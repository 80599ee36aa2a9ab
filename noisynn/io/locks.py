"""One writer per run folder: a lock file held with ``fcntl.flock``."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

from noisynn.errors import UserError
from noisynn.io.atomic import shared_file_mode

LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_lock(folder: Path, what: str):
    """Hold ``<folder>/.lock`` (``fcntl.flock``) for the block: one writer per run folder.

    A second process on the same folder gets a UserError at once. The kernel releases the lock
    when the holder dies, however it dies; a holder that ends normally removes the file. The lock
    is taken on the file the path names *now* (a holder may remove it between our open and our
    lock), so two processes never both believe they hold it.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, shared_file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = ""
            with contextlib.suppress(OSError):
                holder = Path(path).read_text().strip()
            raise UserError(f"{what} {folder} is in use by another training ({holder or 'it holds ' + str(path)}); "
                            "wait for it to end, or choose another folder.") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
