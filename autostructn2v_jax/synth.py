"""Synthetic microscopy-like images and noise with known ground truth (demo, tests, benchmarks).

Nothing is downloaded: clean images are drawn from a seeded numpy Generator.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
from scipy import ndimage

from autostructn2v_jax.files import atomic_write

NOISE_CASES = ("white", "hcorr", "vcorr", "corr2d")


def clean_image(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A [0, 1] float32 image of blurred cells (blobs) and filaments on a dark background."""
    img = np.zeros((size, size), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(6, 12))):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(size * 0.03, size * 0.1, 2)
        angle = rng.uniform(0, np.pi)
        c, s = np.cos(angle), np.sin(angle)
        u = ((yy - cy) * c + (xx - cx) * s) / ry
        v = (-(yy - cy) * s + (xx - cx) * c) / rx
        img += rng.uniform(0.4, 1.0) * (u * u + v * v <= 1.0)
    for _ in range(int(rng.integers(3, 7))):
        y0, x0 = rng.uniform(0, size, 2)
        angle = rng.uniform(0, np.pi)
        t = np.linspace(-size, size, 4 * size)
        ys = np.clip((y0 + t * np.sin(angle)).astype(int), 0, size - 1)
        xs = np.clip((x0 + t * np.cos(angle)).astype(int), 0, size - 1)
        img[ys, xs] += rng.uniform(0.3, 0.8)
    img = ndimage.gaussian_filter(img, 1.5)
    img = img - img.min()
    return (0.1 + 0.8 * img / max(float(img.max()), 1e-6)).astype(np.float32)


def correlated_noise(rng: np.random.Generator, shape, length: int = 5, axis: int = 1) -> np.ndarray:
    """Unit-variance noise correlated along `axis`: white noise convolved with a 1 x `length` box."""
    white = rng.standard_normal(shape)
    corr = ndimage.uniform_filter1d(white, size=length, axis=axis, mode="wrap")
    return (corr / corr.std()).astype(np.float32)


def add_noise(rng: np.random.Generator, clean: np.ndarray, case: str) -> np.ndarray:
    """`white`: Gaussian sigma 0.1. `hcorr`/`vcorr`: box-correlated (length 5) std 0.08 along x/y
    plus independent std 0.04. `corr2d`: white noise blurred by a Gaussian of sigma 1 (correlated
    in every direction), std 0.08, plus independent std 0.04. No clipping: intensities keep their statistics."""
    if case == "white":
        noise = 0.1 * rng.standard_normal(clean.shape)
    elif case in ("hcorr", "vcorr"):
        axis = 1 if case == "hcorr" else 0
        noise = 0.08 * correlated_noise(rng, clean.shape, 5, axis) + 0.04 * rng.standard_normal(clean.shape)
    elif case == "corr2d":
        blob = ndimage.gaussian_filter(rng.standard_normal(clean.shape), 1.0, mode="wrap")
        noise = 0.08 * blob / blob.std() + 0.04 * rng.standard_normal(clean.shape)
    else:
        raise ValueError(f"unknown noise case {case!r}; choose from {NOISE_CASES}")
    return (clean + noise).astype(np.float32)


def psnr(reference: np.ndarray, image: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB against `reference` (range = reference max - min)."""
    reference = np.asarray(reference, np.float64)
    image = np.asarray(image, np.float64)
    if data_range is None:
        data_range = float(reference.max() - reference.min()) or 1.0
    mse = float(np.mean((reference - image) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def psnr_table(rows) -> dict | None:
    """``{"per_image": {name: {label: dB}}, "mean": {label: dB}}`` of ``rows`` of
    ``(name, reference, {label: image})``; an image of another shape than its reference is left
    out, a label's mean is over the images that have it. None when no PSNR was computed."""
    table: dict[str, dict[str, float]] = {}
    for name, ref, images in rows:
        row = {label: psnr(ref, img) for label, img in images.items()
               if np.shape(img) == np.shape(ref)}
        if row:
            table[name] = row
    if not table:
        return None
    labels = list(dict.fromkeys(k for r in table.values() for k in r))
    return {"per_image": table,
            "mean": {k: float(np.mean([r[k] for r in table.values() if k in r])) for k in labels}}


def write_demo_data(out_dir: str | os.PathLike, *, count: int = 4, size: int = 256,
                    case: str = "hcorr", seed: int = 0) -> pathlib.Path:
    """Write `noisy/` and `clean/` float32 TIFF pairs with the same names; return `out_dir`."""
    import tifffile

    out = pathlib.Path(out_dir)
    rng = np.random.default_rng(seed)
    for sub in ("noisy", "clean"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        clean = clean_image(rng, size)
        noisy = add_noise(rng, clean, case)
        for sub, arr in (("clean", clean), ("noisy", noisy)):
            path = out / sub / f"image_{i:02d}.tif"
            atomic_write(path, lambda f, arr=arr: tifffile.imwrite(f, arr), ".tif")
    return out
