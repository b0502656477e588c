"""One process per data directory: the embedded store's events, replies in progress and job
queue live in its process's memory, so a second process on the same database would write
replies that the first one's clients never hear of, and cancel replies that the first one goes
on writing. The directory's lock file is held (flock) for as long as the store is open; the
kernel lets it go when the process ends, however it ends."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_FILENAME = ".lock"


class DataDirInUse(RuntimeError):
    def __init__(self, data_dir: Path, holder: str) -> None:
        who = f" (process {holder})" if holder else ""
        super().__init__(
            f"DATA_DIR {data_dir} is in use by another process{who}: the embedded store serves "
            "one process; to run several, use Redis (REDIS_URL)"
        )


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Hold `data_dir`'s lock (created with the directory if need be); DataDirInUse when
    another process holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise DataDirInUse(data_dir, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # (releases the lock)


def data_dir_problem(data_dir: Path) -> str | None:
    """Why the embedded store could not open in `data_dir` (not a directory, not writable, in
    use by another process), or None: checked before the server starts, to say it in one line."""
    try:
        with data_dir_lock(data_dir):
            probe = data_dir / f".write-check-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
    except DataDirInUse as exc:
        return str(exc)
    except OSError as exc:
        why = "not a directory" if data_dir.exists() and not data_dir.is_dir() else exc.strerror
        return f"DATA_DIR {data_dir} cannot hold the embedded store: {why or exc}"
    return None
