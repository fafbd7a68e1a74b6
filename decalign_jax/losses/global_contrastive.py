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
  visited block for the backward pass, so a custom VJP runs a second ring.

Inputs of `clip_loss` and `sigmoid_loss` are expected L2-normalised (the
towers normalise, as in big_vision); `supcon_loss` normalises itself.
"""

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from decalign_jax.losses import _numerics
from decalign_jax.losses import contrastive

P = jax.sharding.PartitionSpec
Kind = Literal["clip", "sigmoid"]
Strategy = Literal["dense", "all_gather", "ring"]
Axis = str | tuple[str, ...]

KINDS = ("clip", "sigmoid")
STRATEGIES = ("dense", "all_gather", "ring")
# Logits are scaled by 1 / temperature; TF32 noise would be amplified.
_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def _logits(a: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
  return _mm(a, b.T) / t


def _pos_logits(x: jax.Array, y: jax.Array, t: jax.Array) -> jax.Array:
  """`[n]` logits of the matching pairs `x_i . y_i / t`."""
  return jnp.sum(x * y, axis=-1) / t


# ------------------------------------------------------------- machinery


def _axis_size(mesh: jax.sharding.Mesh, axis: Axis) -> int:
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  size = 1
  for name in names:
    size *= mesh.shape[name]
  return size


def _varying(value: float, shape: tuple[int, ...], dtype, axis: Axis
             ) -> jax.Array:
  """A fresh accumulator typed as per-device (shard_map's vma check)."""
  return jax.lax.pcast(jnp.full(shape, value, dtype), axis, to="varying")


def _shift(tree, axis: Axis, size: int):
  perm = [(i, (i + 1) % size) for i in range(size)]
  return jax.tree.map(lambda a: jax.lax.ppermute(a, axis, perm), tree)


def _ring(body, carry, block, moving, *, axis: Axis, size: int):
  """Shows every device's `block` to `body` once, our own first.

  Args:
    body: `(step, carry, block, moving) -> (carry, moving)`; at `step` s the
      block is that of device `(me - s) % size`.
    carry: our accumulators; they stay here.
    block: read-only pytree of `[n, ...]` arrays, one device on per step.
    moving: the block's accumulators; they travel with it.

  Returns:
    `(carry, moving)`, `moving` being those of our own block (one more
    shift brings them home).
  """
  def visit(step, state):
    carry, block, moving = state
    carry, moving = body(step, carry, block, moving)
    return carry, _shift(block, axis, size), _shift(moving, axis, size)

  carry, block, moving = jax.lax.fori_loop(0, size - 1, visit,
                                           (carry, block, moving))
  carry, moving = body(size - 1, carry, block, moving)
  return carry, _shift(moving, axis, size)


def _online_lse(state, logits: jax.Array, axis: int):
  """Streams `logits` reduced over `axis` into a (max, sum-exp) pair."""
  m, s = state
  m_new = jnp.maximum(m, jnp.max(logits, axis=axis))
  s = s * jnp.exp(m - m_new) + jnp.sum(
      jnp.exp(logits - jnp.expand_dims(m_new, axis)), axis=axis)
  return m_new, s


def _sharded(kernel, mesh, axis, in_specs, out_specs, **kwargs):
  """`jax.shard_map` of `kernel`, specs given as 'b' (batch) / 'r'."""
  spec = lambda c: P(axis) if c == "b" else P()
  return jax.shard_map(
      functools.partial(kernel, axis=axis, size=_axis_size(mesh, axis),
                        **kwargs),
      mesh=mesh, in_specs=tuple(map(spec, in_specs)),
      out_specs=tuple(map(spec, out_specs)))


# ------------------------------------------------------------ all-gather


def _clip_gather(x, y, t, *, axis, size):
  n = x.shape[0]
  logits = _logits(x, jax.lax.all_gather(y, axis, tiled=True), t)  # [n, N]
  rows = jax.nn.logsumexp(logits, axis=1)
  # y->x needs each column's log-sum-exp over all devices' rows: psum of
  # partial sums shifted by the global column max (a constant: no grad).
  col_max = jax.lax.pmax(
      jax.lax.stop_gradient(jnp.max(logits, axis=0)), axis)
  cols = col_max + jnp.log(jax.lax.psum(
      jnp.sum(jnp.exp(logits - col_max), axis=0), axis))  # [N], replicated
  local = jnp.sum(rows - 2.0 * _pos_logits(x, y, t))
  return ((jax.lax.psum(local, axis) + jnp.sum(cols)) / (2 * n * size),)


def _sigmoid_gather(x, y, t, b, *, axis, size):
  logits = _logits(x, jax.lax.all_gather(y, axis, tiled=True), t) + b
  # log s(a) - log s(-a) = a: the matching pairs add their logit.
  local = (jnp.sum(jax.nn.log_sigmoid(-logits))
           + jnp.sum(_pos_logits(x, y, t) + b))
  return (-jax.lax.psum(local, axis) / (x.shape[0] * size),)


def _supcon_masks(labels, valid, labels_blk, valid_blk, is_self):
  pair = ~is_self & valid[:, None] & valid_blk[None, :]
  positive = pair & (labels[:, None] == labels_blk[None, :])
  return pair, positive


def _supcon_gather(f, labels, valid, t, *, axis, size):
  n = f.shape[0]
  gather = functools.partial(jax.lax.all_gather, axis_name=axis, tiled=True)
  f_all, labels_all, valid_all = gather(f), gather(labels), gather(valid)
  logits = _logits(f, f_all, t)  # [n, N]
  me = jax.lax.axis_index(axis) * n + jnp.arange(n)
  is_self = me[:, None] == jnp.arange(n * size)[None, :]
  pair, positive = _supcon_masks(labels, valid, labels_all, valid_all,
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


# ------------------------------------------------------------------ ring


def _ring_loss(fwd_kernel, bwd_kernel, in_specs: str, res_specs: str):
  """`loss(mesh, axis, *args)` from per-device ring kernels, custom VJP.

  Args:
    fwd_kernel: `(*args) -> (loss, *residuals)`.
    bwd_kernel: `(*args, *residuals, g) -> grads` of the floating `args`
      (integer and boolean ones get no cotangent).
    in_specs: 'b' (batch) or 'r' (replicated) per argument.
    res_specs: the same per residual.

  Returns:
    the loss function.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
  def loss(mesh, axis, *args):
    return loss_fwd(mesh, axis, *args)[0]

  def loss_fwd(mesh, axis, *args):
    out = _sharded(fwd_kernel, mesh, axis, in_specs, "r" + res_specs)(*args)
    return out[0], (args, out[1:])

  def loss_bwd(mesh, axis, saved, g):
    args, res = saved
    floats = [jnp.issubdtype(a.dtype, jnp.floating) for a in args]
    out_specs = "".join(c for c, f in zip(in_specs, floats) if f)
    grads = iter(_sharded(bwd_kernel, mesh, axis, in_specs + res_specs + "r",
                          out_specs)(*args, *res, g))
    return tuple(next(grads) if f else None for f in floats)

  loss.defvjp(loss_fwd, loss_bwd)
  return loss


def _clip_ring_fwd_kernel(x, y, t, *, axis, size):
  n = x.shape[0]
  init = (_varying(-jnp.inf, (n,), x.dtype, axis),
          _varying(0.0, (n,), x.dtype, axis))

  def body(step, rows, y_blk, cols):
    del step
    logits = _logits(x, y_blk, t)
    return _online_lse(rows, logits, 1), _online_lse(cols, logits, 0)

  rows, cols = _ring(body, init, y, init, axis=axis, size=size)
  row_lse = rows[0] + jnp.log(rows[1])
  col_lse = cols[0] + jnp.log(cols[1])  # of our y's columns
  local = jnp.sum(row_lse + col_lse - 2.0 * _pos_logits(x, y, t))
  return jax.lax.psum(local, axis) / (2 * n * size), row_lse, col_lse


def _clip_ring_bwd_kernel(x, y, t, row_lse, col_lse, g, *, axis, size):
  n = x.shape[0]
  c = g / (2 * n * size)

  def body(step, carry, block, dy_blk):
    del step
    dx, dt = carry
    y_blk, col_lse_blk = block
    logits = _logits(x, y_blk, t)
    # d loss / d logits: row softmax + column softmax (minus the positives,
    # added below).
    grad = c * (jnp.exp(logits - row_lse[:, None])
                + jnp.exp(logits - col_lse_blk[None, :]))
    carry = dx + _mm(grad, y_blk), dt + jnp.sum(grad * logits)
    return carry, dy_blk + _mm(grad.T, x)

  init = (_varying(0.0, x.shape, x.dtype, axis),
          _varying(0.0, (), x.dtype, axis))
  (dx, dt), dy = _ring(body, init, (y, col_lse),
                       _varying(0.0, y.shape, y.dtype, axis),
                       axis=axis, size=size)
  dt = dt - 2.0 * c * jnp.sum(_pos_logits(x, y, t))
  return ((dx - 2.0 * c * y) / t, (dy - 2.0 * c * x) / t,
          -jax.lax.psum(dt, axis) / t)


def _sigmoid_ring_fwd_kernel(x, y, t, b, *, axis, size):
  def body(step, acc, y_blk, moving):
    del step
    logits = _logits(x, y_blk, t) + b
    return acc + jnp.sum(jax.nn.log_sigmoid(-logits)), moving

  acc, _ = _ring(body, _varying(0.0, (), x.dtype, axis), y, (),
                 axis=axis, size=size)
  local = acc + jnp.sum(_pos_logits(x, y, t) + b)
  return (-jax.lax.psum(local, axis) / (x.shape[0] * size),)


def _sigmoid_ring_bwd_kernel(x, y, t, b, g, *, axis, size):
  n = x.shape[0]
  c = g / (n * size)

  def body(step, carry, y_blk, dy_blk):
    del step
    dx, dt, db = carry
    scaled = _logits(x, y_blk, t)
    grad = c * jax.nn.sigmoid(scaled + b)  # Positives corrected below.
    carry = (dx + _mm(grad, y_blk), dt + jnp.sum(grad * scaled),
             db + jnp.sum(grad))
    return carry, dy_blk + _mm(grad.T, x)

  zero = _varying(0.0, (), x.dtype, axis)
  init = (_varying(0.0, x.shape, x.dtype, axis), zero, zero)
  (dx, dt, db), dy = _ring(body, init, y,
                           _varying(0.0, y.shape, y.dtype, axis),
                           axis=axis, size=size)
  dt = dt - c * jnp.sum(_pos_logits(x, y, t))
  return ((dx - c * y) / t, (dy - c * x) / t,
          -jax.lax.psum(dt, axis) / t, jax.lax.psum(db - c * n, axis))


def _supcon_ring_fwd_kernel(f, labels, valid, t, *, axis, size):
  n = f.shape[0]
  eye = jnp.eye(n, dtype=bool)

  def body(step, rows, block, moving):
    m, s, pos_sum, num_pos = rows
    f_blk, labels_blk, valid_blk = block
    logits = _logits(f, f_blk, t)
    is_self = jnp.logical_and(step == 0, eye)
    pair, positive = _supcon_masks(labels, valid, labels_blk, valid_blk,
                                   is_self)
    # As the reference: the shift is the max over valid samples and self.
    m_new = jnp.maximum(m, jnp.max(
        jnp.where(valid_blk[None, :] | is_self, logits, -jnp.inf), axis=1))
    s = s * jnp.exp(m - m_new) + jnp.sum(
        jnp.where(pair, jnp.exp(logits - m_new[:, None]), 0.0), axis=1)
    pos_sum = pos_sum + jnp.sum(jnp.where(positive, logits, 0.0), axis=1)
    return (m_new, s, pos_sum, num_pos + jnp.sum(positive, axis=1)), moving

  init = (_varying(-jnp.inf, (n,), f.dtype, axis),
          _varying(0.0, (n,), f.dtype, axis),
          _varying(0.0, (n,), f.dtype, axis),
          _varying(0, (n,), jnp.int32, axis))
  (m, s, pos_sum, num_pos), _ = _ring(
      body, init, (f, labels, valid), (), axis=axis, size=size)
  # -(mean positive log-prob) = max + log_norm - mean positive logit.
  per_anchor = (m + jnp.log(_numerics.clamp_min(s, 1e-8))
                - pos_sum / jnp.maximum(num_pos, 1).astype(f.dtype))
  anchor = num_pos > 0
  total = jax.lax.psum(jnp.sum(jnp.where(anchor, per_anchor, 0.0)), axis)
  count = jnp.maximum(jax.lax.psum(jnp.sum(anchor), axis), 1).astype(f.dtype)
  return total / count, m, s, num_pos, count


def _supcon_ring_bwd_kernel(f, labels, valid, t, m, s, num_pos, count, g, *,
                            axis, size):
  n = f.shape[0]
  eye = jnp.eye(n, dtype=bool)
  scale = jnp.where(num_pos > 0, g / count, 0.0)
  # The clamp at 1e-8 passes the gradient where s >= 1e-8 (torch).
  norm_scale = jnp.where(s >= 1e-8, scale / s, 0.0)
  pos_scale = scale / jnp.maximum(num_pos, 1).astype(f.dtype)

  def body(step, carry, block, df_blk):
    df, dt = carry
    f_blk, labels_blk, valid_blk = block
    logits = _logits(f, f_blk, t)
    is_self = jnp.logical_and(step == 0, eye)
    pair, positive = _supcon_masks(labels, valid, labels_blk, valid_blk,
                                   is_self)
    # The shift m is detached in the reference: no gradient through it.
    grad = (jnp.where(pair, jnp.exp(logits - m[:, None]), 0.0)
            * norm_scale[:, None]
            - jnp.where(positive, pos_scale[:, None], 0.0))
    carry = df + _mm(grad, f_blk), dt + jnp.sum(grad * logits)
    return carry, df_blk + _mm(grad.T, f)

  init = (_varying(0.0, f.shape, f.dtype, axis),
          _varying(0.0, (), f.dtype, axis))
  (df, dt), df_home = _ring(body, init, (f, labels, valid),
                            _varying(0.0, f.shape, f.dtype, axis),
                            axis=axis, size=size)
  return (df + df_home) / t, -jax.lax.psum(dt, axis) / t


_clip_ring = _ring_loss(_clip_ring_fwd_kernel, _clip_ring_bwd_kernel,
                        "bbr", "bb")
_sigmoid_ring = _ring_loss(_sigmoid_ring_fwd_kernel, _sigmoid_ring_bwd_kernel,
                           "bbrr", "")
_supcon_ring = _ring_loss(_supcon_ring_fwd_kernel, _supcon_ring_bwd_kernel,
                          "bbbr", "bbbr")


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
    return _clip_ring(mesh, axis, x, y, t)
  if strategy == "all_gather":
    return _sharded(_clip_gather, mesh, axis, "bbr", "r")(x, y, t)[0]
  logits = _logits(x, y, t)
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
    return _sigmoid_ring(mesh, axis, x, y, t, b)
  if strategy == "all_gather":
    return _sharded(_sigmoid_gather, mesh, axis, "bbrr", "r")(x, y, t, b)[0]
  logits = _logits(x, y, t) + b
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
    return _supcon_ring(mesh, axis, f, labels, valid, t)
  return _sharded(_supcon_gather, mesh, axis, "bbbr", "r")(
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
