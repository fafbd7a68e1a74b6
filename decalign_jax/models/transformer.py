"""MulT-style cross-modal transformer encoder (Tsai et al. 2019, as in DecAlign).

Post-LN layers, inputs scaled by sqrt(d), no positional embedding. The query
stream is one modality; keys/values are either the same stream (self-attention)
or the time-concatenation of the other modalities (cross-modal attention).
Layouts are channel-last: `[B, T, D]`.
"""

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from decalign_jax.models import attention as attention_lib
from decalign_jax.models import dots
from decalign_jax.models import dropout as dropout_lib

# torch.nn.Linear / Conv1d default weight init: kaiming_uniform(a=sqrt(5)),
# i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) = variance 1/(3 fan_in).
torch_default_kernel_init = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform")
# The reference packs W_q, W_k, W_v in one (3d, d) matrix with
# xavier_uniform: variance 2/(d + 3d) = 1/(2d); fan_avg of a (d, d) block is d.
packed_xavier_init = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")


def torch_default_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """torch.nn.Linear default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_dense(features: int, fan_in: int, name: str, **kw) -> dots.Dense:
  return dots.Dense(
      features, kernel_init=torch_default_kernel_init,
      bias_init=torch_default_bias_init(fan_in), name=name, **kw)


def causal_mask(query_len: int, segment_lens: Sequence[int]) -> jax.Array:
  """Boolean `[Tq, S]` mask, True where attention is allowed.

  Each key/value segment (one modality of the time-concatenated context) is
  position-aligned with the query: query step t sees steps <= t of every
  segment. With a single segment of the query's length this is the usual
  lower-triangular self-attention mask.

  Args:
    query_len: Tq.
    segment_lens: lengths of the concatenated key/value segments.

  Returns:
    `[Tq, sum(segment_lens)]` bool.
  """
  t = jnp.arange(query_len)[:, None]
  parts = [jnp.arange(n)[None, :] <= t for n in segment_lens]
  return jnp.concatenate(parts, axis=1)


class MultiheadAttention(nn.Module):
  """Multi-head attention with separate q/k/v projections.

  Heads own contiguous channel blocks `[h*d/H, (h+1)*d/H)`; logits are
  `(q . k) / sqrt(d/H)`, scaled after the product as in the reference.
  """

  embed_dim: int
  num_heads: int
  attn_dropout: float = 0.0
  attention_kernel: str = "xla"  # or 'cpu': see attention.attention

  @nn.compact
  def __call__(self, query, key, value, *, mask=None, deterministic=True):
    """Attends `query` [B, Tq, D] over `key`/`value` [B, S, D].

    Args:
      query: `[B, Tq, D]`.
      key: `[B, S, D]`.
      value: `[B, S, D]`.
      mask: optional `[Tq, S]` bool, True = attend.
      deterministic: disables dropout.

    Returns:
      `([B, Tq, D] output, [B, H, Tq, S] post-softmax weights)`.
    """
    d, h = self.embed_dim, self.num_heads
    if d % h:
      raise ValueError(f"model.d_model={d} is not divisible by "
                       f"model.num_heads={h}")
    hd = d // h
    proj = lambda name: dots.Dense(  # noqa: E731
        d, kernel_init=packed_xavier_init, bias_init=nn.initializers.zeros,
        name=name)
    # [B, T, H, hd]: the attention core picks its layout (the XLA path
    # goes heads-first, 3x faster at batch 512; the kernel reads this one).
    split = lambda x: x.reshape(*x.shape[:2], h, hd)  # noqa: E731
    q = split(proj("q_proj")(query))
    k = split(proj("k_proj")(key))
    v = split(proj("v_proj")(value))
    rate = 0.0 if deterministic else self.attn_dropout
    out, weights = attention_lib.attention(
        q, k, v, mask=mask, dropout_rate=rate,
        dropout_key=self.make_rng("dropout") if rate else None,
        implementation=self.attention_kernel, heads_last=True)
    self.sow("intermediates", "attn_weights", weights)
    out = out.reshape(query.shape)
    out = dots.Dense(d, kernel_init=torch_default_kernel_init,
                     bias_init=nn.initializers.zeros, name="out_proj")(out)
    return out, weights


class TransformerEncoderLayer(nn.Module):
  """Post-LN layer: x = LN(x + MHA(x, kv)); x = LN(x + FFN(x))."""

  embed_dim: int
  num_heads: int
  attn_dropout: float = 0.0
  relu_dropout: float = 0.0
  res_dropout: float = 0.0
  attention_kernel: str = "xla"  # 'cpu': the kernel, and its dropout masks

  @nn.compact
  def __call__(self, x, key, value, *, mask=None, deterministic=True):
    d = self.embed_dim
    attn, _ = MultiheadAttention(d, self.num_heads, self.attn_dropout,
                                 self.attention_kernel, name="self_attn")(
                                     x, key, value, mask=mask,
                                     deterministic=deterministic)
    self.sow("intermediates", "attn_out", attn)
    res_drop = dropout_lib.Dropout(self.res_dropout,
                                   implementation=self.attention_kernel)
    x = x + res_drop(attn, deterministic)
    x = nn.LayerNorm(epsilon=1e-5, name="attn_layer_norm")(x)
    y = torch_dense(4 * d, d, "fc1")(x)
    y = dropout_lib.Dropout(self.relu_dropout,
                            implementation=self.attention_kernel)(
                                nn.relu(y), deterministic)
    y = torch_dense(d, 4 * d, "fc2")(y)
    x = x + res_drop(y, deterministic)
    return nn.LayerNorm(epsilon=1e-5, name="final_layer_norm")(x)


class TransformerEncoder(nn.Module):
  """Stack of layers over a query stream, optionally with a cross context.

  Attributes:
    causal: apply a causal mask.
    causal_in_cross: if False (the reference's behaviour), `causal` is ignored
      under cross-modal attention; if True, each context segment is masked
      position-aligned with the query (see `causal_mask`).
  """

  embed_dim: int
  num_heads: int
  num_layers: int
  attn_dropout: float = 0.0
  relu_dropout: float = 0.0
  res_dropout: float = 0.0
  embed_dropout: float = 0.0
  causal: bool = False
  causal_in_cross: bool = True
  attention_kernel: str = "xla"  # 'cpu': the kernel, and its dropout masks

  @nn.compact
  def __call__(self, x, context: Sequence[jax.Array] = (), *,
               deterministic=True):
    """Encodes `x` [B, T, D], attending to `context` segments if given.

    Args:
      x: query stream `[B, T, D]`.
      context: key/value segments `[B, S_i, D]`, concatenated in time; empty
        means self-attention.
      deterministic: disables dropout.

    Returns:
      `[B, T, D]`.
    """
    scale = math.sqrt(self.embed_dim)
    drop = dropout_lib.Dropout(self.embed_dropout,
                               implementation=self.attention_kernel)
    x = drop(scale * x, deterministic)
    if context:
      ctx = scale * jnp.concatenate(list(context), axis=1)
      # The reference draws separate embed-dropout masks for keys and values.
      key, value = drop(ctx, deterministic), drop(ctx, deterministic)
      segment_lens = [c.shape[1] for c in context]
      use_mask = self.causal and self.causal_in_cross
    else:
      key = value = None
      segment_lens = [x.shape[1]]
      use_mask = self.causal
    mask = causal_mask(x.shape[1], segment_lens) if use_mask else None
    for i in range(self.num_layers):
      kv = x if key is None else key
      vv = x if value is None else value
      x = TransformerEncoderLayer(
          self.embed_dim, self.num_heads, self.attn_dropout,
          self.relu_dropout, self.res_dropout, self.attention_kernel,
          name=f"layers_{i}")(
              x, kv, vv, mask=mask, deterministic=deterministic)
      self.sow("intermediates", f"layer{i}_out", x)
    return x
