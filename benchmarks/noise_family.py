"""Noise shapes and clean-image families with a known noise correlation (for mask_family.py).

Every correlated case is ``0.08 * (white noise convolved with a kernel K, unit std) + 0.04 * white``
(the issue's recipe), so the true correlation coefficient at lag ``d != 0`` is
``0.8 * (K * K)(d) / sum(K**2)`` (``*`` the correlation).  Stripes add one N(0, 1) offset per row
(or column) instead of the convolved noise: correlation 0.8 along the whole row.  ``white`` and
``poisson`` are pixel-independent.  Nothing is downloaded: photos and textures are scikit-image's
bundled images.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
import scipy.signal

CORR_STD, WHITE_STD = 0.08, 0.04
MAX_CROP = 31


def line(length: int, angle_deg: float) -> np.ndarray:
    """A rasterised straight line of ``length`` pixels through the centre at ``angle_deg``."""
    t = np.linspace(-(length - 1) / 2, (length - 1) / 2, 8 * length)
    a = np.deg2rad(angle_deg)
    ys, xs = np.round(-t * np.sin(a)).astype(int), np.round(t * np.cos(a)).astype(int)
    h = max(np.abs(ys).max(), np.abs(xs).max())
    k = np.zeros((2 * h + 1, 2 * h + 1))
    k[ys + h, xs + h] = 1.0
    return k


def disc(radius: float) -> np.ndarray:
    h = int(np.floor(radius))
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
    return (yy**2 + xx**2 <= radius**2).astype(float)


def gaussian(sy: float, sx: float, angle_deg: float = 0.0) -> np.ndarray:
    h = int(np.ceil(4 * max(sy, sx)))
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1].astype(float)
    a = np.deg2rad(angle_deg)
    u, v = yy * np.cos(a) - xx * np.sin(a), yy * np.sin(a) + xx * np.cos(a)
    return np.exp(-0.5 * ((u / sy) ** 2 + (v / sx) ** 2))


def _shape(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in r] for r in rows], float)


def kernels(quick: bool = False) -> dict[str, np.ndarray]:
    """Name -> kernel of every correlated (convolved) noise case."""
    out: dict[str, np.ndarray] = {}
    lengths = (3, 7, 13) if quick else (3, 5, 7, 9, 11, 13)
    for length in lengths:
        for angle in (0, 45, 90, 135, 30):
            out[f"line{length}@{angle}"] = line(length, angle)
    for n in ((3, 5) if quick else (3, 4, 5)):
        out[f"box{n}"] = np.ones((n, n))
    for r in (2.0, 3.0):
        out[f"disc{r:g}"] = disc(r)
    out["diamond2"] = (np.add.outer(np.abs(np.arange(-2, 3)), np.abs(np.arange(-2, 3))) <= 2).astype(float)
    out["ellipse@30"] = (gaussian(1.5, 3.0, 30) > np.exp(-0.5)).astype(float)
    out["cross"] = _shape(["..#..", "..#..", "#####", "..#..", "..#.."])
    out["L"] = _shape(["#...", "#...", "#...", "####"])
    out["ring"] = _shape([".###.", "#...#", "#...#", "#...#", ".###."])
    for s in ((0.5, 1.0, 2.0) if quick else (0.5, 1.0, 1.5, 2.0)):
        out[f"gauss{s:g}"] = gaussian(s, s)
    out["gauss0.6x2"] = gaussian(0.6, 2.0)
    out["gauss2x0.8@45"] = gaussian(2.0, 0.8, 45)
    return out


CASES_INDEPENDENT = ("white", "poisson")
CASES_STRIPES = ("stripes_rows", "stripes_cols")


def true_correlation(case: str, kernel: np.ndarray | None, size: int = MAX_CROP) -> np.ndarray:
    """The noise's correlation coefficient per lag, a ``size x size`` crop around zero lag."""
    c = size // 2
    rho = np.zeros((size, size))
    if case == "stripes_rows":
        rho[c, :] = 0.8
    elif case == "stripes_cols":
        rho[:, c] = 0.8
    elif kernel is not None:
        full = scipy.signal.correlate2d(kernel, kernel, mode="full")
        full = 0.8 * full / full.max()
        h = full.shape[0] // 2
        r = min(h, c)
        rho[c - r:c + r + 1, c - r:c + r + 1] = full[h - r:h + r + 1, h - r:h + r + 1]
    rho[c, c] = 1.0
    return rho


def add_noise(rng: np.random.Generator, clean: np.ndarray, case: str, kernel: np.ndarray | None) -> np.ndarray:
    """``clean`` plus the case's noise (no clipping)."""
    shape = clean.shape
    white = WHITE_STD * rng.standard_normal(shape)
    if case == "white":
        return (clean + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if case == "poisson":
        peak = 30.0  # photons at intensity 1: shot noise plus read noise
        return (rng.poisson(np.clip(clean, 0, None) * peak) / peak + 0.03 * rng.standard_normal(shape)).astype(np.float32)
    if case == "stripes_rows":
        return (clean + CORR_STD * rng.standard_normal((shape[0], 1)) + white).astype(np.float32)
    if case == "stripes_cols":
        return (clean + CORR_STD * rng.standard_normal((1, shape[1])) + white).astype(np.float32)
    corr = ndi.convolve(rng.standard_normal(shape), kernel, mode="wrap")
    return (clean + CORR_STD * corr / np.sqrt((kernel**2).sum()) + white).astype(np.float32)


FAMILIES = ("cells", "photos", "texture")
_PHOTOS = ("camera", "coins", "moon", "astronaut")
_TEXTURES = ("brick", "grass", "gravel")


def clean_images(family: str, rng: np.random.Generator, count: int = 4, size: int = 192) -> list[np.ndarray]:
    """``count`` clean ``size x size`` images in [0, 1]: synthetic cells, photo crops or texture crops."""
    if family == "cells":
        from autostructn2v_jax import synth

        return [synth.clean_image(rng, size) for _ in range(count)]
    import skimage.color
    import skimage.data

    names = _PHOTOS if family == "photos" else _TEXTURES
    out = []
    for i in range(count):
        img = getattr(skimage.data, names[i % len(names)])()
        if img.ndim == 3:
            img = skimage.color.rgb2gray(img)
        img = img.astype(np.float32)
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
        y = int(rng.integers(0, img.shape[0] - size + 1))
        x = int(rng.integers(0, img.shape[1] - size + 1))
        out.append(img[y:y + size, x:x + size].copy())
    return out


def score(mask: np.ndarray, rho: np.ndarray) -> tuple[float, int]:
    """(recall of lags with rho >= 0.15, masked lags with rho < 0.02), mask centred on rho's crop."""
    m = np.asarray(mask, bool)
    size = rho.shape[0]
    big = np.zeros((max(size, m.shape[0]),) * 2, bool)
    o = (big.shape[0] - m.shape[0]) // 2
    big[o:o + m.shape[0], o:o + m.shape[1]] = m
    r = np.zeros(big.shape)
    o2 = (big.shape[0] - size) // 2
    r[o2:o2 + size, o2:o2 + size] = rho
    need = r >= 0.15
    return float((big & need).sum() / need.sum()), int((big & (r < 0.02)).sum())
