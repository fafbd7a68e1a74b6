"""DecAlign's hierarchical alignment: heterogeneous and homogeneous branches.

Pure functions over pooled per-modality features; they compose the ops in
`decalign_jax.losses` and return `(loss, aux)` where `aux` holds every
intermediate (GMM fits, prototype costs, OT objective, moments, MMD) so that
evaluations and parity tests can read them.
"""

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

from decalign_jax.losses import gmm as gmm_lib
from decalign_jax.losses import mmd as mmd_lib
from decalign_jax.losses import moments as moments_lib
from decalign_jax.losses import ot as ot_lib

MODALITIES = ("l", "a", "v")
PAIRS = (("l", "a"), ("l", "v"), ("a", "v"))
# Sample-to-prototype terms in the reference's order: each modality's samples
# against the other two modalities' prototypes.
DIRECTED_PAIRS = (("l", "a"), ("l", "v"), ("a", "l"), ("a", "v"), ("v", "l"),
                  ("v", "a"))


@dataclasses.dataclass(frozen=True)
class HeteroSettings:
  """Settings of the heterogeneous (prototype + OT) branch."""
  num_prototypes: int = 8
  gmm_em_iters: int = 5
  gmm_var_floor: float = 1e-4
  ot_epsilon: float = 0.1
  ot_num_iters: int = 50
  ot_mode: Literal["ott", "reference"] = "ott"
  cost_reduction: Literal["mean", "sum"] = "mean"
  mahalanobis: bool = False


def hetero_alignment(pooled: dict[str, jax.Array], s: HeteroSettings
                     ) -> tuple[jax.Array, dict[str, Any]]:
  """Heterogeneous alignment loss: multi-marginal OT + sample-to-prototype.

  Args:
    pooled: modality key ('l', 'a', 'v') -> `[B, D]` pooled unique features.
    s: settings.

  Returns:
    `(ot_objective + mean of the six sample-to-prototype costs, aux)`.
  """
  aux: dict[str, Any] = {}
  fits = {}
  nus = {}
  for m in MODALITIES:
    # DecAlign Eq. (prototypes): diagonal GMM fitted by EM on the batch.
    fits[m] = gmm_lib.fit_diag_gmm(
        pooled[m], num_components=s.num_prototypes,
        num_iters=s.gmm_em_iters, var_floor=s.gmm_var_floor)
    nu = fits[m].posterior.mean(axis=0)
    nus[m] = nu / jnp.maximum(nu.sum(), 1e-8)
    aux[f"gmm_{m}"] = fits[m]
    aux[f"nu_{m}"] = nus[m]
  costs = {}
  for a, b in PAIRS:
    # DecAlign Eq. (prototype cost): W2^2 between diagonal Gaussians.
    costs[a + b] = ot_lib.gaussian_w2_cost(
        fits[a].mu, fits[a].var, fits[b].mu, fits[b].var,
        reduction=s.cost_reduction)
    aux[f"cost_{a}{b}"] = costs[a + b]
  # DecAlign Eq. (multi-marginal OT) over the three prototype sets.
  ot = ot_lib.multimarginal_sinkhorn(
      costs["la"], costs["lv"], costs["av"], nus["l"], nus["a"], nus["v"],
      epsilon=s.ot_epsilon, num_iters=s.ot_num_iters, mode=s.ot_mode)
  aux["joint_cost"] = ot.joint_cost
  aux["ot_plan"] = ot.plan
  aux["ot_loss"] = ot.objective
  local = []
  for src, dst in DIRECTED_PAIRS:
    # DecAlign Eq. (local): posterior-weighted sample-to-prototype cost.
    cost = ot_lib.sample_to_prototype_cost(
        pooled[src], fits[dst].mu, fits[dst].var, reduction=s.cost_reduction,
        mahalanobis=s.mahalanobis, var_floor=s.gmm_var_floor)
    term = (fits[src].posterior * cost).sum(axis=1).mean()
    aux[f"sample_proto_cost_{src}{dst}"] = cost
    aux[f"local_{src}{dst}"] = term
    local.append(term)
  aux["local_proto_loss"] = jnp.stack(local).mean()
  return ot.objective + aux["local_proto_loss"], aux


def homo_alignment(z: dict[str, jax.Array], *, mmd_bandwidth: float
                   ) -> tuple[jax.Array, dict[str, Any]]:
  """Homogeneous alignment loss: moment matching + Gaussian-kernel MMD.

  Args:
    z: modality key -> `[B, P]` latent codes of the common features.
    mmd_bandwidth: kernel bandwidth (gamma = 1 / (2 bandwidth)).

  Returns:
    `(mean pairwise moment distance + mean pairwise MMD, aux)`.
  """
  aux: dict[str, Any] = {}
  stats = {m: moments_lib.moment_stats(z[m]) for m in MODALITIES}
  for m in MODALITIES:
    aux[f"stats_{m}"] = stats[m]
  sem, mmd = [], []
  for a, b in PAIRS:
    # DecAlign Eq. (moments): mean, covariance and skewness matching.
    sem.append(moments_lib.moment_distance(stats[a], stats[b]))
    # DecAlign Eq. (MMD): biased Gaussian-kernel MMD^2.
    mmd.append(mmd_lib.gaussian_mmd(z[a], z[b], bandwidth=mmd_bandwidth))
    aux[f"stats_distance_{a}{b}"] = sem[-1]
    aux[f"mmd_{a}{b}"] = mmd[-1]
  aux["sem_loss"] = sum(sem) / 3.0
  aux["mmd_loss"] = sum(mmd) / 3.0
  return aux["sem_loss"] + aux["mmd_loss"], aux
