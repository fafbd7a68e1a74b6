"""Moment matching between latent distributions (homogeneous branch)."""

import jax
import jax.numpy as jnp

from decalign_jax.losses import _numerics

# GPUs may run float32 matmuls in TF32 (~3 digits); these are tiny, so keep
# full precision for parity with the reference.
_HIGHEST = jax.lax.Precision.HIGHEST


def moment_stats(z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean, unbiased covariance and per-dimension skewness of a batch.

  Args:
    z: `[B, P]` latent codes.

  Returns:
    `(mu [P], cov [P, P], skew [P])`; cov divides by `max(B - 1, 1)`, skew is
    `mean(c^3) / max(mean(c^2), 1e-6)^1.5` with the biased variance.
  """
  mu = jnp.mean(z, axis=0)
  centered = z - mu
  denom = max(z.shape[0] - 1, 1)
  cov = jnp.matmul(centered.T, centered, precision=_HIGHEST) / denom
  var = _numerics.clamp_min(jnp.mean(jnp.square(centered), axis=0), 1e-6)
  skew = jnp.mean(centered ** 3, axis=0) / var ** 1.5
  return mu, cov, skew


def moment_distance(stats_x: tuple[jax.Array, jax.Array, jax.Array],
                    stats_y: tuple[jax.Array, jax.Array, jax.Array]
                    ) -> jax.Array:
  """Sum of the mean squared differences of mean, covariance and skewness.

  Args:
    stats_x: `moment_stats` of one modality.
    stats_y: `moment_stats` of another.

  Returns:
    scalar distance.
  """
  # DecAlign Eq. (semantic moments): MSE(mu) + MSE(cov) + MSE(skew).
  return sum(jnp.mean(jnp.square(a - b)) for a, b in zip(stats_x, stats_y))
