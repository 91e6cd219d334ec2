"""Atomic file writes: the one helper every module uses to write a file a user may read.

A kill leaves either the old file or the whole new one, never a half-written file, and several
writers (processes or hosts) never share a temporary file.
"""

from __future__ import annotations

import os
import tempfile
from typing import IO, Callable

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], suffix: str = ".tmp") -> None:
    """Write ``path`` through ``write(binary_file)`` into a unique temporary file beside it, then
    rename it over ``path``; the temporary file is removed if anything fails."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write`` of UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), ".part")
