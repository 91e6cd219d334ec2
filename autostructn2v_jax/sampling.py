"""Patches for training: ROI candidates, the on-device image bank, patch sampling, augmentation.

Host side (numpy, once per stage): :func:`roi_candidates` and :func:`make_bank` build the
:class:`ImageBank`. Device side (pure jax, jittable, vmapped over the batch):
:func:`sample_patches` draws ``(B, P, P)`` patches from it; :func:`augment`, :func:`augment_batch`
and :func:`dihedral_transforms` apply the 8 flips/rotations of the square (dihedral group D4)
identically to every array given (also used by test-time augmentation in ``predict``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from . import randbits
from .errors import ConfigError

__all__ = [
    "roi_candidates",
    "ROI_MIN_FRACTION",
    "ROI_THRESHOLD",
    "ROI_SCALE_FACTOR",
    "ROI_SELECT_BACKGROUND",
    "ImageBank",
    "make_bank",
    "sample_patches",
    "augment",
    "augment_batch",
    "dihedral_transforms",
]

logger = logging.getLogger(__name__)

#: Fraction of a patch (measured on the low-resolution ROI map) that must lie in the selected class
#: (background or foreground) for its corner to be an ROI candidate.
ROI_MIN_FRACTION = 0.75
#: Smoothing (in low-resolution pixels) of the ROI map before thresholding.
ROI_SMOOTH_SIGMA = 1.0
#: Default ROI rule of :func:`make_bank` / :func:`roi_candidates`: background (the darker part of
#: the smoothed, [0, 1]-scaled quarter-resolution map, at or below one half).
ROI_THRESHOLD = 0.5
ROI_SCALE_FACTOR = 0.25
ROI_SELECT_BACKGROUND = True


# --------------------------------------------------------------------------------------------
# ROI candidates
# --------------------------------------------------------------------------------------------
def _corner_grid(n: int, p: int, stride: int) -> np.ndarray:
    g = np.arange(0, n - p + 1, stride)
    if g[-1] != n - p:
        g = np.append(g, n - p)
    return g


def _roi_grid(shape: tuple[int, int], patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The corner rows and columns that :func:`roi_candidates` tests: stride ``patch_size // 4``."""
    p = int(patch_size)
    stride = max(1, p // 4)
    return _corner_grid(int(shape[0]), p, stride), _corner_grid(int(shape[1]), p, stride)


def roi_candidates(plane: np.ndarray, patch_size: int, roi_threshold: float = ROI_THRESHOLD,
                   scale_factor: float = ROI_SCALE_FACTOR,
                   select_background: bool = ROI_SELECT_BACKGROUND) -> np.ndarray:
    """Patch corners ``(K, 2)`` int32 ``(y, x)`` whose patch lies mostly in the selected class.

    Rule: the plane is block-averaged by ``b = max(1, round(1 / scale_factor))`` (edge rows/columns
    that do not fill a block are dropped, then the map is edge-extended back to full size), smoothed
    with a Gaussian (sigma ``ROI_SMOOTH_SIGMA`` low-res pixels), min-max normalised to ``[0, 1]`` (a
    constant plane maps to 0, i.e. background). Background = value ``<= roi_threshold`` (if
    ``select_background``), foreground = ``> roi_threshold`` otherwise. A corner is a candidate when
    at least ``ROI_MIN_FRACTION`` of its ``patch_size``-square patch lies in the selected
    class. Corners are taken on a grid of stride ``max(1, patch_size // 4)`` (plus the last valid
    row/column) to bound their number. With no candidate, all grid corners are returned (a note is
    logged). Fully vectorised (integral image).
    """
    x = np.asarray(plane, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"roi_candidates: plane must be 2-D, got shape {x.shape}")
    h, w = x.shape
    p = int(patch_size)
    if p < 1 or h < p or w < p:
        raise ValueError(f"roi_candidates: patch_size {p} does not fit a {h}x{w} plane")
    if not (0 < float(scale_factor) <= 1):
        raise ConfigError("scale_factor", f"must be in (0, 1], got {scale_factor}")
    b = max(1, min(int(round(1.0 / float(scale_factor))), h, w))
    hc, wc = (h // b) * b, (w // b) * b
    low = x[:hc, :wc].reshape(hc // b, b, wc // b, b).mean(axis=(1, 3))
    if ROI_SMOOTH_SIGMA > 0:
        low = ndimage.gaussian_filter(low, ROI_SMOOTH_SIGMA, mode="nearest")
    lo, hi = float(low.min()), float(low.max())
    norm = (low - lo) / (hi - lo) if hi > lo else np.zeros_like(low)
    sel = norm <= roi_threshold if select_background else norm > roi_threshold
    full = np.repeat(np.repeat(sel, b, axis=0), b, axis=1)
    full = np.pad(full, ((0, h - hc), (0, w - wc)), mode="edge")
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = full.astype(np.int64).cumsum(0).cumsum(1)
    yy, xx = np.meshgrid(*_roi_grid((h, w), p), indexing="ij")
    counts = (integral[yy + p, xx + p] - integral[yy, xx + p] - integral[yy + p, xx]
              + integral[yy, xx])
    ok = counts >= ROI_MIN_FRACTION * p * p
    if not ok.any():
        logger.info("roi_candidates: no %s patch found in a %dx%d plane; using all corners",
                    "background" if select_background else "foreground", h, w)
        ok = np.ones_like(ok)
    return np.stack([yy[ok], xx[ok]], axis=1).astype(np.int32)


# --------------------------------------------------------------------------------------------
# Device-side bank, sampling and augmentation
# --------------------------------------------------------------------------------------------
class ImageBank(NamedTuple):
    """A stage's normalised images, ready for on-device sampling (a pytree of arrays).

    images:  float32 (N, Hmax, Wmax), plane i in ``images[i, :H_i, :W_i]``, zero padding elsewhere.
    shapes:  int32 (N, 2), ``(H_i, W_i)``.
    corners: int32 (M, 3) rows ``(image, y, x)``; ``y = x = -1`` means a uniform random corner
             inside that image.
    weights: float32 (M,) sampling probabilities (sum 1).
    """

    images: Any
    shapes: Any
    corners: Any
    weights: Any


def roi_grid_size(shape: tuple[int, int], patch_size: int) -> int:
    """How many corners :func:`roi_candidates` can return for a plane of ``shape``: its whole grid."""
    ys, xs = _roi_grid(shape, patch_size)
    return len(ys) * len(xs)


def _pad_rows(corners: np.ndarray, weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Corners and weights padded to ``size`` rows: the most the planes' ROI grids can give.

    The ROI candidate count depends on the image content, and it is a shape of the compiled train
    step: without padding every dataset compiles its own step (a persistent-cache miss of seconds
    to minutes). Padded to the grid size, the bank's shapes depend only on the planes' shapes.
    Padding rows repeat the last real corner with weight 0, so they are never drawn, and the draws
    are those of the unpadded bank (same cumulative weights).
    """
    pad = size - len(corners)
    return (np.concatenate([corners, np.repeat(corners[-1:], pad, axis=0)]),
            np.concatenate([weights, np.zeros(pad, weights.dtype)]))


def make_bank(planes: Sequence[np.ndarray], patch_size: int, use_roi: bool = False,
              roi_threshold: float = ROI_THRESHOLD, scale_factor: float = ROI_SCALE_FACTOR,
              select_background: bool = ROI_SELECT_BACKGROUND) -> ImageBank:
    """Build an :class:`ImageBank` (numpy arrays; the caller ``jax.device_put``s it).

    ``planes``: normalised 2-D float planes, each at least ``patch_size`` in both dimensions.
    Random mode (``use_roi=False``): one row ``(i, -1, -1)`` per plane weighted by its number of
    valid corners ``(H-P+1)(W-P+1)``, so every valid patch of every plane is equally likely.
    ROI mode: rows are the :func:`roi_candidates` of every plane, uniformly weighted (the defaults
    select background: ``ROI_THRESHOLD``, ``ROI_SCALE_FACTOR``, ``ROI_SELECT_BACKGROUND``), then
    zero-weight rows up to the planes' whole ROI grids (:func:`_pad_rows`: one compiled train step
    per set of plane shapes, not per dataset).
    """
    p = int(patch_size)
    if len(planes) == 0:
        raise ValueError("make_bank: no planes")
    arrs = [np.asarray(a, dtype=np.float32) for a in planes]
    for i, a in enumerate(arrs):
        if a.ndim != 2:
            raise ValueError(f"make_bank: plane {i} must be 2-D, got shape {a.shape}")
        if a.shape[0] < p or a.shape[1] < p:
            raise ValueError(f"make_bank: plane {i} of shape {a.shape} is smaller than patch {p}")
    hmax = max(a.shape[0] for a in arrs)
    wmax = max(a.shape[1] for a in arrs)
    images = np.zeros((len(arrs), hmax, wmax), np.float32)
    for i, a in enumerate(arrs):
        images[i, : a.shape[0], : a.shape[1]] = a
    shapes = np.array([a.shape for a in arrs], np.int32)
    if use_roi:
        rows = []
        for i, a in enumerate(arrs):
            c = roi_candidates(a, p, roi_threshold, scale_factor, select_background)
            rows.append(np.concatenate([np.full((len(c), 1), i, np.int32), c], axis=1))
        corners = np.concatenate(rows, axis=0).astype(np.int32)
        weights = np.full(len(corners), 1.0 / len(corners), np.float64)
        corners, weights = _pad_rows(corners, weights, sum(roi_grid_size(a.shape, p) for a in arrs))
    else:
        corners = np.stack([np.arange(len(arrs)), np.full(len(arrs), -1), np.full(len(arrs), -1)],
                           axis=1).astype(np.int32)
        n_valid = (shapes[:, 0].astype(np.float64) - p + 1) * (shapes[:, 1] - p + 1)
        weights = n_valid / n_valid.sum()
    return ImageBank(images=images, shapes=shapes, corners=corners,
                     weights=weights.astype(np.float32))


def sample_patches(key: jax.Array, bank: ImageBank, patch_size: int, batch_size: int) -> jax.Array:
    """Draw ``(batch_size, patch_size, patch_size)`` float32 patches from ``bank`` (jittable).

    ``patch_size`` and ``batch_size`` must be static under ``jax.jit``. Rows are drawn with
    probabilities ``bank.weights``; a ``-1`` corner becomes a uniform corner inside that image, so
    padding is never sampled.
    """
    p, b = int(patch_size), int(batch_size)
    bits = randbits.draw(key, (b, 3))  # row, y, x per patch: one random call (randbits)
    corners = jnp.asarray(bank.corners)
    rows = randbits.categorical(bits[:, 0], jnp.asarray(bank.weights))
    images = jnp.asarray(bank.images)
    shapes = jnp.asarray(bank.shapes)

    def one(row: jax.Array, bits: jax.Array) -> jax.Array:
        c = corners[row]
        i = c[0]
        hw = shapes[i]
        ry = randbits.randint(bits[1], 0, hw[0] - p + 1)
        rx = randbits.randint(bits[2], 0, hw[1] - p + 1)
        y = jnp.where(c[1] < 0, ry, c[1])
        x = jnp.where(c[2] < 0, rx, c[2])
        return jax.lax.dynamic_slice(images, (i, y, x), (1, p, p))[0]

    return jax.vmap(one)(rows, bits)


def _dihedral(t: int, axes: tuple[int, int]) -> tuple[Callable, Callable]:
    rot, flip = t % 4, t // 4

    def forward(a):
        if flip:
            a = jnp.flip(a, axis=axes[1])
        return jnp.rot90(a, rot, axes=axes)

    def inverse(a):
        a = jnp.rot90(a, -rot, axes=axes)
        if flip:
            a = jnp.flip(a, axis=axes[1])
        return a

    return forward, inverse


def dihedral_transforms(axes: tuple[int, int] = (0, 1)) -> list[tuple[Callable, Callable]]:
    """The 8 transforms of the square as ``(forward, inverse)`` pairs acting on ``axes``.

    Index ``t``: ``forward = rot90(k=t % 4)`` after a flip of the second axis if ``t >= 4``;
    ``t = 0`` is the identity. Use ``axes=(1, 2)`` for ``(B, H, W, C)`` batches (test-time
    augmentation).
    """
    return [_dihedral(t, tuple(axes)) for t in range(8)]


_D4 = dihedral_transforms((0, 1))


def augment(key: jax.Array, *arrays: jax.Array, enabled: jax.Array | bool = True) -> tuple:
    """Apply one random dihedral transform (of 8, uniform) identically to every array.

    Each array is ``(H, W)`` or ``(H, W, ...)`` with ``H == W`` (any dtype, e.g. bool masks).
    Jittable and vmappable (see :func:`augment_batch`). Returns a tuple of the transformed arrays.
    ``enabled`` (may be traced): ``False`` applies the identity, so one compiled function can serve
    augmented and plain batches.  Training does not use it: ``train.make_batch`` decides at trace
    time.
    """
    if not arrays:
        return ()
    for a in arrays:
        if a.ndim < 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"augment: arrays must be square (H, W, ...), got shape {a.shape}")
    return _transform(jnp.where(enabled, randbits.randint(randbits.draw(key, ()), 0, 8), 0), arrays)


def _transform(t: jax.Array, arrays: tuple) -> tuple:
    """Dihedral transform number ``t`` (traced int) applied to every array."""
    branches = [lambda arrs, f=f: tuple(f(a) for a in arrs) for f, _ in _D4]
    return tuple(jax.lax.switch(t, branches, tuple(jnp.asarray(a) for a in arrays)))


def augment_batch(key: jax.Array, *arrays: jax.Array, enabled: jax.Array | bool = True) -> tuple:
    """:func:`augment` over the leading (batch) axis with independent per-sample transforms."""
    if not arrays:
        return ()
    for a in arrays:
        if a.ndim < 3 or a.shape[1] != a.shape[2] or a.shape[0] != arrays[0].shape[0]:
            raise ValueError(f"augment_batch: arrays must be (B, H, W, ...) with H == W and one B, "
                             f"got shape {a.shape}")
    t = randbits.randint(randbits.draw(key, (arrays[0].shape[0],)), 0, 8)  # one random call
    return jax.vmap(_transform)(jnp.where(enabled, t, 0), tuple(arrays))