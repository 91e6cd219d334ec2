"""Random numbers from one block of random bits (pure, jittable).

Why: every ``jax.random`` call inlines its own counter-based hash (threefry), and XLA:CPU spends
0.15-0.3 s compiling each one. The training batch used about twenty (splits, ``randint`` with two
draws each, ``gumbel``, ``choice``): about 2 s of every train-step compile, more than a small
U-Net's gradient (docs/benchmarks.md, "Test suite time"). The data path now draws each block of bits
with a single ``jax.random.bits`` call and turns slices of it into the numbers it needs here.

Resolution: 24 bits per number (``uniform`` is a float32 in ``[0, 1)`` on a grid of ``2**-24``),
so an integer range of ``span`` values is uniform to within ``span / 2**24``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["draw", "uniform", "randint", "gumbel", "categorical"]

_SCALE = 2.0**-24


def draw(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``uint32`` random bits of ``shape``: the one ``jax.random`` call of a sampling function."""
    return jax.random.bits(key, tuple(int(s) for s in shape), jnp.uint32)


def uniform(bits: jax.Array) -> jax.Array:
    """float32 in ``[0, 1)`` from ``uint32`` bits (their top 24 bits)."""
    return (bits >> 8).astype(jnp.float32) * _SCALE


def randint(bits: jax.Array, low, high) -> jax.Array:
    """int32 uniform in ``[low, high)`` (``high > low``; both broadcast against ``bits``)."""
    low = jnp.asarray(low, jnp.int32)
    span = jnp.maximum(jnp.asarray(high, jnp.int32) - low, 1)
    k = jnp.floor(uniform(bits) * span.astype(jnp.float32)).astype(jnp.int32)
    return low + jnp.minimum(k, span - 1)  # float rounding may reach span itself


def gumbel(bits: jax.Array) -> jax.Array:
    """Standard Gumbel samples, ``-log(-log(u))`` with ``u`` in ``(0, 1)``."""
    u = ((bits >> 8).astype(jnp.float32) + 0.5) * _SCALE
    return -jnp.log(-jnp.log(u))


def categorical(bits: jax.Array, probabilities: jax.Array) -> jax.Array:
    """int32 indices drawn with ``probabilities`` (1-D, non-negative, sum > 0): inverse CDF."""
    cdf = jnp.cumsum(jnp.asarray(probabilities, jnp.float32))
    u = uniform(bits) * cdf[-1]
    idx = jnp.searchsorted(cdf, u, side="right")
    return jnp.minimum(idx, cdf.shape[0] - 1).astype(jnp.int32)
