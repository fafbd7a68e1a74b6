"""Masked temporal pooling (the reference `DecAlign._pool`)."""

import jax
import jax.numpy as jnp


def masked_mean(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean over time of valid frames.

  The denominator is clamped at 1, so a sample without any valid frame pools
  to exactly 0, as in the reference.

  Args:
    x: `[B, T, D]` features.
    mask: optional `[B, T]` frame validity (bool or float); None averages
      every frame.

  Returns:
    `[B, D]` pooled features.
  """
  if mask is None:
    return jnp.mean(x, axis=1)
  mask = mask.astype(x.dtype)[..., None]
  # The mask is data, never differentiated: max() needs no torch tie rule.
  denom = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
  return jnp.sum(x * mask, axis=1) / denom
