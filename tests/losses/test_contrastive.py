"""Tests for decalign_jax.losses.contrastive."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decalign_jax.losses import contrastive



_supcon = jax.jit(contrastive.supervised_contrastive_loss,
                  static_argnames=("temperature",))


def _numpy_supcon(features, labels, temperature):
  """Float64 transcription of the reference `_contrastive_loss`."""
  f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True),
                            1e-12)
  logits = f @ f.T / temperature
  b = len(labels)
  losses = []
  for i in range(b):
    others = [j for j in range(b) if j != i]
    pos = [j for j in others if labels[j] == labels[i]]
    if not pos:
      continue
    row = logits[i] - logits[i].max()
    log_norm = np.log(max(np.exp(row[others]).sum(), 1e-8))
    losses.append(-np.mean(row[pos] - log_norm))
  return np.mean(losses) if losses else 0.0


def test_regression_label_classes():
  y = jnp.array([[-4.0], [-3.0], [-2.5], [-0.5], [0.0], [0.5], [1.5], [2.5],
                 [2.6], [3.0], [7.0]])
  got = contrastive.regression_label_classes(y)
  assert got.dtype == jnp.int32
  # Half to even: -2.5 -> -2, +-0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
  np.testing.assert_array_equal(got, [0, 0, 1, 3, 3, 3, 5, 5, 6, 6, 6])


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_brute_force(np_rng, temperature):
  features = np_rng.normal(size=(17, 4))
  labels = np_rng.integers(0, 4, size=17)
  labels[5] = 9  # A sample without positives is not an anchor.
  with jax.enable_x64(True):
    got = _supcon(jnp.asarray(features), jnp.asarray(labels),
                  temperature=temperature)
  np.testing.assert_allclose(got, _numpy_supcon(features, labels,
                                                temperature), rtol=1e-10)


def test_no_positive_gives_zero(np_rng):
  features = jnp.asarray(np_rng.normal(size=(4, 3)), jnp.float32)
  loss, grad = jax.jit(jax.value_and_grad(
      contrastive.supervised_contrastive_loss))(features, jnp.arange(4))
  assert float(loss) == 0.0
  np.testing.assert_array_equal(grad, 0.0)


def test_weights_equal_dropping_padded_samples(np_rng):
  features = np_rng.normal(size=(12, 5)).astype(np.float32)
  labels = np_rng.integers(0, 3, size=12)
  valid = np.ones(12, bool)
  valid[[2, 7, 11]] = False
  features[11] = 0.0  # Padding is typically all zeros.
  padded, grad = jax.jit(jax.value_and_grad(
      lambda f: contrastive.supervised_contrastive_loss(
          f, jnp.asarray(labels), weights=jnp.asarray(valid, jnp.float32))))(
              jnp.asarray(features))
  dropped = _supcon(jnp.asarray(features[valid]), jnp.asarray(labels[valid]))
  np.testing.assert_allclose(padded, dropped, rtol=1e-6)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[~valid], 0.0)


@pytest.mark.parametrize("variant", ["small_regression", "small_mosi_arch",
                                     "small_tinybatch", "small_seqmask"])
def test_golden_regression(golden, variant):
  g = golden(variant)
  classes = contrastive.regression_label_classes(jnp.asarray(g["in/labels"]))
  got = _supcon(jnp.asarray(g["out/final_rep"]), classes, temperature=0.1)
  np.testing.assert_allclose(got, g["loss/ct"], rtol=1e-5, atol=1e-6)


def test_golden_classification(golden):
  g = golden("small_classification")
  labels = jnp.asarray(g["in/labels"].reshape(-1)).astype(jnp.int32)
  got = _supcon(jnp.asarray(g["out/final_rep"]), labels, temperature=0.1)
  np.testing.assert_allclose(got, g["loss/ct"], rtol=1e-5, atol=1e-6)


def test_golden_f64(golden):
  g = golden("small_regression_f64")
  with jax.enable_x64(True):
    classes = contrastive.regression_label_classes(
        jnp.asarray(g["in/labels"]))
    got = _supcon(jnp.asarray(g["out/final_rep"]), classes, temperature=0.1)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, g["loss/ct"], rtol=1e-9)
