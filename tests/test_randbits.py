"""Numbers from random bits (randbits): ranges, uniformity, the Gumbel law, weighted choice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autostructn2v_jax import randbits

N = 200_000


@pytest.fixture(scope="module")
def bits():
    return randbits.draw(jax.random.key(0), (N,))


def test_draw_is_uint32_and_deterministic():
    a = randbits.draw(jax.random.key(3), (4, 5))
    assert a.shape == (4, 5) and a.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(randbits.draw(jax.random.key(3), (4, 5))))
    assert not np.array_equal(np.asarray(a), np.asarray(randbits.draw(jax.random.key(4), (4, 5))))


def test_uniform_covers_the_unit_interval(bits):
    u = np.asarray(randbits.uniform(bits))
    assert u.dtype == np.float32 and u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    # the extreme bit patterns map inside [0, 1)
    edge = np.asarray(randbits.uniform(jnp.asarray([0, 2**32 - 1], jnp.uint32)))
    assert edge[0] == 0.0 and edge[1] < 1.0


@pytest.mark.parametrize("low, high", [(0, 1), (0, 8), (3, 10), (-5, 1000)])
def test_randint_is_uniform_on_its_range(bits, low, high):
    k = np.asarray(randbits.randint(bits, low, high))
    assert k.dtype == np.int32 and k.min() >= low and k.max() < high
    counts = np.bincount(k - low, minlength=high - low)
    assert counts.size == high - low
    expected = N / (high - low)
    assert np.all(np.abs(counts - expected) < 6 * np.sqrt(expected) + 1)  # every value, evenly


def test_randint_with_per_element_bounds_and_top_bits():
    low = jnp.arange(6, dtype=jnp.int32)
    high = low + jnp.asarray([1, 2, 3, 4, 5, 1000])
    top = jnp.full((6,), 2**32 - 1, jnp.uint32)  # the largest draw gives high - 1, never high
    np.testing.assert_array_equal(np.asarray(randbits.randint(top, low, high)), np.asarray(high - 1))
    np.testing.assert_array_equal(np.asarray(randbits.randint(jnp.zeros(6, jnp.uint32), low, high)),
                                  np.asarray(low))


def test_gumbel_law(bits):
    g = np.asarray(randbits.gumbel(bits))
    assert np.isfinite(g).all()
    assert abs(g.mean() - 0.5772) < 0.01 and abs(g.var() - np.pi**2 / 6) < 0.05


def test_categorical_follows_weights_and_skips_zeros(bits):
    p = jnp.asarray([0.0, 0.5, 0.0, 0.25, 0.25, 0.0])
    idx = np.asarray(randbits.categorical(bits, p))
    freq = np.bincount(idx, minlength=6) / N
    assert freq[0] == freq[2] == freq[5] == 0.0
    np.testing.assert_allclose(freq[[1, 3, 4]], [0.5, 0.25, 0.25], atol=0.005)
    # unnormalised weights work as well
    idx2 = np.asarray(randbits.categorical(bits, p * 8))
    np.testing.assert_array_equal(idx, idx2)
