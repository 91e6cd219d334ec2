"""Autocorrelation of noise patches, the high-pass applied before it, and its inversion.

* :func:`autocorrelation` -- jitted, FFT-based mean *linear* ACF of mean-centred patches.
* :func:`highpass` -- image minus its Gaussian blur: removes the image's own smooth correlation
  before the ACF is measured (the pipeline applies it to the images, then cuts the patches).
* :func:`highpass_acf` -- the autocorrelation of that filter itself (what it does to any ACF).
* :func:`highpassed_correlation` -- what a given noise correlation looks like after the high-pass.
* :func:`flattest_tiles` -- the tiles of the patches with the least high-passed variance (where the
  image content is flattest, so the ACF there is mostly noise).
* :func:`deconvolve_highpass` -- the noise ACF before the high-pass, recovered from the ACF after
  it, assuming the noise correlation is short (zero outside a given radius).

Why the inversion: the high-pass keeps a line-shaped correlation (the blur averages across the
line) but removes most of a two-dimensional short-range one together with the signal; the ACF
after the high-pass is the true ACF convolved with :func:`highpass_acf`, a known kernel, so a
short-range ACF can be solved for by least squares.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.signal

from .maskshape import crop_center

__all__ = ["autocorrelation", "highpass", "highpass_acf", "highpassed_correlation", "flattest_tiles",
           "deconvolve_highpass"]

@functools.partial(jax.jit, static_argnames=("normalize", "log", "unbiased"))
def autocorrelation(
    patches: jnp.ndarray,
    normalize: bool = True,
    log: bool = True,
    unbiased: bool = False,
) -> jnp.ndarray:
    """Mean linear autocorrelation of mean-centred patches, centred.

    Args:
      patches: ``(N, H, W)`` or ``(H, W)`` real array.
      normalize: divide by the zero-lag value (left as zeros where that value is 0, e.g. for
        constant patches).
      log: apply ``log1p(abs(.))`` last (after normalisation).
      unbiased: divide each lag by its overlap count ``(H - |dy|) * (W - |dx|)`` (the unbiased
        per-lag estimate).  With ``normalize=True`` and ``log=False`` each value is then the
        sample correlation coefficient of the pixel pairs at that lag.

    Returns:
      float32 ``(2H-1, 2W-1)`` array with zero lag at ``(H-1, W-1)``:
      ``out[H-1+dy, W-1+dx] = mean_n sum_{y,x} p_n[y, x] * p_n[y+dy, x+dx]`` (pairs inside the
      patch only -- zero padding, no wrap-around), with ``p_n`` the mean-centred patch.

    The FFT is batched over N (``rfft2`` on a fast size >= ``2H-1 x 2W-1``); the mean power
    spectrum is inverted once.  Jitted; the flags are static.
    """
    x = jnp.asarray(patches, dtype=jnp.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"autocorrelation expects (N, H, W) or (H, W) patches, got {x.shape}")
    _, h, w = x.shape
    x = x - jnp.mean(x, axis=(1, 2), keepdims=True)
    fh = scipy.fft.next_fast_len(2 * h - 1, real=True)
    fw = scipy.fft.next_fast_len(2 * w - 1, real=True)
    spec = jnp.fft.rfft2(x, s=(fh, fw), axes=(1, 2))
    power = jnp.mean(spec.real**2 + spec.imag**2, axis=0)
    acf = jnp.fft.irfft2(power, s=(fh, fw), axes=(0, 1))
    # Negative lags live at the end of the padded array: roll them in front of zero lag.
    acf = jnp.roll(acf, (h - 1, w - 1), axis=(0, 1))[: 2 * h - 1, : 2 * w - 1]
    if unbiased:
        oy = h - jnp.abs(jnp.arange(-(h - 1), h, dtype=jnp.float32))
        ox = w - jnp.abs(jnp.arange(-(w - 1), w, dtype=jnp.float32))
        acf = acf / (oy[:, None] * ox[None, :])
    if normalize:
        c = acf[h - 1, w - 1]
        safe = jnp.where(c != 0, c, 1.0)
        acf = jnp.where(c != 0, acf / safe, jnp.zeros_like(acf))
    if log:
        acf = jnp.log1p(jnp.abs(acf))
    return acf


def highpass(images: Any, sigma: float) -> np.ndarray:
    """``images - gaussian_filter(images, sigma)`` per 2-D plane (host side; reflect borders).

    Without it the autocorrelation of a noisy image is dominated by the *signal* (cells and
    background gradients are correlated over many pixels), and white noise on a real image looks
    like a broad blob of "structure".  What varies on scales well below ``sigma`` passes: a line
    correlation survives along its direction.  What it does to the noise ACF is exactly a
    convolution with :func:`highpass_acf` (white noise gets a small negative neighbour lobe; a
    two-dimensional correlation of a few pixels is largely removed, which
    :func:`deconvolve_highpass` undoes).  Measurements per ``sigma``: docs/benchmarks.md.

    Args:
      images: ``(H, W)`` or ``(..., H, W)`` real array.
      sigma: Gaussian standard deviation in pixels; ``0`` returns a float copy unchanged.

    Returns:
      float32 array of the same shape.
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"highpass expects (H, W) or (..., H, W) images, got shape {x.shape}")
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"highpass sigma must be a finite number >= 0, got {sigma!r}")
    if sigma == 0:
        return x.astype(np.float32)
    sig = (0.0,) * (x.ndim - 2) + (sigma, sigma)
    return (x - scipy.ndimage.gaussian_filter(x, sig, mode="reflect")).astype(np.float32)


def highpass_acf(sigma: float, radius: int) -> np.ndarray:
    """Autocorrelation ``(h * h)(d)`` of the filter ``h = delta - G_sigma``, lags ``|d| <= radius``.

    ``(2 radius + 1)`` square, zero lag in the middle; sums to ~0 (the filter removes constants).
    ``sigma = 0`` gives the identity (a delta: no high-pass).
    """
    r = int(radius)
    g = np.zeros((2 * r + 1, 2 * r + 1))
    g[r, r] = 1.0
    if float(sigma) == 0:
        return g
    h = g - scipy.ndimage.gaussian_filter(g, float(sigma), mode="constant", truncate=8.0)
    return scipy.ndimage.correlate(h, h, mode="constant")


def highpassed_correlation(noise: Any, sigma: float, size: int) -> np.ndarray:
    """The normalised ACF that high-passed patches show for noise correlated as ``noise``.

    ``highpass_acf(sigma) * noise`` (2-D convolution over lags; ``noise`` an odd square, zero lag
    in the middle), divided by its zero-lag value and cropped (or zero padded) to ``size``: the
    forward model that :func:`deconvolve_highpass` inverts, comparable with
    ``autocorrelation(highpassed patches, normalize=True, log=False, unbiased=True)``.  Zeros when
    the zero-lag value is <= 0.
    """
    n = np.asarray(noise, dtype=np.float64)
    h = highpass_acf(sigma, max(int(size), n.shape[0]) // 2 + 1)
    p = scipy.signal.convolve2d(n, h, mode="full")
    c = p[p.shape[0] // 2, p.shape[1] // 2]
    return crop_center(p / c if c > 0 else np.zeros_like(p), int(size))


def flattest_tiles(patches: Any, tile: int, fraction: float, smooth: float = 0.0,
                   spread: float = 1.0) -> np.ndarray:
    """Cut ``(N, P, P)`` patches into ``tile``-square tiles; keep the flattest ones.

    The patches are already high-passed, so a tile's variance is noise plus the image's detail:
    the lowest ones are where the image is flattest.  ``smooth > 0`` ranks by the variance after
    a Gaussian blur of that sigma instead: the coarse detail that :func:`deconvolve_highpass`
    amplifies most.  Kept: every tile whose variance is at most ``spread`` times the
    ``fraction`` quantile (so on pure noise, where the variances are alike, nearly all tiles are
    kept and the choice does not bias the noise), at least one.  Kept tiles stay in their
    original order (deterministic).
    """
    x = np.asarray(patches, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    n, h, w = x.shape
    t = int(tile)
    if not 1 <= t <= min(h, w):
        raise ValueError(f"tile must be in [1, {min(h, w)}], got {tile}")
    ny, nx = h // t, w // t

    def cut(a: np.ndarray) -> np.ndarray:
        return a[:, : ny * t, : nx * t].reshape(n, ny, t, nx, t).transpose(0, 1, 3, 2, 4).reshape(-1, t, t)

    tiles = cut(x)
    ranked = cut(scipy.ndimage.gaussian_filter(x, (0, smooth, smooth), mode="reflect")) if smooth > 0 else tiles
    var = ranked.var(axis=(1, 2))
    limit = float(spread) * float(np.quantile(var, min(max(float(fraction), 0.0), 1.0)))
    chosen = np.flatnonzero(var <= limit)
    if chosen.size == 0:
        chosen = np.argsort(var, kind="stable")[:1]
    return tiles[chosen]


def deconvolve_highpass(acf: Any, sigma: float, radius: int, ridge: float = 1e-5, *,
                        with_residual: bool = False) -> np.ndarray | tuple[np.ndarray, float]:
    """The noise correlation before the high-pass, from the linear (unbiased) ACF after it.

    Model: ``acf = highpass_acf(sigma) * N`` (2-D convolution over lags) with ``N`` zero outside
    ``|d|_inf <= radius``.  Every lag of ``acf`` (an odd square, zero lag in the middle, at least
    ``2 radius + 1``) is one equation; ``N`` is their ridge-regularised least-squares solution
    (``ridge`` times the mean diagonal of the normal matrix).  The high-pass removes constants, so
    a constant offset of ``N`` is barely determined: it is removed by subtracting the median of
    the outermost ring (where a short correlation has decayed).  Returned as a ``(2 radius + 1)``
    square normalised to 1 at zero lag (zeros when that value is <= 0).  ``sigma = 0``: the
    centre crop of ``acf`` itself.  Image content left after the high-pass is amplified by the
    inversion at coarse scales; feed it the ACF of :func:`flattest_tiles`.

    ``with_residual=True`` also returns how far the model is from the data: the norm of
    ``acf - highpass_acf * N`` over the norm of ``acf``.  It stays under about 0.35 when the
    correlation fits in ``radius`` (every noise shape of the family benchmark) and reaches 0.7
    for stripes along whole rows or columns, whose correlation the model cannot hold; the
    recovered ``N`` is then meaningless (docs/benchmarks.md, "Noise family").
    """
    a = np.asarray(acf, dtype=np.float64)
    r = int(radius)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] % 2 == 0 or a.shape[0] < 2 * r + 1:
        raise ValueError(f"acf must be an odd square with at least radius {r} lags, got {a.shape}")
    k = a.shape[0] // 2
    span = k + r
    hh = highpass_acf(sigma, span)
    lags = np.arange(-r, r + 1)
    obs = np.arange(-k, k + 1)
    dy = obs[:, None, None, None] - lags[None, None, :, None] + span
    dx = obs[None, :, None, None] - lags[None, None, None, :] + span
    design = hh[dy, dx].reshape(a.size, lags.size**2)
    normal = design.T @ design
    normal[np.diag_indices_from(normal)] += float(ridge) * np.trace(normal) / len(normal)
    solution = np.linalg.solve(normal, design.T @ a.ravel())
    residual = float(np.linalg.norm(design @ solution - a.ravel()) / max(np.linalg.norm(a), 1e-30))
    out = solution.reshape(2 * r + 1, 2 * r + 1)
    out = 0.5 * (out + out[::-1, ::-1])  # an ACF is symmetric under 180 degree rotation
    if r >= 1:
        ring = np.maximum(np.abs(lags)[:, None], np.abs(lags)[None, :]) == r
        out = out - np.median(out[ring])
    c = out[r, r]
    out = out / c if c > 0 else np.zeros_like(out)
    return (out, residual) if with_residual else out
