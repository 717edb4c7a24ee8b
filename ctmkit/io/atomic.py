"""Atomic writes: every output file is written to a temp file beside it, fsynced, then renamed, so a crash or
an interrupt never leaves a half-written file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def plain_mode(folder: bool = False) -> int:
    """The mode a plain open() gives a new file, 0666 less the umask (mkstemp's files are a private 0600); with
    `folder`, that of a plain mkdir(), 0777 less the umask (mkdtemp's folders are a private 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def temp_beside(path: Path) -> tuple[int, str]:
    """A temp file next to `path`, with the mode of a plain open() (so outputs shared on a cluster follow the
    user's umask); an OSError names `path` (what the user asked for), not the temp file."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise type(e)(e.errno, e.strerror, str(path)) from None
    os.fchmod(fd, plain_mode())
    return fd, tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically: temp file in the same folder, fsync, rename."""
    with atomic_file(path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_file(path: Path):
    """A binary file object for `path`, written to a temp file beside it and renamed into place only when the
    block ends without an error (fsynced); on an error or interrupt the temp file is removed."""
    path = Path(path)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
