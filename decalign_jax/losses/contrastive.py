"""Supervised contrastive loss on the fused representation (trainer term)."""

import jax
import jax.numpy as jnp

from decalign_jax.losses import _numerics

# Logits are scaled by 1 / temperature (10x); TF32 noise would be amplified.
_HIGHEST = jax.lax.Precision.HIGHEST


def regression_label_classes(y: jax.Array) -> jax.Array:
  """Buckets regression labels in [-3, 3] into 7 classes.

  Args:
    y: `[B]` (or `[B, 1]`) float labels.

  Returns:
    `[B]` int32 `round_half_even(clip(y, -3, 3)) + 3` (0.5 -> 3, 1.5 -> 5,
    2.5 -> 5, as torch.round).
  """
  y = jnp.reshape(y, (-1,))
  return (jnp.round(jnp.clip(y, -3.0, 3.0)) + 3).astype(jnp.int32)


def l2_normalize(x: jax.Array, *, eps: float = 1e-12) -> jax.Array:
  """Rows divided by `max(|x|, eps)` (torch `F.normalize`)."""
  return x / _numerics.clamp_min(_numerics.l2_norm(x, axis=-1), eps)


def supervised_contrastive_loss(features: jax.Array, labels: jax.Array, *,
                                temperature: float = 0.1,
                                weights: jax.Array | None = None
                                ) -> jax.Array:
  """SupCon loss over a batch, as the reference trainer's `_contrastive_loss`.

  Each valid sample with at least one other valid sample of its class is an
  anchor; its loss is minus the mean log-probability of its positives under
  a softmax over all other valid samples. Anchors are averaged; 0 if none.

  Args:
    features: `[B, F]` representations (L2-normalised here).
    labels: `[B]` integer classes.
    temperature: softmax temperature.
    weights: optional `[B]` 0/1 validity; padded samples are neither
      anchors, positives nor negatives. Default: all valid.

  Returns:
    scalar loss.
  """
  batch = features.shape[0]
  valid = (jnp.ones((batch,), bool) if weights is None
           else jnp.reshape(weights, (-1,)) > 0)
  labels = jnp.reshape(labels, (-1,))
  f = l2_normalize(features)
  logits = jnp.matmul(f, f.T, precision=_HIGHEST) / temperature
  not_self = ~jnp.eye(batch, dtype=bool)
  pair = not_self & valid[None, :] & valid[:, None]
  positive = pair & (labels[:, None] == labels[None, :])
  # The reference subtracts the (detached) row max including the diagonal;
  # it cancels in the log-softmax but decides where the 1e-8 clamp bites.
  row_max = jnp.max(jnp.where(valid[None, :] | ~not_self, logits, -jnp.inf),
                    axis=1, keepdims=True)
  logits = logits - jax.lax.stop_gradient(row_max)
  exp_logits = jnp.where(pair, jnp.exp(logits), 0.0)
  log_norm = jnp.log(_numerics.clamp_min(
      jnp.sum(exp_logits, axis=1, keepdims=True), 1e-8))
  log_prob = logits - log_norm
  num_pos = jnp.sum(positive, axis=1)
  # DecAlign trainer term (SupCon): mean log p(positive | anchor).
  mean_pos = (jnp.sum(jnp.where(positive, log_prob, 0.0), axis=1)
              / jnp.maximum(num_pos, 1).astype(log_prob.dtype))
  anchor = (num_pos > 0).astype(log_prob.dtype)
  return -jnp.sum(anchor * mean_pos) / jnp.maximum(jnp.sum(anchor), 1.0)
