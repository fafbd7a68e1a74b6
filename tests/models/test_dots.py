"""The fast-backward matmuls equal autodiff and give XLA:CPU plain products."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decalign_jax.models import dots

_SHAPE = re.compile(r"%([\w.\-]+) = \w+\[([\d,]*)\]\{([\d,]*)\}")
_DOT = re.compile(r"\bdot\(%([\w.\-]+), %[\w.\-]+\).*?"
                  r"lhs_contracting_dims=\{(\d+)\}")


def _major_contracting_dots(hlo: str) -> list[str]:
  """Dots whose left operand contracts over a non-minor dimension."""
  layouts = {m[0]: [int(i) for i in m[2].split(",") if i]
             for m in _SHAPE.findall(hlo)}
  bad = []
  for line in hlo.splitlines():
    m = _DOT.search(line)
    if m and layouts[m[1]][0] != int(m[2]):
      bad.append(line.strip()[:160])
  return bad


def _random(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


CASES = {
    "linear": (dots.linear, lambda x, w: x @ w, [(4, 16, 8), (8, 6)]),
    # tn_product is a forward function of its own (attention's backward).
    "tn_product": (
        dots.tn_product,
        lambda a, b: jnp.einsum("bhqk,bhqc->bhkc", a, b),
        [(2, 2, 16, 24), (2, 2, 16, 8)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_value_and_gradients_equal_autodiff(name):
  fast, plain, shapes = CASES[name]
  args = [_random(s, i) for i, s in enumerate(shapes)]
  cot = _random(plain(*args).shape, 9)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * cot)  # noqa: E731
  np.testing.assert_array_equal(fast(*args), plain(*args))
  got = jax.jit(jax.grad(loss(fast), argnums=(0, 1)))(*args)
  want = jax.grad(loss(plain), argnums=(0, 1))(*args)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def _compiled(f, args):
  return jax.jit(f).lower(*args).compile().as_text()


def test_cpu_products_have_only_minor_contracting_dots():
  # XLA:CPU sends a dot to XNNPACK only if its left operand contracts over
  # the minor dimension; autodiff's backward of a Dense layer and a plain
  # `...qk,...qc->...kc` einsum do not. (At toy sizes, a few rows, XLA drops
  # the barriers and rewrites the products, which is harmless there; the
  # shapes here are small but real.)
  fast, plain, shapes = CASES["linear"]
  args = [_random(s, i) for i, s in enumerate(shapes)]
  grad = lambda f: jax.grad(  # noqa: E731
      lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1))
  fast_tn, plain_tn, tn_shapes = CASES["tn_product"]
  tn_args = [_random(s, i) for i, s in enumerate(tn_shapes)]
  for hlo in (_compiled(grad(fast), args), _compiled(fast_tn, tn_args)):
    assert _DOT.search(hlo), "no dot in the compiled product"
    assert _major_contracting_dots(hlo) == []
  # The check can fail: the plain forms have such a dot.
  assert _major_contracting_dots(_compiled(grad(plain), args))
  assert _major_contracting_dots(_compiled(plain_tn, tn_args))


def test_dense_dot_general_matches_flax_dense_and_falls_back():
  x = _random((3, 4, 6), 0)
  plain = nn.Dense(5)
  fast = nn.Dense(5, dot_general=dots.dense_dot_general)
  params = plain.init(jax.random.key(0), x)
  np.testing.assert_array_equal(fast.apply(params, x), plain.apply(params, x))
  g_fast = jax.grad(lambda p: jnp.sum(fast.apply(p, x) ** 2))(params)
  g_plain = jax.grad(lambda p: jnp.sum(plain.apply(p, x) ** 2))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
               g_fast, g_plain)
  # A non-Dense contraction goes to lax.dot_general unchanged.
  a, b = _random((4, 6), 1), _random((4, 5), 2)
  dims = (((0,), (0,)), ((), ()))
  np.testing.assert_array_equal(
      dots.dense_dot_general(a, b, dims),
      jax.lax.dot_general(a, b, dims))


@pytest.mark.parametrize("kernel,padding,pointwise", [
    ((1,), "VALID", True),   # the reference's Conv1d(kernel_size=1)
    ((3,), "VALID", False),  # wider kernels stay convolutions
    ((1,), "SAME", True),
])
def test_pointwise_conv_is_a_dense_layer(kernel, padding, pointwise):
  x = _random((3, 7, 6), 0)
  plain = nn.Conv(5, kernel, padding=padding, use_bias=False)
  fast = nn.Conv(5, kernel, padding=padding, use_bias=False,
                 conv_general_dilated=dots.dense_conv_general_dilated)
  params = plain.init(jax.random.key(0), x)
  np.testing.assert_allclose(fast.apply(params, x), plain.apply(params, x),
                             rtol=1e-5, atol=1e-6)
  loss = lambda m: lambda p, x: jnp.sum(m.apply(p, x) ** 2)  # noqa: E731
  grads = [jax.grad(loss(m), argnums=(0, 1))(params, x)
           for m in (fast, plain)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5), *grads)
  # Pointwise convolutions leave no convolution in the compiled backward.
  hlo = jax.jit(jax.grad(loss(fast))).lower(params, x).compile().as_text()
  assert ("convolution(" in hlo) != pointwise


@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_equals_flax_dense(use_bias):
  x = _random((3, 4, 6), 0)
  plain = nn.Dense(5, use_bias=use_bias,
                   bias_init=nn.initializers.normal(1.0))
  fast = dots.Dense(5, use_bias=use_bias,
                    bias_init=nn.initializers.normal(1.0))
  params = plain.init(jax.random.key(0), x)
  # Same parameters from the same key: a drop-in for checkpoints too.
  jax.tree.map(np.testing.assert_array_equal, fast.init(jax.random.key(0), x),
               params)
  np.testing.assert_allclose(fast.apply(params, x), plain.apply(params, x),
                             rtol=1e-6, atol=1e-6)
  loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply(p, x)))  # noqa: E731
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               jax.grad(loss(fast))(params), jax.grad(loss(plain))(params))


def test_bias_gradient_is_a_product_on_cpu():
  g = _random((4, 50, 16), 3)
  np.testing.assert_allclose(dots.column_sum(g), g.sum((0, 1)), rtol=1e-5,
                             atol=1e-5)
  y, b = _random((4, 50, 16), 4), _random((16,), 5)
  _, vjp = jax.vjp(dots.bias_add, y, b)
  dy, db = vjp(g)
  np.testing.assert_array_equal(dy, g)
  np.testing.assert_allclose(db, g.sum((0, 1)), rtol=1e-5, atol=1e-5)
  hlo = jax.jit(lambda g: vjp(g)[1]).lower(g).compile().as_text()
  assert re.search(r"\bdot\(", hlo) and not re.search(r"\breduce\(", hlo)
  # Other dtypes keep the plain reduction.
  h = g.astype(jnp.bfloat16)
  assert dots.column_sum(h).dtype == jnp.bfloat16
  np.testing.assert_allclose(dots.column_sum(h).astype(np.float32),
                             g.sum((0, 1)), rtol=0.05, atol=0.3)
