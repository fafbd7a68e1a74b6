"""Contrastive losses over the global batch: dense, all-gather and ring.

CLIP (symmetric InfoNCE), SigLIP (pairwise sigmoid) and SupCon on global
`[N, D]` arrays. The sharded strategies run inside `jax.jit` on arrays split
along a mesh axis (`n = N / devices` rows each) and equal the dense loss and
gradient:

- 'all_gather': each device gathers the other tower and holds `[n, N]`
  logits; autodiff runs through `jax.shard_map`.
- 'ring': the other tower's `[n, D]` blocks travel around the devices with
  `ppermute` while per-row statistics stream (online log-sum-exp), so only
  `[n, n]` logits are alive. Autodiff through the loop would keep every
  visited block for the backward pass, so a custom VJP runs a second ring
  (`ring_contrastive.py`; the shared per-device blocks are in
  `_collective.py`).

Inputs of `clip_loss` and `sigmoid_loss` are expected L2-normalised (the
towers normalise, as in big_vision); `supcon_loss` normalises itself.
"""

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from decalign_jax.losses import _collective as co
from decalign_jax.losses import _numerics
from decalign_jax.losses import contrastive
from decalign_jax.losses import ring_contrastive

Kind = Literal["clip", "sigmoid"]
Strategy = Literal["dense", "all_gather", "ring"]
Axis = co.Axis

KINDS = ("clip", "sigmoid")
STRATEGIES = ("dense", "all_gather", "ring")


# ------------------------------------------------------------ all-gather


def _clip_gather(x, y, t, *, axis, size):
  n = x.shape[0]
  y_all = jax.lax.all_gather(y, axis, tiled=True)
  logits = co.block_logits(x, y_all, t)  # [n, N]
  rows = jax.nn.logsumexp(logits, axis=1)
  # y->x needs each column's log-sum-exp over all devices' rows: psum of
  # partial sums shifted by the global column max (a constant: no grad).
  col_max = jax.lax.pmax(
      jax.lax.stop_gradient(jnp.max(logits, axis=0)), axis)
  cols = col_max + jnp.log(jax.lax.psum(
      jnp.sum(jnp.exp(logits - col_max), axis=0), axis))  # [N], replicated
  local = jnp.sum(rows - 2.0 * co.pos_logits(x, y, t))
  return ((jax.lax.psum(local, axis) + jnp.sum(cols)) / (2 * n * size),)


def _sigmoid_gather(x, y, t, b, *, axis, size):
  logits = co.block_logits(x, jax.lax.all_gather(y, axis, tiled=True), t) + b
  # log s(a) - log s(-a) = a: the matching pairs add their logit.
  local = (jnp.sum(jax.nn.log_sigmoid(-logits))
           + jnp.sum(co.pos_logits(x, y, t) + b))
  return (-jax.lax.psum(local, axis) / (x.shape[0] * size),)


def _supcon_gather(f, labels, valid, t, *, axis, size):
  n = f.shape[0]
  gather = functools.partial(jax.lax.all_gather, axis_name=axis, tiled=True)
  f_all, labels_all, valid_all = gather(f), gather(labels), gather(valid)
  logits = co.block_logits(f, f_all, t)  # [n, N]
  me = jax.lax.axis_index(axis) * n + jnp.arange(n)
  is_self = me[:, None] == jnp.arange(n * size)[None, :]
  pair, positive = co.supcon_masks(labels, valid, labels_all, valid_all,
                                   is_self)
  row_max = jnp.max(jnp.where(valid_all[None, :] | is_self, logits, -jnp.inf),
                    axis=1, keepdims=True)
  logits = logits - jax.lax.stop_gradient(row_max)
  log_norm = jnp.log(_numerics.clamp_min(
      jnp.sum(jnp.where(pair, jnp.exp(logits), 0.0), axis=1), 1e-8))
  num_pos = jnp.sum(positive, axis=1)
  mean_pos = (jnp.sum(jnp.where(positive, logits, 0.0), axis=1)
              / jnp.maximum(num_pos, 1).astype(f.dtype)) - log_norm
  anchor = num_pos > 0
  total = jax.lax.psum(jnp.sum(jnp.where(anchor, mean_pos, 0.0)), axis)
  count = jax.lax.psum(jnp.sum(anchor), axis)
  return (-total / jnp.maximum(count, 1).astype(f.dtype),)


# ---------------------------------------------------------------- public


def _check(strategy: str, mesh: jax.sharding.Mesh | None) -> None:
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy={strategy!r}; expected one of {STRATEGIES}")
  if strategy != "dense" and mesh is None:
    raise ValueError(f"strategy={strategy!r} needs a mesh")


def clip_loss(x: jax.Array, y: jax.Array, *,
              temperature: float | jax.Array,
              strategy: Strategy = "dense",
              mesh: jax.sharding.Mesh | None = None,
              axis: Axis = "data") -> jax.Array:
  """Symmetric InfoNCE (CLIP): mean of the x->y and y->x cross-entropies.

  Args:
    x: `[N, D]` L2-normalised embeddings; `x[i]` matches `y[i]`.
    y: `[N, D]` L2-normalised embeddings.
    temperature: logits are `x @ y.T / temperature` (differentiable).
    strategy: 'dense' (`[N, N]` logits, partitioned by XLA under jit),
      'all_gather' (`[n, N]` per device) or 'ring' (`[n, n]` per device).
    mesh: required by the sharded strategies; `N` divisible by `axis`.
    axis: mesh axis (or axes) the batch is split over.

  Returns:
    scalar loss.
  """
  _check(strategy, mesh)
  t = jnp.asarray(temperature, x.dtype)
  if strategy == "ring":
    return ring_contrastive.clip_ring(mesh, axis, x, y, t)
  if strategy == "all_gather":
    return co.sharded(_clip_gather, mesh, axis, "bbr", "r")(x, y, t)[0]
  logits = co.block_logits(x, y, t)
  pos = jnp.diagonal(logits)
  rows = jax.nn.logsumexp(logits, axis=1) - pos
  cols = jax.nn.logsumexp(logits, axis=0) - pos
  return 0.5 * (jnp.mean(rows) + jnp.mean(cols))


def sigmoid_loss(x: jax.Array, y: jax.Array, *,
                 temperature: float | jax.Array,
                 bias: float | jax.Array,
                 strategy: Strategy = "dense",
                 mesh: jax.sharding.Mesh | None = None,
                 axis: Axis = "data") -> jax.Array:
  """Pairwise sigmoid loss (SigLIP), as big_vision's `_sigmoid_loss`.

  `-sum_ij log sigmoid(z_ij * (x_i . y_j / temperature + bias)) / N` with
  `z_ij = 1` on matching pairs and `-1` elsewhere; big_vision's logit scale
  `t` is `1 / temperature`.

  Args:
    x: `[N, D]` L2-normalised embeddings; `x[i]` matches `y[i]`.
    y: `[N, D]` L2-normalised embeddings.
    temperature: logit scale is `1 / temperature` (differentiable).
    bias: added to every logit (differentiable).
    strategy: 'dense', 'all_gather' or 'ring' (see `clip_loss`).
    mesh: required by the sharded strategies; `N` divisible by `axis`.
    axis: mesh axis (or axes) the batch is split over.

  Returns:
    scalar loss.
  """
  _check(strategy, mesh)
  t = jnp.asarray(temperature, x.dtype)
  b = jnp.asarray(bias, x.dtype)
  if strategy == "ring":
    return ring_contrastive.sigmoid_ring(mesh, axis, x, y, t, b)
  if strategy == "all_gather":
    return co.sharded(_sigmoid_gather, mesh, axis, "bbrr", "r")(x, y, t, b)[0]
  logits = co.block_logits(x, y, t) + b
  z = 2.0 * jnp.eye(x.shape[0], dtype=logits.dtype) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / x.shape[0]


def supcon_loss(features: jax.Array, labels: jax.Array, *,
                temperature: float | jax.Array,
                weights: jax.Array | None = None,
                strategy: Strategy = "dense",
                mesh: jax.sharding.Mesh | None = None,
                axis: Axis = "data") -> jax.Array:
  """SupCon over the global batch, as `supervised_contrastive_loss`.

  Args:
    features: `[N, F]` representations (L2-normalised here).
    labels: `[N]` integer classes.
    temperature: softmax temperature (differentiable).
    weights: optional `[N]` 0/1 validity (padding).
    strategy: 'dense' (`supervised_contrastive_loss` itself), 'all_gather'
      or 'ring' (see `clip_loss`).
    mesh: required by the sharded strategies; `N` divisible by `axis`.
    axis: mesh axis (or axes) the batch is split over.

  Returns:
    scalar loss.
  """
  _check(strategy, mesh)
  if strategy == "dense":
    return contrastive.supervised_contrastive_loss(
        features, labels, temperature=temperature, weights=weights)
  f = contrastive.l2_normalize(features)  # Row-wise: stays sharded.
  labels = jnp.reshape(labels, (-1,))
  valid = (jnp.ones(labels.shape, bool) if weights is None
           else jnp.reshape(weights, (-1,)) > 0)
  t = jnp.asarray(temperature, f.dtype)
  if strategy == "ring":
    return ring_contrastive.supcon_ring(mesh, axis, f, labels, valid, t)
  return co.sharded(_supcon_gather, mesh, axis, "bbbr", "r")(
      f, labels, valid, t)[0]


def contrastive_loss(x: jax.Array, y: jax.Array, *, kind: Kind,
                     temperature: float | jax.Array,
                     bias: float | jax.Array | None = None,
                     strategy: Strategy = "dense",
                     mesh: jax.sharding.Mesh | None = None,
                     axis: Axis = "data") -> jax.Array:
  """Two-tower contrastive loss over the global batch.

  Args:
    x: `[N, D]` L2-normalised embeddings; `x[i]` matches `y[i]`.
    y: `[N, D]` L2-normalised embeddings.
    kind: 'clip' (`clip_loss`) or 'sigmoid' (`sigmoid_loss`).
    temperature: logits are `x @ y.T / temperature`.
    bias: SigLIP logit bias; required for 'sigmoid', refused for 'clip'.
    strategy: 'dense', 'all_gather' or 'ring' (see `clip_loss`).
    mesh: required by the sharded strategies.
    axis: mesh axis (or axes) the batch is split over.

  Returns:
    scalar loss.
  """
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
  if (bias is None) != (kind == "clip"):
    raise ValueError(f"kind={kind!r}: bias is "
                     f"{'not used' if kind == 'clip' else 'required'}")
  shard = dict(strategy=strategy, mesh=mesh, axis=axis)
  if kind == "clip":
    return clip_loss(x, y, temperature=temperature, **shard)
  return sigmoid_loss(x, y, temperature=temperature, bias=bias, **shard)
