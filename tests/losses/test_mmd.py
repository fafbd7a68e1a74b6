"""Tests for decalign_jax.losses.mmd."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import distance

from decalign_jax.losses import mmd



@pytest.mark.parametrize("bandwidth", [1.0, 0.3])
def test_brute_force(np_rng, bandwidth):
  x, y = np_rng.normal(size=(17, 4)), np_rng.normal(size=(13, 4)) + 0.5
  k = lambda a, b: np.exp(  # noqa: E731
      -distance.cdist(a, b, "sqeuclidean") / (2 * bandwidth))
  expected = k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()
  with jax.enable_x64(True):
    got = mmd.gaussian_mmd(jnp.asarray(x), jnp.asarray(y),
                           bandwidth=bandwidth)
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_identical_samples_give_zero_and_finite_grad(np_rng):
  x = jnp.asarray(np_rng.normal(size=(5, 3)), jnp.float32)
  value, grad = jax.jit(jax.value_and_grad(
      lambda x: mmd.gaussian_mmd(x, x)))(x)
  np.testing.assert_allclose(value, 0.0, atol=1e-6)
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("variant", ["small_regression", "small_tinybatch",
                                     "small_mosi_arch"])
def test_golden(golden, variant):
  g = golden(variant)
  z = {m: jnp.asarray(g[f"inter/homo/z_{m}"]) for m in "lav"}
  for a, b in (("l", "a"), ("l", "v"), ("a", "v")):
    np.testing.assert_allclose(mmd.gaussian_mmd(z[a], z[b]),
                               g[f"inter/homo/mmd_{a}{b}"], rtol=1e-5,
                               atol=1e-6)


def test_golden_f64(golden):
  g = golden("small_regression_f64")
  with jax.enable_x64(True):
    z = {m: jnp.asarray(g[f"inter/homo/z_{m}"]) for m in "lav"}
    total = sum(mmd.gaussian_mmd(z[a], z[b])
                for a, b in (("l", "a"), ("l", "v"), ("a", "v"))) / 3
    assert total.dtype == jnp.float64
    np.testing.assert_allclose(total, g["inter/homo/mmd_loss"], rtol=1e-9)
