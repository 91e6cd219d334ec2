"""Autocorrelation of noise patches and automatic structural-mask extraction (stage 2).

Stage 2 (structured N2V) hides a whole *structural kernel* around each predicted pixel.  The
kernel is read off the autocorrelation (ACF) of noise-carrying patches: spatially correlated noise
(e.g. white noise blurred along x) leaves a ridge through the ACF centre, white noise leaves only
the zero-lag peak.

Public names
------------
* :func:`autocorrelation` -- jitted, FFT-based mean *linear* ACF of mean-centred patches.
* :func:`highpass` -- image minus its Gaussian blur (``highpass_sigma``): the pipeline applies it
  to the images before cutting the patches, so the image's own smooth correlation is not taken
  for noise structure (white noise on a cell image would otherwise give a blob).
* :func:`default_extractor_config`, :func:`validate_extractor_config` -- extractor settings.
* :func:`extract_structural_mask` -- host-side mask extraction from a precomputed ACF
  (``method="ring"`` or ``method="significance"``).
* :func:`find_structural_mask` -- what the pipeline calls: computes the right ACF for the chosen
  method from ``(N, H, W)`` patches and extracts the mask.
* :func:`validate_mask`, :func:`load_mask_file`, :func:`save_mask` -- user-supplied mask files.
* :func:`mask_summary`, :func:`plot_mask_figure` -- logging and plotting.

Which ACF each method expects
-----------------------------
* ``ring``: designed for ``autocorrelation(patches, normalize=True, log=True)`` (the defaults); it
  only uses ratios to the centre and min-max normalisation, so a linear normalised ACF works too
  (the segments are then a little shorter because ``log1p`` compresses high values).
* ``significance``: needs a *linear* (``log=False``) ACF whose value per lag is a correlation
  coefficient, ideally ``autocorrelation(..., normalize=True, log=False, unbiased=True)``; the
  zero-lag value is divided out again, so an un-normalised linear ACF also works.  Passing
  ``is_log=True`` raises, because ``log1p(abs(.))`` has lost the sign of the correlation.

The mask is always an odd square bool array, centre True, symmetric under 180 degree rotation
(the ACF is), 8-connected when ``keep_center_component_only`` is set, and holds at most
``max_true_pixels`` True pixels.
"""

from __future__ import annotations

import functools
import heapq
import math
import numbers
import os
import pickle
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.fft
import scipy.ndimage

from .errors import ConfigError, UserInputError
from .files import atomic_write

__all__ = [
    "autocorrelation",
    "highpass",
    "default_extractor_config",
    "validate_extractor_config",
    "extract_structural_mask",
    "find_structural_mask",
    "validate_mask",
    "load_mask_file",
    "save_mask",
    "mask_summary",
    "plot_mask_figure",
    "METHODS",
    "BASELINES",
    "threshold_surface",
]

METHODS = ("ring", "significance")
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity structuring element


# --------------------------------------------------------------------------------------------
# Autocorrelation
# --------------------------------------------------------------------------------------------
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

    Removes the image's own, smooth correlation before the ACF is measured.  Without it the
    autocorrelation of a noisy image is dominated by the *signal* (cells, background gradients
    are correlated over many pixels), and white noise on a real image looks like a broad blob
    of "structure".  The difference to a Gaussian blur keeps what varies on scales well below
    ``sigma``: short-range noise correlations (lags up to about ``2 * sigma``) pass with little
    loss, smooth signal does not.  Side effects on the ACF, for ``sigma = 2``: white noise gets a
    small negative neighbour lobe (about -0.05 at lag 1) instead of 0, far below what either
    method keeps; a correlation along x gets a small negative lobe across it (about -0.1); the
    correlation at lags 3-4 is reduced by a few hundredths.  Signal sharper than ``sigma``
    (edges) partly survives, so ``sigma`` should not be much larger than the noise correlation
    length needs (default 2.0: a 5-pixel correlation is kept, an image blurred by 1.5 px is not).

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


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
_DEFAULTS: dict[str, Any] = {
    "method": "significance",  # measured best (docs/benchmarks.md, "Mask discovery")
    "center_size": 11,
    "adapt_autocorr": True,
    "adapt_CB": 50.0,
    "adapt_DF": 0.95,
    "center_ratio_threshold": 0.3,
    "base_percentile": 50.0,
    "percentile_decay": 1.15,
    "use_center_proximity": True,
    "center_proximity_threshold": 0.95,
    "keep_center_component_only": True,
    "max_true_pixels": 25,
    "z_threshold": 4.0,
    "min_correlation": 0.05,
    "num_pixels": 0,  # 0: derive from the data (find_structural_mask) or pass num_pixels=...
    # Preprocessing of the images before the patches are drawn (pipeline; see highpass()):
    "highpass_sigma": 1.0,  # subtract a Gaussian blur of this sigma (pixels); 0 = off
    # Which patches the pipeline measures (not used by the extraction itself):
    "num_patches": 1000,  # patches whose autocorrelation is averaged
    "patch_size": 64,  # their side (capped by the image size)
    "use_background": True,  # draw them from background regions (ROI, select_background)
}

_BOOL_KEYS = ("adapt_autocorr", "use_center_proximity", "keep_center_component_only", "use_background")
# key -> (lo, hi, lo_inclusive, hi_inclusive)
_REAL_RANGES = {
    "adapt_CB": (0.0, 100.0, True, True),
    "adapt_DF": (0.0, 1.0, False, True),
    "center_ratio_threshold": (0.0, 1.0, True, True),
    "base_percentile": (0.0, 100.0, True, True),
    "percentile_decay": (0.0, math.inf, False, False),
    "center_proximity_threshold": (0.0, 1.0, False, True),
    "z_threshold": (0.0, math.inf, True, False),
    "min_correlation": (0.0, 1.0, True, False),
    "highpass_sigma": (0.0, math.inf, True, False),
}


def default_extractor_config() -> ml_collections.ConfigDict:
    """The extractor settings with their defaults (see the module and README for meanings)."""
    return ml_collections.ConfigDict(dict(_DEFAULTS))


def _as_plain_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, ml_collections.ConfigDict):
        return cfg.to_dict()
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"extractor config must be a ConfigDict or mapping, got {type(cfg).__name__}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def validate_extractor_config(
    cfg: Any, prefix: str = "stage2.extractor"
) -> ml_collections.ConfigDict:
    """Check an extractor config; return it merged over the defaults as a ``ConfigDict``.

    Raises :class:`ConfigError` naming ``f"{prefix}.{key}"`` for unknown keys, wrong types and
    out-of-range values (``center_size`` must be an odd int >= 1, ``method`` one of
    ``"ring"``/``"significance"``, percentiles in [0, 100], ...).
    """
    given = _as_plain_dict(cfg)
    for key in given:
        if key not in _DEFAULTS:
            raise ConfigError(f"{prefix}.{key}", f"unknown key (known: {', '.join(_DEFAULTS)})")
    merged = {**_DEFAULTS, **given}

    def err(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{prefix}.{key}", f"{msg}, got {merged[key]!r}")

    if not isinstance(merged["method"], str) or merged["method"] not in METHODS:
        raise err("method", f"must be one of {list(METHODS)}")
    cs = merged["center_size"]
    if not _is_int(cs) or cs < 1:
        raise err("center_size", "must be an int >= 1")
    if cs % 2 == 0:
        raise err("center_size", "must be odd (the kernel needs a centre pixel)")
    for key in _BOOL_KEYS:
        if not isinstance(merged[key], (bool, np.bool_)):
            raise err(key, "must be true or false")
    for key, (lo, hi, lo_inc, hi_inc) in _REAL_RANGES.items():
        v = merged[key]
        if not _is_real(v) or not math.isfinite(float(v)):
            raise err(key, "must be a finite number")
        v = float(v)
        ok_lo = v >= lo if lo_inc else v > lo
        ok_hi = v <= hi if hi_inc else v < hi
        if not (ok_lo and ok_hi):
            rng = f"{'[' if lo_inc else '('}{lo:g}, {hi:g}{']' if hi_inc else ')'}"
            raise err(key, f"must be in {rng}")
        merged[key] = v
    mt = merged["max_true_pixels"]
    if not _is_int(mt) or mt < 1:
        raise err("max_true_pixels", "must be an int >= 1")
    npx = merged["num_pixels"]
    if not _is_int(npx) or npx < 0:
        raise err("num_pixels", "must be an int >= 0 (0: derive from the data)")
    merged["center_size"] = int(cs)
    for key in ("num_patches", "patch_size"):
        if not _is_int(merged[key]) or merged[key] < 1:
            raise err(key, "must be an int >= 1")
    merged["max_true_pixels"] = int(mt)
    merged["num_pixels"] = int(npx)
    for key in _BOOL_KEYS:
        merged[key] = bool(merged[key])
    return ml_collections.ConfigDict(merged)


# --------------------------------------------------------------------------------------------
# Mask extraction helpers
# --------------------------------------------------------------------------------------------
def _crop_center(acf: np.ndarray, size: int) -> np.ndarray:
    """``size x size`` crop around the centre of an odd-shaped ACF (zero padded if smaller)."""
    h = size // 2
    cy, cx = acf.shape[0] // 2, acf.shape[1] // 2
    out = np.zeros((size, size), dtype=np.float64)
    y0, y1 = max(cy - h, 0), min(cy + h + 1, acf.shape[0])
    x0, x1 = max(cx - h, 0), min(cx + h + 1, acf.shape[1])
    out[y0 - (cy - h) : y1 - (cy - h), x0 - (cx - h) : x1 - (cx - h)] = acf[y0:y1, x0:x1]
    return out


def _chebyshev(size: int) -> np.ndarray:
    h = size // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    return np.maximum(np.abs(yy), np.abs(xx))


def _euclid(size: int) -> np.ndarray:
    h = size // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    return np.sqrt(yy.astype(np.float64) ** 2 + xx**2)


def _symmetrise(mask: np.ndarray) -> np.ndarray:
    return mask | mask[::-1, ::-1]


def _center_component(mask: np.ndarray) -> np.ndarray:
    c = mask.shape[0] // 2
    labels, _ = scipy.ndimage.label(mask, structure=_EIGHT)
    return labels == labels[c, c]


def _cap(mask: np.ndarray, values: np.ndarray, cap: int, connected: bool) -> np.ndarray:
    """At most ``cap`` True pixels, the centre always, symmetric under 180 degree rotation.

    ``connected``: grow from the centre over ``mask`` in order of decreasing ``values`` (8-adjacent
    frontier, a pixel and its mirror added together), so the result stays connected and symmetric.
    Otherwise keep the centre plus the highest-valued symmetric pairs.  Pairs that no longer fit
    are skipped, so the count may end one below an even cap.
    """
    size = mask.shape[0]
    c = size // 2
    if int(mask.sum()) <= cap:
        return mask
    v = 0.5 * (values + values[::-1, ::-1])  # symmetric priority: mirror pairs tie exactly
    out = np.zeros_like(mask)
    out[c, c] = True
    count = 1
    if not connected:
        ys, xs = np.nonzero(mask)
        order = sorted(zip(ys, xs), key=lambda p: (-v[p], p))
        for y, x in order:
            if count + 2 > cap:
                break
            if out[y, x]:
                continue
            out[y, x] = out[2 * c - y, 2 * c - x] = True
            count += 2
        return out
    heap: list[tuple[float, int, int]] = []
    queued = np.zeros_like(mask)
    queued[c, c] = True

    def push_neighbours(y: int, x: int) -> None:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y + dy, x + dx
                if 0 <= yy < size and 0 <= xx < size and mask[yy, xx] and not queued[yy, xx]:
                    queued[yy, xx] = True
                    heapq.heappush(heap, (-float(v[yy, xx]), yy, xx))

    push_neighbours(c, c)
    while heap and count + 2 <= cap:
        _, y, x = heapq.heappop(heap)
        if out[y, x]:
            continue
        my, mx = 2 * c - y, 2 * c - x
        out[y, x] = out[my, mx] = True
        count += 2
        push_neighbours(y, x)
        push_neighbours(my, mx)
    return out


def _finish(mask: np.ndarray, values: np.ndarray, cfg: ml_collections.ConfigDict) -> np.ndarray:
    c = mask.shape[0] // 2
    mask = _symmetrise(mask)
    mask[c, c] = True
    if cfg.keep_center_component_only:
        mask = _center_component(mask)
    return _cap(mask, values, cfg.max_true_pixels, cfg.keep_center_component_only)


def threshold_surface(size: int, cb: float, df: float) -> np.ndarray:
    """The radially adaptive threshold ``T(d) = CB/100 * DF**d``, ``d`` the Euclidean lag length.

    It is compared with the min-max normalised ACF crop (centre ~1): a lag survives the
    adaptive test only if its normalised value exceeds ``T(d)``.  With the defaults (CB=50,
    DF=0.95) a neighbour must reach 0.475 of the crop's range, a lag 5 away 0.39: further lags need
    less, since a real correlation decays with distance while the bar for the nearest lags stays
    high enough that a noise floor can't pass.
    """
    return (cb / 100.0) * np.power(df, _euclid(size))


def _ring_method(crop: np.ndarray, cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, dict]:
    size = crop.shape[0]
    c = size // 2
    center = float(crop[c, c])
    cheb = _chebyshev(size)
    info: dict[str, Any] = {"rings": []}
    if not center > 0:
        info["note"] = "centre value <= 0: no structure can be read, centre pixel only"
        mask = np.zeros((size, size), bool)
        mask[c, c] = True
        info["ratio"] = np.zeros_like(crop)
        return mask, info
    # Ratio to the centre (the "normalised" ACF): used for the ring-consideration test and the
    # centre-proximity test, so a flat (white-noise) crop is never stretched into structure.
    ratio = crop / center
    lo, hi = float(crop.min()), float(crop.max())
    norm = (crop - lo) / (hi - lo) if hi > lo else np.zeros_like(crop)
    if cfg.adapt_autocorr:
        surface = threshold_surface(size, cfg.adapt_CB, cfg.adapt_DF)
        adapted = norm - surface
    else:
        surface = np.zeros_like(crop)
        adapted = norm
    mask = np.zeros((size, size), bool)
    mask[c, c] = True
    for r in range(1, c + 1):
        ring = cheb == r
        max_ratio = float(ratio[ring].max())
        considered = max_ratio >= cfg.center_ratio_threshold
        p = min(100.0, cfg.base_percentile * cfg.percentile_decay ** (r - 1))
        vals = adapted[ring]
        rmin, rmax = float(vals.min()), float(vals.max())
        thr = rmin + (rmax - rmin) * p / 100.0
        keep = np.zeros_like(mask)
        if considered:
            keep = ring & (adapted >= thr)
            if cfg.adapt_autocorr:
                keep &= adapted > 0  # must also clear the threshold surface
            mask |= keep
        info["rings"].append(
            {
                "ring": r,
                "max_ratio": max_ratio,
                "considered": bool(considered),
                "percentile": float(p),
                "threshold": float(thr),
                "kept": [[int(y) - c, int(x) - c] for y, x in zip(*np.nonzero(keep))],
            }
        )
    if cfg.use_center_proximity:
        prox = ratio > cfg.center_proximity_threshold
        prox[c, c] = False
        info["proximity_kept"] = [[int(y) - c, int(x) - c] for y, x in zip(*np.nonzero(prox))]
        mask |= prox
    info["ratio"] = ratio
    info["normalized"] = norm
    info["threshold_surface"] = surface
    info["adapted"] = adapted
    info["candidates"] = mask.copy()
    return _finish(mask, crop, cfg), info


BASELINES = ("outer_ring", "none")


def _significance_method(
    crop: np.ndarray, cfg: ml_collections.ConfigDict, num_pixels: int, baseline: str
) -> tuple[np.ndarray, dict]:
    size = crop.shape[0]
    c = size // 2
    center = float(crop[c, c])
    info: dict[str, Any] = {"num_pixels": int(num_pixels)}
    if not num_pixels or num_pixels < 1:
        raise ValueError(
            "significance method needs num_pixels >= 1 (config num_pixels or the num_pixels "
            "argument): the number of independent pixels behind the ACF"
        )
    rho = crop / center if center > 0 else np.zeros_like(crop)
    base = 0.0
    if baseline == "outer_ring" and size >= 3:
        base = float(np.median(rho[_chebyshev(size) == size // 2]))
    excess = rho - base
    z = excess * math.sqrt(num_pixels)
    cand = (z >= cfg.z_threshold) & (excess >= cfg.min_correlation)
    info["baseline"] = base
    info["excess"] = excess
    cand[c, c] = True
    info["rho"] = rho
    info["z"] = z
    info["candidates"] = cand.copy()
    info["standard_error"] = 1.0 / math.sqrt(num_pixels)
    return _finish(cand, excess, cfg), info


def extract_structural_mask(
    autocorr: Any,
    config: Any = None,
    *,
    num_pixels: int | None = None,
    is_log: bool | None = None,
    baseline: str = "outer_ring",
) -> tuple[np.ndarray, dict]:
    """Structural kernel from a centred ACF (host side, numpy/scipy).

    Args:
      autocorr: 2-D ACF with odd sides and zero lag in the middle (as from
        :func:`autocorrelation`).  Ring method: preferably the normalised log ACF; significance
        method: a linear ACF (normalised or not; it is divided by its centre value).
      config: extractor config (``ConfigDict`` or mapping; missing keys take the defaults).
      num_pixels: significance method only; overrides ``config.num_pixels``.  The number of
        independent pixel pairs behind each lag (see below).
      is_log: say whether ``autocorr`` went through ``log1p(abs(.))``; ``True`` with the
        significance method raises ``ValueError`` (signs are lost).  ``None``: trust the caller.
      baseline: significance method only.  ``"outer_ring"`` (default): subtract the median
        ``rho`` of the crop's outermost ring (Chebyshev distance ``center_size // 2``) before
        testing, so a smooth correlated *signal* (whose ACF is a broad, slowly varying pedestal)
        is not taken for noise structure; noise correlations that reach that ring are then
        under-estimated by the pedestal.  ``"none"``: test ``rho`` itself.

    Ring method (``method="ring"``):
      1. crop ``center_size x center_size`` around the centre; ``ratio = crop / centre``;
      2. ``norm`` = min-max normalised crop; with ``adapt_autocorr`` the *adapted* values are
         ``norm - T(d)``, ``T(d) = adapt_CB/100 * adapt_DF**d`` (:func:`threshold_surface`,
         ``d`` the Euclidean lag length) and a pixel must have adapted value > 0;
      3. ring ``r`` (Chebyshev distance ``r``) is considered only if ``max(ratio on ring) >=
         center_ratio_threshold`` -- computed on the ratio, not the stretched values, so the flat
         ACF of white noise rejects every ring;
      4. in a considered ring keep pixels with adapted value ``>= min + range * p / 100`` (min and
         range of that ring's adapted values), ``p = base_percentile * percentile_decay**(r-1)``
         (clipped at 100);
      5. ``use_center_proximity``: also keep any pixel with ``ratio > center_proximity_threshold``.

    Significance method (``method="significance"``): ``rho = crop / centre`` is the correlation
    coefficient per lag, minus the ``baseline`` pedestal (see ``baseline``).  Under independent
    noise its standard error is ``~ 1/sqrt(n)`` (Bartlett), with ``n`` the number of pixel pairs
    at that lag (for the unbiased ACF of ``N`` non-overlapping ``H x W`` patches,
    ``N (H-|dy|)(W-|dx|)``).  One ``n = num_pixels`` is used for all lags:
    :func:`find_structural_mask` passes the smallest pair count in the crop, which is
    conservative.  Keep lags with ``z = rho * sqrt(n) >= z_threshold`` and ``rho >=
    min_correlation`` (both on the baseline-corrected value).  ``min_correlation`` is the real
    guard when patches overlap (then the pixels are not independent and ``n`` overstates the
    information) or when the signal itself is correlated.

    Both methods then symmetrise under 180 degree rotation (OR), set the centre, keep the
    8-connected component holding the centre (``keep_center_component_only``) and cap the count
    at ``max_true_pixels``: grown from the centre in order of decreasing ACF value, a pixel and
    its mirror together (so the capped mask stays connected and symmetric).

    Returns:
      ``(mask, info)``: ``mask`` a ``center_size x center_size`` bool numpy array, centre True;
      ``info`` a dict with ``method``, ``acf_crop`` and the per-method details (``rings`` with
      each ring's ``max_ratio``, ``considered``, ``percentile``, ``threshold``, ``kept`` offsets;
      or ``rho``, ``z``, ``num_pixels``), numpy arrays and python scalars.
    """
    cfg = validate_extractor_config(config)
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {list(BASELINES)}, got {baseline!r}")
    acf = np.asarray(autocorr, dtype=np.float64)
    if acf.ndim != 2 or acf.shape[0] % 2 == 0 or acf.shape[1] % 2 == 0:
        raise ValueError(
            f"autocorr must be 2-D with odd sides (zero lag in the middle), got {acf.shape}"
        )
    if not np.all(np.isfinite(acf)):
        raise ValueError("autocorr holds NaN or Inf values")
    crop = _crop_center(acf, cfg.center_size)
    if cfg.method == "ring":
        mask, info = _ring_method(crop, cfg)
    else:
        if is_log:
            raise ValueError(
                "the significance method needs a linear ACF (autocorrelation(..., log=False)): "
                "log1p(abs(.)) loses the sign of the correlation"
            )
        n = cfg.num_pixels if num_pixels is None else int(num_pixels)
        mask, info = _significance_method(crop, cfg, n, baseline)
    info["method"] = cfg.method
    info["acf_crop"] = crop
    info["center_size"] = cfg.center_size
    info["num_true"] = int(mask.sum())
    info["summary"] = mask_summary(mask)
    return mask, info


def find_structural_mask(
    patches: Any,
    config: Any = None,
    *,
    num_pixels: int | None = None,
    baseline: str = "outer_ring",
) -> tuple[np.ndarray, dict]:
    """Compute the ACF the chosen method wants from ``(N, H, W)`` patches and extract the mask.

    ``patches``: normalised, *un-augmented* noise-carrying patches (flips/rotations would mix x
    and y structure).  Ring method: ``autocorrelation(normalize=True, log=True)``.  Significance
    method: ``autocorrelation(normalize=True, log=False, unbiased=True)`` (a correlation
    coefficient per lag) with ``n = num_pixels`` (argument, else ``config.num_pixels`` if > 0,
    else ``N * (H - h) * (W - h)``, ``h = center_size // 2``: the smallest pair count in the
    crop, which assumes the patches don't overlap -- pass a smaller ``num_pixels`` when they do)
    and ``baseline`` (see :func:`extract_structural_mask`).
    """
    cfg = validate_extractor_config(config)
    x = jnp.asarray(patches, dtype=jnp.float32)  # stays on the device if it already is
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"patches must be (N, H, W) or (H, W), got shape {x.shape}")
    if cfg.method == "ring":
        acf = np.asarray(autocorrelation(x, normalize=True, log=True))
        return extract_structural_mask(acf, cfg, is_log=True)
    n, h, w = x.shape
    if num_pixels is None:
        if cfg.num_pixels > 0:
            num_pixels = cfg.num_pixels
        else:
            half = cfg.center_size // 2
            num_pixels = n * max(h - half, 1) * max(w - half, 1)
    acf = np.asarray(autocorrelation(x, normalize=True, log=False, unbiased=True))
    return extract_structural_mask(
        acf, cfg, num_pixels=int(num_pixels), is_log=False, baseline=baseline
    )


# --------------------------------------------------------------------------------------------
# Mask files
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def mask_summary(mask: Any) -> str:
    """Short human description of a structural mask."""
    m = np.asarray(mask, dtype=bool)
    n = int(m.sum())
    cy, cx = m.shape[0] // 2, m.shape[1] // 2
    if n == 0:
        return "empty mask"
    if n == 1 and m[cy, cx]:
        return "centre pixel only (no structure found: stage 2 = plain N2V)"
    ys, xs = np.nonzero(m)
    contiguous = _center_component(m).sum() == n if m[cy, cx] else False
    if contiguous and np.all(ys == cy):
        return f"horizontal line of {n} pixels"
    if contiguous and np.all(xs == cx):
        return f"vertical line of {n} pixels"
    if contiguous and m.shape[0] == m.shape[1]:
        if np.all(ys - cy == xs - cx):
            return f"diagonal line (top-left to bottom-right) of {n} pixels"
        if np.all(ys - cy == cx - xs):
            return f"diagonal line (top-right to bottom-left) of {n} pixels"
    eh, ew = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
    return f"{n} pixels, extent {eh}x{ew}"


def plot_mask_figure(info: Mapping, mask: Any, tiled_mask: Any, path: str | os.PathLike) -> None:
    """PNG with three panels: cropped ACF, the mask, one tiled full mask.  Atomic write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    p = os.fspath(path)
    m = np.asarray(mask, dtype=bool)
    fig = Figure(figsize=(12, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    crop = np.asarray(info.get("acf_crop", np.zeros(m.shape)), dtype=float)
    h = crop.shape[0] // 2
    ext = (-h - 0.5, h + 0.5, h + 0.5, -h - 0.5)
    im = axes[0].imshow(crop, cmap="magma", extent=ext, interpolation="nearest")
    fig.colorbar(im, ax=axes[0], fraction=0.046, pad=0.04)
    axes[0].set_title(f"autocorrelation ({info.get('method', '?')})")
    axes[0].set_xlabel("dx")
    axes[0].set_ylabel("dy")
    hm = m.shape[0] // 2
    axes[1].imshow(m, cmap="gray", vmin=0, vmax=1, interpolation="nearest",
                   extent=(-hm - 0.5, hm + 0.5, hm + 0.5, -hm - 0.5))
    axes[1].set_title(f"mask: {mask_summary(m)}", fontsize=9)
    axes[2].imshow(np.asarray(tiled_mask, dtype=bool), cmap="gray", vmin=0, vmax=1,
                   interpolation="nearest")
    axes[2].set_title("tiled mask (one patch)")
    fig.tight_layout()
    atomic_write(p, lambda f: fig.savefig(f, format="png"), ".png")
