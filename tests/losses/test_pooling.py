"""Tests for decalign_jax.losses.pooling."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decalign_jax.losses import pooling



def test_no_mask_is_time_mean(np_rng):
  x = np_rng.normal(size=(17, 5, 4)).astype(np.float32)
  np.testing.assert_allclose(pooling.masked_mean(jnp.asarray(x)),
                             x.mean(axis=1), rtol=1e-6)


@pytest.mark.parametrize("as_bool", [True, False])
def test_mask_matches_brute_force(np_rng, as_bool):
  x = np_rng.normal(size=(17, 5, 4)).astype(np.float32)
  mask = np_rng.uniform(size=(17, 5)) > 0.4
  mask[3] = False  # A sample with no valid frame.
  expected = np.zeros((17, 4), np.float32)
  for b in range(17):
    if mask[b].any():
      expected[b] = x[b][mask[b]].mean(axis=0)
  m = jnp.asarray(mask if as_bool else mask.astype(np.float32))
  got = np.asarray(pooling.masked_mean(jnp.asarray(x), m))
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  assert np.all(got[3] == 0.0)  # Exactly 0, as the reference's clamp.


def test_golden_unmasked(golden):
  g = golden("small_regression")
  for m in "lav":
    # Fixture features are [B, D, T]; ours are channel-last.
    s = jnp.asarray(g[f"out/s_{m}"]).transpose(0, 2, 1)
    np.testing.assert_allclose(pooling.masked_mean(s),
                               g[f"inter/hete/pooled_{m}"],
                               rtol=1e-5, atol=1e-6)


def test_golden_masked(golden):
  g = golden("small_seqmask")
  for m in "av":
    mask = jnp.asarray(g[f"inter/mask_{m}"][:, 0, :])
    for branch, key in (("s", "hete"), ("c", "homo")):
      x = jnp.asarray(g[f"out/{branch}_{m}"]).transpose(0, 2, 1)
      got = pooling.masked_mean(x, mask)
      np.testing.assert_allclose(got, g[f"inter/{key}/pooled_{m}"],
                                 rtol=1e-5, atol=1e-6)
  # Sample 1 has no audio frame at all and pools to exactly 0.
  assert np.all(g["inter/hete/pooled_a"][1] == 0)


def test_jit_grad(np_rng):
  x = jnp.asarray(np_rng.normal(size=(4, 6, 3)), jnp.float32)
  mask = jnp.asarray(np_rng.uniform(size=(4, 6)) > 0.5).at[0].set(False)
  grad = jax.jit(jax.grad(lambda x: pooling.masked_mean(x, mask).sum()))(x)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[0], 0.0)
