"""Posterior-mean final step: limits, shapes, independence of the pixel's own noise, noise estimates."""

import jax
import numpy as np
import pytest
from scipy import ndimage

from autostructn2v_jax import posterior


def _scene(seed=0, size=96):
    rng = np.random.default_rng(seed)
    clean = ndimage.gaussian_filter(rng.random((size, size)), 3)
    clean = (clean - clean.min()) / (clean.max() - clean.min())
    # a blind-spot-like prediction: error independent of the noise
    mu = clean + 0.03 * ndimage.gaussian_filter(rng.standard_normal(clean.shape), 1) / 0.28
    return rng, clean.astype(np.float32), mu.astype(np.float32)


def test_zero_noise_returns_observation_and_huge_noise_returns_prediction():
    rng, clean, mu = _scene()
    y = (clean + 0.1 * rng.standard_normal(clean.shape)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(posterior.posterior_mean(y, mu, 0.0)), y, atol=1e-5)
    np.testing.assert_allclose(np.asarray(posterior.posterior_mean(y, mu, 1e6)), mu, atol=1e-6)
    nm = posterior.NoiseModel(0.0, 1e6)
    np.testing.assert_allclose(np.asarray(posterior.posterior_mean(y, mu, nm, bins=1)), mu, atol=1e-6)


@pytest.mark.parametrize("bins", [1, 4, 16])
def test_output_lies_between_prediction_and_observation(bins):
    rng, clean, mu = _scene(1)
    y = (clean + 0.1 * rng.standard_normal(clean.shape)).astype(np.float32)
    out = np.asarray(posterior.posterior_mean(y, mu, 0.01, bins=bins))
    lo, hi = np.minimum(y, mu), np.maximum(y, mu)
    assert np.all(out >= lo - 1e-6) and np.all(out <= hi + 1e-6)
    assert not np.allclose(out, mu) and not np.allclose(out, y)


def test_posterior_beats_the_prediction_and_adapts_to_edges():
    rng, clean, mu = _scene(1)
    # prediction error concentrated where the image has structure (as for a real network)
    edges = posterior._gradient_energy(clean)
    edges = np.asarray(edges) > np.quantile(np.asarray(edges), 0.8)
    mu = np.where(edges, clean + 0.08 * rng.standard_normal(clean.shape), mu).astype(np.float32)
    y = (clean + 0.1 * rng.standard_normal(clean.shape)).astype(np.float32)
    mse = lambda x: float(np.mean((np.asarray(x) - clean) ** 2))  # noqa: E731
    one = mse(posterior.posterior_mean(y, mu, 0.01, bins=1))
    binned = mse(posterior.posterior_mean(y, mu, 0.01, bins=16))
    assert binned < one < 0.95 * mse(mu)


def test_shapes_dtypes_and_jit():
    rng, clean, mu = _scene(2, 40)
    y = clean + 0.1 * rng.standard_normal(clean.shape)  # float64 in
    out = posterior.posterior_mean(y, mu, 0.01)
    assert out.shape == y.shape and out.dtype == np.float32
    stack = posterior.posterior_mean(np.stack([y, 2 * y]), np.stack([mu, mu]), 0.01, bins=8)
    assert stack.shape == (2, 40, 40)
    np.testing.assert_allclose(np.asarray(stack[0]), np.asarray(posterior.posterior_mean(y, mu, 0.01, bins=8)),
                               atol=1e-6)  # planes are independent
    jitted = jax.jit(lambda a, b, v: posterior.posterior_mean(a, b, posterior.NoiseModel(0.0, v)))
    np.testing.assert_allclose(np.asarray(jitted(y, mu, 0.01)), np.asarray(out), atol=1e-6)
    step = posterior.posterior_step(y, mu)
    assert isinstance(step, np.ndarray) and step.dtype == np.float32 and step.shape == y.shape
    with pytest.raises(ValueError):
        posterior.posterior_mean(y, mu[:-1], 0.01)
    with pytest.raises(ValueError, match="bins"):
        posterior.posterior_mean(y, mu, 0.01, bins=0)


def test_gain_at_a_pixel_does_not_depend_on_its_own_noise():
    rng, clean, mu = _scene(3, 32)
    y = (clean + 0.1 * rng.standard_normal(clean.shape)).astype(np.float32)
    p = (16, 16)

    def gain(yy, bins=4):
        out = np.asarray(posterior.posterior_mean(yy, mu, 0.003, bins=bins))
        return (out[p] - mu[p]) / (yy[p] - mu[p])

    base = gain(y)
    assert 0 < base < 1
    other = y.copy()
    other[p] += 0.7
    assert gain(other) == pytest.approx(base, rel=1e-4)
    assert gain(other, bins=1) == pytest.approx(gain(y, bins=1), rel=1e-4)
    other = y.copy()
    other[:, :8] += 0.7  # other pixels' residuals do count
    assert gain(other, bins=1) != pytest.approx(gain(y, bins=1), rel=1e-3)


def test_gaussian_noise_estimate():
    rng, clean, mu = _scene(4, 128)
    y = clean + 0.1 * rng.standard_normal(clean.shape)
    est = posterior.estimate_noise(y, clean)
    assert est.a == 0.0 and np.sqrt(est.b) == pytest.approx(0.1, rel=0.03)
    # with an imperfect prediction the error adds a little
    assert np.sqrt(posterior.estimate_noise(y, mu).b) == pytest.approx(0.1, rel=0.1)
    # without a prediction: the high-pass estimate (white noise)
    assert np.sqrt(posterior.estimate_noise(y).b) == pytest.approx(0.1, rel=0.1)


def test_noise_estimate_of_a_stack_pools_its_planes():
    rng, clean, _ = _scene(6, 64)
    stack = np.stack([clean, clean[::-1]])
    noisy = stack + 0.05 * rng.standard_normal(stack.shape)
    assert np.sqrt(posterior.estimate_noise(noisy, stack).b) == pytest.approx(0.05, rel=0.05)
    assert np.sqrt(posterior.estimate_noise(noisy).b) == pytest.approx(0.05, rel=0.1)
    with pytest.raises(ValueError, match="shape"):
        posterior.estimate_noise(noisy, stack[0])


def test_poisson_gaussian_noise_estimate():
    rng, clean, _ = _scene(5, 160)
    y = clean + rng.standard_normal(clean.shape) * np.sqrt(0.04 * clean + 0.001)
    est = posterior.estimate_noise(y, clean, model="poisson_gaussian")
    assert est.a == pytest.approx(0.04, rel=0.15)
    # the intercept is extrapolated far below the data; the variance inside the data range is what matters
    for level in (0.3, 0.5, 0.7):
        assert float(est.variance(level)) == pytest.approx(0.04 * level + 0.001, rel=0.08)
    # Gaussian data: the fitted slope is ~0 (or the Gaussian fallback)
    yg = clean + 0.05 * rng.standard_normal(clean.shape)
    eg = posterior.estimate_noise(yg, clean, model="poisson_gaussian")
    assert abs(eg.a) < 0.003 and np.sqrt(eg.a * 0.5 + eg.b) == pytest.approx(0.05, rel=0.08)
    with pytest.raises(ValueError, match="noise model"):
        posterior.estimate_noise(y, clean, model="histogram")


@pytest.mark.parametrize("model", ["gaussian", "poisson_gaussian"])
def test_pooled_estimate_of_one_plane_is_its_own_estimate_in_raw_units(model):
    """A plane normalised by (offset, scale): the pooled estimate in raw units, rescaled to the
    plane's units, is the plane's own estimate."""
    rng, clean, mu = _scene(7, 128)
    raw = 200.0 + 1000.0 * (clean + rng.standard_normal(clean.shape) * np.sqrt(0.02 * clean + 0.002))
    offset, scale = float(raw.mean()), float(raw.std())
    y = (raw - offset) / scale
    mu_n = (200.0 + 1000.0 * mu - offset) / scale
    own = posterior.estimate_noise(y, mu_n, model=model)
    pooled = posterior.estimate_noise_pooled([(y, mu_n, scale, offset)], model=model).rescaled(scale, offset)
    for level in (-1.0, 0.0, 1.0):
        assert float(pooled.variance(level)) == pytest.approx(float(own.variance(level)), rel=1e-6)


def test_pooled_estimate_pools_planes_of_different_scales_in_raw_units():
    """Same raw noise (sigma 0.05), planes normalised with very different scales: the pooled model
    is in raw units and turns into each plane's units with `rescaled`; with one plane whose
    prediction is poor (large errors everywhere) the pooled estimate moves less than that plane's."""
    rng, clean, _ = _scene(8, 96)
    planes, truth = [], []
    for k, (offset, scale) in enumerate([(0.0, 1.0), (5.0, 0.2), (-3.0, 7.0)]):
        img = np.roll(clean, 17 * k, axis=1)
        noisy = img + 0.05 * rng.standard_normal(img.shape)
        planes.append(((noisy - offset) / scale, (img - offset) / scale, scale, offset))
        truth.append(0.05 ** 2 / scale ** 2)
    pooled = posterior.estimate_noise_pooled(planes)
    assert pooled.a == 0.0 and np.sqrt(pooled.b) == pytest.approx(0.05, rel=0.05)
    for (y, mu, scale, offset), var in zip(planes, truth):
        assert pooled.rescaled(scale, offset).b == pytest.approx(var, rel=0.1)
    # a plane with a bad prediction: its own estimate is far off, the pooled one much less
    y0, mu0, s0, o0 = planes[0]
    bad = mu0 + 0.08 * ndimage.gaussian_filter(rng.standard_normal(mu0.shape), 0.7) / 0.4
    own_err = abs(posterior.estimate_noise(y0, bad).b / 0.05 ** 2 - 1)
    pooled_bad = posterior.estimate_noise_pooled([(y0, bad, s0, o0), *planes[1:]])
    assert abs(pooled_bad.b / 0.05 ** 2 - 1) < own_err / 2
    with pytest.raises(ValueError, match="at least one plane"):
        posterior.estimate_noise_pooled([])
    with pytest.raises(ValueError, match="noise model"):
        posterior.estimate_noise_pooled(planes, model="histogram")


def test_blind_residuals_measure_the_noise_that_a_leaky_prediction_hides():
    """A prediction that copies part of the correlated noise (as a network that sees the correlated
    neighbours does) makes the plain residuals too small; residuals at the centres of blind
    predictions (made without those pixels) measure the whole noise."""
    rng, clean, _ = _scene(9, 128)
    white = rng.standard_normal(clean.shape)
    noise = 0.05 * ndimage.uniform_filter1d(white, 5, axis=1) * np.sqrt(5)  # x-correlated, std 0.05
    y = clean + noise
    leaky = clean + 0.4 * (np.roll(noise, 1, axis=1) + np.roll(noise, -1, axis=1)) / 2
    plain = posterior.estimate_noise_pooled([(y, leaky, 1.0, 0.0)])
    assert plain.b < 0.8 * 0.05 ** 2
    blind = []
    for k in range(3):  # passes: every 7th pixel is a centre, predicted without its noise
        centres = np.zeros(clean.shape, bool)
        centres[k::3, k::7] = True
        blind.append((np.where(centres, clean, leaky), centres))
    est = posterior.estimate_noise_pooled([(y, leaky, 1.0, 0.0, blind)])
    assert est.b == pytest.approx(0.05 ** 2, rel=0.1)
    # in raw units like the plain estimate, and an empty list means no blind samples
    assert posterior.estimate_noise_pooled([(y / 2, leaky / 2, 2.0, 0.0, [(b / 2, c) for b, c in blind])]).b \
        == pytest.approx(est.b, rel=1e-6)
    assert posterior.estimate_noise_pooled([(y, leaky, 1.0, 0.0, [])]).b == pytest.approx(plain.b)


# --------------------------------------------------------------------------- correlated noise


def _line_noise(rng, shape, std_line=0.08, std_white=0.04):
    """Noise correlated along x (a length-5 box, like the quality tests' hcorr) plus white noise;
    its true correlation on lags -4..4 along x."""
    w = rng.normal(size=(shape[0], shape[1] + 4))
    line = np.stack([w[:, k:k + shape[1]] for k in range(5)]).sum(0) / np.sqrt(5) * std_line
    noise = line + rng.normal(size=shape) * std_white
    var = std_line ** 2 + std_white ** 2
    rho = np.array([[std_line ** 2 * (5 - abs(k)) / 5 / var for k in range(-4, 5)]])
    rho[0, 4] = 1.0
    return noise, rho, var


def test_correlated_posterior_is_the_dense_joint_posterior_mean():
    rng = np.random.default_rng(0)
    h, w = 10, 12
    clean = rng.normal(size=(h, w)) * 0.2
    mu = clean + rng.normal(size=(h, w)) * 0.05
    noise, rho, var = _line_noise(rng, (h, w))
    y = clean + noise
    out = np.asarray(posterior.posterior_mean(y, mu, var, bins=1, correlation=rho, iters=500), np.float64)
    # the same quantities densely: prior variance from the bins=1 leave-one-out estimate
    r = (y - mu).ravel()
    ex = r * r - var
    prior = np.maximum((ex.sum() - ex) / (ex.size - 1), 0.0)
    cov = np.zeros((h * w, h * w))
    idx = np.arange(h * w).reshape(h, w)
    for k in range(-4, 5):
        a, b = idx[:, max(0, -k):w - max(0, k)].ravel(), idx[:, max(0, k):w - max(0, -k)].ravel()
        cov[a, b] = rho[0, 4 + k] * var
    want = mu.ravel() + prior * np.linalg.solve(np.diag(prior) + cov, r)
    np.testing.assert_allclose(out.ravel(), want, atol=2e-4)
    # the centre alone (or None) is the per-pixel formula
    plain = np.asarray(posterior.posterior_mean(y, mu, var, bins=4))
    for c in (None, np.ones((1, 1)), np.pad(np.ones((1, 1)), 1)):
        got = np.asarray(posterior.posterior_mean(y, mu, var, bins=4, correlation=c))
        np.testing.assert_allclose(got, plain, atol=1e-5)


def test_correlated_posterior_beats_the_per_pixel_step_on_correlated_noise():
    # The step's model: a prediction error independent from pixel to pixel (a smooth error would
    # be taken for noise at the frequencies where the noise is weak).
    rng, clean, _ = _scene(1, 128)
    mu = clean + 0.03 * rng.standard_normal(clean.shape)
    noise, rho, var = _line_noise(rng, clean.shape)
    y = clean + noise
    est = posterior.estimate_correlation([(y, mu, 1.0)], np.ones((1, 9), bool))
    assert est.shape == (1, 9) and est[0, 4] == 1.0
    np.testing.assert_allclose(est, est[::-1, ::-1])
    np.testing.assert_allclose(est, rho, atol=0.08)  # what the residuals of flat pixels say
    mse = lambda x: float(np.mean((np.asarray(x) - clean) ** 2))  # noqa: E731
    plain = mse(posterior.posterior_mean(y, mu, var))
    joint = mse(posterior.posterior_mean(y, mu, var, correlation=est))
    assert joint < 0.95 * plain < mse(mu), (joint, plain, mse(mu))  # measured 0.91x


def test_estimated_correlation_is_kept_positive_definite_and_checked():
    rng = np.random.default_rng(2)
    y = rng.normal(size=(64, 64))
    # residuals anti-correlated at lag 1 along x and strongly correlated at lag 2: not a valid ACF
    r = y - 0.9 * np.roll(y, 1, axis=1) + 0.9 * np.roll(y, 2, axis=1)
    rho = posterior.estimate_correlation([(r, np.zeros_like(r), 1.0)], np.ones((1, 5), bool))
    spectrum = np.fft.rfft2(np.roll(np.pad(rho, ((0, 64), (0, 64))), (0, -2), (0, 1))).real
    assert spectrum.min() >= 0.05 - 1e-9 and rho[0, 2] == 1.0
    with pytest.raises(ValueError, match="odd"):
        posterior.posterior_mean(y, y, 0.1, correlation=np.ones((2, 2)))
    with pytest.raises(ValueError, match="centre"):
        posterior.posterior_mean(y, y, 0.1, correlation=np.full((1, 3), 0.5))
