"""The fused CPU attention kernel equals the XLA attention path."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decalign_jax.models import attention
from decalign_jax.models import cpu_attention
from decalign_jax.models import decalign
from decalign_jax.models import transformer

_RS = np.random.default_rng(1)
KEY = jax.random.key(7)


def _operands(q_len, k_len, head_dim, lead=(3, 4)):
  shapes = [(*lead, q_len, head_dim), (*lead, k_len, head_dim),
            (*lead, k_len, head_dim), (*lead, q_len, head_dim)]
  return [jnp.asarray(_RS.standard_normal(s), jnp.float32) for s in shapes]


def _loss_and_grads(impl, q, k, v, g, mask, rate, heads_last=False):
  def loss(q, k, v):
    out, _ = attention.attention(q, k, v, mask=mask, dropout_rate=rate,
                                 dropout_key=KEY if rate else None,
                                 implementation=impl, heads_last=heads_last)
    return jnp.sum(out * g), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2),
                                               has_aux=True))(q, k, v)
  return out, grads


@pytest.mark.parametrize("q_len,k_len,head_dim,mask_kind,rate,heads_last", [
    (50, 100, 8, "causal_cross", 0.1, False),  # the MOSI shape
    (50, 100, 8, "none", 0.1, True),           # as MOSI runs it
    (50, 100, 8, "causal_cross", 0.0, True),
    (7, 7, 8, "causal", 0.3, False),           # one partial vector of keys
    (9, 70, 16, "none", 0.25, True),           # keys over two hash vectors
    (5, 13, 4, "random", 0.5, False),
    (5, 13, 4, "random", 0.5, True),
])
def test_matches_xla(q_len, k_len, head_dim, mask_kind, rate, heads_last):
  q, k, v, g = _operands(q_len, k_len, head_dim)
  if heads_last:  # [3, 4, T, C] as [B=3, T, H=4, C]: the same values moved
    q, k, v, g = (x.transpose(0, 2, 1, 3) for x in (q, k, v, g))
  mask = {
      "none": None,
      "causal": transformer.causal_mask(q_len, [k_len]),
      "causal_cross": transformer.causal_mask(q_len, [k_len // 2] * 2),
      "random": jnp.asarray(_RS.random((q_len, k_len)) > 0.4).at[:, 0].set(
          True),
  }[mask_kind]
  out_x, grads_x = _loss_and_grads("xla", q, k, v, g, mask, rate,
                                   heads_last)
  out_c, grads_c = _loss_and_grads("cpu", q, k, v, g, mask, rate, heads_last)
  np.testing.assert_allclose(out_c, out_x, rtol=2e-5, atol=2e-6)
  for gc, gx in zip(grads_c, grads_x):
    np.testing.assert_allclose(gc, gx, rtol=2e-5, atol=5e-6)


def test_same_dropout_mask_as_xla():
  # With values = identity rows, out = dropped weights: the kept positions
  # must be exactly those of dropout.random_bits16 (same key, same rows).
  k_len = 40
  q = jnp.asarray(_RS.standard_normal((2, 3, 6, 8)), jnp.float32) * 0.01
  k = jnp.asarray(_RS.standard_normal((2, 3, k_len, 8)), jnp.float32)
  v = jnp.zeros((2, 3, k_len, 8), jnp.float32).at[..., :8, :].set(
      jnp.eye(8))
  kw = dict(dropout_rate=0.5, dropout_key=KEY)
  out_x, _ = attention.attention(q, k, v, implementation="xla", **kw)
  out_c, _ = attention.attention(q, k, v, implementation="cpu", **kw)
  assert jnp.any(out_x == 0) and jnp.any(out_x != 0)
  np.testing.assert_array_equal(out_c == 0, out_x == 0)
  np.testing.assert_allclose(out_c, out_x, rtol=1e-5, atol=1e-7)


def test_fully_masked_row_gives_zeros_and_finite_gradients():
  # The documented difference from the XLA path (NaN there); the row shares
  # a block of four query rows with unmasked ones.
  q, k, v, g = _operands(6, 20, 8)
  mask = jnp.ones((6, 20), bool).at[2].set(False)
  out, grads = _loss_and_grads("cpu", q, k, v, g, mask, 0.2)
  np.testing.assert_array_equal(out[..., 2, :], 0.0)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))
  out_x, _ = _loss_and_grads("xla", q, k, v, g, mask, 0.2)
  rows = np.array([0, 1, 3, 4, 5])
  np.testing.assert_allclose(out[..., rows, :], out_x[..., rows, :],
                             rtol=2e-5, atol=2e-6)


def test_heads_last_is_the_same_attention_in_another_layout():
  q, k, v, _ = _operands(6, 12, 8)
  mask = transformer.causal_mask(6, [6, 6])
  kw = dict(mask=mask, dropout_rate=0.3, dropout_key=KEY)
  t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
  first, w_first = attention.attention(q, k, v, implementation="cpu", **kw)
  for impl in ("cpu", "xla"):
    last, w_last = attention.attention(t(q), t(k), t(v), implementation=impl,
                                       heads_last=True, **kw)
    np.testing.assert_allclose(t(last), first, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(w_last, w_first, rtol=2e-5, atol=2e-6)
  with pytest.raises(ValueError, match=r"mask has shape \(4, 4\)"):
    cpu_attention.attention(t(q), t(k), t(v), jnp.ones((4, 4), bool), None,
                            0.0, heads_last=True)


def test_weights_output_and_its_gradient():
  q, k, v, _ = _operands(6, 10, 8)
  cot = jnp.asarray(_RS.standard_normal((3, 4, 6, 10)), jnp.float32)

  def loss(impl):
    def fn(q, k, v):
      out, w = attention.attention(q, k, v, dropout_rate=0.2,
                                   dropout_key=KEY, implementation=impl)
      return jnp.sum(out) + jnp.sum(w * cot)
    return jax.grad(fn, (0, 1, 2))(q, k, v)

  for gc, gx in zip(loss("cpu"), loss("xla")):
    np.testing.assert_allclose(gc, gx, rtol=2e-5, atol=5e-6)


def test_unsupported_operands_take_the_xla_path():
  q, k, v, _ = _operands(4, 6, 6)  # head dim 6 has no kernel
  assert not cpu_attention.supports(q, k, None)
  assert cpu_attention.supports(*_operands(4, 6, 8)[:2], KEY)
  assert not cpu_attention.supports(
      *_operands(4, 6, 8)[:2], jax.random.key(0, impl="rbg"))
  out_c, _ = attention.attention(q, k, v, implementation="cpu")
  out_x, _ = attention.attention(q, k, v, implementation="xla")
  np.testing.assert_array_equal(out_c, out_x)
  with pytest.raises(ValueError, match="implementation='gpu'"):
    attention.attention(q, k, v, implementation="gpu")


@pytest.mark.parametrize("attn_mask", [True, False])
def test_model_loss_and_gradients_match_xla(attn_mask):
  rs = np.random.default_rng(3)
  b, t = 4, 10
  x = [jnp.asarray(rs.standard_normal((b, t, d)), jnp.float32)
       for d in (12, 5, 7)]

  def run(impl):
    model = decalign.DecAlign(
        feature_dims=(12, 5, 7), d_model=16, num_heads=2, num_layers=2,
        attn_dropout=0.2, attn_dropout_a=0.1, relu_dropout=0.1,
        res_dropout=0.1, embed_dropout=0.1, attn_mask=attn_mask,
        attention_kernel=impl)
    params = model.init(jax.random.key(0), *x)["params"]

    def loss(params):
      logits, aux = model.apply({"params": params}, *x, train=True,
                                rngs={"dropout": jax.random.key(5)})
      return jnp.mean(logits**2) + sum(aux["losses"].values())

    return jax.jit(jax.value_and_grad(loss))(params)

  (loss_c, grads_c), (loss_x, grads_x) = run("cpu"), run("xla")
  np.testing.assert_allclose(loss_c, loss_x, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               grads_c, grads_x)


def test_resolve():
  assert cpu_attention.resolve("xla") == "xla"
  assert cpu_attention.resolve("cpu") == "cpu"
  # This test process has 8 CPU devices: 'auto' keeps GSPMD-partitionable XLA.
  assert jax.device_count() > 1 and cpu_attention.resolve("auto") == "xla"
  with pytest.raises(ValueError, match=r"model.attention_kernel='fast'"):
    cpu_attention.resolve("fast")


def test_without_a_compiler_auto_falls_back_and_cpu_raises(tmp_path):
  script = (
      "import warnings, jax\n"
      "from decalign_jax.models import cpu_attention as c\n"
      "with warnings.catch_warnings(record=True) as w:\n"
      "  warnings.simplefilter('always')\n"
      "  print(c.resolve('auto'), len(w), 'unavailable' in str(w[0].message))\n"
      "try:\n"
      "  c.resolve('cpu')\n"
      "except ValueError as e:\n"
      "  print('raised', 'no-such-compiler' in str(e))\n")
  env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"),
             DECALIGN_JAX_KERNEL_CACHE=str(tmp_path / "cache"),
             JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device, where 'auto' would pick the kernel
  proc = subprocess.run([sys.executable, "-c", script], env=env,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["xla", "1", "True", "raised", "True"]
  assert not (tmp_path / "cache").exists()  # nothing half-built left behind


def test_unwritable_cache_is_reported_as_unavailable(tmp_path, monkeypatch):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  monkeypatch.setenv("DECALIGN_JAX_KERNEL_CACHE", str(blocker / "kernels"))
  with pytest.raises(cpu_attention.KernelUnavailable, match="a_file"):
    cpu_attention.build()
