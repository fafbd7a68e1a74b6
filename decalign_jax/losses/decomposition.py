"""Decoupling loss between unique (s) and common (c) features."""

import jax
import jax.numpy as jnp

from decalign_jax.losses import _numerics

# torch.nn.functional.cosine_similarity's default eps.
_COSINE_EPS = 1e-8


def cosine_similarity(x: jax.Array, y: jax.Array, *,
                      eps: float = _COSINE_EPS) -> jax.Array:
  """Row-wise cosine similarity, as torch 2.x `F.cosine_similarity`.

  torch >= 2.0 divides each input by its own norm clamped at `eps` and then
  sums the product (ATen Distance.cpp). It does not compute the older
  `x.y / sqrt(clamp_min(|x|^2 |y|^2, eps^2))`. The clamp runs under
  `NoGradGuard`, so the gradient flows as if the norm were unclamped
  (straight-through).

  Args:
    x: `[B, N]`.
    y: `[B, N]`.
    eps: lower bound of each norm.

  Returns:
    `[B]` cosine similarities.
  """
  def normalise(a):
    norm = _numerics.l2_norm(a, axis=-1)
    clamped = norm + jax.lax.stop_gradient(jnp.maximum(norm, eps) - norm)
    return a / clamped

  return jnp.sum(normalise(x) * normalise(y), axis=-1)


def decoupling_loss(s: jax.Array, c: jax.Array) -> jax.Array:
  """Mean over the batch of cos^2 between flattened unique/common features.

  A sample whose features are all zero (no valid frame) contributes 0 with a
  zero gradient, as in the reference.

  Args:
    s: `[B, T, D]` modality-unique features.
    c: `[B, T, D]` modality-common features.

  Returns:
    scalar loss.
  """
  batch = s.shape[0]
  # DecAlign Eq. (decoupling): mean_b cos^2(s_b, c_b) on (T*D)-flat features.
  cosine = cosine_similarity(s.reshape(batch, -1), c.reshape(batch, -1))
  return jnp.mean(jnp.square(cosine))
