"""User-supplied structural-mask files: validate, load and save ``.npy`` masks."""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np

from .errors import UserInputError
from .files import atomic_write

__all__ = ["validate_mask", "load_mask_file", "save_mask"]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def validate_mask(array: Any, source: str) -> np.ndarray:
    """Check a user mask; return it as a bool array.  ``source`` names it in error messages.

    Rules: 2-D, both sides odd, values bool or numbers equal to 0/1, centre pixel True.
    Raises :class:`UserInputError` (one line starting with ``source``).
    """
    a = np.asarray(array)
    if a.ndim != 2:
        raise UserInputError(f"mask {source}: must be a 2-D array, got shape {a.shape}")
    if a.shape[0] % 2 == 0 or a.shape[1] % 2 == 0:
        raise UserInputError(
            f"mask {source}: both sides must be odd so the mask has a centre pixel, "
            f"got shape {a.shape}"
        )
    if a.dtype == np.bool_:
        m = a.copy()
    elif np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating):
        with np.errstate(invalid="ignore"):
            ok = np.all((a == 0) | (a == 1))
        if not ok:
            bad = a[~((a == 0) | (a == 1))].ravel()[0]
            raise UserInputError(
                f"mask {source}: values must be boolean (True/False or 0/1), found {bad!r}"
            )
        m = a == 1
    else:
        raise UserInputError(
            f"mask {source}: values must be boolean (True/False or 0/1), got dtype {a.dtype}"
        )
    cy, cx = m.shape[0] // 2, m.shape[1] // 2
    if not m[cy, cx]:
        raise UserInputError(f"mask {source}: the centre pixel ({cy}, {cx}) must be True")
    return m


def load_mask_file(path: str | os.PathLike) -> np.ndarray:
    """Load and validate a ``.npy`` mask (``allow_pickle=False``); :class:`UserInputError` naming
    the path for a missing file, a non-``.npy``/pickled payload, or an invalid mask."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise UserInputError(f"mask file {p}: not found")
    if os.path.isdir(p):
        raise UserInputError(f"mask file {p}: is a directory, expected a .npy file")
    try:
        data = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise UserInputError(
            f"mask file {p}: not a valid .npy array saved without pickling ({_one_line(e)})"
        ) from None
    if isinstance(data, np.lib.npyio.NpzFile):
        data.close()
        raise UserInputError(f"mask file {p}: is a .npz archive, expected a single .npy array")
    return validate_mask(data, f"file {p}")


def save_mask(path: str | os.PathLike, mask: Any) -> None:
    """Validate ``mask`` and write it to ``path`` as a bool ``.npy`` (atomic: temp + replace)."""
    p = os.fspath(path)
    m = validate_mask(mask, p)
    atomic_write(p, lambda f: np.save(f, m, allow_pickle=False), ".npy")
