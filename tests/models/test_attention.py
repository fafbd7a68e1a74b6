"""The attention core's hand-written backward equals autodiff."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decalign_jax.models import attention
from decalign_jax.models import dropout as dropout_lib

_RS = np.random.default_rng(0)
Q, K, V = (jnp.asarray(_RS.standard_normal(s), jnp.float32)
           for s in [(2, 3, 16, 8), (2, 3, 24, 8), (2, 3, 24, 8)])
MASK = jnp.asarray(_RS.random((16, 24)) > 0.3).at[:, 0].set(True)
KEY = jax.random.key(3)
COT_OUT = jnp.asarray(_RS.standard_normal((2, 3, 16, 8)), jnp.float32)
COT_W = jnp.asarray(_RS.standard_normal((2, 3, 16, 24)), jnp.float32)


def _autodiff_attention(q, k, v, mask, rate):
  logits = jnp.einsum("...qc,...kc->...qk", q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  w = jax.nn.softmax(logits, axis=-1)
  wd = dropout_lib.dropout(w, rate, KEY) if rate else w
  return wd @ v, w


@pytest.mark.parametrize("rate", [0.0, 0.25])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("use_weights", [False, True])
def test_matches_autodiff(rate, masked, use_weights):
  mask = MASK if masked else None

  def loss(f):
    def fn(q, k, v):
      out, w = f(q, k, v)
      extra = jnp.sum(w * COT_W) if use_weights else 0.0
      return jnp.sum(out * COT_OUT) + extra
    return fn

  ours = lambda q, k, v: attention.attention(  # noqa: E731
      q, k, v, mask=mask, dropout_rate=rate, dropout_key=KEY)
  ref = lambda q, k, v: _autodiff_attention(q, k, v, mask, rate)  # noqa
  for a, b in zip(ours(Q, K, V), ref(Q, K, V)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(Q, K, V)
  want = jax.grad(loss(ref), argnums=(0, 1, 2))(Q, K, V)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
  if masked:
    # No gradient reaches a key through masked-out logits only.
    assert np.isfinite(np.asarray(got[1])).all()


def test_dropout_uses_the_key_and_needs_one():
  a, _ = attention.attention(Q, K, V, dropout_rate=0.5, dropout_key=KEY)
  b, _ = attention.attention(Q, K, V, dropout_rate=0.5,
                             dropout_key=jax.random.key(4))
  c, _ = attention.attention(Q, K, V)
  assert not np.allclose(a, b) and not np.allclose(a, c)
  with pytest.raises(ValueError, match="dropout_key"):
    attention.attention(Q, K, V, dropout_rate=0.1)
  with pytest.raises(ValueError, match="dropout rate"):
    attention.attention(Q, K, V, dropout_rate=1.5, dropout_key=KEY)


def test_extreme_rates():
  # A rate that rounds to keeping everything, and one that drops everything.
  tiny, _ = attention.attention(Q, K, V, dropout_rate=1e-6, dropout_key=KEY)
  np.testing.assert_array_equal(tiny, attention.attention(Q, K, V)[0])
  grads = jax.grad(lambda v: jnp.sum(attention.attention(
      Q, K, v, dropout_rate=1.0, dropout_key=KEY)[0]))(V)
  np.testing.assert_array_equal(grads, np.zeros_like(V))


def test_gradients_keep_input_dtypes():
  q, k = Q.astype(jnp.bfloat16), K.astype(jnp.bfloat16)
  grads = jax.grad(lambda q, k, v: jnp.sum(
      attention.attention(q, k, v)[0].astype(jnp.float32)),
                   argnums=(0, 1, 2))(q, k, V)
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16, V.dtype]
