"""Atomic file replacement: a crash, a full disk or a read-only folder never leaves half a file.

The new content goes to a temporary file in the destination folder (same file system, so
``os.replace`` is atomic), is flushed to disk, and only then replaces the destination.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path


def atomic_write(path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` then move the temporary file onto ``path``.

    Raises ``FileExistsError`` when ``path`` exists and ``overwrite`` is False, before writing.
    The temporary name keeps the destination's suffixes so writers that pick a format from
    the extension (SimpleITK, nibabel) still do.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    suffix = "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path, text: str, *, overwrite: bool = False, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    # newline="" writes the text's line endings as they are (CSV rows end in "\n" everywhere).
    return atomic_write(
        path, lambda tmp: tmp.write_text(text, encoding=encoding, newline=""), overwrite=overwrite
    )


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
