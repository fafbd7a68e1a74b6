"""Prototype costs and multi-marginal entropic OT (the only `ott` importer).

Two solvers give the same objective at convergence:

* `mode='reference'`: the reference `_multi_marginal_sinkhorn`, kernel domain,
  a fixed number of unrolled iterations, gradients by unrolled autodiff. Its
  `exp(-C / eps)` is clamped at 1e-30, so once every joint cost exceeds
  `eps * ln(1e30)` (~6.9 at eps 0.1) the kernel is constant, the `+1e-8`
  terms dominate and objective and gradients silently collapse to ~0.
* `mode='ott'`: OTT-JAX's log-domain `MMSinkhorn`, run to a marginal
  tolerance; stable for any cost scale. Gradients by the envelope theorem
  (Danskin): d obj / d C = plan, d obj / d nu_m = potential f_m.

OTT's `MMSinkhorn` only builds its cost tensor from point clouds and
`CostFn`s, so the three pairwise matrices are handed to it through a lookup
`CostFn` whose points are the prototype indices (`_CostTable`). That keeps
the costs exactly those of `gaussian_w2_cost` (including its `+1e-8`),
accepts any pairwise cost, and leaves one definition of the cost shared by
both modes.
"""

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from ott.experimental import mmsinkhorn
from ott.geometry import costs

from decalign_jax.losses import _numerics

Reduction = Literal["mean", "sum"]
OTMode = Literal["ott", "reference"]


def _reducer(reduction: str):
  if reduction == "mean":
    return jnp.mean
  if reduction == "sum":
    return jnp.sum
  raise ValueError(
      f"cost_reduction must be 'mean' or 'sum', got {reduction!r}")


def gaussian_w2_cost(mu1: jax.Array, var1: jax.Array, mu2: jax.Array,
                     var2: jax.Array, *, reduction: Reduction = "mean"
                     ) -> jax.Array:
  """Squared 2-Wasserstein distance between diagonal Gaussians.

  Args:
    mu1: `[K1, D]` means.
    var1: `[K1, D]` variances.
    mu2: `[K2, D]` means.
    var2: `[K2, D]` variances.
    reduction: 'mean' (reference default) or 'sum' over the D dimensions.

  Returns:
    `[K1, K2]` costs.
  """
  reduce = _reducer(reduction)
  diff = mu1[:, None, :] - mu2[None, :, :]
  # DecAlign Eq. (prototype cost): |mu1-mu2|^2 + |sqrt(v1)-sqrt(v2)|^2, with
  # the reference's +1e-8 under the square root.
  mean_cost = reduce(jnp.square(diff), axis=2)
  cov_cost = (var1[:, None, :] + var2[None, :, :]
              - 2.0 * jnp.sqrt(var1[:, None, :] * var2[None, :, :] + 1e-8))
  return mean_cost + reduce(cov_cost, axis=2)


def sample_to_prototype_cost(x: jax.Array, mu: jax.Array, var: jax.Array, *,
                             reduction: Reduction = "mean",
                             mahalanobis: bool = False,
                             var_floor: float = 1e-4) -> jax.Array:
  """Squared distance of each sample to each prototype mean.

  Args:
    x: `[B, D]` samples.
    mu: `[K, D]` prototype means.
    var: `[K, D]` prototype variances (used only if `mahalanobis`).
    reduction: 'mean' or 'sum' over D.
    mahalanobis: divide by the variance clamped at `var_floor`.
    var_floor: lower bound of the variance.

  Returns:
    `[B, K]` costs.
  """
  reduce = _reducer(reduction)
  cost = jnp.square(x[:, None, :] - mu[None, :, :])
  if mahalanobis:
    cost = cost / _numerics.clamp_min(var, var_floor)[None]
  return reduce(cost, axis=2)


class MultiMarginalOT(NamedTuple):
  """Result of a 3-marginal entropic OT solve.

  Attributes:
    objective: scalar `<plan, C> + eps * sum(plan * (log plan - 1))`.
    plan: `[K1, K2, K3]` coupling.
    joint_cost: `[K1, K2, K3]` cost tensor C.
  """
  objective: jax.Array
  plan: jax.Array
  joint_cost: jax.Array


def joint_cost_tensor(cost_la: jax.Array, cost_lv: jax.Array,
                      cost_av: jax.Array) -> jax.Array:
  """`C[i, j, k] = la[i, j] + lv[i, k] + av[j, k]` as `[K1, K2, K3]`."""
  return (cost_la[:, :, None] + cost_lv[:, None, :]) + cost_av[None, :, :]


def entropic_objective(plan: jax.Array, cost: jax.Array,
                       epsilon: float) -> jax.Array:
  """`<P, C> + eps * sum(P (log P - 1))` with `0 log 0 = 0`."""
  entropy = jnp.sum(jax.scipy.special.xlogy(plan, plan) - plan)
  return jnp.sum(plan * cost) + epsilon * entropy


def multimarginal_sinkhorn_reference(joint_cost: jax.Array, nu_l: jax.Array,
                                     nu_a: jax.Array, nu_v: jax.Array, *,
                                     epsilon: float = 0.1,
                                     num_iters: int = 50) -> MultiMarginalOT:
  """The reference kernel-domain solver, operation for operation.

  Args:
    joint_cost: `[K1, K2, K3]` cost tensor (need not be a sum of pairwise
      costs).
    nu_l: `[K1]` marginal.
    nu_a: `[K2]` marginal.
    nu_v: `[K3]` marginal.
    epsilon: entropic regularisation (floored at 1e-6 as the reference).
    num_iters: fixed number of (u, v, w) sweeps (static, unrolled).

  Returns:
    `MultiMarginalOT`; everything differentiable by unrolled autodiff.
  """
  c = joint_cost
  # The clamp keeps the kernel positive; it is also what makes the objective
  # collapse to ~0 at large costs (see the module docstring).
  kernel = _numerics.clamp_min(
      jnp.exp(-c / jnp.maximum(epsilon, 1e-6)), 1e-30)

  u = jnp.ones(c.shape[0], c.dtype)
  v = jnp.ones(c.shape[1], c.dtype)
  w = jnp.ones(c.shape[2], c.dtype)
  # Unrolled in Python: a scan (fori_loop) compiles 4x faster but sums the
  # kernel's cotangent in another order, which at ill-conditioned costs
  # (scale 100 in the stress fixture) moves the gradient 2e-6 away from the
  # reference's instead of 5e-7.
  for _ in range(num_iters):
    u = nu_l / (jnp.sum(kernel * v[None, :, None] * w[None, None, :],
                        axis=(1, 2)) + 1e-8)
    v = nu_a / (jnp.sum(kernel * u[:, None, None] * w[None, None, :],
                        axis=(0, 2)) + 1e-8)
    w = nu_v / (jnp.sum(kernel * u[:, None, None] * v[None, :, None],
                        axis=(0, 1)) + 1e-8)
  plan = u[:, None, None] * v[None, :, None] * w[None, None, :] * kernel
  log_plan = jnp.log(_numerics.clamp_min(plan, 1e-8))
  entropy = jnp.sum(plan * (log_plan - 1.0))
  # DecAlign Eq. (multi-marginal OT): <T, C> + eps * sum T (log T - 1).
  objective = jnp.sum(plan * c) + epsilon * entropy
  return MultiMarginalOT(objective=objective, plan=plan, joint_cost=c)


@jtu.register_pytree_node_class
class _CostTable(costs.CostFn):
  """Pairwise cost read from a `[N, M]` table; points are `[1]` row indices.

  Lets `MMSinkhorn` (which builds its cost tensor from point clouds) use a
  precomputed cost exactly.
  """

  def __init__(self, table: jax.Array):
    self.table = table

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    return self.table[x[0].astype(jnp.int32), y[0].astype(jnp.int32)]

  def tree_flatten(self):  # noqa: D102
    return (self.table,), None

  @classmethod
  def tree_unflatten(cls, aux_data, children):  # noqa: D102
    del aux_data
    return cls(*children)


def _ott_potentials(cost_la, cost_lv, cost_av, nus, *, epsilon, threshold,
                    max_iterations):
  """Dual potentials `(f, g, h)` from OTT's log-domain `MMSinkhorn`."""
  k1, k2, k3 = cost_lv.shape[0], cost_la.shape[1], cost_lv.shape[1]
  points = tuple(jnp.arange(k, dtype=cost_la.dtype)[:, None]
                 for k in (k1, k2, k3))
  # MMSinkhorn orders pairwise costs (0,1), (0,2), (1,2) = la, lv, av.
  cost_fns = (_CostTable(cost_la), _CostTable(cost_lv), _CostTable(cost_av))
  solver = mmsinkhorn.MMSinkhorn(
      threshold=threshold, max_iterations=max_iterations,
      inner_iterations=10)
  out = solver(points, a_s=nus, cost_fns=cost_fns, epsilon=epsilon)
  return out.potentials


def multimarginal_sinkhorn(cost_la: jax.Array, cost_lv: jax.Array,
                           cost_av: jax.Array, nu_l: jax.Array,
                           nu_a: jax.Array, nu_v: jax.Array, *,
                           epsilon: float = 0.1, num_iters: int = 50,
                           mode: OTMode = "ott", threshold: float = 1e-6,
                           max_iterations: int = 2000) -> MultiMarginalOT:
  """3-marginal entropic OT between prototype sets with pairwise costs.

  In 'ott' mode the objective is evaluated on OTT's coupling
  `P = exp((f + g + h - C) / eps)` with exact entropy. It equals OTT's
  `ent_reg_cost - eps` at convergence (OTT reports the dual
  `sum_m <f_m, nu_m> + eps (1 - sum P)`), so `ent_reg_cost` is not used.
  Its gradient is Danskin's: the solve runs on stopped inputs and the value
  carries the dual's gradient (d/dC = P, d/d nu_m = f_m), which is exact at
  convergence, costs no backward pass through the solver and needs no
  unrolled memory. Gradients w.r.t. a nu are defined up to a constant shift
  (the simplex constraint), so they differ from the reference's by one;
  normalising nu (as the model does) removes it. The returned plan carries no
  gradient in this mode.

  Args:
    cost_la: `[K1, K2]` text-audio prototype costs.
    cost_lv: `[K1, K3]` text-vision costs.
    cost_av: `[K2, K3]` audio-vision costs.
    nu_l: `[K1]` marginal (sums to 1).
    nu_a: `[K2]` marginal.
    nu_v: `[K3]` marginal.
    epsilon: entropic regularisation.
    num_iters: 'reference' mode: fixed iteration count; unused by 'ott',
      which stops at `threshold`.
    mode: 'ott' (log-domain OTT solver) or 'reference' (kernel domain).
    threshold: 'ott' mode: tolerance on the summed L1 marginal errors.
    max_iterations: 'ott' mode: iteration cap.

  Returns:
    `MultiMarginalOT(objective, plan, joint_cost)`.
  """
  if mode not in ("ott", "reference"):
    raise ValueError(f"ot_mode must be 'ott' or 'reference', got {mode!r}")
  cost = joint_cost_tensor(cost_la, cost_lv, cost_av)
  if mode == "reference":
    return multimarginal_sinkhorn_reference(
        cost, nu_l, nu_a, nu_v, epsilon=epsilon, num_iters=num_iters)

  nus = (nu_l, nu_a, nu_v)
  # The solve sees no tangents: gradients come from the envelope theorem, so
  # OTT's own backward pass through its loop is never traced.
  f, g, h = (p.astype(cost.dtype) for p in _ott_potentials(
      *jax.lax.stop_gradient((cost_la, cost_lv, cost_av, nus)),
      epsilon=epsilon, threshold=threshold, max_iterations=max_iterations))
  # Coupling from frozen potentials; differentiable in the cost only. An entry
  # with zero marginal mass has a -inf potential and an all-zero slice.
  plan = jnp.exp(
      (f[:, None, None] + g[None, :, None] + h[None, None, :] - cost)
      / epsilon)
  finite = lambda p: jnp.where(jnp.isfinite(p), p, 0.0)  # noqa: E731
  dual = (jnp.dot(finite(f), nu_l) + jnp.dot(finite(g), nu_a)
          + jnp.dot(finite(h), nu_v) - epsilon * jnp.sum(plan))
  # DecAlign Eq. (multi-marginal OT): value of the primal on OTT's coupling,
  # gradient of the dual (envelope theorem).
  primal = entropic_objective(
      jax.lax.stop_gradient(plan), jax.lax.stop_gradient(cost), epsilon)
  objective = dual + jax.lax.stop_gradient(primal - dual)
  return MultiMarginalOT(objective=objective,
                         plan=jax.lax.stop_gradient(plan), joint_cost=cost)
