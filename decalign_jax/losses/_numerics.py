"""Elementwise helpers with PyTorch's gradient conventions.

The reference clamps with `Tensor.clamp_min` and normalises with
`Tensor.norm`; their subgradients differ from the JAX defaults at the kink,
and ties do occur in practice (the zero diagonal of a squared-distance
matrix, the all-zero features of a sample without any valid frame).
"""

import jax
import jax.numpy as jnp


def clamp_min(x: jax.Array, lo: float) -> jax.Array:
  """`max(x, lo)` with torch's `clamp_min` gradient and NaN handling.

  torch passes the gradient where `x >= lo` (ties included) and propagates
  NaN; `jnp.maximum` splits the gradient 1/2-1/2 at ties.

  Args:
    x: any array.
    lo: lower bound.

  Returns:
    array like `x`.
  """
  return jnp.where(x < lo, jnp.asarray(lo, x.dtype), x)


def l2_norm(x: jax.Array, *, axis: int = -1) -> jax.Array:
  """Euclidean norm over `axis` (kept) with a zero gradient at the origin.

  torch's norm backward masks the `0 / 0` at a zero vector to 0; the naive
  `sqrt(sum(x^2))` gives NaN there.

  Args:
    x: any array.
    axis: reduced axis, kept with size 1.

  Returns:
    array like `x` with `axis` of size 1.
  """
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
