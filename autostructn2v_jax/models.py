"""Flax (Linen) U-Net used functionally. The only module of the package that imports flax.

Public API
----------
* ``UNet(features, num_layers)``: the Linen module, ``__call__(x, train)`` with NHWC
  ``(B, H, W, 1)`` float32 in and out. ``H`` and ``W`` must be divisible by ``2**num_layers``
  and the bottleneck must be at least 2 pixels wide (reflect padding).
* ``check_patch_size(patch_size, num_layers, key)``: raises :class:`ConfigError` for a bad size.
* ``init_variables(features, num_layers, patch_size, seed_or_key) -> {'params', 'batch_stats'}``.
* ``apply_model(variables, x, train)``: module-level pure function. The architecture
  (``features``, ``num_layers``) is read from the *structure and shapes* of ``variables`` (static
  under ``jit``), so nothing besides the variables has to travel with a checkpoint.
  ``train=True`` -> ``(y, new_batch_stats)`` (batch statistics, updated running averages);
  ``train=False`` -> ``y`` (running averages).
* ``make_apply_fn(features, num_layers, conv_impl="auto") -> apply(variables, x, train)``: the same
  pure function with the architecture fixed explicitly (cached: the same arguments give the same
  function object, so ``jit`` caches keyed on it are shared).
* ``reflect_conv3x3(x, kernel, impl="auto")``: the network's 3x3 convolution (reflect padding 1,
  no bias), ``impl`` one of :data:`CONV_IMPLS`; ``resolve_conv_impl(impl, flops)`` says what
  ``"auto"`` means on the current backend for a layer of that size.
* ``architecture(variables) -> (features, num_layers)``.
* ``receptive_field(num_layers) -> int``: exact receptive-field radius in input pixels.
* ``count_params(variables) -> int``: number of trainable parameters.

Architecture
------------
Encoder level ``l = 0..L-1``: ``(reflect-pad 1, conv3x3 VALID, BatchNorm, ReLU) x 2`` with
``features * 2**l`` channels, then a 2x2 max-pool; bottleneck block with ``features * 2**L``
channels; decoder level ``l = L-1..0``: 2x2 stride-2 up-convolution to ``features * 2**l``
channels, concatenation with the encoder output of that level, block; final 1x1 conv to 1 channel.

For speed on CPU the up-convolution is a Dense layer ``C_in -> 4*C_out`` followed by
depth-to-space, and the max-pool is a reshape + max over the 2x2 axes. These are mathematically the
same maps as a stride-2 2x2 transposed convolution and ``nn.max_pool(x, (2, 2), (2, 2))``
(tests/test_models.py checks outputs and gradients) but their gradients are much cheaper than the
stock ``nn.ConvTranspose`` / ``nn.max_pool`` ones. ``UNet(..., fast_ops=False)`` builds the network
with the stock ops instead (for tests and benchmarks only; its parameter tree differs).

The 3x3 convolution on the reflect-padded input has two implementations with the same parameters
(``Conv_0/kernel``, HWIO, as ``nn.Conv`` declares it) and the same values up to float rounding:

* ``"xla"``: ``lax.conv_general_dilated`` VALID on the reflect-padded input (what ``nn.Conv`` does).
* ``"edges"``: a zero-padded SAME convolution of the unpadded input plus the reflect ring's
  contribution, which only reaches the four border rows/columns of the output and is computed as
  four thin 3-tap 1-D correlations added in place. XLA:CPU runs SAME convolutions (input and output
  of the same size) and their gradients several times faster than VALID ones on a padded input.
  A ``jax.custom_vjp`` keeps the backward pass in the same form (SAME convolution transposes plus
  thin strips) instead of the full-size padded gradients that plain autodiff produces.

``conv_impl="auto"`` picks, per layer and at trace time (shapes are static), ``"edges"`` on CPU
for layers of at least :data:`EDGES_MIN_FLOPS` forward FLOPs and ``"xla"`` for smaller ones and on
every other backend (see docs/benchmarks.md).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .errors import ConfigError

__all__ = [
    "CONV_IMPLS",
    "ReflectConv3x3",
    "reflect_conv3x3",
    "resolve_conv_impl",
    "conv3x3_flops",
    "EDGES_MIN_FLOPS",
    "UNet",
    "UpConv2x2",
    "max_pool_2x2",
    "blur_pool_2x2",
    "pool_2x2",
    "POOLS",
    "has_top_skip",
    "check_patch_size",
    "init_variables",
    "apply_model",
    "make_apply_fn",
    "architecture",
    "receptive_field",
    "count_params",
]

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


# --------------------------------------------------------------------------------------------
# Fast building blocks
# --------------------------------------------------------------------------------------------
@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 stride-2 max-pool of NHWC ``x`` (H, W even) as reshape + max.

    Same values and gradients as ``flax.linen.max_pool(x, (2, 2), strides=(2, 2))``: the gradient
    goes to one maximal element of each window, the first in row-major order. The backward pass
    selects exactly one element per window even if no element compares equal to the maximum (the
    last one then gets it). Autodiff's rule instead divides by the number of matches: when XLA
    recomputes ``x`` in another fusion with different rounding (seen at LLVM opt level 0) there are
    none and the gradient is 0 / 0 = NaN. Written with compares and selects on the unpermuted
    layout, it is also 2-3x faster than autodiff's (docs/benchmarks.md).
    """
    b, h, w, c = x.shape
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def _max_pool_fwd(x):
    return max_pool_2x2(x), x


def _max_pool_bwd(x, g):
    b, h, w, c = x.shape
    win = x.reshape(b, h // 2, 2, w // 2, 2, c)
    eq = win == jnp.max(win, axis=(2, 4), keepdims=True)
    e00, e01, e10 = eq[:, :, 0:1, :, 0:1], eq[:, :, 0:1, :, 1:2], eq[:, :, 1:2, :, 0:1]
    first = jnp.concatenate([jnp.concatenate([e00, e01 & ~e00], axis=4),
                             jnp.concatenate([e10 & ~(e00 | e01), ~(e00 | e01 | e10)], axis=4)], axis=2)
    return (jnp.where(first, g[:, :, None, :, None, :], 0.0).reshape(b, h, w, c).astype(x.dtype),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def _blur_half(m: jax.Array, axis: int) -> jax.Array:
    """``[1, 2, 1] / 4`` blur along ``axis`` (reflect padding) kept at the even positions."""
    n = m.shape[axis]
    even = jax.lax.slice_in_dim(m, 0, n, 2, axis)
    odd = jax.lax.slice_in_dim(m, 1, n, 2, axis)  # odd[k] = m[2k + 1]
    first = jax.lax.slice_in_dim(odd, 0, 1, axis=axis)  # reflect: m[-1] = m[1]
    before = jnp.concatenate([first, jax.lax.slice_in_dim(odd, 0, n // 2 - 1, axis=axis)], axis)
    return 0.25 * before + 0.5 * even + 0.25 * odd


def _max_next(x: jax.Array, axis: int) -> jax.Array:
    """``max(x[i], x[i + 1])`` along ``axis``; the last position keeps ``x[-1]`` (edge padding)."""
    n = x.shape[axis]
    nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis),
                           jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis)
    return jnp.maximum(x, nxt)


def blur_pool_2x2(x: jax.Array) -> jax.Array:
    """N2V2's max-blur-pool of NHWC ``x`` (H, W even): a 2x2 max with stride 1, then a separable
    ``[1, 2, 1] / 4`` blur sampled with stride 2 -> ``(B, H/2, W/2, C)``.

    Höck et al. (2022) replace the U-Net's max-pools with it to remove the checkerboard artefacts
    of plain N2V (a stride-2 max aliases). Output pixel ``k`` sees input pixels ``2k-1 .. 2k+2``
    per axis (max-pool: ``2k .. 2k+1``); :func:`receptive_field` accounts for it. Written with
    slices and adds only, so its gradient is as cheap as the forward.
    """
    m = _max_next(_max_next(x, 1), 2)
    return _blur_half(_blur_half(m, 1), 2)


POOLS = ("max", "blur")


def pool_2x2(x: jax.Array, pool: str) -> jax.Array:
    """The U-Net's down-sampling: ``"max"`` (:func:`max_pool_2x2`) or ``"blur"`` (N2V2)."""
    if pool == "max":
        return max_pool_2x2(x)
    if pool == "blur":
        return blur_pool_2x2(x)
    raise ConfigError("model.pool", f"must be one of {POOLS}, got {pool!r}")


def depth_to_space_2x2(y: jax.Array, features: int) -> jax.Array:
    """``(B, H, W, 2*2*C)`` laid out as ``(dy, dx, c)`` -> ``(B, 2H, 2W, C)``."""
    b, h, w, _ = y.shape
    y = y.reshape(b, h, w, 2, 2, features)
    y = jnp.transpose(y, (0, 1, 3, 2, 4, 5))
    return y.reshape(b, 2 * h, 2 * w, features)


class UpConv2x2(nn.Module):
    """2x2 stride-2 transposed convolution written as Dense (C_in -> 4*C_out) + depth-to-space.

    Output pixel ``(2i + dy, 2j + dx)`` is ``x[i, j] @ K[:, dy, dx, :] + b`` where ``K`` is the
    Dense kernel reshaped to ``(C_in, 2, 2, C_out)``. Equivalent to
    ``jax.lax.conv_transpose(x, W, (2, 2), 'VALID')`` and to
    ``nn.ConvTranspose(C_out, (2, 2), strides=(2, 2), padding='VALID')`` with the HWIO kernel
    ``W[dy, dx, ci, co] = K[ci, 1 - dy, 1 - dx, co]`` (spatially flipped; see tests).
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (in_features, 4 * self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        y = jnp.dot(x, kernel.astype(x.dtype))
        return depth_to_space_2x2(y, self.features) + bias.astype(x.dtype)


def _reflect_pad1_slices(x: jax.Array) -> jax.Array:
    """Reflect padding by 1 pixel of NHWC ``x`` as ``jnp.pad`` writes it (slices + concatenate)."""
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")


def _reflect_pad1_take(x: jax.Array) -> jax.Array:
    """The same padding as two gathers with constant indices (``1, 0..n-1, n-2`` per axis).

    XLA:CPU compiles the slice-and-concatenate fusion of ``jnp.pad`` slowly: about 80 ms of LLVM
    time per padded layer, most of a small network's compile (docs/benchmarks.md, "Test suite
    time"). The gathers compile in a fraction of that; the values are the same copies.
    """
    h, w = x.shape[1:3]
    rows = np.concatenate([[1], np.arange(h), [h - 2]])
    cols = np.concatenate([[1], np.arange(w), [w - 2]])
    return jnp.take(jnp.take(x, rows, axis=1, mode="clip"), cols, axis=2,
                    mode="clip")


def _reflect_pad1(x: jax.Array) -> jax.Array:
    """Reflect padding by 1 pixel: gathers on CPU (compile time), ``jnp.pad`` elsewhere."""
    if jax.default_backend() == "cpu":
        return _reflect_pad1_take(x)
    return _reflect_pad1_slices(x)


CONV_IMPLS = ("auto", "xla", "edges")
_DIMS = ("NHWC", "HWIO", "NHWC")


# ``"auto"`` on CPU uses ``"edges"`` for a layer only from this much forward work (FLOPs): below it
# XLA's own convolution runs as fast (measured: a features-8/16 network on 32-pixel patches) and
# compiles 2-3x faster (about 5 s against 13 s for a whole train step), so small networks, short
# runs and the test suite do not pay the custom convolution's compile time for nothing
# (docs/benchmarks.md, "Which convolution per layer").
EDGES_MIN_FLOPS = 1e8


def conv3x3_flops(x_shape: tuple, features: int) -> float:
    """Forward FLOPs of one 3x3 convolution of an NHWC input of ``x_shape`` to ``features``."""
    b, h, w, c = (int(v) for v in x_shape)
    return 2.0 * 9 * b * h * w * c * int(features)


def resolve_conv_impl(impl: str = "auto", flops: float | None = None) -> str:
    """``"xla"`` or ``"edges"``: what ``impl`` means on the default backend for a layer of
    ``flops`` forward work (``"auto"``: edges on CPU when ``flops`` is unknown or at least
    :data:`EDGES_MIN_FLOPS`, xla otherwise and on every other backend)."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "xla"
        return "edges" if flops is None or flops >= EDGES_MIN_FLOPS else "xla"
    return impl


def _taps_1d(v: jax.Array, taps: jax.Array) -> jax.Array:
    """``v (B, L + 2, C)``, ``taps (3, C, O)`` -> ``(B, L, O)``: 3-tap correlation along axis 1."""
    n = v.shape[1] - 2
    return sum(jnp.einsum("blc,co->blo", v[:, k:k + n], taps[k]) for k in range(3))


def _conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DIMS)


def _ring_sources(x: jax.Array) -> tuple:
    """The input rows/columns that the reflect ring copies: rows 1, H-2 and columns 1, W-2."""
    h, w = x.shape[1:3]
    return x[:, 1], x[:, h - 2], x[:, :, 1], x[:, :, w - 2]


def _ring_terms(sources: tuple, kernel: jax.Array) -> tuple:
    """The reflect ring's contribution to output rows 0, H-1 (``(B, W, O)`` each) and columns
    0, W-1 (``(B, H, O)`` each).

    A 3x3 window sees the ring only there: the top ring row (input row 1 reflect-padded along W,
    corners included) through kernel row 0, the bottom one (row H-2) through kernel row 2, and the
    left/right ring columns (input columns 1, W-2; corners excluded, the rows count them) through
    kernel columns 0 and 2.
    """
    row_1, row_h2, col_1, col_w2 = sources
    w = row_1.shape[1]

    def ring_row(row):
        return jnp.concatenate([row[:, 1:2], row, row[:, w - 2:w - 1]], axis=1)

    def ring_col(col):
        return jnp.pad(col, ((0, 0), (1, 1), (0, 0)))

    return (_taps_1d(ring_row(row_1), kernel[0]), _taps_1d(ring_row(row_h2), kernel[2]),
            _taps_1d(ring_col(col_1), kernel[:, 0]), _taps_1d(ring_col(col_w2), kernel[:, 2]))


def _add_strips(y: jax.Array, strips: tuple, rows: tuple, cols: tuple) -> jax.Array:
    """``y`` with ``strips`` (two rows, two columns) added at ``rows`` / ``cols``, in place."""
    for strip, r in zip(strips[:2], rows):
        y = jax.lax.dynamic_update_slice_in_dim(y, y[:, r:r + 1] + strip[:, None], r, axis=1)
    for strip, c in zip(strips[2:], cols):
        y = jax.lax.dynamic_update_slice_in_dim(y, y[:, :, c:c + 1] + strip[:, :, None], c, axis=2)
    return y


@jax.custom_vjp
def _conv3x3_edges(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Reflect-padded 3x3 convolution as a SAME (zero padding) one + the reflect ring's part.

    The padded input is the zero-padded ``x`` plus a ring holding the reflected values, whose
    contribution only reaches the border rows/columns (:func:`_ring_terms`). Forward and both
    gradients are a full-size SAME convolution (and its transposes) plus thin strips added in place:
    no padded copy of the input or of the gradient is ever made.
    """
    h, w = x.shape[1:3]
    y = _conv_same(x, kernel)
    return _add_strips(y, _ring_terms(_ring_sources(x), kernel), (0, h - 1), (0, w - 1))


def _conv3x3_edges_fwd(x, kernel):
    return _conv3x3_edges(x, kernel), (x, kernel)


def _conv3x3_edges_bwd(res, g):
    x, kernel = res
    h, w = x.shape[1:3]
    _, same_vjp = jax.vjp(_conv_same, x, kernel)
    dx, dkernel = same_vjp(g)
    g_border = (g[:, 0], g[:, h - 1], g[:, :, 0], g[:, :, w - 1])
    _, ring_vjp = jax.vjp(_ring_terms, _ring_sources(x), kernel)
    d_sources, d_ring_kernel = ring_vjp(g_border)
    dx = _add_strips(dx, d_sources, (1, h - 2), (1, w - 2))
    return dx, dkernel + d_ring_kernel


_conv3x3_edges.defvjp(_conv3x3_edges_fwd, _conv3x3_edges_bwd)


def reflect_conv3x3(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
    """3x3 convolution of NHWC ``x`` (H, W >= 2) on its reflect-padded (1 px) input, HWIO ``kernel``.

    Same map as ``lax.conv_general_dilated(reflect_pad(x), kernel, (1, 1), 'VALID')``;
    ``impl``: see :data:`CONV_IMPLS` and the module docstring.
    """
    if resolve_conv_impl(impl, conv3x3_flops(x.shape, kernel.shape[-1])) == "edges":
        return _conv3x3_edges(x, kernel)
    return jax.lax.conv_general_dilated(_reflect_pad1(x), kernel, (1, 1), "VALID",
                                        dimension_numbers=_DIMS)


class ReflectConv3x3(nn.Module):
    """Bias-free 3x3 convolution with reflect padding 1.

    Declares ``kernel`` exactly as ``nn.Conv(features, (3, 3), use_bias=False)`` does (same shape,
    initializer and name), so parameter trees and checkpoints are those of the ``nn.Conv`` version.
    """

    features: int
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, x.shape[-1], self.features), jnp.float32)
        return reflect_conv3x3(x, kernel.astype(x.dtype), self.conv_impl)


class ConvBlock(nn.Module):
    """(reflect-pad 1, conv3x3 VALID, BatchNorm, ReLU) x 2."""

    features: int
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i in range(2):
            x = ReflectConv3x3(self.features, self.conv_impl, name=f"Conv_{i}")(x)
            x = nn.BatchNorm(
                use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON
            )(x)
            x = nn.relu(x)
        return x


class UNet(nn.Module):
    """U-Net, NHWC ``(B, H, W, 1)`` -> ``(B, H, W, 1)``; see the module docstring."""

    features: int = 32
    num_layers: int = 2
    fast_ops: bool = True  # False: stock nn.ConvTranspose / nn.max_pool (tests, benchmarks)
    conv_impl: str = "auto"  # see CONV_IMPLS; "auto": per backend
    pool: str = "max"  # "max" or "blur" (N2V2 max-blur-pool)
    top_skip: bool = True  # False: no skip connection at the top level (N2V2)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = x.astype(jnp.float32)
        skips = []
        for level in range(self.num_layers):
            x = ConvBlock(self.features * 2**level, self.conv_impl, name=f"enc_{level}")(x, train)
            skips.append(x)
            if not self.fast_ops and self.pool == "max":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            else:
                x = pool_2x2(x, self.pool)
        x = ConvBlock(self.features * 2**self.num_layers, self.conv_impl, name="bottleneck")(x, train)
        for level in reversed(range(self.num_layers)):
            feats = self.features * 2**level
            if self.fast_ops:
                x = UpConv2x2(feats, name=f"up_{level}")(x)
            else:
                x = nn.ConvTranspose(feats, (2, 2), strides=(2, 2), padding="VALID",
                                     name=f"up_{level}")(x)
            if level > 0 or self.top_skip:
                x = jnp.concatenate([skips[level], x], axis=-1)
            x = ConvBlock(feats, self.conv_impl, name=f"dec_{level}")(x, train)
        return nn.Conv(1, (1, 1), name="out")(x)


# --------------------------------------------------------------------------------------------
# Functional helpers
# --------------------------------------------------------------------------------------------
def check_patch_size(patch_size: Any, num_layers: int, key: str = "stage1.patch_size") -> None:
    """Raise ``ConfigError(key, ...)`` unless ``patch_size`` fits a U-Net of depth ``num_layers``.

    The size must be an integer divisible by ``2**num_layers`` and the bottleneck
    (``patch_size / 2**num_layers``) at least 2 pixels wide (needed by the reflect padding).
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)):
        raise ConfigError(key, f"must be an integer, got {patch_size!r}")
    num_layers = int(num_layers)
    if num_layers < 0:
        raise ConfigError(key, f"num_layers must be >= 0, got {num_layers}")
    m = 2**num_layers
    if patch_size % m != 0 or patch_size < 2 * m:
        raise ConfigError(
            key,
            f"{patch_size} must be a multiple of 2**num_layers = {m} and at least {2 * m} "
            f"(num_layers={num_layers}), e.g. {max(2 * m, -(-int(patch_size) // m) * m)}",
        )


def _numpy_seed(seed_or_key: Any) -> Any:
    """An int seed as is; a jax PRNG key as its raw key data (both seed a numpy Generator)."""
    if isinstance(seed_or_key, (int, np.integer)) and not isinstance(seed_or_key, bool):
        return int(seed_or_key)
    return [int(v) for v in np.asarray(jax.random.key_data(seed_or_key)).ravel()]


@functools.lru_cache(maxsize=None)
def _variable_shapes(features: int, num_layers: int, top_skip: bool = True) -> dict:
    """Shapes of ``UNet(features, num_layers)``'s variables, from ``jax.eval_shape`` (traced, never
    compiled: compiling Flax's init costs seconds per architecture on CPU)."""
    model = UNet(features=features, num_layers=num_layers, top_skip=top_skip)
    size = 2 * 2**num_layers  # the smallest valid input: parameter shapes do not depend on it
    x = jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32)
    return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0, impl="rbg")}, x,
                                               train=False), x)


def _lecun_normal(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """Flax's ``lecun_normal``: a normal truncated at +-2 std, std ``sqrt(1 / fan_in)`` after the
    truncation (``fan_in`` = product of all axes but the last)."""
    z = rng.standard_normal(shape)
    bad = np.abs(z) > 2.0
    while bad.any():
        z[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(z) > 2.0
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return (z * np.sqrt(1.0 / fan_in) / 0.87962566103423978).astype(np.float32)


def _init_leaf(rng: np.random.Generator, name: str, shape: tuple) -> np.ndarray:
    if name == "kernel":
        return _lecun_normal(rng, shape)
    if name in ("scale", "var"):  # BatchNorm scale and running variance
        return np.ones(shape, np.float32)
    return np.zeros(shape, np.float32)  # biases, running means


def _init_tree(rng: np.random.Generator, tree: Any) -> Any:
    return {k: (_init_tree(rng, v) if hasattr(v, "items") else _init_leaf(rng, str(k), tuple(v.shape)))
            for k, v in sorted(tree.items())}


def init_variables(features: int, num_layers: int, patch_size: int, seed_or_key: Any, *,
                   top_skip: bool = True) -> dict:
    """Fresh ``{'params': ..., 'batch_stats': ...}`` (plain nested dicts of float32 arrays).

    ``seed_or_key``: an int seed or a jax PRNG key (its key data seeds the draw). The values are
    what ``UNet.init`` gives (``lecun_normal`` kernels, zero biases, BatchNorm scale 1 and running
    statistics 0 / 1), drawn on the host with a numpy Generator: deterministic for a given seed
    on every backend, and nothing is compiled. ``patch_size`` is only validated (parameter shapes
    do not depend on it). ``top_skip=False``: the N2V2 network without a top-level skip (its
    ``dec_0`` block takes ``features`` channels instead of ``2 * features``); the pooling kind has
    no parameters.
    """
    check_patch_size(patch_size, num_layers)
    features, num_layers = int(features), int(num_layers)
    if features < 1:
        raise ConfigError("model.features", f"must be >= 1, got {features}")
    shapes = _variable_shapes(features, num_layers, bool(top_skip))
    rng = np.random.default_rng(_numpy_seed(seed_or_key))
    params = _init_tree(rng, shapes["params"])
    stats = _init_tree(rng, shapes["batch_stats"])
    return {"params": jax.tree.map(jnp.asarray, params), "batch_stats": jax.tree.map(jnp.asarray, stats)}


def _plain(tree: Any) -> Any:
    if hasattr(tree, "items"):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


@functools.lru_cache(maxsize=None)
def make_apply_fn(features: int, num_layers: int, conv_impl: str = "auto", pool: str = "max",
                  top_skip: bool = True) -> Callable:
    """Pure ``apply(variables, x, train)`` for ``UNet(features, num_layers, conv_impl, pool,
    top_skip)``.

    ``train=True`` returns ``(y, new_batch_stats)``; ``train=False`` returns ``y``. ``train`` must
    be a Python bool (static). Cached per architecture and convolution implementation.
    """
    resolve_conv_impl(conv_impl)  # validate now, not at trace time
    if pool not in POOLS:
        raise ConfigError("model.pool", f"must be one of {POOLS}, got {pool!r}")
    model = UNet(features=int(features), num_layers=int(num_layers), conv_impl=conv_impl,
                 pool=pool, top_skip=bool(top_skip))

    def apply(variables: dict, x: jax.Array, train: bool):
        v = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        if train:
            y, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
            return y, _plain(updates["batch_stats"])
        return model.apply(v, x, train=False)

    apply.__name__ = f"unet_f{features}_l{num_layers}_{conv_impl}_{pool}{'' if top_skip else '_noskip'}_apply"
    apply.features = int(features)  # compile_options picks the CPU convolution library by it
    return apply


def architecture(variables: dict) -> tuple[int, int]:
    """``(features, num_layers)`` read from the parameter tree of ``init_variables``."""
    params = variables["params"]
    num_layers = sum(1 for k in params if str(k).startswith("enc_"))
    first = params["enc_0"] if num_layers else params["bottleneck"]
    features = int(first["Conv_0"]["kernel"].shape[-1])
    return features, num_layers


def has_top_skip(variables: dict) -> bool:
    """Whether the network of ``variables`` has its top-level skip connection (read from the
    input channels of ``dec_0``: ``2 * features`` with it, ``features`` without)."""
    features, num_layers = architecture(variables)
    if num_layers == 0:
        return True
    return int(variables["params"]["dec_0"]["Conv_0"]["kernel"].shape[2]) == 2 * features


def apply_model(variables: dict, x: jax.Array, train: bool, pool: str = "max"):
    """Pure forward pass; the architecture is inferred from ``variables`` (static under jit).
    ``pool`` has no parameters, so it cannot be read from them: pass ``"blur"`` for an N2V2
    network.

    ``train=True`` -> ``(y, new_batch_stats)``, ``train=False`` -> ``y``.
    """
    features, num_layers = architecture(variables)
    return make_apply_fn(features, num_layers, "auto", pool, has_top_skip(variables))(variables, x, train)


def receptive_field(num_layers: int, pool: str = "max", top_skip: bool = True) -> int:
    """Exact receptive-field radius (pixels, per axis) of ``UNet(_, num_layers, pool=pool,
    top_skip=top_skip)`` in the interior.

    Output pixel ``p`` depends on input pixels in ``[p - a, p + b]`` where ``a, b`` depend on the
    phase ``p mod 2**num_layers`` (pooling grid); the radius is the maximum of ``a, b`` over all
    phases, computed by propagating intervals backwards through the graph. Beyond this Chebyshev
    distance an input pixel cannot influence an output pixel (away from the image borders).
    """
    depth = int(num_layers)
    # pooled pixel k sees [2k, 2k+1] (max) or [2k-1, 2k+2] (blur) of the level above
    reach = {"max": (0, 1), "blur": (-1, 2)}[pool]

    def block(lo, hi):  # two 3x3 convs at the same level
        return lo - 2, hi + 2

    def dep_x(level, lo, hi):  # input of the encoder block at `level` -> network input pixels
        while level > 0:
            lo, hi = block(2 * lo + reach[0], 2 * hi + reach[1])  # pool, encoder block of level-1
            level -= 1
        return lo, hi

    def dep_dec(level, lo, hi):  # decoder/bottleneck output at `level`
        lo, hi = block(lo, hi)
        if level == depth:
            return dep_x(level, lo, hi)
        b = dep_dec(level + 1, lo // 2, hi // 2)  # up-convolution
        if level == 0 and not top_skip:
            return b
        a = dep_x(level, *block(lo, hi))  # skip: encoder block output at this level
        return min(a[0], b[0]), max(a[1], b[1])

    radius = 0
    for p in range(2**depth):
        lo, hi = dep_dec(0, p, p)
        radius = max(radius, p - lo, hi - p)
    return radius


def count_params(variables: dict) -> int:
    """Number of trainable parameters (``variables['params']``, or a bare params tree)."""
    tree = variables.get("params", variables) if hasattr(variables, "get") else variables
    return int(sum(int(np.prod(np.shape(a))) for a in jax.tree_util.tree_leaves(tree)))
