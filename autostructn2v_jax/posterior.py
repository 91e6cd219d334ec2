"""Posterior-mean final step: put back the information of the noisy pixel itself.

A blind-spot network never sees the pixel it predicts, so its output ``mu`` estimates
``E[clean | neighbours]`` and throws away the observation ``y`` at that pixel. Treating the network
output as a Gaussian prior ``clean ~ N(mu, s_p^2)`` and the noise as
``y | clean ~ N(clean, s_n^2)``, the posterior mean is the per-pixel Wiener combination

    E[clean | neighbours, y] = mu + s_p^2 / (s_p^2 + s_n^2) * (y - mu).

``s_n^2`` comes from a noise model estimated from the data (:func:`estimate_noise`: Gaussian, or
Poisson-Gaussian ``var = a * signal + b``). ``s_p^2``, the mean squared error of the prediction, is
small in flat regions and large at edges and in texture; it is estimated from the residuals
``r = y - mu`` of all pixels with a similar *gradient energy of the prediction*: pixels are put
into equal-count bins of that feature and ``s_p^2 = max(mean_bin(r^2) - mean_bin(s_n^2), 0)``,
because ``E[r^2] = s_p^2 + s_n^2`` when the prediction error is independent of the pixel's own
noise. A bin holds hundreds of pixels, so the estimate is not dominated by the noise of ``r^2`` (a
small window of neighbours is: its clipped average overestimates ``s_p^2`` in flat regions); the
pixel itself is left out of its bin's mean, so its gain does not depend on its own noise.

Assumptions. The prediction error is independent of the pixel's noise: a blind-spot network
predicts without the pixel (training masks it; at inference the network does see it and passes
a small fraction of it through, which the estimate then partly absorbs). Structured (correlated)
noise: the step assumes the model's blind spot hides every pixel whose noise is correlated with the
centre's (a stage-2 model with the structural mask). Then ``y - mu = prediction error + the
pixel's own noise`` and ``s_n^2`` is the *total* noise variance at a pixel, which the residual-based
estimate measures. A model that sees correlated neighbours (stage 1 on structured noise) has
already absorbed part of the noise into ``mu``; the step then cannot remove that part. With the
noise's correlation over such a mask (:func:`estimate_correlation`, ``correlation=`` below) the
step can instead be the joint posterior mean of the whole plane, which reads the pixel's noise also
from its correlated neighbours' residuals; it assumes a prediction error independent from pixel to
pixel, which small, under-trained networks violate (docs/benchmarks.md, "Correlated posterior").
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["NoiseModel", "NOISE_MODELS", "estimate_noise", "estimate_noise_pooled", "posterior_mean",
           "posterior_step", "estimate_correlation", "CG_ITERATIONS"]

NOISE_MODELS = ("gaussian", "poisson_gaussian")
_MAD_TO_STD = 1.4826022185056018  # 1 / Phi^-1(3/4): MAD of a Gaussian times this is its std
_VAR_FLOOR = 1e-12
_SPECTRUM_FLOOR = 0.05  # a correlation used by the solve keeps its power spectrum above this
CG_ITERATIONS = 200  # at most, per plane (converges in tens on the measured structured noise)


class NoiseModel(NamedTuple):
    """Noise variance ``a * signal + b`` (``a = 0``: Gaussian with ``sigma^2 = b``), in the units of
    the arrays it was estimated on."""

    a: float
    b: float

    def variance(self, signal):
        """Per-pixel noise variance at ``signal`` (floored at a tiny positive value)."""
        return jnp.maximum(self.a * jnp.asarray(signal) + self.b, _VAR_FLOOR)

    def rescaled(self, scale: float, offset: float = 0.0) -> "NoiseModel":
        """The same noise in the units ``x' = (x - offset) / scale`` (e.g. one plane normalised by
        its mean and standard deviation): ``var' = (a * (offset + scale * s') + b) / scale^2``."""
        scale = float(scale)
        return NoiseModel(self.a / scale, (self.a * float(offset) + self.b) / scale ** 2)


def _robust_var(r: np.ndarray) -> float:
    """Variance from the median absolute deviation: insensitive to sparse large residuals."""
    r = np.ravel(r)
    mad = np.median(np.abs(r - np.median(r)))
    return float((_MAD_TO_STD * mad) ** 2)


def _plane_samples(y: np.ndarray, mu: np.ndarray | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(noise samples, signal, flatness feature) of one plane, flattened.

    With a prediction: the residual ``y - mu``, the signal ``mu`` and the gradient energy of ``mu``.
    Without: ``(y - mean of its 4 neighbours) / sqrt(1.25)`` (variance s^2 for white noise of
    variance s^2), the 3x3 mean as signal and its gradient energy; interior pixels only.
    """
    if mu is None:
        c = y[1:-1, 1:-1]
        four = (y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:]) / 4.0
        mu = (4.0 * four + c + y[:-2, :-2] + y[:-2, 2:] + y[2:, :-2] + y[2:, 2:]) / 9.0
        r = (c - four) / np.sqrt(1.25)
    else:
        r = y - mu
    feature = np.asarray(_gradient_energy(jnp.asarray(mu, jnp.float32)))
    return r.ravel(), mu.ravel(), feature.ravel()


def estimate_noise(noisy, prediction=None, *, model: str = "gaussian", bins: int = 16,
                   flat_fraction: float = 0.5) -> NoiseModel:
    """Estimate the noise model of an ``(H, W)`` (or ``(..., H, W)``) image from the data alone.

    With ``prediction`` (a blind-spot model's output): from the residuals ``noisy - prediction``,
    whose robust (MAD) spread is the pixel's total noise plus the usually much smaller, sparse
    prediction error; only the ``flat_fraction`` of pixels where the prediction's gradient energy
    is lowest (where that error is smallest) are used. Without a prediction: from a 4-neighbour
    high-pass of ``noisy`` (valid for white noise only: correlated noise has less high-frequency
    power and is underestimated). ``model="poisson_gaussian"`` fits ``var = a * signal + b`` by
    weighted least squares to robust variances in ``bins`` equal-count bins of the signal (the
    prediction, or a 3x3 mean) of those pixels; if the fitted slope is not positive the Gaussian
    estimate is returned.
    """
    _check_model(model)
    y = np.asarray(noisy, np.float64)
    if y.ndim < 2 or min(y.shape[-2:]) < 3:
        raise ValueError(f"estimate_noise needs images of at least 3x3 pixels, got shape {y.shape}")
    planes = y.reshape(-1, *y.shape[-2:])
    if prediction is None:
        preds = [None] * len(planes)
    else:
        mu = np.asarray(prediction, np.float64)
        if mu.shape != y.shape:
            raise ValueError(f"prediction shape {mu.shape} differs from the image's {y.shape}")
        preds = list(mu.reshape(planes.shape))
    r, signal, feature = (np.concatenate(parts) for parts in
                          zip(*(_plane_samples(p, m) for p, m in zip(planes, preds))))
    keep = feature <= np.quantile(feature, flat_fraction)
    return _fit(r[keep], signal[keep], model, bins)


def estimate_noise_pooled(planes, *, model: str = "gaussian", bins: int = 16,
                          flat_fraction: float = 0.5) -> NoiseModel:
    """One noise model for many planes of one acquisition, each given in its own units.

    ``planes``: ``(noisy, prediction, scale, offset)`` or ``(noisy, prediction, scale, offset,
    blind)`` per ``(H, W)`` plane, where ``raw = offset + scale * noisy`` (a plane normalised by its
    own mean and standard deviation). The flattest ``flat_fraction`` of each plane (as in
    :func:`estimate_noise`) gives residual samples; they are pooled in raw units and one model is
    fitted, in raw units (turn it into a plane's units with :meth:`NoiseModel.rescaled`). A plane's
    own estimate moves with its content (a textured plane's residuals hold more prediction error, and
    a network passes part of a pixel's noise into its prediction): on the 54 photo crops of issue 12
    with x-correlated noise, per-plane estimates ranged over 0.77-1.61x the true variance and the
    pooled one was 0.94x, +0.1 dB after the posterior step (docs/benchmarks.md).

    ``blind``: a list of ``(blind_prediction, centres)`` pairs, predictions of the plane with the
    model's mask hidden around the True pixels of ``centres`` (as in training). The residuals are
    then taken at those centres only, where the prediction cannot have copied any of the pixel's
    own or correlated noise: 1.05-1.08x the true variance where the plain residuals gave 0.89-0.94x
    with a structured mask (docs/benchmarks.md, "Blind noise estimate"). Flatness is still read
    from ``prediction``.
    """
    _check_model(model)
    rs, signals = [], []
    for y, mu, scale, offset, *blind in planes:
        y, mu = np.asarray(y, np.float64), np.asarray(mu, np.float64)
        if y.ndim != 2 or y.shape != mu.shape or min(y.shape) < 3:
            raise ValueError(f"estimate_noise_pooled needs equal (H, W) planes of at least 3x3 pixels, "
                             f"got {y.shape} and {mu.shape}")
        r, signal, feature = _plane_samples(y, mu)
        keep = feature <= np.quantile(feature, flat_fraction)
        if blind and blind[0]:
            at = np.concatenate([np.ravel(c) for _, c in blind[0]]).astype(bool)
            r = np.concatenate([np.ravel(y - np.asarray(mb, np.float64)) for mb, _ in blind[0]])[at]
            signal, keep = np.tile(signal, len(blind[0]))[at], np.tile(keep, len(blind[0]))[at]
        rs.append(r[keep] * float(scale))
        signals.append(float(offset) + float(scale) * signal[keep])
    if not rs:
        raise ValueError("estimate_noise_pooled needs at least one plane")
    return _fit(np.concatenate(rs), np.concatenate(signals), model, bins)


def _check_model(model: str) -> None:
    if model not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {model!r}; use one of {NOISE_MODELS}")


def _fit(r: np.ndarray, signal: np.ndarray, model: str, bins: int) -> NoiseModel:
    """The noise model of residual samples ``r`` at ``signal`` (see :func:`estimate_noise`)."""
    gauss = NoiseModel(0.0, _robust_var(r))
    if model == "gaussian":
        return gauss
    order = np.argsort(signal, kind="stable")
    chunks = np.array_split(order, max(2, int(bins)))
    m = np.array([signal[c].mean() for c in chunks])
    v = np.array([_robust_var(r[c]) for c in chunks])
    n = np.array([len(c) for c in chunks], np.float64)
    w = n / np.maximum(v, _VAR_FLOOR) ** 2  # var(sample variance) ~ 2 v^2 / n
    design = np.stack([m, np.ones_like(m)], axis=1) * np.sqrt(w)[:, None]
    a, b = np.linalg.lstsq(design, v * np.sqrt(w), rcond=None)[0]
    if not (np.isfinite(a) and a > 0):
        return gauss
    return NoiseModel(float(a), float(b))


@jax.jit
def _gradient_energy(x: jax.Array) -> jax.Array:
    """Squared Sobel gradient magnitude of a 2-D array (reflect padding): large at edges/texture."""
    p = jnp.pad(x, 1, mode="reflect" if min(x.shape) > 1 else "edge")
    h, w = x.shape
    s = lambda dy, dx: p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]  # noqa: E731
    gx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
    gy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
    return gx * gx + gy * gy


def _prior_variance(y, mu, var_n, bins: int):
    """Per-pixel prior variance ``s_p^2``: the leave-one-out mean of ``r^2 - s_n^2`` over the pixel's
    bin of the prediction's gradient energy, clipped at 0."""
    r = y - mu
    excess = (r * r - var_n).ravel()
    g = _gradient_energy(mu).ravel()
    rank = jnp.argsort(jnp.argsort(g))
    n = g.shape[0]
    bin_id = (rank * bins) // n
    total = jax.ops.segment_sum(excess, bin_id, num_segments=bins)
    count = jax.ops.segment_sum(jnp.ones_like(excess), bin_id, num_segments=bins)
    # leave-one-out mean of the bin: the gain at a pixel never depends on its own noise
    loo = (total[bin_id] - excess) / jnp.maximum(count[bin_id] - 1.0, 1.0)
    return jnp.maximum(loo, 0.0).reshape(y.shape)


def _posterior_plane(y, mu, a, b, bins: int):
    r = y - mu
    var_n = jnp.maximum(a * mu + b, _VAR_FLOOR)
    prior = _prior_variance(y, mu, var_n, bins)
    both = prior + var_n
    gain = jnp.where(both > 0, prior / jnp.where(both > 0, both, 1.0), 1.0)
    return mu + gain * r


def _correlate_same(v, kernel):
    """``v`` correlated with an odd-sided ``kernel``, zero outside ``v`` (same size)."""
    out = jax.lax.conv_general_dilated(v[None, None], kernel[None, None], (1, 1), "SAME",
                                       precision=jax.lax.Precision.HIGHEST)
    return out[0, 0]


def _posterior_plane_correlated(y, mu, a, b, rho, bins: int, iters: int):
    """Joint posterior mean of one plane under noise correlated as ``rho``.

    Prior ``clean ~ N(mu, P)``, ``P = diag(s_p^2)``; noise ``N(0, S)``, ``S = D^1/2 R D^1/2`` with
    ``D = diag(s_n^2)`` and ``R`` the stationary correlation ``rho`` (zero beyond its support). The
    posterior mean is ``mu + P (P + S)^-1 (y - mu)``, solved by conjugate gradients (Jacobi
    preconditioned, ``iters`` at most). With ``rho`` the centre alone it is the per-pixel formula."""
    r = y - mu
    var_n = jnp.maximum(a * mu + b, _VAR_FLOOR)
    prior = _prior_variance(y, mu, var_n, bins)
    sd = jnp.sqrt(var_n)

    def matvec(v):
        return prior * v + sd * _correlate_same(sd * v, rho)

    z, _ = jax.scipy.sparse.linalg.cg(matvec, r, M=lambda v: v / (prior + var_n), tol=1e-6,
                                      maxiter=iters)
    return mu + prior * z


@functools.partial(jax.jit, static_argnames=("bins",))
def _posterior(y, mu, a, b, bins):
    h, w = y.shape[-2:]
    flat = jax.vmap(lambda yy, mm: _posterior_plane(yy, mm, a, b, bins))(
        y.reshape(-1, h, w), mu.reshape(-1, h, w))
    return flat.reshape(y.shape)


@functools.partial(jax.jit, static_argnames=("bins", "iters"))
def _posterior_correlated(y, mu, a, b, rho, bins, iters):
    h, w = y.shape[-2:]
    flat = jax.vmap(lambda yy, mm: _posterior_plane_correlated(yy, mm, a, b, rho, bins, iters))(
        y.reshape(-1, h, w), mu.reshape(-1, h, w))
    return flat.reshape(y.shape)


def posterior_mean(noisy, prediction, noise: Union[NoiseModel, float], *,
                   bins: int = 16, correlation=None, iters: int = CG_ITERATIONS) -> jax.Array:
    """Per-pixel posterior mean ``mu + s_p^2 / (s_p^2 + s_n^2) * (y - mu)`` of an ``(..., H, W)``
    image (float32, same shape; each ``(H, W)`` plane on its own).

    ``noise``: a :class:`NoiseModel` (``s_n^2 = a * mu + b``) or a scalar noise variance.
    ``s_p^2 = max(mean(r^2 - s_n^2), 0)`` over the other pixels of the same bin of the prediction's
    gradient energy (``bins`` equal-count bins; ``bins=1``: one prior variance per plane).
    ``s_n^2 -> 0`` returns ``noisy``; ``s_n^2 -> inf`` returns ``prediction``. ``bins`` is static;
    the arrays and the noise parameters may be traced.

    ``correlation``: the noise's correlation coefficients per lag (odd-sided, 1 at the centre,
    zero beyond it; :func:`estimate_correlation`) for structured noise. The step is then the joint
    posterior mean ``mu + P (P + S)^-1 (y - mu)`` of the whole plane, ``S`` the noise covariance
    (conjugate gradients, at most ``iters`` iterations): a correlated neighbour's residual tells
    how much of the pixel's residual is noise. ``None`` or the centre alone: the per-pixel formula.
    """
    y = jnp.asarray(noisy, jnp.float32)
    mu = jnp.asarray(prediction, jnp.float32)
    if y.shape != mu.shape or y.ndim < 2:
        raise ValueError(f"noisy {y.shape} and prediction {mu.shape} must be equal (..., H, W)")
    if isinstance(bins, bool) or int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
    nm = noise if isinstance(noise, NoiseModel) else NoiseModel(0.0, noise)
    a, b = jnp.float32(nm.a), jnp.float32(nm.b)
    rho = None if correlation is None else _check_correlation(correlation)
    if rho is None or rho.size == 1:
        return _posterior(y, mu, a, b, int(bins))
    return _posterior_correlated(y, mu, a, b, jnp.asarray(rho, jnp.float32), int(bins), int(iters))


def _check_correlation(correlation) -> np.ndarray:
    rho = np.asarray(correlation, np.float64)
    if rho.ndim != 2 or rho.shape[0] % 2 == 0 or rho.shape[1] % 2 == 0:
        raise ValueError(f"correlation must be 2-D with odd sides, got shape {rho.shape}")
    if not np.all(np.isfinite(rho)) or abs(rho[rho.shape[0] // 2, rho.shape[1] // 2] - 1.0) > 1e-6:
        raise ValueError("correlation must be finite with 1 at its centre")
    return rho


def _positive_definite(rho: np.ndarray, floor: float = _SPECTRUM_FLOOR) -> np.ndarray:
    """``rho`` blended with the centre alone (``lam * rho + (1 - lam) * delta``, the largest
    ``lam <= 1``) so that its power spectrum stays above ``floor``: an estimated correlation need
    not be a valid one, and the solve needs ``S`` positive definite."""
    h, w = rho.shape
    spectrum = np.fft.rfft2(np.roll(np.pad(rho, ((0, 64), (0, 64))), (-(h // 2), -(w // 2)), (0, 1))).real
    low = float(spectrum.min())
    if low >= floor:
        return rho
    lam = (1.0 - floor) / (1.0 - low)
    out = lam * rho
    out[h // 2, w // 2] = 1.0
    return out


def estimate_correlation(planes, support, *, flat_fraction: float = 0.5) -> np.ndarray:
    """The noise's correlation coefficients on the lags of ``support`` (odd-sided bool, e.g. a
    stage-2 structural mask: by construction the lags where the noise is correlated; zero
    elsewhere), pooled over ``planes`` of ``(noisy, prediction, scale)`` in their own units
    (``raw = offset + scale * noisy``).

    From the residuals ``r = noisy - prediction`` of the ``flat_fraction`` of pixels where the
    prediction's gradient energy is lowest (as :func:`estimate_noise`): covariance of ``r`` at each
    lag over pairs of such pixels, in raw units, divided by the variance. Symmetric under 180
    degree rotation, 1 at the centre, kept positive definite."""
    k = np.asarray(support, bool)
    if k.ndim != 2 or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
        raise ValueError(f"support must be 2-D with odd sides, got shape {k.shape}")
    k = k | k[::-1, ::-1]
    cy, cx = k.shape[0] // 2, k.shape[1] // 2
    k[cy, cx] = True
    # Lag -d pairs the same pixels as lag d: measure one of each pair and mirror it.
    lags = [(dy - cy, dx - cx) for dy, dx in zip(*np.nonzero(k)) if (dy - cy, dx - cx) >= (0, 0)]
    num, den = np.zeros(len(lags)), np.zeros(len(lags))
    for y, mu, scale in planes:
        y, mu = np.asarray(y, np.float64), np.asarray(mu, np.float64)
        if y.ndim != 2 or y.shape != mu.shape:
            raise ValueError(f"estimate_correlation needs equal (H, W) planes, got {y.shape} and {mu.shape}")
        r = (y - mu) * float(scale)
        g = np.asarray(_gradient_energy(jnp.asarray(mu, jnp.float32)))
        m = g <= np.quantile(g, flat_fraction)
        h, w = r.shape
        for i, (oy, ox) in enumerate(lags):  # one vectorised product per lag
            if abs(oy) >= h or abs(ox) >= w:
                continue
            ys, xs = slice(max(0, -oy), h - max(0, oy)), slice(max(0, -ox), w - max(0, ox))
            ys2, xs2 = slice(max(0, oy), h - max(0, -oy)), slice(max(0, ox), w - max(0, -ox))
            both = m[ys, xs] & m[ys2, xs2]
            num[i] += float(np.sum(r[ys, xs] * r[ys2, xs2] * both))
            den[i] += float(both.sum())
    cov = np.where(den > 0, num / np.maximum(den, 1.0), 0.0)
    var = cov[lags.index((0, 0))]
    rho = np.zeros(k.shape)
    if var <= 0:
        rho[cy, cx] = 1.0
        return rho
    for (oy, ox), c in zip(lags, cov):
        rho[cy + oy, cx + ox] = rho[cy - oy, cx - ox] = c / var
    return _positive_definite(rho)


def posterior_step(noisy, prediction, noise_model: str = "gaussian", *,
                   bins: int = 16, noise: NoiseModel | None = None, correlation=None) -> np.ndarray:
    """The per-plane call: the posterior mean as a float32 NumPy array, with ``noise`` (a model in
    the plane's units, e.g. a pooled estimate) or else a noise model of kind ``noise_model``
    estimated from this plane's ``noisy - prediction``; ``correlation`` as in
    :func:`posterior_mean`."""
    model = noise if noise is not None else estimate_noise(noisy, prediction, model=noise_model)
    return np.asarray(posterior_mean(noisy, prediction, model, bins=bins, correlation=correlation))
