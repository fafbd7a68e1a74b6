"""Tests for decalign_jax.losses.gmm."""

import functools

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from scipy import special
from scipy import stats

from decalign_jax.losses import _numerics
from decalign_jax.losses import gmm



def _numpy_em(x, k, num_iters, var_floor):
  """Float64 transcription of the reference EM, for brute-force checks."""
  b, d = x.shape
  mu = x[gmm.init_indices(b, k)]
  var = np.tile(np.maximum(x.var(axis=0), var_floor), (k, 1))
  pi = np.full(k, 1.0 / k)

  def log_prob(pi, mu, var):
    out = np.empty((b, k))
    for j in range(k):
      out[:, j] = np.log(max(pi[j], 1e-8)) + stats.multivariate_normal.logpdf(
          x, mean=mu[j], cov=np.diag(var[j]))
    return out

  for _ in range(num_iters):
    gamma = special.softmax(log_prob(pi, mu, var), axis=1)
    nk = np.maximum(gamma.sum(0), 1e-6)
    pi = nk / b
    mu = gamma.T @ x / nk[:, None]
    var = np.maximum(gamma.T @ x**2 / nk[:, None] - mu**2, var_floor)
  return pi, mu, var, special.softmax(log_prob(pi, mu, var), axis=1)


@pytest.mark.parametrize("b,k,expected", [
    (16, 4, [0, 5, 10, 15]),
    (32, 7, [0, 5, 10, 16, 21, 26, 31]),  # 15.5 -> 16 (half to even).
    (3, 4, [0, 1, 2, 0]),  # B < K: the batch is tiled.
    (5, 1, [0]),
])
def test_init_indices(b, k, expected):
  np.testing.assert_array_equal(gmm.init_indices(b, k), expected)


def test_init_indices_middle_ties():
  # README: B=128 -> 63.5 -> 64, B=512 -> 255.5 -> 256 (K=7).
  assert gmm.init_indices(128, 7)[3] == 64
  assert gmm.init_indices(512, 7)[3] == 256


@pytest.mark.parametrize("variant", ["small_regression", "small_mosi_arch"])
def test_init_indices_golden(golden, variant):
  g = golden(variant)
  b = g["inter/hete/pooled_l"].shape[0]
  k = g["inter/hete/gmm_l_pi"].shape[0]
  np.testing.assert_array_equal(gmm.init_indices(b, k),
                                g["inter/hete/gmm_init_indices"])


@pytest.mark.parametrize("variant", ["small_regression", "small_tinybatch"])
def test_init_golden(golden, variant):
  g = golden(variant)
  for m in "lav":
    pi, mu, var = gmm.init_diag_gmm(
        jnp.asarray(g[f"inter/hete/pooled_{m}"]), num_components=4,
        var_floor=1e-4)
    for name, got in (("pi", pi), ("mu", mu), ("var", var)):
      np.testing.assert_allclose(got, g[f"inter/hete/gmm_init_{m}_{name}"],
                                 rtol=1e-5, atol=1e-6)


def test_log_prob_matches_scipy(np_rng):
  x = np_rng.normal(size=(17, 4))
  mu = np_rng.normal(size=(3, 4))
  var = np_rng.uniform(0.5, 2.0, size=(3, 4))
  pi = np.array([0.2, 0.8, 0.0])  # A zero weight is clamped at 1e-8.
  expected = np.stack([
      np.log(max(pi[j], 1e-8)) + stats.multivariate_normal.logpdf(
          x, mean=mu[j], cov=np.diag(var[j])) for j in range(3)], axis=1)
  got = gmm.gmm_log_prob(*(jnp.asarray(a, jnp.float32)
                           for a in (x, pi, mu, var)))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_fit_matches_brute_force_em(np_rng):
  x = np_rng.normal(size=(17, 4))
  x[:6] += 3.0
  with jax.enable_x64(True):
    got = jax.jit(functools.partial(
        gmm.fit_diag_gmm, num_components=3, num_iters=5,
        var_floor=1e-4))(jnp.asarray(x))
  for a, b in zip(got, _numpy_em(x, 3, 5, 1e-4)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


_TOL32 = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant",
                         ["small_regression", "small_tinybatch",
                          "small_mosi_arch"])
def test_fit_golden(golden, variant):
  g = golden(variant)
  k = g["inter/hete/gmm_l_pi"].shape[0]
  fit = jax.jit(functools.partial(gmm.fit_diag_gmm, num_components=k))
  for m in "lav":
    got = fit(jnp.asarray(g[f"inter/hete/pooled_{m}"]))
    for name in gmm.DiagGMM._fields:
      np.testing.assert_allclose(getattr(got, name),
                                 g[f"inter/hete/gmm_{m}_{name}"], **_TOL32,
                                 err_msg=f"{variant} {m} {name}")


def test_fit_golden_f64(golden):
  g = golden("small_regression_f64")
  with jax.enable_x64(True):
    fit = jax.jit(functools.partial(gmm.fit_diag_gmm, num_components=4))
    for m in "lav":
      got = fit(jnp.asarray(g[f"inter/hete/pooled_{m}"]))
      assert got.mu.dtype == jnp.float64
      for name in gmm.DiagGMM._fields:
        np.testing.assert_allclose(getattr(got, name),
                                   g[f"inter/hete/gmm_{m}_{name}"],
                                   rtol=1e-9, atol=1e-15)


def test_clamp_min_has_torch_subgradient():
  x = jnp.array([0.5, 1.0, 2.0, jnp.nan])
  np.testing.assert_array_equal(_numerics.clamp_min(x, 1.0)[:3],
                                [1.0, 1.0, 2.0])
  assert np.isnan(_numerics.clamp_min(x, 1.0)[3])  # NaN propagates.
  # torch's clamp_min passes the gradient where x >= min, ties included.
  grad = jax.grad(lambda x: _numerics.clamp_min(x, 1.0).sum())(x[:3])
  np.testing.assert_array_equal(grad, [0.0, 1.0, 1.0])


def test_jit_grad_vmap(np_rng):
  x = jnp.asarray(np_rng.normal(size=(2, 9, 4)), jnp.float32)

  def loss(x):
    fit = gmm.fit_diag_gmm(x, num_components=3)
    return fit.mu.sum() + fit.var.sum() + (fit.posterior * fit.pi).sum()

  grads = jax.jit(jax.vmap(jax.grad(loss)))(x)
  assert grads.shape == x.shape
  assert np.all(np.isfinite(grads)) and np.any(grads != 0)


def test_finite_difference_f64(np_rng):
  x0 = np_rng.normal(size=(7, 3))
  x0[:3] += 2.0
  w = np_rng.normal(size=(4, 3))

  def loss(x):
    fit = gmm.fit_diag_gmm(x, num_components=2, num_iters=3, var_floor=1e-4)
    return (jnp.sum(fit.mu * w[:2]) + jnp.sum(fit.var * w[2:])
            + jnp.sum(fit.posterior[:, 0] ** 2) + fit.pi[0])

  with jax.enable_x64(True):
    jax.test_util.check_grads(jax.jit(loss), (jnp.asarray(x0),), order=1,
                              modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)
