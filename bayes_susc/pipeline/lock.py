"""One writer per run folder: an advisory lock held for the whole run.

Two processes sampling into one folder would both sample every component, and the
second's clean-up of a killed run's temporary files would delete the first's
half-written results. The lock is ``fcntl.flock`` on ``<run folder>/.lock``: the
kernel releases it when its holder exits, however it exits, so a killed run never
leaves the folder locked. The file records who holds it (process id, host, command,
start time) so that the refusal names the holder.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bayes_susc.errors import RunFolderBusy

__all__ = ["LOCK_NAME", "run_folder_lock"]

LOCK_NAME = ".lock"


@contextmanager
def run_folder_lock(folder: Path) -> Iterator[Path]:
    """Hold ``folder``'s lock while the block runs; yields the lock file's path.

    Raises:
        RunFolderBusy: another process holds the lock (the message names it); raised at
            once, without waiting.
    """
    import fcntl

    folder = Path(folder)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunFolderBusy(
            f"run folder {folder} is in use by {holder}; wait for that run to finish, or "
            "write into another folder (--out)"
        ) from None
    try:
        started = datetime.datetime.now().isoformat(timespec="seconds")
        command = " ".join(sys.argv[:3]) or "python"
        record = f"process {os.getpid()} on {socket.gethostname()} ({command}, since {started})"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        yield path
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
