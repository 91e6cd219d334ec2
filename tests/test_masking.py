"""Tests for autostructn2v_jax.masking: blind-spot masks, replacement, masked loss."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from autostructn2v_jax.errors import ConfigError
from autostructn2v_jax.masking import (
    cluster_kernel,
    crop_kernel,
    make_blind_spot_batch,
    mask_capacity,
    mask_layout,
    masked_mse,
    replace_masked,
    stage1_kernel,
    strategy_id,
    tile_mask,
    use_cluster,
)

PIXEL = np.ones((1, 1), bool)
LINE5 = np.zeros((5, 5), bool)
LINE5[2, :] = True  # 1x5 horizontal line (structural kernel)


# ----------------------------------------------------------------------------- helpers


def trimmed(kernel: np.ndarray):
    """(True offsets relative to the kernel centre) of a kernel."""
    k = np.asarray(kernel).astype(bool)
    rows, cols = np.nonzero(k)
    return rows - k.shape[0] // 2, cols - k.shape[1] // 2


def check_masks(im, pm, kernel) -> int:
    """Rigorous check of one draw; returns the number of copies.

    Rebuild every copy from its prediction pixel (= the kernel centre); require: all copies inside
    the patch, their union is exactly input_mask, and no two pixels of different copies coincide
    or are 8-adjacent.
    """
    im, pm = np.asarray(im), np.asarray(pm)
    assert im.dtype == bool and pm.dtype == bool and im.shape == pm.shape
    h, w = im.shape
    assert not np.any(pm & ~im), "prediction pixels must be masked in the input"
    dy, dx = trimmed(kernel)
    ys, xs = np.nonzero(pm)
    lab = np.zeros((h + 2, w + 2), np.int64)  # 1-px zero frame for the shift comparisons
    hits = np.zeros((h, w), np.int64)
    for i, (y, x) in enumerate(zip(ys, xs)):
        py, px = y + dy, x + dx
        assert py.min() >= 0 and px.min() >= 0 and py.max() < h and px.max() < w
        lab[py + 1, px + 1] = i + 1
        hits[py, px] += 1
    assert hits.max(initial=0) <= 1, "copies overlap"
    np.testing.assert_array_equal(hits.astype(bool), im)
    core = lab[1:-1, 1:-1]
    for sy in (-1, 0, 1):
        for sx in (-1, 0, 1):
            nb = lab[1 + sy : h + 1 + sy, 1 + sx : w + 1 + sx]
            both = (core > 0) & (nb > 0)
            assert np.all(core[both] == nb[both]), "two copies are 8-adjacent"
    return len(ys)


@functools.lru_cache(maxsize=None)
def jitted_tile(kernel_bytes: bytes, kshape, patch_shape, pct):
    kernel = np.frombuffer(kernel_bytes, bool).reshape(kshape)
    return jax.jit(jax.vmap(lambda k: tile_mask(k, kernel, patch_shape, pct)))


@functools.lru_cache(maxsize=None)
def jitted_replace(strategy):
    return jax.jit(lambda k, p, m: replace_masked(k, p, m, strategy))


@functools.lru_cache(maxsize=None)
def jitted_jacobian(strategy):
    return jax.jit(lambda k, p, m: jax.jacrev(lambda q: replace_masked(k, q, m, strategy))(p))


def replace(key, patch, mask, strategy):
    return np.asarray(jitted_replace(strategy)(key, jnp.asarray(patch), jnp.asarray(mask)))


def draw_many(kernel, patch_shape, pct, n, seed=0):
    k = np.asarray(kernel, bool)
    f = jitted_tile(k.tobytes(), k.shape, tuple(patch_shape), float(pct))
    im, pm = f(jax.random.split(jax.random.key(seed), n))
    return np.asarray(im), np.asarray(pm)


# ----------------------------------------------------------------------------- stage-1 kernel


def test_stage1_kernel_shapes():
    k1 = stage1_kernel(1)
    assert k1.dtype == bool and k1.shape == (3, 3) and k1.sum() == 1 and k1[1, 1]
    k3 = stage1_kernel(3)
    assert k3.shape == (5, 5) and k3.sum() == 9 and k3[1:4, 1:4].all()
    assert not k3[0].any() and not k3[-1].any() and not k3[:, 0].any() and not k3[:, -1].any()


@pytest.mark.parametrize("bad", [0, -1, 2, 4])
def test_stage1_kernel_errors(bad):
    with pytest.raises(ConfigError, match="stage1.mask_center_size"):
        stage1_kernel(bad)


# ----------------------------------------------------------------------------- layout / percentage


@pytest.mark.parametrize(
    "kernel,patch,pct",
    [(PIXEL, (32, 32), 15.0), (PIXEL, (64, 64), 15.0), (LINE5, (96, 96), 10.0)],
)
def test_achieved_percentage(kernel, patch, pct):
    nk = int(np.asarray(kernel).sum())
    lay = mask_layout(kernel, patch, pct)
    h, w = patch
    assert not lay.capped
    assert lay.n == round(pct / 100 * h * w / nk)
    assert lay.percentage == pytest.approx(100 * lay.n * nk / (h * w))
    # within |K|/2 pixels of the target
    assert abs(lay.percentage - pct) / 100 * h * w <= nk / 2 + 1e-9
    im, pm = draw_many(kernel, patch, pct, 8)
    for i in range(8):
        assert check_masks(im[i], pm[i], kernel) == lay.n
        assert 100 * im[i].sum() / (h * w) == pytest.approx(lay.percentage)
    if kernel is LINE5:  # 8-connected kernel: labelling gives one component per copy
        for i in range(8):
            lab, num = ndimage.label(im[i], structure=np.ones((3, 3)))
            assert num == pm[i].sum() == lay.n
            sizes = ndimage.sum(im[i], lab, range(1, num + 1))
            assert np.all(sizes == 5)


def test_capacity_cap_warns():
    cap = mask_capacity(PIXEL, (16, 16))
    assert cap == pytest.approx(25.0)
    with pytest.warns(UserWarning, match="mask_percentage"):
        im, pm = jax.jit(lambda k: tile_mask(k, PIXEL, (16, 16), 60.0))(jax.random.key(1))
    assert 100 * np.asarray(im).sum() / 256 == pytest.approx(cap)
    check_masks(im, pm, PIXEL)


def test_input_validation():
    with pytest.raises(ValueError, match="does not fit"):
        mask_capacity(LINE5, (8, 4))
    with pytest.raises(ValueError, match="does not fit"):
        tile_mask(jax.random.key(0), stage1_kernel(3), (2, 16), 5.0)
    # a box exactly as large as the patch still fits (one copy)
    im, pm = draw_many(LINE5, (1, 5), 50.0, 1)
    assert np.asarray(im).all() and np.asarray(pm).sum() == 1
    for bad in (0.0, -1.0, 100.5):
        with pytest.raises(ValueError, match="mask_percentage"):
            tile_mask(jax.random.key(0), PIXEL, (16, 16), bad)
    with pytest.raises(ValueError, match="odd"):
        tile_mask(jax.random.key(0), np.ones((2, 3), bool), (16, 16), 5.0)
    with pytest.raises(ValueError, match="centre"):
        tile_mask(jax.random.key(0), np.array([[1, 0, 1]]), (16, 16), 5.0)
    # 0/1 integer kernels are accepted
    im, pm = jax.jit(lambda k: tile_mask(k, LINE5.astype(np.int32), (20, 20), 10.0))(
        jax.random.key(0)
    )
    check_masks(im, pm, LINE5)


# ----------------------------------------------------------------------------- randomness


def test_reproducible_and_key_dependent():
    f = jax.jit(lambda k: tile_mask(k, LINE5, (32, 32), 10.0))
    a = f(jax.random.key(3))
    b = f(jax.random.key(3))
    c = f(jax.random.key(4))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_not_a_fixed_lattice():
    im, pm = draw_many(PIXEL, (32, 32), 15.0, 200, seed=7)
    assert pm.any(axis=0).all()
    # per-row / per-column masking frequency is close to uniform (no lattice, no border pile-up)
    freq = pm.mean(axis=0)
    for prof in (freq.mean(axis=0), freq.mean(axis=1)):
        assert np.all(np.abs(prof / freq.mean() - 1) < 0.4)
    im, pm = draw_many(LINE5, (32, 32), 10.0, 1000, seed=8)
    assert pm[:, 1:-1, 3:-3].any(axis=0).all()  # every admissible centre used


def test_vmap_gives_different_masks():
    im, pm = draw_many(stage1_kernel(1), (24, 24), 5.0, 6, seed=11)
    assert im.shape == pm.shape == (6, 24, 24)
    flat = {p.tobytes() for p in pm}
    assert len(flat) == 6
    for i in range(6):
        check_masks(im[i], pm[i], stage1_kernel(1))


@st.composite
def kernels(draw):
    h = draw(st.sampled_from([1, 3, 5]))
    w = draw(st.sampled_from([1, 3, 5]))
    bits = draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
    k = np.array(bits, bool).reshape(h, w)
    k[h // 2, w // 2] = True
    return k


@settings(max_examples=8, deadline=None)
@given(
    kernel=kernels(),
    ph=st.integers(8, 40),
    pw=st.integers(8, 40),
    pct=st.floats(0.5, 40.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_tile_mask_properties(kernel, ph, pw, pct, seed):
    nk = int(kernel.sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lay = mask_layout(kernel, (ph, pw), pct)
        im, pm = jax.jit(lambda k: tile_mask(k, kernel, (ph, pw), pct))(jax.random.key(seed))
    n = check_masks(im, pm, kernel)
    assert n == lay.n and np.asarray(im).sum() == n * nk
    if lay.capped:
        assert lay.percentage == pytest.approx(mask_capacity(kernel, (ph, pw)))
        assert lay.percentage < pct
    else:
        assert n == max(1, round(pct / 100 * ph * pw / nk))


# ----------------------------------------------------------------------------- replacement


def _example(seed=0, shape=(12, 12), kernel=PIXEL, pct=15.0):
    patch = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    im, pm = draw_many(kernel, shape, pct, 1, seed=seed)
    return patch, im[0], pm[0]


def neighbour_reference(patch, mask, reduce):
    """Each masked pixel -> `reduce` of its unmasked 3x3 neighbours inside the patch (NaN if none)."""
    patch, mask = np.asarray(patch, np.float64), np.asarray(mask)
    h, w = patch.shape
    out = patch.copy()
    for y, x in zip(*np.nonzero(mask)):
        vals = [
            patch[j, i]
            for j in range(max(0, y - 1), min(h, y + 2))
            for i in range(max(0, x - 1), min(w, x + 2))
            if not mask[j, i]
        ]
        out[y, x] = reduce(vals) if vals else np.nan
    return out


def local_mean_reference(patch, mask):
    return neighbour_reference(patch, mask, np.mean)


@pytest.mark.parametrize("strategy", [0, "local_mean", 1, "zero", 2, "random", 3, "median"])
def test_unmasked_unchanged(strategy):
    patch, im, _ = _example(seed=1)
    out = replace(jax.random.key(2), patch, im, strategy)
    assert out.shape == patch.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out[~np.asarray(im)], np.asarray(patch)[~np.asarray(im)])


def test_zero_strategy():
    patch, im, _ = _example(seed=2)
    out = replace(jax.random.key(0), patch, im, "zero")
    assert np.all(out[np.asarray(im)] == 0)


def test_local_mean_matches_reference():
    patch, im, _ = _example(seed=3, kernel=LINE5, pct=20.0)  # includes border-touching copies
    out = replace(jax.random.key(0), patch, im, 0)
    ref = local_mean_reference(patch, im)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    # hand-made border case: corner pixel averages its 3 in-patch neighbours only
    p = jnp.arange(16.0).reshape(4, 4)
    m = jnp.zeros((4, 4), bool).at[0, 0].set(True)
    out = replace(jax.random.key(0), p, m, "local_mean")
    assert float(out[0, 0]) == pytest.approx((1 + 4 + 5) / 3)


def test_local_mean_fallback_for_interior_pixels():
    patch, im, pm = _example(seed=4, kernel=stage1_kernel(3), pct=10.0)
    out = replace(jax.random.key(5), patch, im, 0)
    unmasked_vals = set(np.asarray(patch)[~np.asarray(im)].tolist())
    # the centre of a 3x3 block has no unmasked neighbour: it gets some unmasked value
    for y, x in zip(*np.nonzero(np.asarray(pm))):
        assert out[y, x] in unmasked_vals
    assert np.isfinite(out).all()


def median_reference(patch, mask):
    return neighbour_reference(patch, mask, np.median)


@pytest.mark.parametrize("kernel", [PIXEL, LINE5], ids=["pixel", "line5"])
def test_median_matches_reference(kernel):
    patch, im, _ = _example(seed=13, shape=(16, 16), kernel=kernel, pct=20.0)  # border copies too
    out = replace(jax.random.key(0), patch, im, "median")
    np.testing.assert_allclose(out, median_reference(patch, im), rtol=1e-5, atol=1e-6)
    # even and odd counts by hand (masked neighbours never count)
    p = jnp.array([[0.0, 9.0, 2.0, 7.0], [4.0, 1.0, 8.0, 3.0], [5.0, 6.0, 0.5, 2.5], [1.5, 3.5, 4.5, 6.5]])
    m = jnp.zeros((4, 4), bool).at[0, 0].set(True).at[0, 1].set(True).at[3, 3].set(True)
    out = replace(jax.random.key(0), p, m, "median")
    assert float(out[0, 0]) == pytest.approx((4.0 + 1.0) / 2)  # of 4, 1
    assert float(out[0, 1]) == pytest.approx((2.0 + 4.0) / 2)  # of 2, 4, 1, 8
    assert float(out[3, 3]) == pytest.approx(2.5)  # of 0.5, 2.5, 4.5
    # a masked pixel with no unmasked neighbour falls back to some unmasked value
    patch, im, pm = _example(seed=4, kernel=stage1_kernel(3), pct=10.0)
    out = replace(jax.random.key(5), patch, im, 3)
    unmasked_vals = set(np.asarray(patch)[~np.asarray(im)].tolist())
    assert all(out[y, x] in unmasked_vals for y, x in zip(*np.nonzero(np.asarray(pm))))


def test_random_strategy_uses_unmasked_values():
    patch, im, _ = _example(seed=6, shape=(16, 16), kernel=LINE5, pct=20.0)
    out = replace(jax.random.key(1), patch, im, "random")
    m = np.asarray(im)
    allowed = set(np.asarray(patch)[~m].tolist())
    assert all(v in allowed for v in out[m].tolist())
    assert len(set(out[m].tolist())) > 1  # drawn per pixel, not one value


def test_strategy_id():
    names = (0, 1, 2, 3, "local_mean", "zero", "random", "median")
    assert [strategy_id(s) for s in names] == [0, 1, 2, 3, 0, 1, 2, 3]
    for bad in (4, -1, "mode", True, 1.0):
        with pytest.raises(ValueError, match="replacement_strategy"):
            strategy_id(bad)
    with pytest.raises(ConfigError, match="replacement_strategy"):
        replace_masked(jax.random.key(0), jnp.zeros((4, 4)), jnp.zeros((4, 4), bool), "nope")


@pytest.mark.parametrize("kernel", [PIXEL, LINE5, stage1_kernel(3)], ids=["pixel", "line5", "block3"])
@pytest.mark.parametrize("strategy", ["local_mean", "zero", "random", "median"])
def test_replacement_independent_of_masked_pixels(kernel, strategy):
    patch, im, _ = _example(seed=9, shape=(16, 16), kernel=kernel, pct=15.0)
    key = jax.random.key(3)
    jac = jitted_jacobian(strategy)(key, jnp.asarray(patch), jnp.asarray(im))
    jac = np.asarray(jac).reshape(256, 256)  # [output pixel, input pixel]
    m = np.asarray(im).ravel()
    assert m.sum() > 0
    assert np.all(jac[np.ix_(m, m)] == 0)
    if strategy != "zero":  # masked outputs do depend on (unmasked) inputs
        assert np.abs(jac[m][:, ~m]).sum() > 0


# ----------------------------------------------------------------------------- loss and batch


def test_masked_mse_manual():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(2, 6, 6)).astype(np.float32)
    target = rng.normal(size=(2, 6, 6)).astype(np.float32)
    m = rng.random((2, 6, 6)) < 0.3
    want = ((pred - target) ** 2)[m].sum() / m.sum()
    assert float(masked_mse(pred, target, m)) == pytest.approx(want, rel=1e-5)
    got4 = masked_mse(pred[..., None], target[..., None], m)  # NHWC prediction, (B,H,W) mask
    assert float(got4) == pytest.approx(want, rel=1e-5)
    assert float(masked_mse(pred, target, np.zeros_like(m))) == 0.0


def test_masked_mse_counts_pixels_whose_replacement_equals_original():
    patches = jnp.full((3, 16, 16), 0.7, jnp.float32)
    f = jax.jit(lambda k, p: make_blind_spot_batch(k, p, PIXEL, 10.0, "local_mean"))
    inputs, pm, im = f(jax.random.key(0), patches)
    np.testing.assert_allclose(inputs, patches)  # replacement equals the original everywhere
    pred = jnp.where(pm, patches + 2.0, patches)  # differs exactly at the prediction pixels
    assert float(masked_mse(pred, patches, pm)) == pytest.approx(4.0)
    pred = jnp.where(im & ~pm, pred + 5.0, pred)  # non-prediction pixels do not count
    assert float(masked_mse(pred, patches, pm)) == pytest.approx(4.0)


def test_make_blind_spot_batch_jit():
    patches = jnp.asarray(np.random.default_rng(1).random((4, 20, 20)), jnp.float32)
    f = jax.jit(lambda k, p: make_blind_spot_batch(k, p, LINE5, 10.0, 2))
    inputs, pm, im = f(jax.random.key(2), patches)
    assert inputs.shape == (4, 20, 20) and inputs.dtype == jnp.float32
    assert pm.dtype == im.dtype == jnp.bool_ and pm.shape == im.shape == (4, 20, 20)
    im, pm, inputs = np.asarray(im), np.asarray(pm), np.asarray(inputs)
    np.testing.assert_array_equal(inputs[~im], np.asarray(patches)[~im])
    assert len({x.tobytes() for x in pm}) == 4
    for i in range(4):
        check_masks(im[i], pm[i], LINE5)


def test_crop_kernel_is_canonical_and_draws_the_same_masks():
    """A kernel padded with a False border crops to the same array and tiles identically, so both
    give one train-step spec (one compile)."""
    line = np.ones((1, 9), bool)
    padded = np.zeros((11, 11), bool)
    padded[5, 1:10] = True
    np.testing.assert_array_equal(crop_kernel(padded), line)
    np.testing.assert_array_equal(crop_kernel(line), line)
    lopsided = np.zeros((7, 7), bool)
    lopsided[3, 3] = lopsided[1, 4] = True  # reaches 2 rows up, 1 column right: 5x3 crop
    assert crop_kernel(lopsided).shape == (5, 3) and crop_kernel(lopsided).sum() == 2
    key = jax.random.key(4)
    for a, b in ((padded, line), (lopsided, crop_kernel(lopsided))):
        # one compiled call per pair (op by op, tile_mask compiles each primitive: ~5 s cold)
        (ia, pa), (ib, pb) = jax.jit(lambda k: (tile_mask(k, a, (32, 32), 10.0),
                                                tile_mask(k, b, (32, 32), 10.0)))(key)
        np.testing.assert_array_equal(np.asarray(ia), np.asarray(ib))
        np.testing.assert_array_equal(np.asarray(pa), np.asarray(pb))
    from autostructn2v_jax import config, train

    cfg = config.base_config().stage2
    assert train.StageSpec.from_config("stage2", cfg, padded) == train.StageSpec.from_config("stage2", cfg, line)
    with pytest.raises(ValueError, match="centre"):
        crop_kernel(np.zeros((3, 3), bool))


# ----------------------------------------------------------------------------- clustered copies


@pytest.mark.parametrize("kernel, shape, size", [
    (PIXEL, (1, 1), 1),
    (LINE5, (1, 9), 9),
    (np.ones((3, 3), bool), (5, 5), 25),
    (stage1_kernel(1), (1, 1), 1),
])
def test_cluster_kernel_is_the_kernel_dilated_by_itself(kernel, shape, size):
    big = cluster_kernel(kernel)
    assert big.shape == shape and big.sum() == size
    small = crop_kernel(kernel)
    np.testing.assert_array_equal(big, ndimage.binary_dilation(
        np.pad(small, [(s // 2, s // 2) for s in small.shape]), structure=small[::-1, ::-1]))


@settings(max_examples=8, deadline=None)
@given(kernel=kernels(), pct=st.floats(2.0, 30.0), seed=st.integers(0, 2**31 - 1))
def test_clustered_masks_hide_the_whole_kernel_around_every_loss_pixel(kernel, pct, seed):
    """With ``cluster`` the copies are those of ``K (+) K`` (same draw, same checks), each gives
    |K| loss pixels, and around every loss pixel the whole kernel is hidden (the blind-spot
    condition), as around a single centre."""
    shape = (40, 40)
    big = cluster_kernel(kernel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a big kernel at a high percentage may be capped
        lay = mask_layout(kernel, shape, pct, cluster=True)
    patches = jnp.asarray(np.random.default_rng(seed).random((2, *shape)), jnp.float32)

    @jax.jit
    def draw(key):
        return (make_blind_spot_batch(key, patches, kernel, pct, "local_mean", cluster=True),
                make_blind_spot_batch(key, patches, big, pct, "local_mean"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (inputs, pm, im), (_, big_pm, big_im) = draw(jax.random.key(seed))
    im, pm = np.asarray(im), np.asarray(pm)
    np.testing.assert_array_equal(im, np.asarray(big_im))
    dy, dx = trimmed(kernel)
    for i in range(2):
        assert check_masks(im[i], np.asarray(big_pm)[i], big) == lay.n
        assert not np.any(np.asarray(big_pm)[i] & ~pm[i])  # the copy's centre is a loss pixel
        ys, xs = np.nonzero(pm[i])
        assert len(ys) == lay.n * int(crop_kernel(kernel).sum())
        for y, x in zip(ys, xs):
            assert min(y + dy) >= 0 and min(x + dx) >= 0 and im[i][y + dy, x + dx].all()
    np.testing.assert_array_equal(np.asarray(inputs)[~im], np.asarray(patches)[~im])


def test_use_cluster_only_for_lines_that_fit():
    line = np.ones((1, 9), bool)
    assert use_cluster(line, (64, 64), 10.0)
    assert use_cluster(np.eye(3, dtype=bool), (64, 64), 10.0)  # a diagonal line
    # a longer diagonal's cluster (a 13x13 box) leaves room for 5 % only: single copies
    assert not use_cluster(np.eye(7, dtype=bool), (64, 64), 10.0)
    gapped = np.zeros((1, 9), bool)
    gapped[0, ::2] = True  # evenly spaced: still a line (its sum with itself: 9 of 17 pixels)
    assert use_cluster(gapped, (64, 64), 10.0)
    thick = np.zeros((3, 9), bool)
    thick[1, :] = True
    thick[0, 3:5] = thick[2, 4:6] = True  # the quality test's 13-pixel 3x9 mask kind
    for kernel in (np.ones((3, 3), bool), thick, LINE5 | LINE5.T):
        assert not use_cluster(kernel, (64, 64), 10.0), kernel.astype(int)
    assert not use_cluster(PIXEL, (64, 64), 10.0) and not use_cluster(stage1_kernel(1), (64, 64), 10.0)
    assert not use_cluster(np.ones((1, 41), bool), (64, 64), 10.0)  # 81 px: wider than the patch
    from autostructn2v_jax import config, train

    cfg = config.base_config()
    assert train.StageSpec.from_config("stage2", cfg.stage2, line).cluster
    cfg.stage2.mask_cluster = False
    assert not train.StageSpec.from_config("stage2", cfg.stage2, line).cluster
    # a 1-px blind spot gives the same spec whatever the flag (stage 2 continuing stage 1 shares its step)
    assert not train.StageSpec.from_config("stage2", config.base_config().stage2, PIXEL).cluster
