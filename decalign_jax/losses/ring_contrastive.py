"""Ring strategy of the global-batch contrastive losses (`[n, n]` logits).

The other tower's `[n, D]` blocks travel around the devices with `ppermute`
while per-row statistics stream (online log-sum-exp), so only `[n, n]` logits
are alive on a device. Autodiff through the loop would keep every visited
block for the backward pass, so each loss has a custom VJP that runs a second
ring. `global_contrastive` is the public interface.
"""

import functools

import jax
import jax.numpy as jnp

from decalign_jax.losses import _collective as co
from decalign_jax.losses import _numerics




def ring_loss(fwd_kernel, bwd_kernel, in_specs: str, res_specs: str):
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
    out = co.sharded(fwd_kernel, mesh, axis, in_specs, "r" + res_specs)(*args)
    return out[0], (args, out[1:])

  def loss_bwd(mesh, axis, saved, g):
    args, res = saved
    floats = [jnp.issubdtype(a.dtype, jnp.floating) for a in args]
    out_specs = "".join(c for c, f in zip(in_specs, floats) if f)
    grads = iter(co.sharded(bwd_kernel, mesh, axis,
                            in_specs + res_specs + "r",
                            out_specs)(*args, *res, g))
    return tuple(next(grads) if f else None for f in floats)

  loss.defvjp(loss_fwd, loss_bwd)
  return loss


def _clip_ring_fwd_kernel(x, y, t, *, axis, size):
  n = x.shape[0]
  init = (co.varying(-jnp.inf, (n,), x.dtype, axis),
          co.varying(0.0, (n,), x.dtype, axis))

  def body(step, rows, y_blk, cols):
    del step
    logits = co.block_logits(x, y_blk, t)
    return co.online_lse(rows, logits, 1), co.online_lse(cols, logits, 0)

  rows, cols = co.ring(body, init, y, init, axis=axis, size=size)
  row_lse = rows[0] + jnp.log(rows[1])
  col_lse = cols[0] + jnp.log(cols[1])  # of our y's columns
  local = jnp.sum(row_lse + col_lse - 2.0 * co.pos_logits(x, y, t))
  return jax.lax.psum(local, axis) / (2 * n * size), row_lse, col_lse


def _clip_ring_bwd_kernel(x, y, t, row_lse, col_lse, g, *, axis, size):
  n = x.shape[0]
  c = g / (2 * n * size)

  def body(step, carry, block, dy_blk):
    del step
    dx, dt = carry
    y_blk, col_lse_blk = block
    logits = co.block_logits(x, y_blk, t)
    # d loss / d logits: row softmax + column softmax (minus the positives,
    # added below).
    grad = c * (jnp.exp(logits - row_lse[:, None])
                + jnp.exp(logits - col_lse_blk[None, :]))
    carry = dx + co.mm(grad, y_blk), dt + jnp.sum(grad * logits)
    return carry, dy_blk + co.mm(grad.T, x)

  init = (co.varying(0.0, x.shape, x.dtype, axis),
          co.varying(0.0, (), x.dtype, axis))
  (dx, dt), dy = co.ring(body, init, (y, col_lse),
                         co.varying(0.0, y.shape, y.dtype, axis),
                         axis=axis, size=size)
  dt = dt - 2.0 * c * jnp.sum(co.pos_logits(x, y, t))
  return ((dx - 2.0 * c * y) / t, (dy - 2.0 * c * x) / t,
          -jax.lax.psum(dt, axis) / t)


def _sigmoid_ring_fwd_kernel(x, y, t, b, *, axis, size):
  def body(step, acc, y_blk, moving):
    del step
    logits = co.block_logits(x, y_blk, t) + b
    return acc + jnp.sum(jax.nn.log_sigmoid(-logits)), moving

  acc, _ = co.ring(body, co.varying(0.0, (), x.dtype, axis), y, (),
                   axis=axis, size=size)
  local = acc + jnp.sum(co.pos_logits(x, y, t) + b)
  return (-jax.lax.psum(local, axis) / (x.shape[0] * size),)


def _sigmoid_ring_bwd_kernel(x, y, t, b, g, *, axis, size):
  n = x.shape[0]
  c = g / (n * size)

  def body(step, carry, y_blk, dy_blk):
    del step
    dx, dt, db = carry
    scaled = co.block_logits(x, y_blk, t)
    grad = c * jax.nn.sigmoid(scaled + b)  # Positives corrected below.
    carry = (dx + co.mm(grad, y_blk), dt + jnp.sum(grad * scaled),
             db + jnp.sum(grad))
    return carry, dy_blk + co.mm(grad.T, x)

  zero = co.varying(0.0, (), x.dtype, axis)
  init = (co.varying(0.0, x.shape, x.dtype, axis), zero, zero)
  (dx, dt, db), dy = co.ring(body, init, y,
                             co.varying(0.0, y.shape, y.dtype, axis),
                             axis=axis, size=size)
  dt = dt - c * jnp.sum(co.pos_logits(x, y, t))
  return ((dx - c * y) / t, (dy - c * x) / t,
          -jax.lax.psum(dt, axis) / t, jax.lax.psum(db - c * n, axis))


def _supcon_ring_fwd_kernel(f, labels, valid, t, *, axis, size):
  n = f.shape[0]
  eye = jnp.eye(n, dtype=bool)

  def body(step, rows, block, moving):
    m, s, pos_sum, num_pos = rows
    f_blk, labels_blk, valid_blk = block
    logits = co.block_logits(f, f_blk, t)
    is_self = jnp.logical_and(step == 0, eye)
    pair, positive = co.supcon_masks(labels, valid, labels_blk, valid_blk,
                                     is_self)
    # As the reference: the shift is the max over valid samples and self.
    m_new = jnp.maximum(m, jnp.max(
        jnp.where(valid_blk[None, :] | is_self, logits, -jnp.inf), axis=1))
    s = s * jnp.exp(m - m_new) + jnp.sum(
        jnp.where(pair, jnp.exp(logits - m_new[:, None]), 0.0), axis=1)
    pos_sum = pos_sum + jnp.sum(jnp.where(positive, logits, 0.0), axis=1)
    return (m_new, s, pos_sum, num_pos + jnp.sum(positive, axis=1)), moving

  init = (co.varying(-jnp.inf, (n,), f.dtype, axis),
          co.varying(0.0, (n,), f.dtype, axis),
          co.varying(0.0, (n,), f.dtype, axis),
          co.varying(0, (n,), jnp.int32, axis))
  (m, s, pos_sum, num_pos), _ = co.ring(
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
    logits = co.block_logits(f, f_blk, t)
    is_self = jnp.logical_and(step == 0, eye)
    pair, positive = co.supcon_masks(labels, valid, labels_blk, valid_blk,
                                     is_self)
    # The shift m is detached in the reference: no gradient through it.
    grad = (jnp.where(pair, jnp.exp(logits - m[:, None]), 0.0)
            * norm_scale[:, None]
            - jnp.where(positive, pos_scale[:, None], 0.0))
    carry = df + co.mm(grad, f_blk), dt + jnp.sum(grad * logits)
    return carry, df_blk + co.mm(grad.T, f)

  init = (co.varying(0.0, f.shape, f.dtype, axis),
          co.varying(0.0, (), f.dtype, axis))
  (df, dt), df_home = co.ring(body, init, (f, labels, valid),
                              co.varying(0.0, f.shape, f.dtype, axis),
                              axis=axis, size=size)
  return (df + df_home) / t, -jax.lax.psum(dt, axis) / t


clip_ring = ring_loss(_clip_ring_fwd_kernel, _clip_ring_bwd_kernel,
                      "bbr", "bb")
sigmoid_ring = ring_loss(_sigmoid_ring_fwd_kernel, _sigmoid_ring_bwd_kernel,
                         "bbrr", "")
supcon_ring = ring_loss(_supcon_ring_fwd_kernel, _supcon_ring_bwd_kernel,
                        "bbbr", "bbbr")
