"""U-Net model: shapes, init, batch stats, fast ops == stock ops, receptive field, training."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from autostructn2v_jax import models as models_mod
from autostructn2v_jax.errors import ConfigError
from autostructn2v_jax.models import (
    CONV_IMPLS,
    ReflectConv3x3,
    UNet,
    UpConv2x2,
    apply_model,
    architecture,
    check_patch_size,
    count_params,
    init_variables,
    make_apply_fn,
    max_pool_2x2,
    blur_pool_2x2,
    has_top_skip,
    count_params,
    receptive_field,
    reflect_conv3x3,
    resolve_conv_impl,
    conv3x3_flops,
    EDGES_MIN_FLOPS,
)

F, L = 8, 2

# jitted once per (shape, train): eager Flax dispatch is slow on CPU
fwd = jax.jit(apply_model, static_argnums=2)


@pytest.fixture(scope="module")
def variables():
    return init_variables(F, L, 32, 0)


def _rand(seed, shape):
    # numpy, not jax.random: each jax.random shape would be one more (slow) compile
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_output_shape_dtype_nhwc(variables):
    x = _rand(1, (2, 32, 48, 1))
    y = fwd(variables, x, False)
    assert y.shape == (2, 32, 48, 1) and y.dtype == jnp.float32
    y2, stats = fwd(variables, x, True)
    assert y2.shape == (2, 32, 48, 1) and y2.dtype == jnp.float32
    assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(
        variables["batch_stats"]
    )
    assert architecture(variables) == (F, L)
    assert make_apply_fn(F, L) is make_apply_fn(F, L)
    np.testing.assert_allclose(
        np.asarray(jax.jit(make_apply_fn(F, L), static_argnums=2)(variables, x, False)), y,
        atol=1e-6)


def test_variables_are_plain_dicts_and_param_count(variables):
    assert type(variables) is dict and set(variables) == {"params", "batch_stats"}
    assert type(variables["params"]) is dict and type(variables["params"]["enc_0"]) is dict
    n = sum(a.size for a in jax.tree_util.tree_leaves(variables["params"]))
    assert count_params(variables) == n > 0
    for leaf in jax.tree_util.tree_leaves(variables):
        assert leaf.dtype == jnp.float32


@pytest.mark.parametrize("bad", [30, 4, 0, -8, 33, "32", 32.0, True, None])
def test_check_patch_size_errors(bad):
    with pytest.raises(ConfigError) as err:
        check_patch_size(bad, 2, key="stage2.patch_size")
    assert "stage2.patch_size" in str(err.value)


def test_check_patch_size_ok_and_init_validates():
    check_patch_size(32, 2)
    check_patch_size(8, 2)
    check_patch_size(np.int64(64), 3)
    with pytest.raises(ConfigError, match="stage1.patch_size"):
        init_variables(F, L, 30, 0)


def test_init_deterministic_by_seed(variables):
    same = init_variables(F, L, 64, 0)
    other = init_variables(F, L, 32, 1)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(same)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    diffs = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(
            jax.tree_util.tree_leaves(variables["params"]),
            jax.tree_util.tree_leaves(other["params"]),
        )
    ]
    assert any(diffs)
    # a jax key works too
    keyed = init_variables(F, L, 32, jax.random.key(3, impl="rbg"))
    assert count_params(keyed) == count_params(variables)


def test_train_mode_updates_batch_stats_eval_mode_uses_them(variables):
    x = 3.0 + 2.0 * _rand(2, (4, 16, 16, 1))
    _, stats = fwd(variables, x, True)
    old = variables["batch_stats"]["enc_0"]["BatchNorm_0"]
    new = stats["enc_0"]["BatchNorm_0"]
    assert not np.allclose(np.asarray(old["mean"]), np.asarray(new["mean"]))
    assert not np.allclose(np.asarray(old["var"]), np.asarray(new["var"]))
    # eval mode: each sample independent of the rest of the batch (running averages)
    v2 = {"params": variables["params"], "batch_stats": stats}
    y_all = fwd(v2, x, False)
    y_one = fwd(v2, x[1:2], False)
    np.testing.assert_allclose(np.asarray(y_all[1:2]), np.asarray(y_one), atol=1e-5)
    # train mode: batch statistics, so the result depends on the batch
    y_tr_all, _ = fwd(v2, x, True)
    y_tr_one, _ = fwd(v2, x[1:2], True)
    assert not np.allclose(np.asarray(y_tr_all[1:2]), np.asarray(y_tr_one), atol=1e-4)


def _upconv_reference_kernel(dense_kernel, c_out):
    c_in = dense_kernel.shape[0]
    k = dense_kernel.reshape(c_in, 2, 2, c_out)
    return jnp.transpose(k, (1, 2, 0, 3))[::-1, ::-1]  # HWIO, spatially flipped


def test_fast_upconv_equals_transposed_conv():
    x = _rand(4, (2, 5, 7, 6))
    mod = UpConv2x2(3)
    v = mod.init(jax.random.key(0), x)
    v = jax.tree_util.tree_map(lambda a: a + 0.1 * _rand(9, a.shape), v)  # non-zero bias
    bias = v["params"]["bias"]

    def fast(x, kernel, bias):
        return mod.apply({"params": {"kernel": kernel, "bias": bias}}, x)

    def lax_ref(x, kernel, bias):
        w = _upconv_reference_kernel(kernel, 3)
        dn = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_transpose(x, w, (2, 2), "VALID", dimension_numbers=dn) + bias

    stock = nn.ConvTranspose(3, (2, 2), strides=(2, 2), padding="VALID")

    def flax_ref(x, kernel, bias):
        w = _upconv_reference_kernel(kernel, 3)
        return stock.apply({"params": {"kernel": w, "bias": bias}}, x)

    y = fast(x, v["params"]["kernel"], bias)
    assert y.shape == (2, 10, 14, 3)
    g = _rand(5, y.shape)
    for ref in (lax_ref, flax_ref):
        np.testing.assert_allclose(
            np.asarray(y), np.asarray(ref(x, v["params"]["kernel"], bias)), atol=1e-5
        )
        grads_fast = jax.grad(lambda *a: jnp.sum(fast(*a) * g), argnums=(0, 1, 2))(
            x, v["params"]["kernel"], bias)
        grads_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * g), argnums=(0, 1, 2))(
            x, v["params"]["kernel"], bias)
        for a, b in zip(grads_fast, grads_ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_fast_maxpool_equals_flax_max_pool():
    x = _rand(6, (3, 8, 12, 5))
    ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))  # noqa: E731
    np.testing.assert_array_equal(np.asarray(max_pool_2x2(x)), np.asarray(ref(x)))
    g = _rand(7, (3, 4, 6, 5))
    ga = jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * g))(x)
    gb = jax.grad(lambda x: jnp.sum(ref(x) * g))(x)
    np.testing.assert_array_equal(np.asarray(ga), np.asarray(gb))


def test_maxpool_gradient_on_ties_goes_to_one_element():
    """Windows full of ties (ReLU zeros, flat images): the whole gradient goes to one element, as
    in flax, and is never NaN (autodiff's ``x == max`` count can be 0 when XLA recomputes ``x``)."""
    x = jnp.round(_rand(9, (2, 6, 8, 3)) * 2.0)  # few distinct values: many tied windows
    g = _rand(10, (2, 3, 4, 3))
    ga = jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * g))(x)
    gb = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), strides=(2, 2)) * g))(x)
    np.testing.assert_array_equal(np.asarray(ga), np.asarray(gb))
    flat = jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * g))(jnp.zeros((2, 6, 8, 3)))
    per_window = np.asarray(flat).reshape(2, 3, 2, 4, 2, 3)
    np.testing.assert_array_equal((per_window != 0).sum(axis=(2, 4)), 1)
    np.testing.assert_allclose(per_window.sum(axis=(2, 4)), np.asarray(g), rtol=1e-6)


def test_fast_network_equals_stock_network():
    feats, depth = 4, 2
    x = _rand(8, (2, 16, 24, 1))
    fast = UNet(feats, depth)
    v = jax.jit(lambda k: fast.init(k, x, train=False))(jax.random.key(1, impl="rbg"))
    params = dict(v["params"])
    stock_params = dict(params)
    for level in range(depth):
        up = params[f"up_{level}"]
        c_out = up["bias"].shape[0]
        stock_params[f"up_{level}"] = {
            "kernel": _upconv_reference_kernel(up["kernel"], c_out), "bias": up["bias"]}
    stock = UNet(feats, depth, fast_ops=False)

    @jax.jit
    def both(v, stock_params, x):  # train mode (batch statistics): the same ops as eval mode
        a, _ = fast.apply(v, x, train=True, mutable=["batch_stats"])
        b, _ = stock.apply({"params": stock_params, "batch_stats": v["batch_stats"]}, x,
                           train=True, mutable=["batch_stats"])
        return a, b

    a, b = both(v, stock_params, x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("depth,pool,top_skip", [(1, "max", True), (2, "max", True),
                                                 (1, "blur", True), (2, "blur", False)])
def test_receptive_field_empirical(depth, pool, top_skip):
    feats, size = 4, 64
    v = init_variables(feats, depth, size, 11, top_skip=top_skip)
    # non-trivial running statistics (small: a larger shift of the means switches off every ReLU of
    # the deep path, and the network without a top skip would then give a constant)
    v = {
        "params": v["params"],
        "batch_stats": jax.tree_util.tree_map(
            lambda a: a + 0.02 * jnp.abs(_rand(3, a.shape)), v["batch_stats"]),
    }
    apply = make_apply_fn(feats, depth, "auto", pool, top_skip)
    m = 2**depth
    base = _rand(12, (1, size, size, 1))
    xs, centres = [base], []
    for phase in range(m):  # every phase of the pooling grid
        c = size // 2 - m + phase
        centres.append(c)
        xs.append(base.at[0, c, c, 0].add(5.0))
    # Each input in its own call of the same shape: XLA:CPU may order accumulations differently
    # at different batch positions (last-bit differences on AMD Zen), which is not a dependency.
    fwd = jax.jit(lambda x: apply(v, x, False))
    y = np.stack([np.asarray(fwd(x))[0] for x in xs])
    rf = receptive_field(depth, pool, top_skip)
    yy, xx = np.mgrid[:size, :size]
    reach = 0
    for i, c in enumerate(centres):
        changed = y[i + 1, ..., 0] != y[0, ..., 0]  # same call shape: exact comparison is valid
        dist = np.maximum(np.abs(yy - c), np.abs(xx - c))
        assert changed.any()
        assert not changed[dist > rf].any(), "output changed beyond the receptive field"
        reach = max(reach, int(dist[changed].max()))
    assert reach == rf, (reach, rf)  # the bound is tight


def test_receptive_field_values():
    assert [receptive_field(n) for n in range(4)] == [2, 9, 23, 51]
    assert [receptive_field(n, "blur") for n in range(4)] == [2, 10, 26, 58]
    assert receptive_field(2, "blur", False) == receptive_field(2, "blur")  # the deep path reaches further


def test_blur_pool_matches_a_direct_numpy_reference():
    x = np.asarray(_rand(13, (2, 8, 12, 3)))
    m = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge")
    m = np.maximum(np.maximum(m[:, :-1, :-1], m[:, 1:, :-1]), np.maximum(m[:, :-1, 1:], m[:, 1:, 1:]))
    m = np.pad(m, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    taps = np.array([0.25, 0.5, 0.25])
    blurred = sum(taps[i] * taps[j] * m[:, i:i + 8, j:j + 12] for i in range(3) for j in range(3))
    ref = blurred[:, ::2, ::2]
    out = np.asarray(blur_pool_2x2(jnp.asarray(x)))
    assert out.shape == (2, 4, 6, 3)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    g = jax.grad(lambda x: jnp.sum(blur_pool_2x2(x) ** 2))(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(g)))


def test_n2v2_network_has_no_top_skip_and_is_detected():
    with_skip = init_variables(4, 2, 16, 0)
    without = init_variables(4, 2, 16, 0, top_skip=False)
    assert has_top_skip(with_skip) and not has_top_skip(without)
    assert without["params"]["dec_0"]["Conv_0"]["kernel"].shape[2] == 4
    assert count_params(without) < count_params(with_skip)
    x = _rand(14, (1, 16, 16, 1))
    y = jax.jit(lambda v, x: apply_model(v, x, False, "blur"))(without, x)
    assert y.shape == x.shape and np.all(np.isfinite(np.asarray(y)))
    with pytest.raises(ConfigError, match="model.pool"):
        make_apply_fn(4, 2, "auto", "average")


def test_gradient_step_reduces_loss():
    # depth 1: every block kind is wired, and the step compiles in half the time of depth 2
    variables = init_variables(F, 1, 16, 0)
    apply = make_apply_fn(F, 1)
    x = _rand(20, (4, 16, 16, 1))
    target = 0.5 * x

    def loss_fn(params, stats):
        y, new_stats = apply({"params": params, "batch_stats": stats}, x, True)
        return jnp.mean((y - target) ** 2), new_stats

    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, stats, opt_state):
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    params, stats = variables["params"], variables["batch_stats"]
    opt_state = opt.init(params)
    losses = []
    for _ in range(8):
        params, stats, opt_state, loss = step(params, stats, opt_state)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0], losses


# ------------------------------------------------------------------ 3x3 convolution implementations


def _reflect_conv_reference(x, kernel):
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    return jax.lax.conv_general_dilated(xp, kernel, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("impl", ["xla", "edges"])
@pytest.mark.parametrize("shape", [(1, 5, 7, 3, 4), (2, 2, 2, 1, 5), (3, 3, 6, 4, 2), (1, 9, 4, 16, 8)])
def test_reflect_conv_equals_lax_conv_on_reflect_padded_input(impl, shape):
    b, h, w, c, o = shape
    x, kernel, g = _rand(30, (b, h, w, c)), _rand(31, (3, 3, c, o)), _rand(32, (b, h, w, o))

    def fwd_and_grads(fn):
        y, vjp = jax.vjp(fn, x, kernel)
        return (y, *vjp(g))

    got = jax.jit(lambda: fwd_and_grads(lambda x, k: reflect_conv3x3(x, k, impl)))()
    ref = jax.jit(lambda: fwd_and_grads(_reflect_conv_reference))()
    for name, a, r in zip(("output", "input gradient", "kernel gradient"), got, ref):
        assert a.shape == r.shape, name
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=0, atol=2e-6 * max(scale, 1.0),
                                   err_msg=name)


@pytest.mark.parametrize("shape", [(1, 2, 2, 1), (2, 5, 7, 3)])
def test_reflect_pad_forms_equal_numpy_reflect(shape):
    # both paddings (gathers on CPU, jnp.pad's slices elsewhere) run here, values and gradients
    x, g = _rand(40, shape), _rand(41, (shape[0], shape[1] + 2, shape[2] + 2, shape[3]))
    ref = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    grads = []
    for pad in (models_mod._reflect_pad1_take, models_mod._reflect_pad1_slices):
        y, vjp = jax.vjp(jax.jit(pad), x)
        np.testing.assert_array_equal(np.asarray(y), ref)
        grads.append(np.asarray(vjp(g)[0]))
    np.testing.assert_allclose(grads[0], grads[1], atol=1e-6)


def test_reflect_conv_edges_sees_the_reflected_border():
    # A pixel in row 1 is copied into the ring above row 0: moving it changes output row 0
    # through the ring too (a zero-padded convolution would not see that copy).
    x = jnp.zeros((1, 4, 4, 1)).at[0, 1, 2, 0].set(1.0)
    kernel = jnp.zeros((3, 3, 1, 1)).at[0, 1, 0, 0].set(1.0)  # output(i, j) = padded(i - 1, j)
    y = np.asarray(reflect_conv3x3(x, kernel, "edges"))[0, ..., 0]
    assert y[0, 2] == 1.0 and y[2, 2] == 1.0 and y.sum() == 2.0


def test_conv_impl_resolution_and_validation():
    assert set(CONV_IMPLS) == {"auto", "xla", "edges"}
    assert resolve_conv_impl("auto") == ("edges" if jax.default_backend() == "cpu" else "xla")
    assert resolve_conv_impl("xla") == "xla"
    # per layer on CPU: the custom convolution only where the work pays for its compile time
    cpu = jax.default_backend() == "cpu"
    big = conv3x3_flops((16, 64, 64, 16), 16)  # a features-16 level-0 layer, batch 16, patch 64
    small = conv3x3_flops((8, 32, 32, 8), 8)  # the test suite's features-8 networks
    assert small < EDGES_MIN_FLOPS <= big
    assert resolve_conv_impl("auto", big) == ("edges" if cpu else "xla")
    assert resolve_conv_impl("auto", small) == "xla"
    assert resolve_conv_impl("edges", small) == "edges" and resolve_conv_impl("xla", big) == "xla"
    with pytest.raises(ValueError, match="conv_impl"):
        resolve_conv_impl("fast")
    with pytest.raises(ValueError, match="conv_impl"):
        make_apply_fn(F, L, "nope")


def test_reflect_conv_module_declares_nn_conv_parameters():
    x = _rand(33, (1, 6, 6, 3))
    key = jax.random.key(4)
    ours = ReflectConv3x3(5).init(key, x)
    stock = nn.Conv(5, (3, 3), padding="VALID", use_bias=False).init(key, x)
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(stock)
    np.testing.assert_array_equal(np.asarray(ours["params"]["kernel"]),
                                  np.asarray(stock["params"]["kernel"]))


def test_unet_conv_impls_same_params_outputs_and_gradients():
    # depth 1 wires every kind of block (encoder, bottleneck, up-convolution, skip, decoder) with 6
    # convolutions instead of 10: the custom convolution's compile time is per layer, and each
    # layer's map and gradients are checked against XLA's in test_reflect_conv_* above
    feats, depth = 4, 1
    x = _rand(34, (2, 16, 24, 1))
    target = _rand(35, (2, 16, 24, 1))
    models = {impl: UNet(feats, depth, conv_impl=impl) for impl in ("xla", "edges")}
    # The same parameter tree (names, shapes, dtypes; traced, not compiled: Flax's init compiles
    # slowly), so the same initial values and checkpoints.
    shapes = {impl: jax.eval_shape(lambda k, m=m: m.init(k, x, train=False), jax.random.key(2, impl="rbg"))
              for impl, m in models.items()}
    assert jax.tree_util.tree_structure(shapes["xla"]) == jax.tree_util.tree_structure(shapes["edges"])
    assert jax.tree_util.tree_leaves(shapes["xla"]) == jax.tree_util.tree_leaves(shapes["edges"])
    v = init_variables(feats, depth, 16, 2)
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(
        {"params": shapes["xla"]["params"], "batch_stats": shapes["xla"]["batch_stats"]})

    def loss_and_grads(impl):
        def loss(params, x):
            y, _ = models[impl].apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                      train=True, mutable=["batch_stats"])
            return jnp.mean((y - target) ** 2), y
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(v["params"], x)

    (la, ya), ga = loss_and_grads("xla")
    (lb, yb), gb = loss_and_grads("edges")
    np.testing.assert_allclose(np.asarray(ya), np.asarray(yb), atol=1e-5)
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        scale = max(float(jnp.max(jnp.abs(a))), 1e-3)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4 * scale)
