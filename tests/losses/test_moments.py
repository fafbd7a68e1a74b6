"""Tests for decalign_jax.losses.moments."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decalign_jax.losses import moments



def _numpy_stats(z):
  mu = z.mean(0)
  c = z - mu
  cov = c.T @ c / max(z.shape[0] - 1, 1)
  skew = (c**3).mean(0) / np.maximum((c**2).mean(0), 1e-6) ** 1.5
  return mu, cov, skew


@pytest.mark.parametrize("batch", [17, 1])
def test_stats_brute_force(np_rng, batch):
  z = np_rng.gamma(2.0, size=(batch, 4))
  with jax.enable_x64(True):
    got = moments.moment_stats(jnp.asarray(z))
  for a, b in zip(got, _numpy_stats(z)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(got[1], np.cov(z.T) if batch > 1 else 0.0,
                             rtol=1e-12, atol=1e-15)


def test_distance_brute_force(np_rng):
  x, y = np_rng.normal(size=(17, 4)), np_rng.normal(size=(13, 4)) ** 2
  with jax.enable_x64(True):
    got = moments.moment_distance(moments.moment_stats(jnp.asarray(x)),
                                  moments.moment_stats(jnp.asarray(y)))
  expected = sum(np.mean((a - b) ** 2)
                 for a, b in zip(_numpy_stats(x), _numpy_stats(y)))
  np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("variant", ["small_regression", "small_tinybatch",
                                     "small_mosi_arch", "small_seqmask"])
def test_golden(golden, variant):
  g = golden(variant)
  stats = {m: moments.moment_stats(jnp.asarray(g[f"inter/homo/z_{m}"]))
           for m in "lav"}
  for m in "lav":
    for i, name in enumerate(("mu", "cov")):
      np.testing.assert_allclose(stats[m][i], g[f"inter/homo/stats_{m}_{name}"],
                                 rtol=1e-5, atol=1e-6)
    # The skewness is ill-conditioned here (std ~ 0.1 |mean|, so centring
    # cancels ~4 bits): the reference's own float32 value is up to 3e-6 from
    # its float64 value and its batch sum runs in another order (torch's
    # 4-way ILP partial sums; emulated in numpy the gap drops to 1e-7).
    np.testing.assert_allclose(stats[m][2], g[f"inter/homo/stats_{m}_skew"],
                               rtol=1e-5, atol=1e-5)
  for a, b in (("l", "a"), ("l", "v"), ("a", "v")):
    np.testing.assert_allclose(
        moments.moment_distance(stats[a], stats[b]),
        g[f"inter/homo/stats_distance_{a}{b}"], rtol=1e-5, atol=1e-6)


def test_golden_f64(golden):
  g = golden("small_regression_f64")
  with jax.enable_x64(True):
    stats = {m: moments.moment_stats(jnp.asarray(g[f"inter/homo/z_{m}"]))
             for m in "lav"}
    for m in "lav":
      for i, name in enumerate(("mu", "cov", "skew")):
        assert stats[m][i].dtype == jnp.float64
        np.testing.assert_allclose(stats[m][i],
                                   g[f"inter/homo/stats_{m}_{name}"],
                                   rtol=1e-9, atol=1e-15)
    sem = sum(moments.moment_distance(stats[a], stats[b])
              for a, b in (("l", "a"), ("l", "v"), ("a", "v"))) / 3
    np.testing.assert_allclose(sem, g["inter/homo/sem_loss"], rtol=1e-9)


def test_jit_grad(np_rng):
  x = jnp.asarray(np_rng.normal(size=(9, 3)), jnp.float32)
  y = x.at[:, 0].set(0.0)  # A constant column: variance clamped at 1e-6.
  grads = jax.jit(jax.grad(
      lambda x, y: moments.moment_distance(moments.moment_stats(x),
                                           moments.moment_stats(y)),
      argnums=(0, 1)))(x, y)
  assert all(np.all(np.isfinite(g)) for g in grads)
