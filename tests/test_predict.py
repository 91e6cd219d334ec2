"""Tiled prediction: exact equality with whole-frame prediction, borders, TTA, one compile."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autostructn2v_jax.errors import ConfigError, UserInputError
from autostructn2v_jax.models import apply_model, init_variables, make_apply_fn, receptive_field
from autostructn2v_jax.predict import make_predict_fn, predict_image, tile_plan

F, L = 8, 2
TILE = 80  # core 32 + 2 * halo 24 (receptive field 23 rounded up to a multiple of 2)
SIZES = [(100, 77), (64, 64), (40, 130), (20, 20), (3, 9)]


@pytest.fixture(scope="module")
def variables():
    v = init_variables(F, L, 32, 5)
    rng = np.random.default_rng(0)

    def perturb(path, a):  # non-trivial running statistics
        r = jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32)
        name = jax.tree_util.keystr(path)
        return a * r if "var" in name else a + (r - 1.0)

    stats = jax.tree_util.tree_map_with_path(perturb, v["batch_stats"])
    return {"params": v["params"], "batch_stats": stats}


def _image(shape, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (np.sin(yy / 5.0) * np.cos(xx / 7.0) + 0.3 * rng.standard_normal(shape)).astype(
        np.float32
    )


_whole = jax.jit(lambda v, x: make_apply_fn(F, L)(v, x, False))


def _whole_image_reference(variables, image, halo):
    """Network on the whole reflect-padded image (top/left pad = halo, bottom/right >= halo up to
    a multiple of 2**L: a different frame from the tiles'), cropped."""
    h, w = image.shape
    m = 2**L
    fh, fw = -(-(h + 2 * halo) // m) * m, -(-(w + 2 * halo) // m) * m
    frame = np.pad(image, ((halo, fh - h - halo), (halo, fw - w - halo)), mode="reflect")
    y = np.asarray(_whole(variables, frame[None, ..., None]))[0, ..., 0]
    return y[halo: halo + h, halo: halo + w]


def test_tile_plan_geometry():
    plan = tile_plan((100, 77), L, TILE)
    assert plan.halo >= receptive_field(L) and (2 * plan.halo) % 2**L == 0
    assert plan.tile == TILE and plan.core == TILE - 2 * plan.halo and plan.core % 2**L == 0
    assert (plan.ny, plan.nx) == (4, 3)
    assert plan.pad[0][0] == plan.halo and plan.pad[0][1] >= plan.halo
    default = tile_plan((1000, 300), L)
    assert default.core == 256 and default.tile % 2**L == 0
    small = tile_plan((20, 13), L)
    assert small.ny == small.nx == 1 and small.core % 2**L == 0


@pytest.mark.parametrize("shape", SIZES)
def test_tiled_equals_whole_image(variables, shape):
    image = _image(shape, seed=sum(shape))
    plan = tile_plan(shape, L, TILE)
    tiled = predict_image(variables, image, tile_size=TILE, batch_tiles=3)
    assert tiled.shape == shape and tiled.dtype == np.float32
    ref = _whole_image_reference(variables, image, plan.halo)
    np.testing.assert_allclose(tiled, ref, atol=1e-5, rtol=0)
    # border rows / columns are real predictions, not zeros
    for edge in (tiled[0], tiled[-1], tiled[:, 0], tiled[:, -1]):
        assert np.all(np.isfinite(edge)) and np.any(edge != 0)
    np.testing.assert_allclose(tiled[0], ref[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(tiled[:, -1], ref[:, -1], atol=1e-5, rtol=0)


def test_default_tile_size_and_explicit_arguments(variables):
    image = _image((70, 45), seed=3)
    a = predict_image(variables, image)  # defaults: apply_model, depth read from variables
    b = predict_image(variables, image, apply_fn=make_apply_fn(F, L), num_layers=L, batch_tiles=1)
    ref = _whole_image_reference(variables, image, tile_plan(image.shape, L).halo)
    np.testing.assert_allclose(a, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(b, ref, atol=1e-5, rtol=0)


def test_one_compile_for_all_image_sizes(variables):
    traces = []

    def counted_apply(v, x, train):
        traces.append(x.shape)
        return apply_model(v, x, train)

    for shape in SIZES:
        out = predict_image(variables, _image(shape), apply_fn=counted_apply, tile_size=TILE)
        assert out.shape == shape
    assert traces == [(8, TILE, TILE, 1)]


def test_make_predict_fn_fixed_batch(variables):
    fn = make_predict_fn(make_apply_fn(F, L), TILE, 2)
    tiles = jnp.asarray(np.stack([_image((TILE, TILE), s) for s in range(2)])[..., None])
    out = fn(variables, tiles)
    assert out.shape == (2, TILE, TILE, 1) and out.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(_whole(variables, tiles)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(37, 50), (20, 20)])
def test_tta_of_identity_is_identity(shape):
    image = _image(shape, seed=7)
    identity = lambda v, x, train: x  # noqa: E731
    affine = lambda v, x, train: 2.0 * x + 1.0  # noqa: E731
    for fn, expect in ((identity, image), (affine, 2.0 * image + 1.0)):
        out = predict_image({}, image, apply_fn=fn, num_layers=L, tile_size=TILE, tta=True)
        np.testing.assert_allclose(out, expect, atol=1e-6, rtol=0)


def test_tta_is_the_mean_over_the_eight_symmetries(variables):
    tiles = np.stack([_image((TILE, TILE), s) for s in range(2)])[..., None]
    plain = make_predict_fn(make_apply_fn(F, L), TILE, 2)
    tta = make_predict_fn(make_apply_fn(F, L), TILE, 2, tta=True)
    # The D4 group written out here with numpy: rotations, and rotations after a flip.
    expect = np.zeros(tiles.shape, np.float64)
    for k in range(4):
        for flip in (False, True):
            view = np.rot90(np.flip(tiles, 2) if flip else tiles, k, axes=(1, 2))
            back = np.rot90(np.asarray(plain(variables, jnp.asarray(view))), -k, axes=(1, 2))
            expect += np.flip(back, 2) if flip else back
    expect /= 8
    out = np.asarray(tta(variables, jnp.asarray(tiles)))
    np.testing.assert_allclose(out, expect, atol=1e-5, rtol=0)
    # the network is not symmetric, so the average is not the plain prediction
    assert np.abs(out - np.asarray(plain(variables, jnp.asarray(tiles)))).max() > 1e-3
    image = _image((30, 41), seed=9)
    whole = predict_image(variables, image, tile_size=TILE, tta=True)
    assert whole.shape == image.shape and whole.dtype == np.float32


def test_errors(variables):
    with pytest.raises(UserInputError):
        predict_image(variables, np.zeros((2, 8, 8), np.float32), tile_size=TILE)
    with pytest.raises(ConfigError, match="tile_size"):
        predict_image(variables, _image((16, 16)), tile_size=82)  # not a multiple of 4
    with pytest.raises(ConfigError, match="tile_size"):
        predict_image(variables, _image((16, 16)), tile_size=48)  # no room for the core
    with pytest.warns(UserWarning, match="receptive field"):
        tile_plan((16, 16), L, TILE, halo=2)


def test_stage_model_final_output_applies_the_posterior_step():
    from autostructn2v_jax import config as config_lib
    from autostructn2v_jax import inference, posterior

    cfg = config_lib.base_config().stage1
    cfg.features, cfg.predict_tile_size = 8, 64
    variables = init_variables(8, 2, 32, 0)
    rng = np.random.default_rng(2)
    plane = rng.standard_normal((64, 80)).astype(np.float32)
    off = inference.StageModel(variables, cfg)
    on = inference.StageModel(variables, cfg, posterior_mean="gaussian")
    raw = off(plane)
    np.testing.assert_array_equal(off.denoise(plane), raw)
    # the noise model comes from the blind residuals (the stage's blind spot hidden, as in training)
    noise = posterior.estimate_noise_pooled([(plane, raw, 1.0, 0.0, on.blind_predictions(plane, seed=0))])
    np.testing.assert_allclose(on.denoise(plane), posterior.posterior_step(plane, raw, noise=noise), rtol=1e-6)
    assert not np.allclose(on.denoise(plane), raw)


def test_blind_predictions_never_see_the_hidden_pixels():
    """At every centre the blind prediction is made with the stage's whole mask hidden: changing
    the values under the mask copies changes nothing, and the centres have the training density."""
    from scipy import ndimage

    from autostructn2v_jax import config as config_lib
    from autostructn2v_jax import inference

    cfg = config_lib.base_config().stage2
    cfg.features, cfg.num_layers, cfg.predict_tile_size, cfg.mask_percentage = 8, 2, 64, 10.0
    kernel = np.zeros((3, 7), bool)
    kernel[1] = True  # a horizontal line of 7
    model = inference.StageModel(init_variables(8, 2, 32, 0), cfg, kernel=kernel)
    plane = np.random.default_rng(5).standard_normal((64, 80)).astype(np.float32)
    pairs = model.blind_predictions(plane, seed=3)
    # about BLIND_FRACTION of the pixels are centres, over passes with different masks
    assert len(pairs) > 1 and not np.array_equal(pairs[0][1], pairs[1][1])
    line = np.ones((1, 7), bool)
    for pred, centres in pairs:
        assert centres.sum() * 7 == pytest.approx(0.10 * plane.size, rel=0.1)  # training density
    pred, centres = pairs[0]
    hidden = ndimage.binary_dilation(centres, structure=line)  # the copies of the mask
    again = model.blind_predictions(np.where(hidden, plane + 10.0, plane), seed=3)[0]
    np.testing.assert_array_equal(again[1], centres)
    np.testing.assert_allclose(again[0][centres], pred[centres], rtol=1e-5, atol=1e-5)
    # a plain prediction does see those pixels
    assert not np.allclose(model(np.where(hidden, plane + 10.0, plane), tta=False)[centres],
                           model(plane, tta=False)[centres], atol=1e-3)
    # a mask that cannot fit the plane gives no blind samples
    assert inference.StageModel(init_variables(8, 2, 32, 0), cfg, kernel=np.ones((1, 31), bool)
                                ).blind_predictions(plane[:8, :16], seed=0) == []


def test_stage_model_pools_one_noise_model_over_all_planes():
    """`denoise_files` (the pipeline and `predict` on in-memory files) gives every plane the
    posterior step with one noise model pooled in raw units, not a model per plane."""
    from autostructn2v_jax import config as config_lib
    from autostructn2v_jax import inference, posterior, preprocess

    cfg = config_lib.base_config().stage1
    cfg.features, cfg.predict_tile_size = 8, 64
    model = inference.StageModel(init_variables(8, 2, 32, 0), cfg, posterior_mean="gaussian")
    rng = np.random.default_rng(3)
    files = [rng.standard_normal((2, 40, 48)).astype(np.float32) * 30 + 500,
             rng.standard_normal((1, 64, 64)).astype(np.float32) * 5 + 10]
    out = model.denoise_files(files)
    pairs = [preprocess.normalize(p) for planes in files for p in planes]
    preds = [model(n) for n, _ in pairs]
    pooled = posterior.estimate_noise_pooled([(n, mu, st["std"], st["mean"], model.blind_predictions(n, seed=i))
                                              for i, ((n, st), mu) in enumerate(zip(pairs, preds))])
    expect = [preprocess.denormalize(posterior.posterior_step(n, mu, noise=pooled.rescaled(st["std"], st["mean"])), st)
              for (n, st), mu in zip(pairs, preds)]
    got = [p for planes in out for p in planes]
    assert [o.shape for o in out] == [f.shape for f in files]
    for g, e in zip(got, expect):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-3)
    # a plane's own model would differ (the planes' noise differs in raw units here)
    own = preprocess.denormalize(posterior.posterior_step(pairs[2][0], preds[2]), pairs[2][1])
    assert not np.allclose(own, got[2], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(model.denoise_planes(files[0]), model.denoise_files([files[0]])[0])
    # a constant plane cannot join the pool and keeps its own estimate (its value comes back)
    flat_file = np.full((1, 40, 48), 7.0, np.float32)
    np.testing.assert_allclose(model.denoise_files([files[0], flat_file])[1], flat_file, rtol=1e-6)


def test_n2v2_network_tiles_exactly_with_its_own_receptive_field():
    """Blur-pool reaches one pixel further per pooling level: the halo from
    ``receptive_field(L, "blur", False)`` keeps tiled prediction equal to the whole frame."""
    v = init_variables(F, L, 32, 6, top_skip=False)
    apply = make_apply_fn(F, L, "auto", "blur", False)
    halo = receptive_field(L, "blur", False)
    image = _image((100, 77), seed=4)
    plan = tile_plan(image.shape, L, 84, halo)
    tiled = predict_image(v, image, apply_fn=apply, num_layers=L, tile_size=84, halo=halo, batch_tiles=4)
    h, w = image.shape
    m = 2**L
    fh, fw = -(-(h + 2 * plan.halo) // m) * m, -(-(w + 2 * plan.halo) // m) * m
    frame = np.pad(image, ((plan.halo, fh - h - plan.halo), (plan.halo, fw - w - plan.halo)), mode="reflect")
    whole = np.asarray(jax.jit(lambda x: apply(v, x, False))(frame[None, ..., None]))[0, ..., 0]
    np.testing.assert_allclose(tiled, whole[plan.halo:plan.halo + h, plan.halo:plan.halo + w], atol=1e-5, rtol=0)


def test_tta_follows_the_config_and_the_training():
    """`tta=auto` averages the 8 symmetries only for a stage trained with them."""
    from autostructn2v_jax import config as config_lib, inference

    cfg = config_lib.base_config()
    assert inference.uses_tta(cfg, cfg.stage1)
    cfg.stage1.use_augmentation = False
    assert not inference.uses_tta(cfg, cfg.stage1)
    cfg.tta = "on"
    assert inference.uses_tta(cfg, cfg.stage1)
    cfg.tta = "off"
    assert not inference.uses_tta(cfg, cfg.stage2)


def test_structured_stage_posterior_uses_the_noise_correlation_over_its_mask():
    """With `posterior_correlated`, a stage-2 model (a structural mask) finishes with the joint
    posterior step: the noise correlation estimated over its mask, pooled; a one-pixel blind spot
    keeps the per-pixel step."""
    from autostructn2v_jax import config as config_lib
    from autostructn2v_jax import inference, posterior

    cfg = config_lib.base_config().stage2
    cfg.features, cfg.num_layers, cfg.predict_tile_size = 8, 2, 64
    kernel = np.ones((1, 7), bool)
    variables = init_variables(8, 2, 32, 0)
    model = inference.StageModel(variables, cfg, posterior_mean="gaussian", kernel=kernel,
                                 posterior_correlated=True)
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 84))
    plane = (w[:, :80] + w[:, 1:81] + w[:, 2:82]).astype(np.float32)  # correlated along x
    raw = model(plane)
    rho = posterior.estimate_correlation([(plane, raw, 1.0)], kernel)
    assert rho.shape == (1, 7) and rho[0, 2] > 0.2  # the x-correlation is seen
    noise = posterior.estimate_noise_pooled([(plane, raw, 1.0, 0.0, model.blind_predictions(plane, seed=0))])
    want = posterior.posterior_step(plane, raw, noise=noise, correlation=rho)
    np.testing.assert_allclose(model.denoise(plane), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want, posterior.posterior_step(plane, raw, noise=noise), atol=1e-3)
    # opt-in (config `posterior_correlated`), and never for a one-pixel blind spot
    for other in (inference.StageModel(variables, cfg, posterior_mean="gaussian", kernel=kernel),
                  inference.StageModel(variables, cfg, posterior_mean="gaussian", posterior_correlated=True)):
        assert other.noise_correlation([(plane, raw, {"std": 1.0})], [True]) is None
