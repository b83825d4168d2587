"""Safe file writes: the one place that knows how to replace a file atomically."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["atomic_write_bytes"]

#: Mode asked of the OS for a new file; the process umask is applied to it (0644 under umask 022).
FILE_MODE = 0o666


def _create_temp(folder: Path, name: str) -> tuple[int, Path]:
    """A new, empty, exclusively created temp file next to ``name`` in ``folder``: ``(fd, path)``.

    Unlike ``tempfile.mkstemp`` (always mode 0600) the file is opened with mode :data:`FILE_MODE`,
    so the kernel applies the user's umask (and any default ACL of the folder), exactly as for a
    file written with ``open(path, "wb")``; no process-wide ``os.umask`` call is needed.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, FILE_MODE), tmp
        except FileExistsError:  # pragma: no cover - 48 random bits collide
            continue
    raise FileExistsError(
        f"could not create a temp file for {name!r} in {folder}"
    )  # pragma: no cover


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one:
    temp file in the same folder, fsync, rename, fsync of the folder (where the platform allows).

    The new file gets the mode a plain ``open(path, "wb")`` would give it: ``0666`` less the
    process umask (``0644`` under the usual umask ``022``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
