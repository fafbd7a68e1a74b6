"""Tests for decalign_jax.losses.decomposition."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from decalign_jax.losses import decomposition



def _channel_last(a):
  return jnp.asarray(a).transpose(0, 2, 1)


def test_matches_brute_force(np_rng):
  s = np_rng.normal(size=(17, 5, 4))
  c = np_rng.normal(size=(17, 5, 4)) + 0.3 * s
  sf, cf = s.reshape(17, -1), c.reshape(17, -1)
  cos = (sf * cf).sum(1) / np.linalg.norm(sf, axis=1) / np.linalg.norm(
      cf, axis=1)
  got = decomposition.decoupling_loss(jnp.asarray(s, jnp.float32),
                                      jnp.asarray(c, jnp.float32))
  np.testing.assert_allclose(got, np.mean(cos**2), rtol=1e-5)


def test_torch2_eps_semantics():
  # torch >= 2 clamps each norm at eps separately: with |x| = 1e-9 < eps and
  # |y| = 100 the cosine is (x / 1e-8) . (y / |y|) = 0.1 * cos. The older
  # x.y / max(|x| |y|, eps) formula would give the unclamped cosine.
  with jax.enable_x64(True):
    x = jnp.array([[0.6e-9, 0.8e-9]])
    y = jnp.array([[100.0, 0.0]])
    np.testing.assert_allclose(decomposition.cosine_similarity(x, y), [0.06],
                               rtol=1e-12)


def test_zero_sample_contributes_zero_with_finite_grad(np_rng):
  s = np_rng.normal(size=(3, 5, 4)).astype(np.float32)
  c = np_rng.normal(size=(3, 5, 4)).astype(np.float32)
  s[1] = 0.0
  c[1] = 0.0
  loss, (gs, gc) = jax.jit(jax.value_and_grad(
      decomposition.decoupling_loss, argnums=(0, 1)))(jnp.asarray(s),
                                                       jnp.asarray(c))
  sf, cf = s.reshape(3, -1), c.reshape(3, -1)
  cos = [(sf[b] @ cf[b]) / np.linalg.norm(sf[b]) / np.linalg.norm(cf[b])
         for b in (0, 2)]
  np.testing.assert_allclose(loss, np.sum(np.square(cos)) / 3, rtol=1e-5)
  assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gc))
  np.testing.assert_array_equal(gs[1], 0.0)


def test_golden(golden):
  for variant in ("small_regression", "small_seqmask", "small_mosi_arch"):
    g = golden(variant)
    dec = jnp.mean(jnp.stack([
        decomposition.decoupling_loss(_channel_last(g[f"out/s_{m}"]),
                                      _channel_last(g[f"out/c_{m}"]))
        for m in "lav"]))
    np.testing.assert_allclose(dec, g["out/dec_loss"], rtol=1e-5, atol=1e-6)


def test_golden_f64(golden):
  g = golden("small_regression_f64")
  with jax.enable_x64(True):
    dec = jnp.mean(jnp.stack([
        decomposition.decoupling_loss(_channel_last(g[f"out/s_{m}"]),
                                      _channel_last(g[f"out/c_{m}"]))
        for m in "lav"]))
    assert dec.dtype == jnp.float64
    np.testing.assert_allclose(dec, g["out/dec_loss"], rtol=1e-9)
