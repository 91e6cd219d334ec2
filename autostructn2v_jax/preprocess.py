"""Per-image normalisation and its inverse, image splits, and the image-size check.

* :func:`normalize` / :func:`denormalize`: per-plane mean/std normalisation and its exact inverse.
  The caller normalises every plane on its own and stores the returned ``stats`` dict with the run
  (it maps predictions back to the original intensity range). :func:`normalization_stats` is the
  rule itself, shared with the streaming reader that accumulates the sums strip by strip.
* :func:`split_images`, :func:`holdout_split`, :func:`check_min_size`.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Sequence

import numpy as np

from .errors import ConfigError, UserInputError

__all__ = [
    "normalize",
    "denormalize",
    "normalization_stats",
    "check_split_ratio",
    "split_images",
    "holdout_split",
    "check_min_size",
]

logger = logging.getLogger(__name__)


def normalization_stats(mean: float, std: float, constant: bool) -> dict:
    """The stored ``{"mean", "std"}`` of a plane with raw ``mean``/``std``: ``std`` is floored at
    ``1e-6 * max(1, |mean|)`` so tiny-range images stay finite (a constant plane maps to zeros)."""
    std = 0.0 if constant else float(std)
    return {"mean": float(mean), "std": max(std, 1e-6 * max(1.0, abs(float(mean))))}


def normalize(plane: np.ndarray) -> tuple[np.ndarray, dict]:
    """``(plane - mean) / std`` as float32 with ``stats = {"mean": float, "std": float}``.

    Statistics are over the whole array given (call it per plane); see
    :func:`normalization_stats` for the floor. A constant image gives all zeros. Store ``stats``
    per image with the run; :func:`denormalize` is the exact inverse.
    """
    x = np.asarray(plane, dtype=np.float64)
    if x.size == 0:
        raise ValueError("normalize: empty array")
    constant = bool(x.max() == x.min())
    stats = normalization_stats(float(x.flat[0]) if constant else float(x.mean()),
                                0.0 if constant else float(x.std()), constant)
    if constant:
        return np.zeros(x.shape, np.float32), stats
    return ((x - stats["mean"]) / stats["std"]).astype(np.float32), stats


def denormalize(normed: np.ndarray, stats: dict) -> np.ndarray:
    """Inverse of :func:`normalize`: ``normed * std + mean`` as float32 (no clipping)."""
    x = np.asarray(normed, dtype=np.float64)
    return (x * float(stats["std"]) + float(stats["mean"])).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Splits and size checks
# --------------------------------------------------------------------------------------------
def check_split_ratio(split_ratio) -> list[float]:
    """The ratio as 3 floats; ``ConfigError("split_ratio", ...)`` unless it is 3 finite
    non-negative numbers summing to 1 with train > 0 (the one place this rule is checked)."""
    try:
        if isinstance(split_ratio, (str, bytes)) or any(isinstance(r, bool) for r in split_ratio):
            raise TypeError
        ratios = [float(r) for r in split_ratio]
    except (TypeError, ValueError):
        raise ConfigError("split_ratio",
                          f"must be 3 numbers (train, val, test), got {split_ratio!r}") from None
    if len(ratios) != 3 or not all(math.isfinite(r) and r >= 0 for r in ratios):
        raise ConfigError("split_ratio", f"must be 3 non-negative numbers, got {split_ratio!r}")
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise ConfigError("split_ratio", f"must sum to 1, got {split_ratio!r} (sum {sum(ratios)})")
    if ratios[0] <= 0:
        raise ConfigError("split_ratio", f"train fraction must be > 0, got {split_ratio!r}")
    return ratios


def split_images(n_images: int, split_ratio: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reproducible random split of ``range(n_images)`` into sorted, disjoint, covering indices.

    Counts: ``n_val = round(r_val * n)``, ``n_test = round(r_test * n)``, the rest is train; at
    least one train image is kept (taken from test, then val). Permutation from
    ``np.random.default_rng(seed)``. Raises ``ConfigError("split_ratio", ...)`` unless the ratio is
    3 finite non-negative numbers summing to 1 with train > 0.
    """
    ratios = check_split_ratio(split_ratio)
    n = int(n_images)
    if n < 1:
        raise UserInputError(f"split_images: need at least one image, got {n_images}")
    n_val = int(round(ratios[1] * n))
    n_test = int(round(ratios[2] * n))
    while n - n_val - n_test < 1:
        if n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    perm = np.random.default_rng(seed).permutation(n)
    n_train = n - n_val - n_test
    train = np.sort(perm[:n_train])
    val = np.sort(perm[n_train:n_train + n_val])
    test = np.sort(perm[n_train + n_val:])
    return train, val, test


def holdout_split(planes: Sequence[np.ndarray], patch_size: int, fraction: float = 0.15
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Carve a validation region out of every plane (for datasets too small for an image split).

    For each ``(H, W)`` plane: the bottom strip of height ``max(patch_size, round(fraction * H))``
    becomes a validation plane and the rest a training plane, provided the rest is at least
    ``patch_size`` high. Otherwise the same is done along the width (right strip). If neither
    fits, the whole plane is used for both training and validation and a warning is logged.
    Returns ``(train_planes, val_planes)``, one entry per input plane.
    """
    p = int(patch_size)
    train, val = [], []
    for i, plane in enumerate(planes):
        plane = np.asarray(plane)
        if plane.ndim != 2:
            raise ValueError(f"holdout_split: plane {i} must be 2-D, got shape {plane.shape}")
        h, w = plane.shape
        hv = max(p, int(round(fraction * h)))
        wv = max(p, int(round(fraction * w)))
        if h - hv >= p and hv <= h:
            train.append(plane[: h - hv])
            val.append(plane[h - hv:])
        elif w - wv >= p and wv <= w:
            train.append(plane[:, : w - wv])
            val.append(plane[:, w - wv:])
        else:
            logger.warning("holdout_split: plane %d (%dx%d) is too small to hold out a %d-pixel "
                           "validation strip; using it for both training and validation",
                           i, h, w, p)
            train.append(plane)
            val.append(plane)
    return train, val


def check_min_size(planes: Sequence[np.ndarray], paths: Sequence[str | os.PathLike],
                   patch_size: int, key: str) -> None:
    """Raise ``UserInputError`` naming the file and ``key`` if any image is smaller than a patch.

    ``planes[i]`` is ``(H, W)`` or ``(P, H, W)``; ``paths[i]`` is its file; ``key`` the config key
    of the patch size (e.g. ``"stage1.patch_size"``).
    """
    for arr, path in zip(planes, paths):
        h, w = np.shape(arr)[-2:]
        if h < patch_size or w < patch_size:
            raise UserInputError(
                f"{path}: image is {h}x{w} pixels, smaller than {key}={patch_size}; use a smaller "
                f"patch size or larger images"
            )
