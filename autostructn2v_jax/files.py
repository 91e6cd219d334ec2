"""Atomic file writes: the one helper every module uses to write a file a user may read.

A kill leaves either the old file or the whole new one, never a half-written file, and several
writers (processes or hosts) never share a temporary file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Callable, Iterator

__all__ = ["atomic_path", "atomic_write", "atomic_write_text"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a unique temporary file name beside ``path`` (for writers that need a name, e.g. a
    memory map); it is renamed over ``path`` when the block succeeds and removed otherwise."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], suffix: str = ".tmp") -> None:
    """Write ``path`` through ``write(binary_file)`` into a unique temporary file beside it, then
    rename it over ``path``; the temporary file is removed if anything fails."""
    with atomic_path(path, suffix) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write`` of UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), ".part")
