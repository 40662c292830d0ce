"""Writing files so that a crash or a power cut leaves the old file or the new one, never half of one.

    write_atomically(path, data)  # one file, in one go

    with staged_file(folder, "x.jpg") as (f, tmp):  # a file written in pieces (streamed, checked on the way)
        f.write(chunk)
    os.replace(tmp, folder / "x.jpg")  # later, maybe with others
    fsync_dir(folder)

A temporary file has a unique name beside its final one (``.x.jpg.k3j9q_a1.tmp``): two writers never share
one, and on the same file system the rename is atomic. Its bytes are fsynced before the rename and the
folder after it, so the rename too survives a power cut. A leftover from a crash matches ``.*.tmp`` and
can be swept at start.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["fsync_dir", "staged_file", "write_atomically"]


@contextmanager
def staged_file(folder: Path, name: str, mode: int = 0o644) -> Iterator[tuple[BinaryIO, Path]]:
    """A new file under a unique temporary name beside ``folder / name``, open for writing; when the block
    ends it is flushed, fsynced and given ``mode``, and if the block raises it is removed. Renaming it into
    place is the caller's."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(folder: Path) -> None:
    """Make the folder's entries (a rename into it, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: readers, and the disk after a crash, see the old file or the new one."""
    with staged_file(path.parent, path.name, mode) as (f, tmp):
        f.write(data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
