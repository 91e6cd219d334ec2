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
* ``make_apply_fn(features, num_layers) -> apply(variables, x, train)``: the same pure function with
  the architecture fixed explicitly (cached: the same arguments give the same function object, so
  ``jit`` caches keyed on it are shared).
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
    "UNet",
    "UpConv2x2",
    "max_pool_2x2",
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
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 stride-2 max-pool of NHWC ``x`` (H, W even) as reshape + max.

    Same values as ``flax.linen.max_pool(x, (2, 2), strides=(2, 2))``; same gradients except that
    ties inside a window share the gradient equally instead of giving it to one element.
    """
    b, h, w, c = x.shape
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


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


def _reflect_pad1(x: jax.Array) -> jax.Array:
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")


class ConvBlock(nn.Module):
    """(reflect-pad 1, conv3x3 VALID, BatchNorm, ReLU) x 2."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for _ in range(2):
            x = nn.Conv(self.features, (3, 3), padding="VALID", use_bias=False)(_reflect_pad1(x))
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

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = x.astype(jnp.float32)
        skips = []
        for level in range(self.num_layers):
            x = ConvBlock(self.features * 2**level, name=f"enc_{level}")(x, train)
            skips.append(x)
            if self.fast_ops:
                x = max_pool_2x2(x)
            else:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = ConvBlock(self.features * 2**self.num_layers, name="bottleneck")(x, train)
        for level in reversed(range(self.num_layers)):
            feats = self.features * 2**level
            if self.fast_ops:
                x = UpConv2x2(feats, name=f"up_{level}")(x)
            else:
                x = nn.ConvTranspose(feats, (2, 2), strides=(2, 2), padding="VALID",
                                     name=f"up_{level}")(x)
            x = jnp.concatenate([skips[level], x], axis=-1)
            x = ConvBlock(feats, name=f"dec_{level}")(x, train)
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


def _to_key(seed_or_key: Any) -> jax.Array:
    if isinstance(seed_or_key, (int, np.integer)) and not isinstance(seed_or_key, bool):
        # rbg keys: Flax init compiles several times faster than with threefry keys on CPU.
        return jax.random.key(int(seed_or_key), impl="rbg")
    return seed_or_key


@functools.lru_cache(maxsize=None)
def _jitted_init(features: int, num_layers: int, size: int) -> Callable:
    model = UNet(features=features, num_layers=num_layers)

    def init(key):
        x = jnp.zeros((1, size, size, 1), jnp.float32)
        return model.init({"params": key}, x, train=False)

    return jax.jit(init)


def init_variables(features: int, num_layers: int, patch_size: int, seed_or_key: Any) -> dict:
    """Fresh ``{'params': ..., 'batch_stats': ...}`` (plain nested dicts of float32 arrays).

    ``seed_or_key``: an int seed (turned into an ``rbg`` key: deterministic for a given seed on a
    given backend) or a jax PRNG key. ``patch_size`` is only validated (parameter shapes do not
    depend on it): initialisation runs on the smallest valid input, under ``jit``.
    """
    check_patch_size(patch_size, num_layers)
    features, num_layers = int(features), int(num_layers)
    if features < 1:
        raise ConfigError("model.features", f"must be >= 1, got {features}")
    variables = _jitted_init(features, num_layers, 2 * 2**num_layers)(_to_key(seed_or_key))
    return {"params": _plain(variables["params"]), "batch_stats": _plain(variables["batch_stats"])}


def _plain(tree: Any) -> Any:
    if hasattr(tree, "items"):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


@functools.lru_cache(maxsize=None)
def make_apply_fn(features: int, num_layers: int) -> Callable:
    """Pure ``apply(variables, x, train)`` for ``UNet(features, num_layers)``.

    ``train=True`` returns ``(y, new_batch_stats)``; ``train=False`` returns ``y``. ``train`` must
    be a Python bool (static). Cached per architecture.
    """
    model = UNet(features=int(features), num_layers=int(num_layers))

    def apply(variables: dict, x: jax.Array, train: bool):
        v = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        if train:
            y, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
            return y, _plain(updates["batch_stats"])
        return model.apply(v, x, train=False)

    apply.__name__ = f"unet_f{features}_l{num_layers}_apply"
    return apply


def architecture(variables: dict) -> tuple[int, int]:
    """``(features, num_layers)`` read from the parameter tree of ``init_variables``."""
    params = variables["params"]
    num_layers = sum(1 for k in params if str(k).startswith("enc_"))
    first = params["enc_0"] if num_layers else params["bottleneck"]
    features = int(first["Conv_0"]["kernel"].shape[-1])
    return features, num_layers


def apply_model(variables: dict, x: jax.Array, train: bool):
    """Pure forward pass; the architecture is inferred from ``variables`` (static under jit).

    ``train=True`` -> ``(y, new_batch_stats)``, ``train=False`` -> ``y``.
    """
    features, num_layers = architecture(variables)
    return make_apply_fn(features, num_layers)(variables, x, train)


def receptive_field(num_layers: int) -> int:
    """Exact receptive-field radius (pixels, per axis) of ``UNet(_, num_layers)`` in the interior.

    Output pixel ``p`` depends on input pixels in ``[p - a, p + b]`` where ``a, b`` depend on the
    phase ``p mod 2**num_layers`` (pooling grid); the radius is the maximum of ``a, b`` over all
    phases, computed by propagating intervals backwards through the graph. Beyond this Chebyshev
    distance an input pixel cannot influence an output pixel (away from the image borders).
    """
    depth = int(num_layers)

    def block(lo, hi):  # two 3x3 convs at the same level
        return lo - 2, hi + 2

    def dep_x(level, lo, hi):  # input of the encoder block at `level` -> network input pixels
        while level > 0:
            lo, hi = block(2 * lo, 2 * hi + 1)  # through max-pool then encoder block of level-1
            level -= 1
        return lo, hi

    def dep_dec(level, lo, hi):  # decoder/bottleneck output at `level`
        lo, hi = block(lo, hi)
        if level == depth:
            return dep_x(level, lo, hi)
        a = dep_x(level, *block(lo, hi))  # skip: encoder block output at this level
        b = dep_dec(level + 1, lo // 2, hi // 2)  # up-convolution
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
