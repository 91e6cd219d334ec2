"""Structural-mask extraction (stage 2): methods, crop growth, and the patches they measure.

Stage 2 (structured N2V) hides a whole *structural kernel* around each predicted pixel.  The
kernel is read off the autocorrelation (ACF) of noise-carrying patches: spatially correlated noise
leaves structure around the ACF centre, white noise leaves only the zero-lag peak.

* :func:`extract_structural_mask` -- from a precomputed ACF (``method`` ``"deconvolved"``,
  ``"significance"`` or ``"ring"``).
* :func:`find_structural_mask` -- computes the ACF(s) the method wants from patches, grows the
  crop while the mask reaches its edge, and extracts the mask.
* :func:`mask_from_planes` -- what the pipeline, the API and the CLI call: draws the patches
  (:func:`structure_patches`), counts the distinct pixels behind them
  (:func:`structure_pixel_count`) and calls :func:`find_structural_mask`.

Which ACF each method expects: ``ring`` the normalised log ACF
(``autocorrelation(normalize=True, log=True)``; it only uses ratios to the centre, so a linear
one works too); ``significance`` and ``deconvolved`` a *linear* ACF whose value per lag is a
correlation coefficient (``normalize=True, log=False, unbiased=True``); ``is_log=True`` raises for
them (``log1p(abs(.))`` has lost the sign).  Finishing (symmetry, connectivity, cap) is in
:mod:`maskshape`; the defaults and their validation in :mod:`config`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.ndimage

from . import sampling
from .autocorr import autocorrelation, deconvolve_highpass, flattest_tiles, highpass, highpassed_correlation
from .extractor_config import EXTRACTOR_METHODS, validate_extractor_config
from .maskshape import chebyshev, crop_center, euclid, finish, mask_summary, touches_edge

__all__ = [
    "METHODS",
    "BASELINES",
    "threshold_surface",
    "smooth_pedestal",
    "extract_structural_mask",
    "find_structural_mask",
    "structure_bank",
    "structure_patches",
    "structure_pixel_count",
    "fit_to_patch",
    "mask_from_planes",
    "mask_summary",
]

METHODS = EXTRACTOR_METHODS
_DECONV_RADIUS = 8
_FLAT_SPREAD = 2.0  # keep tiles up to 2x the flat quantile: pure noise is then barely biased
_FLAT_SMOOTH = 4.0  # rank tiles by their coarse detail (what the inversion amplifies); 2.0 leaked
# photo content into the recovered ACF as a pedestal of 0.1-0.2 (docs/benchmarks.md)
_PEDESTAL_SIGMA = 2.0  # the smooth pedestal: a Gaussian of this sigma (lags) over the other lags
_PEDESTAL_ROUNDS = 4
# The recovery's model (a correlation within radius 8) fails when the fit leaves more than this
# share of the measured ACF unexplained: stripes along whole rows or columns gave 0.70-0.73, every
# other shape of the noise family at most 0.32 (docs/benchmarks.md, "Noise family").
_MAX_FIT_RESIDUAL = 0.5
# A *line* detection: significance candidates at most this thick (std across their main axis, in
# lags) and on average this far above the baseline.  Lines survive the high-pass at full strength
# (0.19-0.31 on the family's lines); 2-D kernels whose high-passed ACF happens to leave a thin
# detection (box, Gaussian sigma 2, L) stay at 0.05-0.10, and a 30-degree ellipse is thicker.
_LINE_MAX_THICKNESS = 0.3
_LINE_MIN_EXCESS = 0.15
# A line's recovered extent: only the line's 8-neighbours, and only when they explain the measured
# (high-passed) ACF clearly better than the line alone: misfit over the central _FIT_CROP lags at
# most _EXTENT_MIN_GAIN times the line's.  Where the extent is real (30-degree lines, a Gaussian of
# sigma 0.6 x 2, on cells and photos) the ratio was 0.25-0.71; where the recovery grew dense
# texture into a blob around the line, 0.89-2.7 (docs/benchmarks.md, "Noise family").
_FIT_CROP = 21
_EXTENT_MIN_GAIN = 0.8


def threshold_surface(size: int, cb: float, df: float) -> np.ndarray:
    """The radially adaptive threshold ``T(d) = CB/100 * DF**d``, ``d`` the Euclidean lag length.

    It is compared with the min-max normalised ACF crop (centre ~1): a lag survives the
    adaptive test only if its normalised value exceeds ``T(d)``.  With the defaults (CB=50,
    DF=0.95) a neighbour must reach 0.475 of the crop's range, a lag 5 away 0.39: further lags need
    less, since a real correlation decays with distance while the bar for the nearest lags stays
    high enough that a noise floor can't pass.
    """
    return (cb / 100.0) * np.power(df, euclid(size))


def _ring_method(crop: np.ndarray, cfg: Any) -> tuple[np.ndarray, dict]:
    size = crop.shape[0]
    c = size // 2
    center = float(crop[c, c])
    cheb = chebyshev(size)
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
    return finish(mask, crop, cfg), info


BASELINES = ("outer_ring", "none")


def _significance_method(
    crop: np.ndarray, cfg: Any, num_pixels: int, baseline: str
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
        base = float(np.median(rho[chebyshev(size) == size // 2]))
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
    return finish(cand, excess, cfg), info


def smooth_pedestal(acf: np.ndarray, exclude: np.ndarray, sigma: float = _PEDESTAL_SIGMA) -> np.ndarray:
    """The broad, smooth part of an ACF: a normalised Gaussian average (``sigma`` lags) of the lags
    not in ``exclude``, clipped at 0.  Image content left in the flattest tiles enters the recovered
    ACF as such a pedestal (a slow rise towards the centre); a noise correlation stands out of it."""
    keep = (~np.asarray(exclude, bool)).astype(np.float64)
    num = scipy.ndimage.gaussian_filter(acf * keep, sigma, mode="constant")
    den = scipy.ndimage.gaussian_filter(keep, sigma, mode="constant")
    return np.maximum(np.where(den > 1e-3, num / np.maximum(den, 1e-3), 0.0), 0.0)


def _excess(noise: np.ndarray, core: np.ndarray, threshold: float) -> np.ndarray:
    """``noise`` minus its smooth pedestal, the pedestal re-estimated without the lags that stand out
    (``core`` plus those with excess ``>= threshold``) for a few rounds."""
    standing = core.copy()
    for _ in range(_PEDESTAL_ROUNDS):
        excess = noise - smooth_pedestal(noise, standing)
        standing = core | (excess >= threshold)
    return excess


def _is_line_detection(detected: np.ndarray, excess: np.ndarray) -> bool:
    """Whether the significance candidates are a strong, thin line through the centre."""
    ys, xs = np.nonzero(detected)
    if len(ys) < 3:
        return False
    smallest = float(np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(float)))[0])
    thickness = math.sqrt(max(smallest, 0.0))  # std across the main axis, in lags
    c = detected.shape[0] // 2
    off = detected.copy()
    off[c, c] = False
    return thickness <= _LINE_MAX_THICKNESS and float(np.mean(excess[off])) >= _LINE_MIN_EXCESS


def _extent_misfit_ratio(noise: np.ndarray, line: np.ndarray, extended: np.ndarray,
                         measured: np.ndarray, sigma: float) -> float:
    """Misfit of the measured high-passed ACF by ``extended`` over that by ``line`` (both lag sets
    in ``noise``'s crop), over the central lags without the centre."""
    size = measured.shape[0]
    off = np.ones((size, size), bool)
    off[size // 2, size // 2] = False
    miss = [np.linalg.norm((highpassed_correlation(np.where(s, noise, 0.0), sigma, size) - measured)[off])
            for s in (extended, line)]
    return float(miss[0] / max(miss[1], 1e-12))


def _deconvolved_method(detected: np.ndarray, info: dict, noise_acf: Any, cfg: Any,
                        fit_residual: float | None, measured: np.ndarray | None = None
                        ) -> tuple[np.ndarray, dict]:
    """Extent from the recovered noise ACF, when any of the three detectors finds structure."""
    if noise_acf is None:
        raise ValueError("the deconvolved method needs noise_acf (find_structural_mask computes it)")
    noise = crop_center(np.asarray(noise_acf, dtype=np.float64), cfg.center_size)
    c = noise.shape[0] // 2
    info["noise_acf"] = noise
    info["detected"] = detected
    core = info["candidates"] | (noise >= cfg.deconv_detect_threshold)
    core[c, c] = True
    excess = _excess(noise, core, cfg.deconv_excess_threshold)
    info["pedestal_excess"] = excess
    off = np.ones_like(core)
    off[c, c] = False
    info["detected_by"] = ("significance" if int(detected.sum()) > 1 else
                           "recovered" if noise[off].max(initial=-np.inf) >= cfg.deconv_detect_threshold else
                           "excess" if excess[off].max(initial=-np.inf) >= cfg.deconv_excess_threshold else "none")
    if info["detected_by"] == "none":
        info["note"] = "no test found structure: centre pixel only"
        return detected, info
    kept = noise >= cfg.deconv_threshold
    # The recovery assumes a correlation shorter than its radius.  A longer one (the significance
    # test reaches beyond it: long lines, stripes) is smeared into a pedestal; keep only what
    # stands out of it.  The same for a line found by the significance test: image content left
    # in the flattest tiles adds a pedestal of 0.1-0.13 around it (cells, photos), while the line
    # itself stands 0.2-0.9 above it.
    info["long"] = bool((info["candidates"] & (chebyshev(noise.shape[0]) > _DECONV_RADIUS)).any())
    info["line"] = _is_line_detection(detected, info["excess"])
    if info["long"] or info["line"]:
        kept &= excess >= cfg.deconv_excess_threshold
    # A line the model cannot hold (stripes along whole rows: fit residual 0.7) is recovered as a
    # broad plateau; the significance candidates alone give the extent.  For long or line
    # detections only, where it was measured (for every detection the family's totals were the
    # same).  On dense texture it also fires and trades 2-D extent for fewer false lags
    # (docs/benchmarks.md, "Noise family").
    info["fit_residual"] = fit_residual
    if (info["long"] or info["line"]) and fit_residual is not None and fit_residual > _MAX_FIT_RESIDUAL:
        kept[:] = False
        info["note"] = (f"the recovered correlation does not fit (residual {fit_residual:.2f}): "
                        "extent from the significance test alone")
    # A line's recovered extent is checked against the high-passed ACF it was recovered from: on
    # dense texture the recovery (which amplifies coarse content) grows the line into a blob.
    if info["line"] and measured is not None and (kept & ~info["candidates"]).any():
        line = info["candidates"] | info["candidates"][::-1, ::-1]
        kept &= scipy.ndimage.binary_dilation(line, np.ones((3, 3), bool))
        ratio = _extent_misfit_ratio(noise, line, line | kept, measured, cfg.highpass_sigma)
        info["extent_misfit_ratio"] = ratio
        if ratio > _EXTENT_MIN_GAIN:
            kept[:] = False
            info["note"] = (f"the recovered extent does not fit the measured correlation better than "
                            f"the line alone (misfit ratio {ratio:.2f}): the line alone")
    cand = info["candidates"] | kept
    info["candidates"] = cand
    return finish(cand.copy(), noise, cfg), info


def extract_structural_mask(
    autocorr: Any,
    config: Any = None,
    *,
    num_pixels: int | None = None,
    is_log: bool | None = None,
    baseline: str = "outer_ring",
    noise_acf: Any = None,
    noise_fit_residual: float | None = None,
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
      noise_acf: deconvolved method only: the noise correlation recovered before the high-pass
        (:func:`autocorr.deconvolve_highpass`, normalised, zero lag in the middle).
      noise_fit_residual: deconvolved method only: the recovery's relative fit residual
        (``deconvolve_highpass(..., with_residual=True)``); above 0.5 the recovered ACF is not
        used for the extent of a line (stripes).  ``None``: not checked.

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

    Deconvolved method (``method="deconvolved"``, the default): structure is *detected* when the
    significance method above finds any lag, a recovered correlation (``noise_acf``) reaches
    ``deconv_detect_threshold``, or one stands ``deconv_excess_threshold`` above the recovered ACF's
    smooth pedestal (:func:`smooth_pedestal`: what image content leaks into it); otherwise the mask
    is the centre alone.  Otherwise the *extent* is read from ``noise_acf``: every lag whose
    recovered correlation is ``>= deconv_threshold`` is added to the detector's candidates (when
    the candidates reach beyond the recovery radius, 8, or form a strong thin line, only those
    that also stand out of the pedestal; for a line, none when the recovery does not fit the
    measured ACF, ``noise_fit_residual > 0.5``: stripes; for a line, only the line's 8-neighbours,
    and only when they fit the measured high-passed ACF clearly better than the line alone, which
    dense texture does not).  The high-pass keeps the direction of a correlation but shrinks a
    two-dimensional one; the recovered ACF restores its size.

    All methods then symmetrise under 180 degree rotation (OR), set the centre, keep the
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
    crop = crop_center(acf, cfg.center_size)
    if cfg.method == "ring":
        mask, info = _ring_method(crop, cfg)
    else:
        if is_log:
            raise ValueError(
                f"the {cfg.method} method needs a linear ACF (autocorrelation(..., log=False)): "
                "log1p(abs(.)) loses the sign of the correlation"
            )
        n = cfg.num_pixels if num_pixels is None else int(num_pixels)
        mask, info = _significance_method(crop, cfg, n, baseline)
        if cfg.method == "deconvolved":
            mid = float(acf[acf.shape[0] // 2, acf.shape[1] // 2])
            measured = crop_center(acf / mid, min(_FIT_CROP, acf.shape[0], acf.shape[1])) if mid > 0 else None
            mask, info = _deconvolved_method(mask, info, noise_acf, cfg, noise_fit_residual, measured)
    info["method"] = cfg.method
    info["acf_crop"] = crop
    info["center_size"] = cfg.center_size
    info["num_true"] = int(mask.sum())
    info["summary"] = mask_summary(mask)
    return mask, info


def _odd_at_most(n: int) -> int:
    return max(1, n if n % 2 else n - 1)


def find_structural_mask(
    patches: Any,
    config: Any = None,
    *,
    num_pixels: int | None = None,
    baseline: str = "outer_ring",
) -> tuple[np.ndarray, dict]:
    """Compute the ACF(s) the chosen method wants from ``(N, H, W)`` patches and extract the mask.

    ``patches``: normalised, *un-augmented*, high-passed noise-carrying patches (flips/rotations
    would mix x and y structure).  Ring method: ``autocorrelation(normalize=True, log=True)``.
    Significance and deconvolved methods: ``autocorrelation(normalize=True, log=False,
    unbiased=True)`` with ``n = num_pixels`` (argument, else ``config.num_pixels`` if > 0, else
    ``N * (H - h) * (W - h)``, ``h = center_size // 2``: the smallest pair count in the crop,
    which assumes non-overlapping patches).  Deconvolved: also the linear ACF of the
    ``flat_fraction`` flattest 32-pixel tiles, inverted for the high-pass of sigma
    ``highpass_sigma`` (:func:`autocorr.deconvolve_highpass`).

    Crop growth: while the mask reaches the edge of its ``center_size`` crop, the crop grows by 4
    up to ``max_center_size`` (and at most the patch side).  A mask still at the edge of the
    largest crop is kept, with ``info["truncated"] = True`` and a note in ``info["summary"]``.
    """
    cfg = validate_extractor_config(config)
    x = jnp.asarray(patches, dtype=jnp.float32)  # stays on the device if it already is
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"patches must be (N, H, W) or (H, W), got shape {x.shape}")
    n, h, w = x.shape
    if cfg.method == "ring":
        acf = np.asarray(autocorrelation(x, normalize=True, log=True))
    else:
        acf = np.asarray(autocorrelation(x, normalize=True, log=False, unbiased=True))
    tile_acf, tile, noise_acf, residual = None, min(32, h, w), None, None
    if cfg.method == "deconvolved":
        tiles = flattest_tiles(np.asarray(x), tile, cfg.flat_fraction, _FLAT_SMOOTH, _FLAT_SPREAD)
        tile_acf = np.asarray(autocorrelation(tiles, normalize=False, log=False, unbiased=True))
        # Solved on radius 8 (zero beyond it): wide enough that a short correlation has decayed
        # at the outermost ring, small enough to stay well conditioned on 32-pixel tiles.
        # Longer correlations are line-like, and lines survive the high-pass: the significance
        # candidates carry them beyond radius 8.
        r = min(_DECONV_RADIUS, tile // 2)
        k = max(r, min(r + 2 * math.ceil(4 * cfg.highpass_sigma), tile - 8))
        noise_acf, residual = deconvolve_highpass(crop_center(tile_acf, 2 * k + 1), cfg.highpass_sigma,
                                                  r, with_residual=True)
    largest = _odd_at_most(min(cfg.max_center_size, h, w))
    size = cfg.center_size
    while True:
        step = ml_collections.ConfigDict({**cfg.to_dict(), "center_size": size})
        kwargs: dict[str, Any] = {"is_log": cfg.method == "ring"}
        if cfg.method != "ring":
            half = size // 2
            npx = num_pixels or cfg.num_pixels or n * max(h - half, 1) * max(w - half, 1)
            kwargs.update(num_pixels=int(npx), baseline=baseline)
        if tile_acf is not None:
            kwargs.update(noise_acf=noise_acf, noise_fit_residual=residual)
        mask, info = extract_structural_mask(acf, step, **kwargs)
        if not touches_edge(mask) or size >= largest:
            break
        size = min(size + 4, largest)
    info["truncated"] = bool(touches_edge(mask) and mask.shape[0] > 1)
    if info["truncated"]:
        info["summary"] += (f"; truncated: the correlation reaches the edge of the largest crop "
                            f"({size}x{size}, max_center_size), it is longer than the mask")
    return mask, info


# --------------------------------------------------------------------------------------------
# The patches the pipeline measures
# --------------------------------------------------------------------------------------------
def structure_bank(planes: list[np.ndarray], ext_cfg: Any) -> tuple[sampling.ImageBank, int]:
    """The bank the autocorrelation patches are drawn from, and their side.

    The background regions (``use_background``) are chosen on the planes as given; the images in
    the bank are then the planes high-passed by ``highpass(plane, highpass_sigma)`` (0: as
    given), so the image's own smooth correlation does not enter the ACF."""
    size = min(int(ext_cfg.patch_size), *(min(p.shape) for p in planes))
    bank = sampling.make_bank(planes, size, bool(ext_cfg.use_background))
    sigma = float(ext_cfg.get("highpass_sigma", 0.0))
    if sigma > 0:
        images = np.zeros_like(bank.images)
        for i, p in enumerate(planes):
            images[i, : p.shape[0], : p.shape[1]] = highpass(p, sigma)
        bank = bank._replace(images=images)
    return bank, size


def structure_patches(planes: list[np.ndarray], ext_cfg: Any, seed: int) -> np.ndarray:
    """Patches for the autocorrelation (see :func:`structure_bank`): never augmented (rotations
    would wash the correlation out)."""
    bank, size = structure_bank(planes, ext_cfg)
    key = jax.random.fold_in(jax.random.key(seed), 0xAC)
    return np.asarray(jax.jit(sampling.sample_patches, static_argnums=(2, 3))(
        key, jax.device_put(bank), size, int(ext_cfg.num_patches)))


def structure_pixel_count(planes: list[np.ndarray], ext_cfg: Any) -> int:
    """Distinct pixels the autocorrelation patches can cover: the union of the patch positions
    that can be drawn (all of a plane without ``use_background``).  The independent-sample count
    of the significance test -- the patches overlap heavily, so ``num_patches * patch_size**2``
    would overstate it."""
    size = min(int(ext_cfg.patch_size), *(min(p.shape) for p in planes))
    bank = sampling.make_bank(planes, size, bool(ext_cfg.use_background))
    shapes = np.asarray(bank.shapes)
    corners = np.asarray(bank.corners)
    covered = 0
    for i, (h, w) in enumerate(shapes):  # one footprint per plane, patches stamped at once
        rows = corners[corners[:, 0] == i]
        if len(rows) == 0:
            continue
        if np.any(rows[:, 1] < 0):  # uniform corners: the whole plane
            covered += int(h) * int(w)
            continue
        diff = np.zeros((int(h) + 1, int(w) + 1), np.int64)  # 2-D difference array of the squares
        y, x = rows[:, 1], rows[:, 2]
        np.add.at(diff, (y, x), 1)
        np.add.at(diff, (y + size, x), -1)
        np.add.at(diff, (y, x + size), -1)
        np.add.at(diff, (y + size, x + size), 1)
        covered += int((diff.cumsum(0).cumsum(1)[:h, :w] > 0).sum())
    return covered


def fit_to_patch(ext_cfg: Any, patch_size: int) -> ml_collections.ConfigDict:
    """``ext_cfg`` with ``max_center_size`` capped so the mask fits a stage-2 patch of
    ``patch_size`` with room for two copies per side (side <= ``patch_size // 2 - 1``); never
    below ``center_size`` (a too large ``center_size`` is the pipeline's one-line error)."""
    cfg = validate_extractor_config(ext_cfg)
    fit = _odd_at_most(max(1, int(patch_size) // 2 - 1))
    cfg.max_center_size = max(min(cfg.max_center_size, fit), cfg.center_size)
    return cfg


def mask_from_planes(planes: list[np.ndarray], ext_cfg: Any, seed: int,
                     patch_size: int | None = None) -> tuple[np.ndarray, dict]:
    """(mask, info) of the autocorrelation of patches of normalised ``planes`` (``stage2.extractor``).

    ``patch_size``: the stage-2 patch side the mask must fit (:func:`fit_to_patch`); None: no cap.
    What the pipeline, ``api.extract_mask`` and the ``extract-mask`` command all call."""
    ext_cfg = validate_extractor_config(ext_cfg) if patch_size is None else fit_to_patch(ext_cfg, patch_size)
    patches = structure_patches(planes, ext_cfg, seed)
    num_pixels = None  # significance test: distinct pixels, not overlapping patch pixels
    if ext_cfg.method != "ring" and int(ext_cfg.num_pixels) == 0:
        half = int(ext_cfg.center_size) // 2
        n, h, w = patches.shape
        covered = structure_pixel_count(planes, ext_cfg)
        num_pixels = max(1, min(n * max(h - half, 1) * max(w - half, 1), covered))
    return find_structural_mask(patches, ext_cfg, num_pixels=num_pixels)
