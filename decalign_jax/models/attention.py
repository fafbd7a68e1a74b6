"""Scaled dot-product attention with dropout, and a hand-written backward.

Forward (MulT / reference order): `logits = (q . k) / sqrt(C)`, masked,
`w = softmax(logits)`, `out = dropout(w) @ v`. The backward is the
FlashAttention one, written in JAX: with `g = dL/d out`,

    D = rowsum(g * out)                     # [.., Q], not a [.., Q, K] pass
    dW = dropout'(g @ v^T)
    dlogits = w * (dW - D) / sqrt(C)

since `sum_k dW w = sum_k (g v^T) dropout(w) = sum_c g out`. Autodiff of the
same forward reduces `dW * w` over the [Q, K] weights instead, and recomputes
the dropout mask twice. The dropout mask is drawn once per pass from the
16-bit generator of `dropout.py`. The key / value products use the fast CPU
form of `dots.py`. Values equal autodiff's to float32 rounding. As for any
`custom_vjp`, forward-mode autodiff (`jax.jvp`, `jax.hessian`) is not defined.
`jax.nn.dot_product_attention` has no dropout on the weights, which the
reference applies; hence this core.
"""

import functools
import math

import jax
from jax import custom_derivatives
import jax.numpy as jnp

from decalign_jax.models import cpu_attention
from decalign_jax.models import dots
from decalign_jax.models import dropout as dropout_lib


def _softmax_weights(q, k, mask):
  logits = jnp.einsum("...qc,...kc->...qk", q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  return jax.nn.softmax(logits, axis=-1)


def _apply_dropout(w, rate, key):
  """`(dropped weights, (keep, scale) or None)`; None when nothing drops."""
  if rate == 0.0:
    return w, None
  keep, scale = dropout_lib.keep_mask(key, w.shape, rate)
  if keep is None:
    return w, None
  return jnp.where(keep, w * jnp.asarray(scale, w.dtype), 0), (keep, scale)


def _value(x):
  return x.value if isinstance(x, custom_derivatives.CustomVJPPrimal) else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, mask, key, rate):
  return _attention_fwd(q, k, v, mask, key, rate)[0]


def _attention_fwd(q, k, v, mask, key, rate):
  q, k, v, mask, key = map(_value, (q, k, v, mask, key))
  w = _softmax_weights(q, k, mask)
  wd, _ = _apply_dropout(w, rate, key)
  out = jnp.matmul(wd, v)
  return (out, w), (q, k, v, key, w, out)


def _attention_bwd(rate, res, cts):
  q, k, v, key, w, out = res
  g, g_weights = cts
  zero = custom_derivatives.SymbolicZero
  if isinstance(g, zero):
    g = jnp.zeros_like(out)
  d_row = jnp.sum(g * out, axis=-1, keepdims=True)
  d_dropped = jnp.einsum("...qc,...kc->...qk", g, v)
  wd, drop = _apply_dropout(w, rate, key)
  if drop is None:
    d_w = d_dropped
  else:
    keep, scale = drop
    d_w = jnp.where(keep, d_dropped * jnp.asarray(scale, w.dtype), 0)
  if not isinstance(g_weights, zero):
    # A cotangent on the returned weights adds its own softmax term.
    d_w = d_w + g_weights
    d_row = d_row + jnp.sum(g_weights * w, axis=-1, keepdims=True)
  d_logits = w * (d_w - d_row) / math.sqrt(q.shape[-1])
  dq = jnp.matmul(d_logits, k).astype(q.dtype)
  dk = dots.tn_product(d_logits, q).astype(k.dtype)
  dv = dots.tn_product(wd, g).astype(v.dtype)
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              mask: jax.Array | None = None, dropout_rate: float = 0.0,
              dropout_key: jax.Array | None = None,
              implementation: str = "xla", heads_last: bool = False
              ) -> tuple[jax.Array, jax.Array]:
  """Multi-head attention core.

  Args:
    q: `[..., Q, C]` queries (heads-first), or `[B, Q, H, C]` with
      `heads_last`.
    k: `[..., K, C]` keys (`[B, K, H, C]`).
    v: `[..., K, C]` values (`[B, K, H, C]`).
    mask: optional `[Q, K]` bool, True = attend.
    dropout_rate: dropout on the attention weights (0 = off).
    dropout_key: PRNG key, required when `dropout_rate > 0`.
    implementation: 'xla', or 'cpu' for the fused kernel of
      `cpu_attention.py` (same values to float32 rounding, same dropout
      mask; operands it does not support take the XLA path).
    heads_last: q, k, v and the output are `[B, T, H, C]`, the layout the
      projections produce. The kernel reads it in place; the XLA path
      transposes to heads-first (where XLA:CPU's batched products are
      fastest) and back.

  Returns:
    `(output in the layout of q, [..., H, Q, K] post-softmax weights before
    dropout)`.
  """
  dropout_lib.keep_threshold(dropout_rate)  # validates the rate
  if dropout_rate > 0.0 and dropout_key is None:
    raise ValueError("attention dropout_rate > 0 needs a dropout_key")
  if implementation not in ("xla", "cpu"):
    raise ValueError(f"attention implementation={implementation!r}; "
                     "expected 'xla' or 'cpu'")
  key = dropout_key if dropout_rate > 0.0 else None
  if implementation == "cpu" and cpu_attention.supports(q, k, key,
                                                        heads_last):
    out = cpu_attention.attention(q, k, v, mask, key, float(dropout_rate),
                                  heads_last)
    # The weights are only for inspection (sown intermediates): XLA drops
    # this computation when nothing reads them.
    first = lambda x: x.transpose(0, 2, 1, 3) if heads_last else x  # noqa: E731
    return out, _softmax_weights(first(q), first(k), mask)
  if heads_last:
    t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    out, w = _attention(t(q), t(k), t(v), mask, dropout_key,
                        float(dropout_rate))
    return t(out), w
  return _attention(q, k, v, mask, dropout_key, float(dropout_rate))
