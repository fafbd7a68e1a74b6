"""Tests for decalign_jax.losses.task."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from decalign_jax.losses import task



def _numpy_regression(d, kind, beta):
  if kind == "mse":
    return np.mean(d**2)
  if kind == "l1":
    return np.mean(np.abs(d))
  ad = np.abs(d)
  return np.mean(np.where(ad < beta, 0.5 * d**2 / beta, ad - 0.5 * beta))


@pytest.mark.parametrize("kind,beta", [("mse", 1.0), ("l1", 1.0),
                                       ("smooth_l1", 1.0),
                                       ("smooth_l1", 0.3)])
def test_regression_brute_force(np_rng, kind, beta):
  pred, target = np_rng.normal(size=17) * 2, np_rng.normal(size=17)
  with jax.enable_x64(True):
    got = task.regression_loss(jnp.asarray(pred), jnp.asarray(target),
                               kind=kind, beta=beta)
  np.testing.assert_allclose(got, _numpy_regression(pred - target, kind,
                                                    beta), rtol=1e-12)


def test_smooth_l1_beta_zero_is_l1(np_rng):
  pred, target = np_rng.normal(size=17), np_rng.normal(size=17)
  got = task.regression_loss(jnp.asarray(pred), jnp.asarray(target),
                             kind="smooth_l1", beta=0.0)
  np.testing.assert_allclose(got, np.mean(np.abs(pred - target)), rtol=1e-6)


def test_regression_weights_and_bad_kind(np_rng):
  pred, target = np_rng.normal(size=(17, 1)), np_rng.normal(size=17)
  valid = np.arange(17) < 11
  got = task.regression_loss(jnp.asarray(pred), jnp.asarray(target),
                             kind="l1", weights=jnp.asarray(valid))
  np.testing.assert_allclose(
      got, np.mean(np.abs(pred[:11, 0] - target[:11])), rtol=1e-6)
  with pytest.raises(ValueError, match="task_loss"):
    task.regression_loss(jnp.asarray(pred), jnp.asarray(target), kind="l3")


def test_classification_brute_force(np_rng):
  logits = np_rng.normal(size=(17, 4))
  labels = np_rng.integers(0, 4, size=17)
  class_weights = np.array([1.0, 2.0, 0.5, 3.0])
  valid = np.ones(17, bool)
  valid[[3, 9]] = False
  nll = -special.log_softmax(logits, axis=1)[np.arange(17), labels]
  w = class_weights[labels] * valid
  with jax.enable_x64(True):
    plain = task.classification_loss(jnp.asarray(logits),
                                     jnp.asarray(labels))
    weighted = task.classification_loss(
        jnp.asarray(logits), jnp.asarray(labels),
        class_weights=jnp.asarray(class_weights), weights=jnp.asarray(valid))
  np.testing.assert_allclose(plain, nll.mean(), rtol=1e-12)
  np.testing.assert_allclose(weighted, (w * nll).sum() / w.sum(), rtol=1e-12)


def test_binary_aux_brute_force(np_rng):
  pred = np_rng.normal(size=17) * 3
  target = np_rng.normal(size=17)
  target[[1, 4, 8]] = 0.0
  nz = target != 0
  t = (target[nz] > 0).astype(float)
  p = special.expit(pred[nz])
  expected = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
  with jax.enable_x64(True):
    got = task.binary_aux_loss(jnp.asarray(pred), jnp.asarray(target))
  np.testing.assert_allclose(got, expected, rtol=1e-12)
  zero, grad = jax.jit(jax.value_and_grad(task.binary_aux_loss))(
      jnp.ones(4), jnp.zeros(4))
  assert float(zero) == 0.0 and np.all(grad == 0.0)


def test_golden_regression(golden):
  g = golden("small_regression")
  got = task.regression_loss(jnp.asarray(g["out/output_logit"]),
                             jnp.asarray(g["in/labels"]), kind="mse")
  np.testing.assert_allclose(got, g["loss/main"], rtol=1e-5, atol=1e-6)


def test_golden_classification(golden):
  g = golden("small_classification")
  got = task.classification_loss(
      jnp.asarray(g["out/output_logit"]),
      jnp.asarray(g["in/labels"].reshape(-1)).astype(jnp.int32))
  np.testing.assert_allclose(got, g["loss/main"], rtol=1e-5, atol=1e-6)
