"""Supervised task losses (the reference trainer's `_main_loss`)."""

from typing import Literal

import jax
import jax.numpy as jnp


def _weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
  """Mean of `values` over entries with nonzero weight; 0 if there are none."""
  if weights is None:
    return jnp.mean(values)
  weights = jnp.reshape(weights, values.shape).astype(values.dtype)
  total = jnp.sum(weights)
  return jnp.sum(weights * values) / jnp.where(total > 0, total, 1.0)


def regression_loss(pred: jax.Array, target: jax.Array, *,
                    kind: Literal["mse", "l1", "smooth_l1"] = "mse",
                    beta: float = 1.0,
                    weights: jax.Array | None = None) -> jax.Array:
  """Mean regression loss (torch `MSELoss`, `L1Loss`, `SmoothL1Loss(beta)`).

  Args:
    pred: `[B]` predictions (any shape with B elements).
    target: `[B]` targets (any shape with B elements).
    kind: 'mse', 'l1' or 'smooth_l1' ('huber' is accepted as smooth_l1, as
      the reference does).
    beta: smooth-L1 transition point; 0 gives L1.
    weights: optional `[B]` 0/1 validity; the mean runs over valid samples.

  Returns:
    scalar loss.
  """
  diff = jnp.reshape(pred, (-1,)) - jnp.reshape(target, (-1,)).astype(
      pred.dtype)
  if kind == "mse":
    per_sample = jnp.square(diff)
  elif kind == "l1":
    per_sample = jnp.abs(diff)
  elif kind in ("smooth_l1", "huber"):
    ad = jnp.abs(diff)
    safe_beta = beta if beta > 0 else 1.0
    per_sample = jnp.where(ad < beta, 0.5 * jnp.square(diff) / safe_beta,
                           ad - 0.5 * beta)
  else:
    raise ValueError(
        f"task_loss must be 'mse', 'l1' or 'smooth_l1', got {kind!r}")
  return _weighted_mean(per_sample, weights)


def classification_loss(logits: jax.Array, labels: jax.Array, *,
                        class_weights: jax.Array | None = None,
                        weights: jax.Array | None = None) -> jax.Array:
  """Cross-entropy as torch `F.cross_entropy(logits, labels, weight=...)`.

  With class weights the mean is `sum(w_y * nll) / sum(w_y)`.

  Args:
    logits: `[B, C]`.
    labels: `[B]` integer classes.
    class_weights: optional `[C]` per-class weights.
    weights: optional `[B]` 0/1 validity of each sample.

  Returns:
    scalar loss.
  """
  labels = jnp.reshape(labels, (-1,)).astype(jnp.int32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  w = jnp.ones_like(nll)
  if class_weights is not None:
    w = w * jnp.asarray(class_weights, nll.dtype)[labels]
  if weights is not None:
    w = w * jnp.reshape(weights, (-1,)).astype(nll.dtype)
  total = jnp.sum(w)
  return jnp.sum(w * nll) / jnp.where(total > 0, total, 1.0)


def binary_aux_loss(pred: jax.Array, target: jax.Array, *,
                    weights: jax.Array | None = None) -> jax.Array:
  """Sign classification of the regression output on non-zero labels.

  The reference's `binary_task_weight` term: BCE-with-logits of `pred`
  against `target > 0`, averaged over samples whose label is not 0; 0 when
  there are none.

  Args:
    pred: `[B]` regression outputs, used as logits.
    target: `[B]` regression labels.
    weights: optional `[B]` 0/1 validity of each sample.

  Returns:
    scalar loss.
  """
  x = jnp.reshape(pred, (-1,))
  target = jnp.reshape(target, (-1,))
  t = (target > 0).astype(x.dtype)
  # Stable softplus form, as torch's binary_cross_entropy_with_logits.
  bce = jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
  nonzero = (target != 0).astype(x.dtype)
  if weights is not None:
    nonzero = nonzero * jnp.reshape(weights, (-1,)).astype(x.dtype)
  return _weighted_mean(bce, nonzero)
