"""Diagonal Gaussian mixture fitted by a few EM steps on a batch.

The reference (`DecAlign._init_gmm`, `_gmm_log_prob`, `_fit_gmm_em`) detaches
nothing: the prototypes are differentiable functions of the batch through the
initialisation, every EM step and the clamps (zero gradient where clamped).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from decalign_jax.losses import _numerics

# The statistics below subtract nearly equal terms (E[x^2] - mu^2); a reduced
# precision matmul (TF32 on GPUs) would swamp the variance floor.
_HIGHEST = jax.lax.Precision.HIGHEST


class DiagGMM(NamedTuple):
  """A fitted diagonal GMM.

  Attributes:
    pi: `[K]` mixture weights.
    mu: `[K, D]` component means.
    var: `[K, D]` component variances.
    posterior: `[B, K]` responsibilities of the fitted batch.
  """
  pi: jax.Array
  mu: jax.Array
  var: jax.Array
  posterior: jax.Array


def _torch_linspace_f32(end: int, steps: int) -> np.ndarray:
  """`torch.linspace(0, end, steps)` in float32, element for element.

  torch's CPU kernel computes the first half forwards from `start` and the
  second half backwards from `end` with a float32 step (the scalar path, used
  for fewer than 16 steps; the vectorised path for longer outputs may differ
  by an ulp).

  Args:
    end: last value.
    steps: number of values.

  Returns:
    `[steps]` float32 values.
  """
  if steps == 1:
    return np.zeros((1,), np.float32)
  start, stop = np.float32(0.0), np.float32(end)
  step = (stop - start) / np.float32(steps - 1)
  out = np.empty((steps,), np.float32)
  for i in range(steps):
    if i < steps // 2:
      out[i] = start + step * np.float32(i)
    else:
      out[i] = stop - step * np.float32(steps - i - 1)
  return out


def init_indices(batch_size: int, num_components: int) -> np.ndarray:
  """Batch rows used as initial means (static, computed at trace time).

  Args:
    batch_size: B.
    num_components: K.

  Returns:
    `[K]` int indices: `round_half_even(linspace(0, B-1, K))` for B >= K,
    else the batch tiled (`i mod B`), so components are duplicated.
  """
  if batch_size >= num_components:
    grid = _torch_linspace_f32(batch_size - 1, num_components)
    return np.round(grid).astype(np.int64)  # np.round: half to even.
  return np.arange(num_components) % batch_size


def init_diag_gmm(x: jax.Array, *, num_components: int, var_floor: float
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Initial mixture parameters, as the reference `_init_gmm`.

  Args:
    x: `[B, D]` pooled features.
    num_components: K.
    var_floor: lower bound of the variances.

  Returns:
    `(pi [K], mu [K, D], var [K, D])`: uniform weights, means at evenly
    spaced batch rows, every variance the batch's population variance.
  """
  k, dim = num_components, x.shape[1]
  mu = x[init_indices(x.shape[0], k)]
  var = _numerics.clamp_min(jnp.var(x, axis=0), var_floor)
  var = jnp.broadcast_to(var[None], (k, dim))
  pi = jnp.full((k,), 1.0 / k, dtype=x.dtype)
  return pi, mu, var


def gmm_log_prob(x: jax.Array, pi: jax.Array, mu: jax.Array, var: jax.Array
                 ) -> jax.Array:
  """Joint log density `log pi_k + log N(x_b | mu_k, diag var_k)`.

  Args:
    x: `[B, D]`.
    pi: `[K]` (clamped at 1e-8 before the log).
    mu: `[K, D]`.
    var: `[K, D]`.

  Returns:
    `[B, K]` log densities.
  """
  diff = x[:, None, :] - mu[None, :, :]
  mahalanobis = jnp.sum(jnp.square(diff) / var[None], axis=2)
  log_det = jnp.sum(jnp.log(var), axis=1)[None]
  log_norm = x.shape[1] * math.log(2.0 * math.pi)
  log_pi = jnp.log(_numerics.clamp_min(pi, 1e-8))[None]
  return log_pi - 0.5 * (mahalanobis + log_det + log_norm)


def fit_diag_gmm(x: jax.Array, *, num_components: int, num_iters: int = 5,
                 var_floor: float = 1e-4) -> DiagGMM:
  """Fits a diagonal GMM with a fixed number of EM steps (`_fit_gmm_em`).

  Args:
    x: `[B, D]` pooled features.
    num_components: K prototypes.
    num_iters: EM steps (static; unrolled).
    var_floor: lower bound of the variances.

  Returns:
    the fitted `DiagGMM`; `posterior` is recomputed after the last M-step.
  """
  pi, mu, var = init_diag_gmm(x, num_components=num_components,
                              var_floor=var_floor)
  for _ in range(num_iters):
    # DecAlign Eq. (prototypes), E-step: responsibilities.
    gamma = jax.nn.softmax(gmm_log_prob(x, pi, mu, var), axis=1)
    # M-step; the clamp keeps empty components finite.
    nk = _numerics.clamp_min(jnp.sum(gamma, axis=0), 1e-6)
    pi = nk / x.shape[0]
    mu = jnp.matmul(gamma.T, x, precision=_HIGHEST) / nk[:, None]
    second = jnp.matmul(gamma.T, jnp.square(x), precision=_HIGHEST)
    var = _numerics.clamp_min(second / nk[:, None] - jnp.square(mu),
                              var_floor)
  posterior = jax.nn.softmax(gmm_log_prob(x, pi, mu, var), axis=1)
  return DiagGMM(pi=pi, mu=mu, var=var, posterior=posterior)
